"""How extracted weights follow the model: each tracked tensor re-reads its parameter when that parameter changed.

The mechanism behind :mod:`attnlens.weights`' "never stale" promise (see that module's docstring): ``_Source`` (one
tracked tensor), ``_Live`` (the base of the weights dataclasses, reading tracked fields through their source) and
:func:`track`, which the adapters call once after extraction. Zeros that stand in for a parameter a model lacks (an
absent bias, an RMSNorm's shift) are made by :func:`zeros_beside` and follow the parameter beside them.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from attnlens.errors import StaleWeightsError

if TYPE_CHECKING:
    from attnlens.weights import ModelWeights

__all__ = ["track", "zeros_beside"]

# The attribute by which zeros_beside marks its zeros with the parameter they stand beside (read by track).
_BESIDE = "_attnlens_beside"


class _Source:
    """One tracked tensor: the model parameter it is read from, where that parameter lives, and how to read it."""

    __slots__ = ("label", "layout", "owners", "param", "ptr", "requires_grad", "tensor", "view")

    def __init__(self, label: str, tensor: Tensor, param: Tensor, owners: tuple[tuple[nn.Module, str, str], ...]):
        self.label = label
        self.owners = owners  # (module, attribute, qualified name) of every slot holding the parameter
        self.layout = (param.shape, param.stride())
        rel = tensor.storage_offset() - param.storage_offset()
        self.view = None if tensor is param else (tensor.shape, tensor.stride(), rel)
        self._take(param, tensor)

    def _take(self, param: Tensor, tensor: Tensor) -> None:
        self.param, self.tensor = param, tensor
        # The parameter's flag: a view taken with autograd on has it too, and a stand-in's zeros never do.
        self.ptr, self.requires_grad = param.data_ptr(), param.requires_grad

    def current(self) -> Tensor:
        param = self.param
        for module, name, _ in self.owners:
            if module._parameters.get(name) is not param:
                param = self._replacement()
                break
        tensor = self.tensor
        # While the old view lives its storage cannot be reused, so an equal data_ptr means the same storage.
        if (
            param is self.param
            and param.data_ptr() == self.ptr
            and param.requires_grad == self.requires_grad
            and param.dtype == tensor.dtype
            and param.device == tensor.device
        ):
            return tensor
        return self._retake(param)

    def _replacement(self) -> Tensor:
        held = [module._parameters.get(name) for module, name, _ in self.owners]
        names = ", ".join(qualified for _, _, qualified in self.owners)
        if not isinstance(held[0], Tensor) or any(h is not held[0] for h in held):
            raise StaleWeightsError(
                f"{self.label}: the model's parameter {names} was removed, or replaced by different objects in the "
                "modules that shared it; extract the weights again (attnlens.extract_weights(model))"
            )
        return held[0]

    def _retake(self, param: Tensor) -> Tensor:
        if self.view is None:
            self._take(param, param)
            return param
        self._check_layout(param)
        size, stride, rel = self.view
        with torch.enable_grad():
            tensor = param.as_strided(size, stride, param.storage_offset() + rel)
        self._take(param, tensor)
        return tensor

    def _check_layout(self, param: Tensor) -> None:
        if (param.shape, param.stride()) != self.layout:
            raise StaleWeightsError(
                f"{self.label}: the model's parameter {self.owners[0][2]} changed shape or layout from "
                f"{tuple(self.layout[0])} / {self.layout[1]} to {tuple(param.shape)} / {param.stride()}; extract the "
                "weights again (attnlens.extract_weights(model))"
            )


class _StandIn(_Source):
    """Zeros standing in for a parameter the model lacks, beside ``param``.

    New zeros in that parameter's dtype and on its device whenever it changed, as the views beside them are taken again.
    """

    __slots__ = ()

    def _retake(self, param: Tensor) -> Tensor:
        self._check_layout(param)
        tensor = param.new_zeros(self.tensor.shape)
        self._take(param, tensor)
        return tensor


def zeros_beside(tensor: Tensor, *shape: int) -> Tensor:
    """Zeros ``shape`` standing in for a parameter the model lacks, beside ``tensor`` (a parameter or a view of one).

    Once :func:`track`ed they follow that parameter's dtype and device (``model.half()``, ``model.to(...)``), as the
    views of the parameters around them do; zeros made with ``new_zeros`` would stay as they were made.
    """
    zeros = tensor.new_zeros(shape)
    setattr(zeros, _BESIDE, tensor if tensor._base is None else tensor._base)
    return zeros


class _Live:
    """Base of the weights dataclasses: a field that has a ``_Source`` is read through it (see the module docstring)."""

    _sources: dict[str, _Source]

    def __getattribute__(self, name: str) -> Any:
        if name[0] != "_":
            source = object.__getattribute__(self, "_sources").get(name)
            if source is not None:
                return source.current()
        return object.__getattribute__(self, name)

    def __getstate__(self) -> dict[str, Any]:
        # Pickles and deep copies are values: the current tensors (detached: torch copies only graph leaves), no
        # modules.
        assert is_dataclass(self)
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in state.items()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_sources", {})


def _describe(obj: Any) -> str:
    """A repr that shows tensors as shapes: the values of a 38M-parameter embedding are no use in a repr."""
    parts = []
    for f in fields(obj):
        if not f.repr:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, Tensor):
            parts.append(f"{f.name}={list(value.shape)}")
        elif isinstance(value, tuple) and value and not isinstance(value[0], (int, float)):
            parts.append(f"{f.name}=({len(value)} x {type(value[0]).__name__})")
        else:
            parts.append(f"{f.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


def track(weights: ModelWeights, model: nn.Module) -> ModelWeights:
    """Make every tensor of ``weights`` that is a model parameter, or a view of one, follow the model (in place).

    Called by the adapters once, right after extraction; generic over architectures: it matches tensors to the
    parameters of ``model``'s modules, whatever their names.

    Returns:
        ``weights``, now tracking ``model``.
    """
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, name, f"{prefix}.{name}" if prefix else name))

    def visit(obj: _Live, label: str) -> None:
        assert is_dataclass(obj)
        sources = object.__getattribute__(obj, "_sources")
        for f in fields(obj):
            value = object.__getattribute__(obj, f.name)
            if isinstance(value, _Live):
                visit(value, f"{label}.{f.name}")
            elif isinstance(value, tuple) and value and isinstance(value[0], _Live):
                for i, item in enumerate(value):
                    visit(item, f"{label}.{f.name}[{i}]")
            elif isinstance(value, Tensor):
                root = value if value._base is None else value._base
                beside = getattr(root, _BESIDE, None)  # a stand-in (or a view of one): it follows that parameter
                param = root if beside is None else beside
                slots = owners.get(id(param))
                if slots:
                    kind = _Source if beside is None else _StandIn
                    sources[f.name] = kind(f"{label}.{f.name}", value, param, tuple(slots))

    visit(weights, "weights")
    return weights
