"""attnlens: open up the attention of Hugging Face GPT-2 checkpoints, and check that the numbers are the model's own.

Importing attnlens has no side effects and loads neither transformers nor any plotting library; the modules that
need them load them when first used.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from attnlens import functional
from attnlens.errors import AttentionCaptureError, UnsupportedModelError
from attnlens.models import extract_weights

# Imported eagerly (it needs neither transformers nor plotting): were it lazy, importing the submodule
# attnlens.trace would bind the name ``attnlens.trace`` to the module instead of the function.
from attnlens.trace import AttentionTrace, trace
from attnlens.weights import FactoredMatrix, LayerNormWeights, LayerWeights, MLPWeights, ModelWeights

if TYPE_CHECKING:
    from attnlens import metrics, viz
    from attnlens.demo import load_demo
    from attnlens.verify import VerificationReport, VerificationRow, verify

__version__ = "0.1.0"

__all__ = [
    "AttentionCaptureError",
    "AttentionTrace",
    "FactoredMatrix",
    "LayerNormWeights",
    "LayerWeights",
    "MLPWeights",
    "ModelWeights",
    "UnsupportedModelError",
    "VerificationReport",
    "VerificationRow",
    "__version__",
    "extract_weights",
    "functional",
    "load_demo",
    "metrics",
    "trace",
    "verify",
    "viz",
]

# Public names defined in modules that are imported on first use.
_LAZY = {
    "VerificationReport": "attnlens.verify",
    "VerificationRow": "attnlens.verify",
    "verify": "attnlens.verify",
    "load_demo": "attnlens.demo",
    "metrics": None,
    "viz": None,
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'attnlens' has no attribute {name!r}")
    module_name = _LAZY[name]
    if module_name is None:
        return importlib.import_module(f"attnlens.{name}")
    return getattr(importlib.import_module(module_name), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The attnlens package: ``attnlens.verify`` and ``attnlens.trace`` stay the functions.

    Importing a submodule binds it on its package under its own name, so ``import attnlens.verify`` (or any
    ``from attnlens.verify import ...``) would otherwise replace the function ``attnlens.verify`` by its module.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
