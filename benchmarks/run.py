#!/usr/bin/env python3
"""attnlens benchmarks: attnlens against HF eager, TransformerLens and nnsight.

Standard library only; it drives one virtualenv per tool (benchmarks/envs.py)
and runs every measurement in a fresh subprocess (benchmarks/child.py).

    python benchmarks/run.py                     # full matrix (long)
    python benchmarks/run.py --quick             # smoke: 1x128, 3 repeats
    python benchmarks/run.py --sections patterns,layer0 --sizes 1x128,4x1024
    python benchmarks/run.py --tools attnlens,hf_eager --repeats 7

Results: benchmarks/results/latest.md and latest.json (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import contextlib

import envs
import report

WORK = HERE / ".work"
SECTIONS = ["extraction", "patterns", "layer0", "verify", "fidelity"]
FULL_SIZES = ["1x128", "1x512", "8x128", "4x1024"]
QUICK_SIZES = ["1x128"]

# section -> tools in the order they alternate (attnlens first in round 0)
SECTION_TOOLS = {
    "extraction": ["attnlens", "tl_hooked", "tl_bridge"],
    "patterns": ["attnlens", "attnlens_eager", "hf_eager", "tl_hooked", "tl_bridge", "nnsight"],
    "layer0": ["attnlens", "hf_eager", "tl_hooked", "tl_bridge", "nnsight"],
    "verify": ["attnlens", "hf_forward"],
    "fidelity": ["attnlens", "attnlens_eager", "tl_hooked", "tl_bridge", "nnsight"],
}
ALL_TOOLS = sorted({t for ts in SECTION_TOOLS.values() for t in ts})


def parse_size(s: str) -> tuple[int, int]:
    b, _, t = s.lower().partition("x")
    return int(b), int(t)


def machine_info(threads: int) -> dict:
    info = {
        "os": platform.platform(),
        "python": platform.python_version(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
    }
    try:
        cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        info["cpu_model"] = cpu[0] if cpu else platform.processor()
        phys = {l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("core id")}
        info["physical_cores_per_socket"] = len(phys) or None
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        kb = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
        info["ram_gib"] = round(kb / 1024 / 1024, 1)
    except (OSError, StopIteration):
        pass
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def child_env(variant: str, threads: int) -> dict:
    root = WORK / "hf" / variant
    env = dict(os.environ)
    env.update(
        HF_HOME=str(root),
        HF_HUB_CACHE=str(root / "hub"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        BENCH_VARIANT=variant,
        PYTHONWARNINGS="ignore",
    )
    env.pop("HF_TOKEN", None)
    return env


def run_child(tool: str, task: str, size: tuple[int, int], variant: str, args, log) -> dict:
    py = envs.python_of(WORK, envs.TOOL_VENV[tool])
    cmd = [
        str(py),
        str(HERE / "child.py"),
        "--tool",
        tool,
        "--task",
        task,
        "--batch",
        str(size[0]),
        "--seq",
        str(size[1]),
        "--threads",
        str(args.threads),
        "--warmup",
        str(args.warmup),
        "--inner",
        str(args.inner_extraction if task == "extraction" else args.inner),
    ]
    if not py.exists():
        return {"tool": tool, "task": task, "status": "not available", "reason": f"venv {envs.TOOL_VENV[tool]} missing"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            cmd,
            env=child_env(variant, args.threads),
            capture_output=True,
            text=True,
            timeout=args.timeout,
            cwd=str(WORK),
        )
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout", -1
    wall = time.perf_counter() - t0
    log.write(f"### {tool} {task} {size} {variant} rc={rc} wall={wall:.1f}s\n{out[-4000:]}\n{err[-4000:]}\n")
    log.flush()
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    if not lines:
        tail = (err or out).strip().splitlines()[-1:] or ["no output"]
        return {
            "tool": tool,
            "task": task,
            "status": "error",
            "reason": f"child exit {rc}: {tail[0][:300]}",
            "child_wall_s": wall,
        }
    res = json.loads(lines[-1][len("RESULT ") :])
    res["child_wall_s"] = wall
    return res


def aggregate(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        bad = runs[0] if runs else {}
        return {"status": bad.get("status", "error"), "reason": bad.get("reason", "no runs"), "n": 0}
    agg = {"status": "ok", "n": len(ok)}
    for key in ("time_s", "extra_rss_mib", "peak_rss_mib", "load_s", "first_call_s", "max_abs_diff", "child_wall_s"):
        vals = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        if vals:
            agg[key] = statistics.median(vals) if key != "max_abs_diff" else max(vals)
            if key == "time_s":
                agg["time_s_all"] = vals
                agg["time_s_min"] = min(vals)
    for key in ("tool_version", "versions", "weights_checked", "torch_threads"):
        if key in ok[0]:
            agg[key] = ok[0][key]
    if len(ok) < len(runs):
        agg["failed_runs"] = len(runs) - len(ok)
    return agg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: sizes 1x128, 3 repeats")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--sizes", default=None, help="comma list of BATCHxSEQ (default: 1x128,1x512,8x128,4x1024)")
    ap.add_argument("--tools", default=",".join(ALL_TOOLS), help=f"comma list of {ALL_TOOLS}")
    ap.add_argument(
        "--repeats", type=int, default=None, help="fresh processes per tool and configuration (default 5, quick 3)"
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed calls per process before timing (the first one is the memory probe)",
    )
    ap.add_argument("--inner", type=int, default=1, help="timed calls per process (their median is the process' time)")
    ap.add_argument(
        "--inner-extraction", type=int, default=5, help="timed calls per process for the extraction section"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads for every tool")
    ap.add_argument("--fidelity-size", default="2x128")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per child process")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="directory for latest.md / latest.json")
    ap.add_argument("--skip-setup", action="store_true", help="do not create/update venvs")
    ap.add_argument("--rebuild-checkpoints", action="store_true")
    args = ap.parse_args()

    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    tools = [t for t in args.tools.split(",") if t]
    if set(tools) - set(ALL_TOOLS):
        ap.error(f"unknown tools {sorted(set(tools) - set(ALL_TOOLS))}")
    sizes = [
        parse_size(s) for s in (args.sizes.split(",") if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES))
    ]
    repeats = args.repeats or (3 if args.quick else 5)

    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "venvs").mkdir(exist_ok=True)
    setup_log = open(WORK / "setup.log", "a")
    needed = sorted({envs.TOOL_VENV[t] for s in sections for t in SECTION_TOOLS[s] if t in tools} | {"attnlens"})
    setup_status = {}
    for v in needed:
        if args.skip_setup:
            setup_status[v] = "skipped"
            continue
        try:
            envs.ensure_venv(WORK, v, log=setup_log)
            setup_status[v] = "ok"
        except subprocess.CalledProcessError as e:
            setup_status[v] = f"setup failed ({e}); see {WORK / 'setup.log'}"
            print(f"[setup] {v}: {setup_status[v]}", file=sys.stderr)
    attnlens_status = envs.install_attnlens(WORK, REPO, log=setup_log)
    print(f"[setup] attnlens: {attnlens_status}", file=sys.stderr)

    ckpt_meta = WORK / "hf" / "checkpoints.json"
    if args.rebuild_checkpoints or not ckpt_meta.exists():
        print("[setup] building offline gpt2 checkpoints", file=sys.stderr, flush=True)
        subprocess.run(
            [
                str(envs.python_of(WORK, "attnlens")),
                str(HERE / "make_checkpoint.py"),
                "--out",
                str(WORK / "hf"),
                "--threads",
                str(args.threads),
            ],
            check=True,
            env=child_env("random", args.threads),
        )
    checkpoints = json.loads(ckpt_meta.read_text())

    results: dict = {
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "quick": args.quick,
        "repeats": repeats,
        "warmup": args.warmup,
        "inner": args.inner,
        "machine": machine_info(args.threads),
        "setup": {
            "venvs": setup_status,
            "attnlens": attnlens_status,
            "pins": {v: [envs.TORCH] + envs.VENVS[v] for v in needed},
        },
        "checkpoints": {
            k: {kk: checkpoints[k][kk] for kk in ("mean_row_max", "qk_scale", "commit") if kk in checkpoints[k]}
            for k in ("random", "sharp")
        },
        "rows": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(WORK / "children.log", "w")
    t_start = time.perf_counter()

    def save():
        results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        results["versions"] = report.collect_versions(results["rows"])
        (args.out / "latest.json").write_text(json.dumps(results, indent=2))
        (args.out / "latest.md").write_text(report.markdown(results))

    for section in sections:
        sec_tools = [t for t in SECTION_TOOLS[section] if t in tools]
        if section == "extraction":
            configs = [((1, 8), "random")]
        elif section == "fidelity":
            configs = [(parse_size(args.fidelity_size), v) for v in ("random", "sharp")]
        else:
            configs = [(s, "random") for s in sizes]
        for size, variant in configs:
            n_rep = 1 if section == "fidelity" else repeats
            runs: dict[str, list] = {t: [] for t in sec_tools}
            for r in range(n_rep):
                order = sec_tools[r % len(sec_tools) :] + sec_tools[: r % len(sec_tools)]  # alternate
                for tool in order:
                    if runs[tool] and runs[tool][-1].get("status") == "not available":
                        continue  # deterministic: no point repeating
                    res = run_child(tool, section, size, variant, args, log)
                    runs[tool].append(res)
                    shown = res.get("time_s", res.get("max_abs_diff", ""))
                    print(
                        f"[{section} {size[0]}x{size[1]} {variant}] rep {r + 1}/{n_rep} {tool}: "
                        f"{res.get('status')} {shown if shown != '' else res.get('reason', '')}",
                        file=sys.stderr,
                        flush=True,
                    )
            for tool in sec_tools:
                row = {
                    "section": section,
                    "tool": tool,
                    "batch": size[0],
                    "seq": size[1],
                    "variant": variant,
                    **aggregate(runs[tool]),
                }
                results["rows"].append(row)
            save()
    save()
    print(f"wrote {args.out / 'latest.md'} and latest.json in {results['elapsed_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
