"""Progress bars for long calls (verify, head_importance, composition_baseline), through tqdm, imported on use.

``progress=None`` (the default) shows a bar only where someone watches (stderr is a terminal, or the call runs in a
Jupyter kernel) and only once the call has run for :data:`DELAY` seconds, so short calls and scripts stay silent;
``True`` shows one at once wherever stderr goes; ``False`` never shows one. tqdm comes with transformers; its
notebook widget is used only where ipywidgets is installed (without it tqdm.auto warns "IProgress not found" into
every cell), else the plain text bar.
"""

from __future__ import annotations

import importlib.util
import sys
from types import TracebackType
from typing import Any

__all__ = ["DELAY", "Bar", "interactive", "tqdm_class"]

DELAY = 2.0
"""Seconds a call runs before its bar appears, with ``progress=None``."""


def interactive() -> bool:
    """Whether someone is likely watching: stderr is a terminal, or this is a Jupyter kernel."""
    return "ipykernel" in sys.modules or bool(getattr(sys.stderr, "isatty", lambda: False)())


def tqdm_class() -> Any:
    """The notebook-aware tqdm bar where ipywidgets can draw it, else the plain text bar (imported on use)."""
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


def _check(progress: Any) -> bool | None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (shown where interactive), got {progress!r}")
    return progress


class Bar:
    """A tqdm bar of ``total`` steps, or nothing; use as a context manager so that it closes also on error."""

    def __init__(self, total: int, desc: str, progress: bool | None, unit: str = "it") -> None:
        progress = _check(progress)
        self.bar: Any = None
        if progress or (progress is None and interactive()):
            delay = 0.0 if progress else DELAY
            self.bar = tqdm_class()(
                total=total, desc=f"attnlens {desc}", unit=unit, file=sys.stderr, delay=delay, leave=False
            )

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps."""
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
