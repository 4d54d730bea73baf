"""Run TransformerLens's own FactoredMatrix unit tests against attnlens's FactoredMatrix, through a small shim.

The tests are not shipped in TransformerLens's wheel and none are copied here: point the script at the folder that
holds them in a TransformerLens checkout (``tests/unit/factored_matrix``)::

    python benchmarks/tl_factored_tests.py PATH/TO/TransformerLens/tests/unit/factored_matrix [--attnlens DIR]

The test files are copied to a temporary folder (away from TransformerLens's conftest) and run with pytest, with
``benchmarks/tl_shim`` first on ``PYTHONPATH``: its ``transformer_lens`` package hands the tests
``attnlens.FactoredMatrix`` (and ``utils.get_corner`` / ``utils.transpose``). ``--attnlens DIR`` puts another attnlens
source tree (e.g. an older release, ``git archive``-d) first, to count before and after a change;
``--transformer-lens`` runs them without the shim, against TransformerLens itself (run the script with the Python
of a venv that has it, plus pytest), for the baseline. Prints the counts
per outcome and every failing test with the first line of its error; needs pytest and einops (attnlens[dev]).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

SHIM = Path(__file__).resolve().parent / "tl_shim"


def run(tests: Path, attnlens_dir: Path | None, shim: bool = True) -> tuple[Counter[str], list[tuple[str, str]]]:
    """Run the test files in ``tests``; return the count per outcome and (test id, first error line) of failures."""
    files = sorted(tests.glob("test_*.py"))
    if not files:
        raise SystemExit(f"no test_*.py files in {tests}: give the folder tests/unit/factored_matrix of a checkout")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "factored_matrix"
        work.mkdir()
        for f in files:
            shutil.copy(f, work / f.name)
        report = Path(tmp) / "report.xml"
        paths = ([str(SHIM)] if shim else []) + ([str(attnlens_dir)] if attnlens_dir else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]))
        command = [sys.executable, "-m", "pytest", str(work), "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        subprocess.run(command, env=env, cwd=tmp, stdout=subprocess.DEVNULL, check=False)
        counts: Counter[str] = Counter()
        failures = []
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            counts[outcome] += 1
            if outcome in ("failure", "error"):
                child = case.find(outcome)
                message = (child.get("message") or "") if child is not None else ""
                failures.append((f"{case.get('classname')}::{case.get('name')}", message.splitlines()[0][:160]))
    return counts, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", type=Path, help="TransformerLens's tests/unit/factored_matrix folder")
    parser.add_argument("--attnlens", type=Path, default=None, help="an attnlens source tree to test instead")
    parser.add_argument(
        "--transformer-lens",
        action="store_true",
        help="no shim: run the tests against the TransformerLens installed for this Python (their own baseline)",
    )
    args = parser.parse_args()
    counts, failures = run(args.tests, args.attnlens, shim=not args.transformer_lens)
    total = sum(counts.values())
    print(
        f"{counts['passed']} of {total} passed, {counts['failure'] + counts['error']} failed, "
        f"{counts['skipped']} skipped (by the tests themselves)"
    )
    for name, message in failures:
        print(f"FAIL {name}: {message}")


if __name__ == "__main__":
    main()
