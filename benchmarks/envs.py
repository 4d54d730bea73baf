"""Per-tool virtualenvs for the benchmarks (standard library only).

Every tool runs in its own venv under ``benchmarks/.work/venvs/`` so that the
peers' dependency pins never touch attnlens (and are never attnlens
dependencies).  ``torch==2.13.0`` is always installed first and kept by a
constraints file: an unpinned torch would pull a multi-GB CUDA build.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"
TRANSFORMERS = "transformers==5.23.0"

# venv name -> pinned requirements (installed after torch).  Versions are the
# newest releases that install next to torch 2.13.0 and load the offline
# "gpt2" checkpoint; see benchmarks/README.md.
VENVS: dict[str, list[str]] = {
    # attnlens itself (from the repo, see install_attnlens) + the HF baselines
    "attnlens": [TRANSFORMERS, "safetensors==0.8.0", "tokenizers==0.23.3"],
    # TransformerLens 3.x: HookedTransformer.from_pretrained_no_processing
    # (4.x removed HookedTransformer)
    "tl_hooked": ["transformer-lens==3.9.0", TRANSFORMERS],
    # TransformerLens 4.x: TransformerBridge.boot_transformers
    "tl_bridge": ["transformer-lens==4.3.0", TRANSFORMERS],
    "nnsight": ["nnsight==0.8.1", TRANSFORMERS],
}

# tool (as in child.py) -> venv
TOOL_VENV = {
    "attnlens": "attnlens",
    "attnlens_eager": "attnlens",
    "hf_eager": "attnlens",
    "hf_forward": "attnlens",
    "tl_hooked": "tl_hooked",
    "tl_bridge": "tl_bridge",
    "nnsight": "nnsight",
}


def python_of(work: Path, venv: str) -> Path:
    return work / "venvs" / venv / "bin" / "python"


def _run(cmd: list, log) -> None:
    print("  $ " + " ".join(map(str, cmd)), file=log, flush=True)
    subprocess.run(list(map(str, cmd)), check=True, stdout=log, stderr=subprocess.STDOUT)


def _spec_hash(name: str) -> str:
    return hashlib.sha1(json.dumps([TORCH, VENVS[name]]).encode()).hexdigest()[:12]


def ensure_venv(work: Path, name: str, log=sys.stderr) -> Path:
    """Create/update venv `name`; returns its python.  Idempotent (marker file)."""
    root = work / "venvs" / name
    py = root / "bin" / "python"
    marker = root / ".bench-spec"
    want = _spec_hash(name)
    if py.exists() and marker.exists() and marker.read_text().strip() == want:
        return py
    print(f"[setup] creating venv {name} ({', '.join([TORCH] + VENVS[name])})", file=sys.stderr, flush=True)
    if not py.exists():
        _run([sys.executable, "-m", "venv", root], log)
    constraints = work / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    _run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], log)
    _run([py, "-m", "pip", "install", "-q", TORCH], log)
    _run([py, "-m", "pip", "install", "-q", "-c", constraints, *VENVS[name]], log)
    marker.write_text(want + "\n")
    return py


def attnlens_importable(py: Path) -> bool:
    r = subprocess.run([str(py), "-c", "import attnlens"], capture_output=True)
    return r.returncode == 0


def _snapshot_repo(repo: Path, dst: Path) -> None:
    """Copy the attnlens sources (not .git, not benchmarks/) to dst, so that
    building the package never writes into the repository itself."""
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(
        repo,
        dst,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git",
            "benchmarks",
            "build",
            "dist",
            "*.egg-info",
            ".venv",
            "__pycache__",
            ".mypy_cache",
            ".pytest_cache",
            ".ruff_cache",
            ".hypothesis",
            "site",
        ),
    )


def install_attnlens(work: Path, repo: Path, log=sys.stderr) -> str:
    """Install attnlens from the current working tree into the attnlens venv.

    The tree is copied to .work/attnlens-src first and installed from there
    (a fresh copy on every run, so the benchmark measures the code as it is
    now, and no build artefacts land in the repository).  Returns a short
    status string; never raises (attnlens rows then read "not available")."""
    py = python_of(work, "attnlens")
    if not any((repo / f).exists() for f in ("pyproject.toml", "setup.py", "setup.cfg")):
        return f"not installable: no pyproject.toml/setup.py in {repo}"
    src = work / "attnlens-src"
    constraints = work / "constraints-attnlens.txt"
    constraints.write_text("\n".join([TORCH] + VENVS["attnlens"]) + "\n")
    try:
        _snapshot_repo(repo, src)
        _run([py, "-m", "pip", "install", "-q", "-c", constraints, "--force-reinstall", "--no-deps", src], log)
        _run([py, "-m", "pip", "install", "-q", "-c", constraints, src], log)  # its dependencies
    except (OSError, subprocess.CalledProcessError) as e:
        return f"install failed ({e}); see {getattr(log, 'name', 'the log')}"
    if not attnlens_importable(py):
        return "installed but not importable"
    return "installed from a copy of the working tree"


def main() -> int:  # python benchmarks/envs.py [venv ...]
    here = Path(__file__).resolve().parent
    work = here / ".work"
    (work / "venvs").mkdir(parents=True, exist_ok=True)
    for name in sys.argv[1:] or list(VENVS):
        ensure_venv(work, name)
    print(install_attnlens(work, here.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
