"""Wrappers and states that users leave a model in, for any architecture: torch.compile, PEFT, accelerate, meta.

* Seen through, because that is exact: ``torch.compile(model)`` (an ``OptimizedModule`` holding the very model),
  PEFT's model classes, and PEFT adapter layers that compute exactly what their base layer does (adapters disabled
  and unmerged, or merged and enabled).
* Refused by name, because the parameters are not what the model computes with: active (unmerged) adapters, adapters
  merged but disabled (peft unmerges them on the next forward), parameters on the meta device (offloaded by
  accelerate, or never loaded), modules compiled on their own (``Module.compile()``, ``torch.compile`` of a block),
  whose compiled code would run instead of the modules attnlens hooks, and modules whose class is not exactly the
  one an adapter expects (:func:`check_exact`: a hand-made LoRA wrapper, a subclass).

torch's compiler and peft are looked up only if the user has already imported them, so that checking a model never
imports them (``import attnlens`` stays light).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from torch import nn

from attnlens.errors import UnsupportedModelError

__all__ = ["check_exact", "check_state", "is_compiled", "plain", "unwrap"]


def _loaded_class(module: str, name: str) -> Any:
    """A class from a module, only if something already imported that module (no model can be its instance else)."""
    found = sys.modules.get(module)
    return getattr(found, name, None) if found is not None else None


def _compiled_class() -> Any:
    return _loaded_class("torch._dynamo.eval_frame", "OptimizedModule")


def _tuner_layer_class() -> Any:
    return _loaded_class("peft.tuners.tuners_utils", "BaseTunerLayer")


def _runs_compiled(module: nn.Module, compiled: Any) -> bool:
    """A ``torch.compile`` wrapper (``compiled``: its class, or None) or a module compiled in place (``.compile()``)."""
    return (compiled is not None and isinstance(module, compiled)) or getattr(
        module, "_compiled_call_impl", None
    ) is not None


def is_compiled(model: nn.Module) -> bool:
    """Whether the model, or any module inside it, runs compiled code (a ``torch.compile`` wrapper, ``.compile()``)."""
    compiled = _compiled_class()
    return any(_runs_compiled(module, compiled) for module in model.modules())


def unwrap(model: Any) -> Any:
    """The model inside the wrappers attnlens sees through: ``torch.compile`` and PEFT's model classes.

    Seeing through ``torch.compile(model)`` is exact: the wrapper holds the very model (``_orig_mod``), whose
    parameters are the compiled code's parameters, and attnlens only ever runs the uncompiled transformer. Its
    patterns are then the model's maths as the eager twin computes it (compiled code computes the same function,
    with at most float rounding of its own, like the sdpa kernel). A ``PeftModel`` (and its ``LoraModel``) holds the
    model with adapter layers in place of some modules; :func:`check_state` checks those layers.
    """
    compiled = _compiled_class()
    peft_model = _loaded_class("peft.peft_model", "PeftModel")
    tuner = _loaded_class("peft.tuners.tuners_utils", "BaseTuner")
    for _ in range(8):  # wrappers nest (a compiled PeftModel, say); a fixed bound rules out cycles
        if compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        elif peft_model is not None and isinstance(model, peft_model):
            model = model.get_base_model()
        elif tuner is not None and isinstance(model, tuner):
            model = model.model
        else:
            break
    return model


def check_state(model: nn.Module, base: nn.Module) -> None:
    """Refuse the states in which a model's parameters are not what it computes with, or cannot be run uncompiled."""
    # One plain walk over the modules' own tensors (this runs on every extraction); names only to word the error.
    modules = list(model.modules())
    if any(t is not None and t.is_meta for m in modules for t in (*m._parameters.values(), *m._buffers.values())):
        meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        offloaded = any(hasattr(m, "_hf_hook") for m in modules)
        why = (
            "offloaded by accelerate (a device_map with 'disk', 'cpu' offload or 'meta': the weights exist only "
            "while a module runs)"
            if offloaded
            else "never loaded (created under init_empty_weights or torch.device('meta'))"
        )
        raise UnsupportedModelError(
            f"{len(meta)} parameter(s) of this model are on the meta device, {why}: {', '.join(meta[:4])}"
            f"{', ...' if len(meta) > 4 else ''}; attnlens needs the weights themselves: load the model onto one "
            "device (from_pretrained without a device_map that offloads), or load its state dict first"
        )
    compiled, tuner = _compiled_class(), _tuner_layer_class()
    for module in base.modules():
        if module is base:  # the transformer itself is run uncompiled (Sites.run); its blocks cannot be
            continue
        if _runs_compiled(module, compiled):
            name = next(n for n, m in base.named_modules() if m is module)
            raise UnsupportedModelError(
                f"module {name or 'transformer'!r} is compiled on its own (torch.compile of a block, or "
                "Module.compile()): attnlens hooks and runs the uncompiled modules; compile the whole model with "
                "torch.compile(model) instead, whose wrapper attnlens sees through"
            )
    if tuner is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, tuner) and not _base_layer_is_exact(module):
            state = (
                "merged but disabled (peft unmerges it, changing the weights, on the next forward)"
                if module.disable_adapters
                else "active and unmerged (the model computes the base weights plus the adapter's update, which "
                "attnlens does not extract)"
            )
            raise UnsupportedModelError(
                f"{name} carries a PEFT adapter ({', '.join(module.active_adapters)}) that is {state}; call "
                "model.merge_and_unload() first (or, to study the base model, disable the unmerged adapter: "
                "with model.disable_adapter(): ...)"
            )


def _base_layer_is_exact(layer: Any) -> bool:
    """Whether a PEFT adapter layer computes exactly what its base layer does (and leaves its weights alone).

    peft's adapter layers run the base layer alone when their adapters are disabled and unmerged, or merged (into
    the base weights) and enabled. Disabled but merged, they unmerge on the next forward, changing the weights.
    """
    return bool(layer.disable_adapters) != bool(layer.merged)


def check_exact(modules: Iterable[tuple[str, Any]], expected: type, expected_name: str) -> None:
    """Refuse each ``(what, module)`` whose module is not exactly of class ``expected`` (seen through :func:`plain`).

    attnlens reads a projection's weights from the class it knows. A subclass, or a wrapper around one (a hand-made
    LoRA holding the base layer and low-rank factors, say), may compute anything from them, and may even pass the
    base layer's ``weight`` through, so only the exact class is trusted, whatever the module wraps. PEFT's adapter
    layers are checked by :func:`check_state` and seen through when exact.
    """
    tuner = _tuner_layer_class()
    for what, module in modules:
        inner = module.get_base_layer() if tuner is not None and isinstance(module, tuner) else module
        if type(inner) is not expected:
            raise UnsupportedModelError(
                f"{what} is a {type(inner).__module__}.{type(inner).__qualname__}, not {expected_name}: attnlens "
                "reads the weights of the modules it knows and cannot tell what another computes (a wrapper's own "
                "update, say); merge any update into the weights and put the original module back, or use PEFT's "
                "LoRA, whose adapter layers attnlens checks"
            )


def plain(module: Any) -> Any:
    """The module itself, or the base layer of a PEFT adapter layer (checked exact by :func:`base_model`)."""
    tuner = _tuner_layer_class()
    if tuner is not None and isinstance(module, tuner):
        return module.get_base_layer()
    return module
