"""Forward hooks on a live model, and the guarantee that the model is left exactly as it was found.

Every hook registered here is removed when its ``with`` block ends, also when the block raises. ``preserved``
restores what attnlens may touch while running a model (training flag, attention implementation, grad mode) and
checks afterwards that no hook of ours is left behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from attnlens.models import gpt2

__all__ = ["StopForward", "forward_hooks", "preserved", "run_until"]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early, once everything asked for has been captured."""


Hook = Callable[..., Any]


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[tuple[Any, Hook]], *, with_kwargs: bool = False, pre: bool = False) -> Iterator[None]:
    """Register forward (or forward-pre) hooks for the duration of a ``with`` block; always removed after.

    Args:
        hooks: ``(module, hook)`` pairs, with torch's hook signatures.
        with_kwargs: pass the module's keyword arguments to the hooks.
        pre: register forward-pre hooks instead of forward hooks.
    """
    handles: list[RemovableHandle] = []
    try:
        for module, hook in hooks:
            if pre:
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
            else:
                handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@contextlib.contextmanager
def preserved(model: Any, *, eval_mode: bool = True, attn_implementation: str | None = None) -> Iterator[None]:
    """Run a block with the model in eval mode (and optionally another attention kernel), then restore it.

    Restores the training flag of every submodule, the attention implementation and torch's grad mode, also when
    the block raises.

    Args:
        model: a supported GPT-2 model.
        eval_mode: put the model in eval mode (dropout off) for the block.
        attn_implementation: switch to this attention kernel for the block (e.g. ``"eager"``).
    """
    training = [(m, m.training) for m in model.modules()]
    implementation = gpt2.attn_implementation(model)
    hooks_before = _hook_counts(model)
    grad = torch.is_grad_enabled()
    try:
        if eval_mode and any(flag for _, flag in training):  # eval() walks every module: skip it when a no-op
            model.eval()
        if attn_implementation is not None:
            gpt2.set_attn_implementation(model, attn_implementation)
        yield
    finally:
        torch.set_grad_enabled(grad)
        if gpt2.attn_implementation(model) != implementation:
            gpt2.set_attn_implementation(model, implementation)
        for module, flag in training:
            if module.training != flag:
                module.training = flag
        if _hook_counts(model) != hooks_before:  # pragma: no cover - a bug in attnlens if it ever fires
            raise RuntimeError("attnlens left a hook on the model; please report this")


def run_until(forward: Callable[[], Any]) -> bool:
    """Run ``forward()``; return True if a hook stopped it early with :class:`StopForward`, False if it finished."""
    try:
        forward()
    except StopForward:
        return True
    return False
