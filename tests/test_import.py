"""The public surface: names import, and `import attnlens` stays light."""

from __future__ import annotations

import subprocess
import sys

import attnlens


def test_public_names_resolve() -> None:
    for name in attnlens.__all__:
        assert getattr(attnlens, name) is not None, name
    assert attnlens.__version__.count(".") == 2


def test_import_is_light() -> None:
    code = (
        "import sys, attnlens; "
        "heavy = ('transformers', 'matplotlib', 'IPython', 'nbformat', 'safetensors'); "
        "heavy = [m for m in heavy if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import attnlens pulled in {out.stdout.strip()}"


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        attnlens.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("expected AttributeError")


def test_submodule_imports_do_not_shadow_functions() -> None:
    import attnlens.trace
    import attnlens.verify

    assert callable(attnlens.trace) and callable(attnlens.verify)
    assert attnlens.metrics.__name__ == "attnlens.metrics"
    assert callable(attnlens.load_demo)


def test_only_models_know_hugging_face_paths() -> None:
    """Everything outside attnlens/models/ is written against the adapter's sites, never against HF module paths."""
    import re
    from pathlib import Path

    root = Path(attnlens.__file__).parent
    hf_path = re.compile(
        r"\.h\[|\bc_attn\b|\bc_proj\b|\bc_fc\b|\bwte\b|\bwpe\b|\blm_head\b|\.transformer\b"
        # GPT-NeoX's: its module paths and class names (the config keys are caught by the adapter rule below).
        r"|\bgpt_neox\b|\bquery_key_value\b|\bembed_in\b|\bembed_out\b|\bdense_h_to_4h\b|GPTNeoX"
    )
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if "models" in path.relative_to(root).parts or "demo" in path.relative_to(root).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # ModelWeights.ln_f (like LayerWeights.ln_1) is an attnlens field named after GPT-2, not a module path.
            if hf_path.search(line) or re.search(r"\bln_f\b", line.replace("weights.ln_f", "").replace("ln_f:", "")):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not offenders, "Hugging Face module paths outside attnlens/models/:\n" + "\n".join(offenders)


# The adapter rule (docs/DESIGN): outside attnlens/models/, code is written against attnlens.models.Adapter only.
_GENERIC_MODEL_MODULES = {"attnlens.models", "attnlens.models.base", "attnlens.models.wrappers"}


def adapter_rule_offences(source: str) -> list[str]:
    """Where ``source`` imports a specific adapter (or its config policy) or reads a model config, one line each.

    Read from the syntax tree, so that strings and comments that name them do not count and no spelling escapes:
    ``from attnlens.models import gpt2``, ``import attnlens.models.gpt2``, ``attnlens.models.gpt2.x``,
    ``model.config``, ``config.n_head``, ``getattr(model, "config")``.
    """
    import ast
    import importlib.util

    def specific(module: str) -> bool:
        return module.startswith("attnlens.models.") and module not in _GENERIC_MODEL_MODULES

    def submodule(name: str) -> bool:
        return importlib.util.find_spec(f"attnlens.models.{name}") is not None

    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [alias.name for alias in node.names]
            if specific(node.module) or (
                node.module == "attnlens.models"
                and any(submodule(n) and specific(f"attnlens.models.{n}") for n in names)
            ):
                found.append(f"{where}: imports from {node.module} {names}")
        elif isinstance(node, ast.Import):
            found += [f"{where}: imports {a.name}" for a in node.names if specific(a.name)]
        elif isinstance(node, ast.Attribute):
            if node.attr == "config":
                found.append(f"{where}: reads .config")
            elif (
                isinstance(node.value, ast.Attribute)
                and node.value.attr == "models"
                and submodule(node.attr)
                and specific(f"attnlens.models.{node.attr}")
            ):
                found.append(f"{where}: uses models.{node.attr}")
        elif isinstance(node, ast.Name) and node.id == "config":
            found.append(f"{where}: uses a name 'config'")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value == "config"
        ):
            found.append(f"{where}: {node.func.id}(..., 'config')")
    return found


def test_the_adapter_rule_check_finds_every_spelling() -> None:
    source = (
        "from attnlens.models import gpt2\n"
        "from attnlens.models.gpt2_config import unknown_keys\n"
        "import attnlens.models.gpt2\n"
        "n = attnlens.models.gpt2.sites\n"
        "h = model.config.n_head\n"
        "c = getattr(model, 'config')\n"
        "from attnlens.models import Adapter, adapt\n"
        "from attnlens.models.wrappers import is_compiled\n"
        "s = 'model.config.n_head is named in a string'\n"
    )
    offences = adapter_rule_offences(source)
    lines = sorted({int(o.split(":")[0].removeprefix("line ")) for o in offences})
    assert lines == [1, 2, 3, 4, 5, 6], offences


def test_only_models_import_adapters_and_read_configs() -> None:
    """Nothing outside attnlens/models/ imports a specific adapter or reads a config field: the Adapter carries it."""
    from pathlib import Path

    root = Path(attnlens.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        # demo/train.py builds and trains the demo GPT-2 from its own config: a script, not the library.
        if relative.parts[0] == "models" or relative == Path("demo/train.py"):
            continue
        offenders += [f"{relative}: {offence}" for offence in adapter_rule_offences(path.read_text())]
    assert not offenders, "the adapter rule is broken outside attnlens/models/:\n" + "\n".join(offenders)
