"""Forward hooks on a live model, one attnlens call per model at a time, and the model left as it was found.

Every hook registered here is removed when its ``with`` block ends, also when the block raises, and acts only in
the thread that registered it: a forward pass that the user runs on the same model from another thread at the same
time passes through attnlens's hooks untouched. ``preserved`` restores what attnlens may change while running a
model (training flags, attention implementation, grad mode). :func:`one_at_a_time` serialises attnlens's own calls
on one model with a per-model re-entrant lock, kept in a weak dictionary beside the model (never on it).

Caveat: a forward pass the user runs from another thread while attnlens is running the same model sees the state
attnlens gives it for that time: eval mode, if attnlens found the model training, and (during :func:`attnlens.verify`
of a model that does not run eager) the eager kernel. Its result is otherwise untouched.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from attnlens.models import Adapter, adapt, lock_key

__all__ = [
    "StopForward",
    "forward_hooks",
    "intervening",
    "model_lock",
    "one_at_a_time",
    "preserved",
    "run_until",
]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early, once everything asked for has been captured."""


Hook = Callable[..., Any]
P = ParamSpec("P")
R = TypeVar("R")

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module | Adapter) -> threading.RLock:
    """The re-entrant lock that attnlens holds while it runs or changes ``model`` (one per model, created once)."""
    key = lock_key(model.model if isinstance(model, Adapter) else model)
    with _LOCKS_GUARD:  # two threads asking for the first time must get the same lock
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.RLock()
    return lock


def one_at_a_time(function: Callable[P, R]) -> Callable[P, R]:
    """Decorate a function whose first argument (or ``model=``) is a model: hold that model's lock for the call.

    Calls on different models run in parallel; calls on one model run one after the other, each seeing the model as
    its caller left it. Anything but an ``nn.Module`` or an :class:`~attnlens.models.Adapter` (a checkpoint name,
    say) runs without a lock.
    """

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        model = args[0] if args else kwargs.get("model")
        if not isinstance(model, (nn.Module, Adapter)):
            return function(*args, **kwargs)
        with model_lock(model):
            return function(*args, **kwargs)

    return wrapper


class _OwnHook:
    """One of attnlens's hooks: it acts in the thread that registered it, and lets other threads' passes through."""

    __slots__ = ("hook", "intervenes", "owner")

    def __init__(self, hook: Hook, intervenes: bool = False) -> None:
        self.hook = hook
        self.owner = threading.get_ident()
        self.intervenes = intervenes

    def __call__(self, *args: Any) -> Any:
        # torch treats None as "no change" for forward and forward-pre hooks alike.
        if threading.get_ident() != self.owner:
            return None
        return self.hook(*args)


@contextlib.contextmanager
def forward_hooks(
    hooks: Iterable[tuple[nn.Module, Hook]], *, with_kwargs: bool = False, pre: bool = False, intervening: bool = False
) -> Iterator[None]:
    """Register forward (or forward-pre) hooks for the duration of a ``with`` block; always removed after.

    The hooks act only on forward passes run by the thread that entered the block.

    Args:
        hooks: ``(module, hook)`` pairs, with torch's hook signatures.
        with_kwargs: pass the module's keyword arguments to the hooks.
        pre: register forward-pre hooks instead of forward hooks.
        intervening: the hooks change what the model computes (see :func:`intervening`).
    """
    handles: list[RemovableHandle] = []
    try:
        for module, hook in hooks:
            own = _OwnHook(hook, intervening)
            if pre:
                handles.append(module.register_forward_pre_hook(own, with_kwargs=with_kwargs))
            else:
                handles.append(module.register_forward_hook(own, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _own_hooks(model: nn.Module) -> list[_OwnHook]:
    return [
        hook
        for m in model.modules()
        for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
        if isinstance(hook, _OwnHook)
    ]


def intervening(model: nn.Module) -> bool:
    """Whether hooks that change what ``model`` computes act in this thread (an :func:`attnlens.ablate` block)."""
    me = threading.get_ident()
    return any(hook.intervenes and hook.owner == me for hook in _own_hooks(model))


@contextlib.contextmanager
def preserved(
    model: nn.Module | Adapter, *, eval_mode: bool = True, attn_implementation: str | None = None
) -> Iterator[None]:
    """Run a block with the model in eval mode (and optionally another attention kernel), then restore it.

    Holds the model's lock (:func:`model_lock`) throughout. Undoes exactly what it changed, also when the block
    raises: the training flag of the modules it put in eval mode, the attention implementation (only if it still is
    the one switched to) and torch's grad mode (thread-local). State it did not change is never written, so what the
    user changes meanwhile from another thread is kept, except where it is the very flag attnlens restores.

    Args:
        model: a supported model, or its :class:`~attnlens.models.Adapter`.
        eval_mode: put the model in eval mode (dropout off) for the block.
        attn_implementation: switch to this attention kernel for the block (e.g. ``"eager"``).
    """
    adapter = adapt(model)
    model = adapter.model
    with model_lock(model):
        # Hooks of enclosing blocks (an ablation the caller runs this call inside) stay; only new ones would be a bug.
        hooks_before = len(_own_hooks(model))
        switched = [m for m in model.modules() if m.training] if eval_mode else []
        implementation = adapter.attn_implementation()
        grad = torch.is_grad_enabled()
        try:
            for module in switched:  # what eval() does, on only the modules that need it
                module.training = False
            if attn_implementation is not None:
                adapter.set_attn_implementation(attn_implementation)
            yield
        finally:
            torch.set_grad_enabled(grad)
            if attn_implementation is not None and adapter.attn_implementation() == attn_implementation:
                adapter.set_attn_implementation(implementation)
            for module in switched:
                module.training = True
            if len(_own_hooks(model)) > hooks_before:  # pragma: no cover - a bug in attnlens if it ever fires
                raise RuntimeError("attnlens left a hook on the model; please report this")


def run_until(forward: Callable[[], Any]) -> bool:
    """Run ``forward()``; return True if a hook stopped it early with :class:`StopForward`, False if it finished."""
    try:
        forward()
    except StopForward:
        return True
    return False
