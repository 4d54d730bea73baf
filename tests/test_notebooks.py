"""The notebooks of the docs (the tutorials in docs/tutorials and docs/gallery.ipynb) run from top to bottom.

They are stored without outputs; the docs build executes them (mkdocs-jupyter, ``execute: true``), and so do these
tests, in both environments. Each runs with nbclient in a fresh temporary working directory on the ``python3``
kernel, which jupyter_client starts with the interpreter running the tests (checked by a cell put first), with the hub
switched off so that nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import optional

nbformat = optional("nbformat")
nbclient = optional("nbclient")
optional("ipykernel")

DOCS = Path(__file__).resolve().parent.parent / "docs"
TUTORIALS = DOCS / "tutorials"
NOTEBOOKS = [*sorted(TUTORIALS.glob("*.ipynb")), DOCS / "gallery.ipynb"]
TIMEOUT = 300


def test_tutorials_are_found() -> None:
    names = {path.name for path in NOTEBOOKS}
    assert {"01_gpt2_weights.ipynb", "02_attention_as_lookup.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_is_stored_clean(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells, f"{path.name} is empty"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{path.name} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this environment: no hub access, no plotting window.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    probe = nbformat.v4.new_code_cell("import sys; print(sys.prefix)")
    nb.cells.insert(0, probe)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=TIMEOUT, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell and its traceback, if any cell fails
    assert probe.outputs[0]["text"].strip() == sys.prefix  # the kernel runs this environment's interpreter
    errors = [
        out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"
    ]
    assert not errors
    assert all(cell.execution_count is not None for cell in nb.cells if cell.cell_type == "code")
