"""attnlens: open up the attention of Hugging Face GPT-2 checkpoints, and check that the numbers are the model's own.

Importing attnlens has no side effects and loads neither transformers nor any plotting library; the modules that
need them load them when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from attnlens import functional
from attnlens.ablation import ablate, head_importance
from attnlens.errors import (
    AttentionCaptureError,
    PositionDependentCircuitError,
    StaleWeightsError,
    UnknownConfigWarning,
    UnsupportedModelError,
    strict_config,
)
from attnlens.generation import GenerationRecorder, GenerationTrace, trace_generate, tracing_generation
from attnlens.loading import load
from attnlens.models import extract_weights

# trace, verify and scan are imported eagerly (none needs transformers nor plotting). Were they lazy, a later
# `import attnlens.verify` would bind the name `attnlens.verify` to the module instead of the function.
from attnlens.scan import ScanResult, scan
from attnlens.trace import AttentionTrace, trace
from attnlens.verify import VerificationReport, VerificationRow, verify
from attnlens.weights import FactoredMatrix, LayerNormWeights, LayerWeights, MLPWeights, ModelWeights

if TYPE_CHECKING:
    from attnlens import metrics, viz
    from attnlens.demo import load_demo

__version__ = "0.1.0"

__all__ = [
    "AttentionCaptureError",
    "AttentionTrace",
    "FactoredMatrix",
    "GenerationRecorder",
    "GenerationTrace",
    "LayerNormWeights",
    "LayerWeights",
    "MLPWeights",
    "ModelWeights",
    "PositionDependentCircuitError",
    "ScanResult",
    "StaleWeightsError",
    "UnknownConfigWarning",
    "UnsupportedModelError",
    "VerificationReport",
    "VerificationRow",
    "__version__",
    "ablate",
    "extract_weights",
    "functional",
    "head_importance",
    "load",
    "load_demo",
    "metrics",
    "scan",
    "strict_config",
    "trace",
    "trace_generate",
    "tracing_generation",
    "verify",
    "viz",
]


def __getattr__(name: str) -> Any:
    # These submodules and load_demo (in attnlens.demo) load on first use, so `import attnlens` stays light.
    if name in ("attribution", "circuits", "metrics", "residual", "viz"):
        return importlib.import_module(f"attnlens.{name}")
    if name == "load_demo":
        return importlib.import_module("attnlens.demo").load_demo
    raise AttributeError(f"module 'attnlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
