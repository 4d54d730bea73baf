"""The ``attnlens`` console command's entry point: the parser is built before torch is imported.

Importing anything under ``attnlens`` imports the package, and with it torch (seconds). This module, outside the
package, loads ``attnlens/cli.py`` by its path (that file imports only the standard library at the top), so that
``attnlens --help``, ``attnlens COMMAND --help`` and usage errors answer at once; a command that parses is then run
by :func:`attnlens.cli.main` itself.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _standalone_cli() -> Any:
    """``attnlens/cli.py`` executed as a module of its own, without importing the attnlens package."""
    package = importlib.util.find_spec("attnlens")  # a top-level spec: found without importing the package
    if package is None or not package.submodule_search_locations:
        raise ImportError("the attnlens package is not installed")
    path = Path(next(iter(package.submodule_search_locations))) / "cli.py"
    spec = importlib.util.spec_from_file_location("_attnlens_cli_parser", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot read {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments (help and usage errors exit here), then run the command through :mod:`attnlens.cli`."""
    args = list(sys.argv[1:] if argv is None else argv)
    _standalone_cli()._parser().parse_args(args)
    from attnlens.cli import main as run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
