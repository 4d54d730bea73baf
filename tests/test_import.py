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
    hf_path = re.compile(r"\.h\[|\bc_attn\b|\bc_proj\b|\bc_fc\b|\bwte\b|\bwpe\b|\blm_head\b|\.transformer\b")
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if "models" in path.relative_to(root).parts or "demo" in path.relative_to(root).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # ModelWeights.ln_f (like LayerWeights.ln_1) is an attnlens field named after GPT-2, not a module path.
            if hf_path.search(line) or re.search(r"\bln_f\b", line.replace("weights.ln_f", "").replace("ln_f:", "")):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not offenders, "Hugging Face module paths outside attnlens/models/:\n" + "\n".join(offenders)
