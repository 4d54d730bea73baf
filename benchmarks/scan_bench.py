"""attnlens.scan against the corpus loops people write today, side by side in one run, as ratios.

One driver run; every measurement is a fresh child process (the TransformerLens peer needs its own interpreter), and
the tools take turns within each repetition (rep 1: A, B, C, D; rep 2: A, B, C, D; ...), so that a change in the
machine's load falls on all of them alike. Each child loads its model, processes one warm-up batch untimed, then
times only the steady-state loop over the same windows (same ``seq_len``, ``batch_size`` and number of tokens) and
prints one JSON line. ``torch.set_num_threads(--threads)`` (default 1) in every measured process.

Sections:

* ``speed``: tokens/s of ``attnlens.scan`` (all seven default statistics) against
  ``trace``: ``attnlens.trace`` + ``attnlens.metrics.head_scores`` per batch (plus mean distance and attention to
  self from the trace's patterns), averaged by hand over batches;
  ``tl``: TransformerLens 3.9 ``run_with_cache`` (patterns only, ``stop_at_layer`` after the last block) per batch,
  then ``transformer_lens.head_detector.detect_head`` per window for "previous_token_head", "duplicate_token_head"
  and "induction_head", averaged by hand;
  ``hf``: Hugging Face eager ``output_attentions=True`` per batch on the base model (no LM head), the returned
  patterns scored with attnlens.metrics' definitions written out in torch, averaged by hand.
* ``memory``: peak RSS (``getrusage``) of scan as ``max_tokens`` grows 1x, 10x, 100x, and of the trace-and-keep-
  patterns loop at 1x and 10x.
* ``dist``: scan in 2 processes x 1 thread (``torch.distributed.run``, gloo) against 1 process x 2 threads.
* ``inprocess``: one process, calls interleaved: scan and the trace and HF loops' per-batch work as multiples of a
  bare SDPA forward (the floor every one of them pays), at ``--sizes``.

    python benchmarks/scan_bench.py                      # default sizes, about 20-25 minutes on 2 busy cores
    python benchmarks/scan_bench.py --sections speed --reps 7 --windows 16

The driver needs only the standard library. It runs attnlens and Hugging Face with ``--attnlens-python`` (default
the checkout's ``.venv/bin/python`` if it exists, else this interpreter), this checkout first on ``PYTHONPATH``, and builds the TransformerLens 3.9
venv (``benchmarks/envs.py``, ``.work/venvs/tl_hooked``) and the offline checkpoint (``make_checkpoint.py``,
``.work/hf``) when they are missing. Results: ``benchmarks/results/scan.md`` and ``scan.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from child import _reset_peak, _status_kb  # the same /proc readings as the other benchmarks

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / ".work"
SCAN_WORK = WORK / "scan"
SPEED_TOOLS = ("scan", "trace", "tl", "hf")
LABELS = {
    "scan": "attnlens.scan",
    "trace": "attnlens.trace + metrics",
    "tl": "TransformerLens 3.9 run_with_cache + detect_head",
    "hf": "HF eager output_attentions + scoring",
}
SMALL_SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4}  # the --memory-shape small model (vocab 50257, n_ctx 1024)

# ===================================================================================================== child side ===


def _rss_kb() -> int:
    return _status_kb("VmRSS") or 0


def _hwm_kb() -> int:
    return _status_kb("VmHWM") or 0


def _peak_kb() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _snapshot() -> Path:
    hub = Path(os.environ["HF_HUB_CACHE"])
    repo = hub / "models--gpt2"
    return repo / "snapshots" / (repo / "refs" / "main").read_text().strip()


def _touch(model) -> None:
    """Read every parameter once, so lazily mapped weights are resident before anything is timed or measured."""
    for p in model.parameters():
        float(p.detach().float().sum())


def _load_hf(args, eager: bool):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    kwargs = {"attn_implementation": "eager"} if eager else {}
    if args.shape == "small":
        torch.manual_seed(0)
        config = GPT2Config(**SMALL_SHAPE, **kwargs)
        model = GPT2LMHeadModel(config).eval()
    else:
        model = GPT2LMHeadModel.from_pretrained(str(_snapshot()), **kwargs).eval()
    _touch(model)
    return model


def _data(args):
    import torch

    return torch.load(args.data, weights_only=True)


def _batches(windows, batch_size):
    return [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]


def _row_sets(ids):
    """Qualifying rows [batch, q_pos] and key sets [batch, q_pos, k_pos] of metrics' definitions (full windows)."""
    import torch

    same = ids[:, :, None] == ids[:, None, :]
    n = ids.shape[1]
    duplicate = same & torch.ones(n, n, dtype=torch.bool).tril(-1)
    # induction key j+1 for every earlier copy j of token i with j + 1 < i
    induction = torch.zeros_like(same)
    induction[:, :, 1:] = same[:, :, :-1] & torch.ones(n, n - 1, dtype=torch.bool).tril(-2)
    after_first = torch.ones_like(ids, dtype=torch.bool)
    after_first[:, 0] = False
    return duplicate, induction, after_first


NAMES = ("previous_token", "duplicate_token", "induction", "first_token", "entropy", "distance", "self")


def _score_layer(p, duplicate, induction, after_first):
    """Sums over qualifying rows [score, head] (float64) of one layer's pattern [batch, head, q, k], by hand."""
    import torch

    p = p.float()
    n = p.shape[-1]
    pos = torch.arange(n, dtype=torch.float32)
    dist = (pos[:, None] - pos[None, :]).clamp(min=0)
    prev = torch.nn.functional.pad(torch.diagonal(p, offset=-1, dim1=-2, dim2=-1), (1, 0))
    vals = {
        "previous_token": (prev, after_first),
        "duplicate_token": ((p * duplicate[:, None]).sum(-1), duplicate.any(-1)),
        "induction": ((p * induction[:, None]).sum(-1), induction.any(-1)),
        "first_token": (p[..., 0], after_first),
        "entropy": (-torch.special.xlogy(p, p).sum(-1), after_first),
        "distance": ((p * dist).sum(-1), after_first),
        "self": (torch.diagonal(p, dim1=-2, dim2=-1), after_first),
    }
    return torch.stack([(v.double() * r[:, None]).sum(dim=(0, 2)) for v, r in (vals[k] for k in NAMES)])


def _distance_self(p, after_first):
    """Sums [2, head] of mean distance and attention to self over rows after the first, by hand."""
    import torch

    p = p.float()
    pos = torch.arange(p.shape[-1], dtype=torch.float32)
    dist = (pos[:, None] - pos[None, :]).clamp(min=0)
    vals = ((p * dist).sum(-1), torch.diagonal(p, dim1=-2, dim2=-1))
    return torch.stack([(v.double() * after_first[:, None]).sum(dim=(0, 2)) for v in vals])


def _counts(duplicate, induction, after_first):
    import torch

    rows = {"duplicate_token": duplicate.any(-1), "induction": induction.any(-1)}
    return torch.tensor([float(rows.get(k, after_first).sum()) for k in NAMES], dtype=torch.float64)


def _run_scan(model, data, n_windows, args):
    import attnlens

    return attnlens.scan(
        model, data["docs"], seq_len=args.seq_len, batch_size=args.batch_size,
        max_tokens=n_windows * args.seq_len, progress=False,
    )  # fmt: skip


def child_speed(args) -> dict:
    import torch

    data = _data(args)
    windows = data["windows"][: args.windows]
    batches = _batches(windows, args.batch_size)
    out: dict = {}
    if args.tool == "scan":
        import hashlib

        model = _load_hf(args, eager=False)
        _run_scan(model, data, args.batch_size, args)  # warm-up: one batch

        def loop():
            return _run_scan(model, data, args.windows, args)

    elif args.tool in ("trace", "hf"):
        model = _load_hf(args, eager=args.tool == "hf")
        if args.tool == "trace":
            import attnlens
            from attnlens import metrics

            def one(ids):
                tr = attnlens.trace(model, ids)
                hs = metrics.head_scores(tr)
                dup, ind, after = _row_sets(ids)
                counts = _counts(dup, ind, after)
                means = [getattr(hs, k) for k in NAMES[:5]]
                # distance and self are not in metrics: from the trace's patterns, by hand
                extra = torch.stack([_distance_self(tr.pattern(i), after) for i in tr.layers], dim=1)
                # a score with no qualifying row in this batch is None: it adds nothing
                zero = torch.zeros(len(tr.layers), len(tr.heads), dtype=torch.float64)
                sums = torch.stack(
                    [zero if m is None else m.double() * c for m, c in zip(means, counts[:5], strict=True)]
                )
                return torch.cat([sums, extra]), counts
        else:
            base = model.base_model  # the transformer without its LM head: only the patterns are wanted

            def one(ids):
                with torch.no_grad():
                    attentions = base(ids, output_attentions=True).attentions
                dup, ind, after = _row_sets(ids)
                sums = torch.stack([_score_layer(a, dup, ind, after) for a in attentions], dim=1)
                return sums, _counts(dup, ind, after)

        one(batches[0])  # warm-up

        def loop():
            total, count = None, None
            for ids in batches:
                sums, c = one(ids)
                total = sums if total is None else total + sums
                count = c if count is None else count + c
            return total / count[:, None, None]

    elif args.tool == "tl":
        from transformer_lens import ActivationCache, HookedTransformer
        from transformer_lens.head_detector import detect_head

        hf = _load_hf(args, eager=False)
        model = HookedTransformer.from_pretrained_no_processing("gpt2", hf_model=hf, device="cpu")
        model.eval()
        out["weights_checked"] = bool(torch.equal(model.W_E.detach(), hf.get_input_embeddings().weight))
        del hf
        n_layers = model.cfg.n_layers
        current = {}
        # Our windows are token ids with no text behind them: detect_head's first step, model.to_tokens(seq), is
        # given them directly; everything after it is TransformerLens's own code.
        model.to_tokens = lambda *a, **k: current["ids"][None]
        heads = ("previous_token_head", "duplicate_token_head", "induction_head")

        def one(ids):
            with torch.no_grad():
                _, cache = model.run_with_cache(
                    ids, names_filter=lambda n: n.endswith("hook_pattern"), stop_at_layer=n_layers
                )
            scores = torch.zeros(len(heads), n_layers, model.cfg.n_heads)
            for b in range(ids.shape[0]):
                current["ids"] = ids[b]
                one_cache = ActivationCache({k: v[b] for k, v in cache.items()}, model, has_batch_dim=False)
                for i, name in enumerate(heads):
                    scores[i] += detect_head(model, "", name, cache=one_cache)
            return scores

        one(batches[0])  # warm-up

        def loop():
            total = sum(one(ids) for ids in batches)
            return total / windows.shape[0]

    else:
        raise SystemExit(f"unknown tool {args.tool}")

    with torch.no_grad():
        start = time.perf_counter()
        result = loop()
        seconds = time.perf_counter() - start
    tokens = int(windows.numel())
    out.update(tool=args.tool, seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds)
    if args.tool == "scan":
        digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
        if result.provenance["data_sha256"] != digest or result.n_tokens != tokens:
            raise SystemExit("scan did not see the same windows as the loops")
        out["mean"] = {k: result.mean[k].tolist() for k in NAMES}
    elif args.tool in ("trace", "hf"):
        out["mean"] = {k: result[i].tolist() for i, k in enumerate(NAMES)}
    else:
        out["tl_scores"] = {"previous_token_head": result[0].tolist()}
    return out


def child_memory(args) -> dict:
    import torch

    torch.set_grad_enabled(False)
    data = _data(args)
    model = _load_hf(args, eager=False)
    n_windows = args.windows
    before = _rss_kb()
    reset = _reset_peak()  # the kernel's peak-RSS mark (VmHWM): the loop's peak, not the model load's
    start = time.perf_counter()
    if args.tool == "scan":
        result = _run_scan(model, data, n_windows, args)
        tokens = result.n_tokens
    else:  # the loop that keeps every pattern, scoring at the end
        import attnlens

        kept = []
        for ids in _batches(data["windows"][:n_windows], args.batch_size):
            tr = attnlens.trace(model, ids)
            kept.append([tr.pattern(i) for i in tr.layers])
        tokens = sum(p[0].shape[0] for p in kept) * args.seq_len
    return {
        "tool": args.tool, "tokens": tokens, "seconds": time.perf_counter() - start,
        "rss_before_kb": before, "peak_rss_kb": _peak_kb(), "loop_peak_kb": _hwm_kb() if reset else None,
    }  # fmt: skip


def child_dist(args) -> dict | None:
    import torch
    import torch.distributed as dist

    data = _data(args)
    model = _load_hf(args, eager=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # One group for both calls (scan uses a group it finds): the group's start-up is not timed, and a second
        # group created and destroyed by scan in the same processes can fail to connect (see docs/benchmarks.md).
        dist.init_process_group("gloo")
    _run_scan(model, data, args.batch_size * world, args)  # warm-up round
    start = time.perf_counter()
    result = _run_scan(model, data, args.windows, args)
    seconds = time.perf_counter() - start
    if world > 1:
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return {
        "tool": args.tool, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "threads": torch.get_num_threads(),
        "seconds": seconds, "tokens": result.n_tokens, "tokens_per_s": result.n_tokens / seconds,
    }  # fmt: skip


def child_inprocess(args) -> dict:
    """One process, calls interleaved: a bare SDPA forward of the base model (the floor every loop pays), scan, and
    the trace and HF loops' per-batch work, on one batch of each size in ``--sizes``."""
    import statistics as st

    import torch

    import attnlens
    from attnlens import metrics

    sdpa, eager = _load_hf(args, eager=False), _load_hf(args, eager=True)
    out: dict = {}
    for size in args.sizes.split(","):
        batch, seq = (int(x) for x in size.split("x"))
        g = torch.Generator().manual_seed(args.seed)
        half = torch.randint(0, 50256, (batch, seq // 2), generator=g)
        ids = torch.cat([half, half], 1)  # every token repeats: duplicate and induction rows everywhere
        stream = ids.flatten()[1:]  # scan puts the end-of-text id first: its windows differ in that one token

        def trace_loop(ids=ids):
            tr = attnlens.trace(sdpa, ids)
            metrics.head_scores(tr)
            _, _, after = _row_sets(ids)
            [_distance_self(tr.pattern(i), after) for i in tr.layers]

        def hf_loop(ids=ids):
            attentions = eager.base_model(ids, output_attentions=True).attentions
            dup, ind, after = _row_sets(ids)
            [_score_layer(a, dup, ind, after) for a in attentions]

        calls = {
            "forward": lambda ids=ids: sdpa.base_model(ids),
            "scan": lambda stream=stream, b=batch, s=seq: attnlens.scan(
                sdpa, [stream], seq_len=s, batch_size=b, max_tokens=b * s, progress=False
            ),
            "trace": trace_loop,
            "hf": hf_loop,
        }
        for f in calls.values():
            f()  # warm-up
        times: dict = {k: [] for k in calls}
        for _ in range(args.reps):
            for k, f in calls.items():
                start = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - start)
        out[size] = {
            "seconds": times,
            "ratio_to_forward": {
                k: _spread([a / b for a, b in zip(v, times["forward"], strict=True)]) for k, v in times.items()
            },
            "ratio_scan_over": {
                k: _spread([b / a for a, b in zip(times["scan"], v, strict=True)]) for k, v in times.items()
            },
        }
        print(f"[inprocess] {size}: " + json.dumps({k: st.median(v) for k, v in times.items()}), file=sys.stderr)
    return out


def child_prepare(args) -> dict:
    """Seeded documents (ids, each with a repeated stretch so that duplicate and induction rows exist) and the
    windows ``[n, seq_len]`` that scan cuts from them (each document preceded by the end-of-text id)."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    eot, vocab = 50256, 50256
    need = args.windows * args.seq_len
    docs, stream = [], []
    while len(stream) < need:
        a = torch.randint(0, vocab, (int(torch.randint(20, 120, (1,), generator=g)),), generator=g)
        b = torch.randint(0, vocab, (int(torch.randint(10, 200, (1,), generator=g)),), generator=g)
        doc = torch.cat([a, b, a])
        docs.append(doc)
        stream += [eot, *doc.tolist()]
    windows = torch.tensor(stream[:need]).view(args.windows, args.seq_len)
    torch.save({"docs": docs, "windows": windows}, args.data)
    return {"windows": args.windows, "documents": len(docs)}


def child_main(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    fn = {
        "speed": child_speed, "memory": child_memory, "dist": child_dist, "prepare": child_prepare,
        "inprocess": child_inprocess,
    }[args.child]  # fmt: skip
    out = fn(args)
    if out is not None:
        print("RESULT " + json.dumps(out), flush=True)
    return 0


# ==================================================================================================== driver side ===


def _env(threads: int) -> dict:
    root = WORK / "hf" / "random"
    env = dict(os.environ)
    env.update(
        HF_HOME=str(root), HF_HUB_CACHE=str(root / "hub"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
        PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )  # fmt: skip
    return env


def _child(py: str, argv: list[str], threads: int, log, prefix: list[str] | None = None) -> dict:
    cmd = [*(prefix or [py]), str(Path(__file__)), *argv, "--threads", str(threads)]
    print("$ " + " ".join(cmd), file=log, flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), cwd=str(REPO))
    log.write(r.stdout + r.stderr)
    log.flush()
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        return {"error": f"exit {r.returncode}: {tail}", "wall_s": time.perf_counter() - t0}
    out = json.loads(lines[-1][7:])
    out["wall_s"] = time.perf_counter() - t0
    return out


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="speed,memory,dist,inprocess")
    ap.add_argument("--tools", default=",".join(SPEED_TOOLS), help="speed section: " + ", ".join(SPEED_TOOLS))
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the speed section")
    ap.add_argument("--dist-reps", type=int, default=3, help="repetitions of the dist section")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--windows", type=int, default=8, help="windows per timed loop (speed and dist)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per measured process")
    ap.add_argument("--memory-seq-len", type=int, default=128)
    ap.add_argument("--memory-tokens", default="2048,20480,204800", help="scan's max_tokens: 1x, 10x, 100x")
    ap.add_argument("--memory-shape", default="small", choices=("small", "gpt2"), help="model of the memory section")
    ap.add_argument("--keep-points", type=int, default=2, help="memory points also run with the keep-patterns loop")
    ap.add_argument("--sizes", default="4x256,1x1024", help="inprocess section: batch x seq_len sizes")
    ap.add_argument("--inprocess-reps", type=int, default=3, help="repetitions of the inprocess section")
    ap.add_argument("--attnlens-python", default=None, help="a Python with torch and transformers (see above)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--seed", type=int, default=0)
    # child mode
    ap.add_argument("--child", choices=("speed", "memory", "dist", "prepare", "inprocess"), help=argparse.SUPPRESS)
    ap.add_argument("--tool", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="gpt2", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)

    default_py = REPO / ".venv" / "bin" / "python"
    py = args.attnlens_python or (str(default_py) if default_py.exists() else sys.executable)
    sys.path.insert(0, str(HERE))
    import envs

    SCAN_WORK.mkdir(parents=True, exist_ok=True)
    log = open(SCAN_WORK / "children.log", "a")
    sections = args.sections.split(",")
    tools = args.tools.split(",")
    setup: dict = {"attnlens_python": py}
    if not (WORK / "hf" / "random" / "hub" / "models--gpt2").exists():
        subprocess.run(
            [py, str(HERE / "make_checkpoint.py"), "--out", str(WORK / "hf"), "--threads", "1"],
            check=True, env=_env(1),
        )  # fmt: skip
    tl_py = None
    if "speed" in sections and "tl" in tools:
        try:
            tl_py = str(envs.ensure_venv(WORK, "tl_hooked", log=log))
            setup["tl_hooked"] = "ok: " + " ".join([envs.TORCH, *envs.VENVS["tl_hooked"]])
        except (OSError, subprocess.CalledProcessError) as e:
            setup["tl_hooked"] = f"setup failed ({e}); see {SCAN_WORK / 'children.log'}"
            tools.remove("tl")
    pythons = {t: (tl_py if t == "tl" else py) for t in tools}

    results: dict = {
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/scan_bench.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": _load(), "uname": " ".join(os.uname())},
        "setup": setup,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if v is not None},
    }
    previous = args.out / "scan.json"
    if previous.exists():  # keep the sections this run does not redo, with their own command and date
        kept = json.loads(previous.read_text())
        for name in ("speed", "memory", "dist", "dist_first_attempt", "inprocess"):
            if name.split("_")[0] not in sections and name in kept:
                results[name] = kept[name]
        if "tl_hooked" not in setup and "tl_hooked" in kept.get("setup", {}):
            setup["tl_hooked"] = kept["setup"]["tl_hooked"]
    loads = [_load()]
    common = ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]

    def prepare(name: str, windows: int, seq_len: int) -> str:
        path = SCAN_WORK / f"{name}-{seq_len}x{windows}-seed{args.seed}.pt"
        if not path.exists():
            r = _child(py, ["--child", "prepare", "--data", str(path), "--windows", str(windows),
                            "--seq-len", str(seq_len), "--seed", str(args.seed)], 1, log)  # fmt: skip
            if "error" in r:
                raise SystemExit(f"could not prepare the data: {r['error']}")
        return str(path)

    def context(first: int) -> dict:
        """What a section's numbers came from: the command, when, and the load it ran under (samples from first)."""
        samples = [x[0] for x in loads[first:]]
        return {
            "command": results["command"], "created": results["created"], "threads": args.threads,
            "seq_len": args.seq_len, "batch_size": args.batch_size, "windows": args.windows,
            "reps": args.reps, "dist_reps": args.dist_reps,
            "loadavg_1min": {"min": min(samples), "median": statistics.median(samples), "max": max(samples)},
        }  # fmt: skip

    def write() -> None:
        results["machine"]["loadavg_samples"] = loads
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scan.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "scan.md").write_text(report(results) + "\n")

    if "speed" in sections:
        first = len(loads)
        data = prepare("speed", args.windows, args.seq_len)
        runs: dict = {t: [] for t in tools}
        for rep in range(args.reps):
            for t in tools:
                argv = ["--child", "speed", "--tool", t, "--data", data, "--windows", str(args.windows), *common]
                r = _child(pythons[t], argv, args.threads, log)
                r["rep"] = rep
                runs[t].append(r)
                loads.append(_load())
                print(f"[speed] rep {rep + 1}/{args.reps} {t}: "
                      f"{r.get('tokens_per_s', 0):.0f} tokens/s {r.get('error', '')}", file=sys.stderr, flush=True)  # fmt: skip
        results["speed"] = speed_summary(runs, args)
        results["speed"]["context"] = context(first)
        write()

    if "memory" in sections:
        first = len(loads)
        mem_tokens = [int(x) for x in args.memory_tokens.split(",")]
        seq = args.memory_seq_len
        data = prepare("memory", max(mem_tokens) // seq, seq)
        rows = []
        for i, n in enumerate(mem_tokens):
            for tool in ("scan", "keep") if i < args.keep_points else ("scan",):
                argv = ["--child", "memory", "--tool", tool, "--data", data, "--windows", str(n // seq),
                        "--seq-len", str(seq), "--batch-size", str(args.batch_size), "--shape", args.memory_shape]  # fmt: skip
                r = _child(py, argv, args.threads, log)
                r.update(max_tokens=n, factor=n / mem_tokens[0])
                rows.append(r)
                loads.append(_load())
                print(f"[memory] {tool} {n} tokens: peak {r.get('peak_rss_kb', 0) / 1024:.0f} MiB "
                      f"{r.get('error', '')}", file=sys.stderr, flush=True)  # fmt: skip
        results["memory"] = {"shape": args.memory_shape, "seq_len": seq, "rows": rows, "context": context(first)}
        write()

    if "dist" in sections:
        first = len(loads)
        data = prepare("speed", args.windows, args.seq_len)
        argv = ["--child", "dist", "--tool", "scan", "--data", data, "--windows", str(args.windows), *common]
        torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python", py]
        runs = {"2x1": [], "1x2": []}
        for rep in range(args.dist_reps):
            runs["2x1"].append(_child(py, argv, 1, log, prefix=torchrun))
            loads.append(_load())
            runs["1x2"].append(_child(py, argv, 2, log))
            loads.append(_load())
            print(f"[dist] rep {rep + 1}: 2x1 {runs['2x1'][-1].get('tokens_per_s', 0):.0f}, "
                  f"1x2 {runs['1x2'][-1].get('tokens_per_s', 0):.0f} tokens/s", file=sys.stderr, flush=True)  # fmt: skip
        ratios = [
            a["tokens_per_s"] / b["tokens_per_s"]
            for a, b in zip(runs["2x1"], runs["1x2"], strict=True)
            if "tokens_per_s" in a and "tokens_per_s" in b
        ]
        results["dist"] = {
            "runs": runs,
            "context": context(first),
            "ratio_2x1_over_1x2": _spread(ratios) if ratios else None,
            "tokens_per_s": {k: _spread([r["tokens_per_s"] for r in v if "tokens_per_s" in r]) for k, v in runs.items()
                             if any("tokens_per_s" in r for r in v)},
        }  # fmt: skip
        write()
    if "inprocess" in sections:
        first = len(loads)
        argv = [
            "--child",
            "inprocess",
            "--sizes",
            args.sizes,
            "--reps",
            str(args.inprocess_reps),
            "--seed",
            str(args.seed),
        ]
        r = _child(py, argv, args.threads, log)
        loads.append(_load())
        results["inprocess"] = {"sizes": r, "context": context(first)}
        results["inprocess"]["context"]["reps"] = args.inprocess_reps
        write()
    results["machine"]["loadavg_end"] = _load()
    write()
    print(report(results))
    return 0


def speed_summary(runs: dict, args) -> dict:
    ok = {t: [r for r in v if "tokens_per_s" in r] for t, v in runs.items()}
    summary: dict = {
        "runs": runs,
        "tokens_per_s": {t: _spread([r["tokens_per_s"] for r in v]) for t, v in ok.items() if v},
    }
    # per-repetition ratios scan / peer: both measured within the same repetition, minutes apart at most
    ratios = {}
    for t in ok:
        if t == "scan":
            continue
        pairs = [
            (a, b) for a, b in zip(runs["scan"], runs[t], strict=True) if "tokens_per_s" in a and "tokens_per_s" in b
        ]
        if pairs:
            ratios[t] = _spread([a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs])
    summary["ratio_scan_over"] = ratios
    # the numbers agree: every tool that computes metrics' definitions against scan's means
    agree = {}
    ref = next((r["mean"] for r in ok.get("scan", [])), None)
    for t in ("trace", "hf"):
        mine = next((r["mean"] for r in ok.get(t, [])), None)
        if ref and mine:
            agree[t] = max(
                abs(a - b)
                for k in NAMES
                for ra, rb in zip(ref[k], mine[k], strict=True)
                for a, b in zip(ra, rb, strict=True)
            )
    summary["max_abs_diff_of_means_vs_scan"] = agree
    if ratios:
        best = min(ratios, key=lambda t: ratios[t]["median"])
        summary["best_loop"] = best
        summary["target_met"] = ratios[best]["median"] >= 1.5
    return summary


def _fmt_spread(s: dict, fmt: str = "{:.2f}", unit: str = "x") -> str:
    return f"{fmt.format(s['median'])}{unit} ({fmt.format(s['min'])}-{fmt.format(s['max'])}{unit}, n={s['n']})"


def report(res: dict) -> str:
    m = res["machine"]
    loads = [x[0] for x in m.get("loadavg_samples", [])]
    lines = [
        "# attnlens.scan against the corpus loops",
        "",
        f"Last written {res['created']} by `{res['command']}`; each section names the run it comes from.",
        "",
        f"Machine: {m['cpus']} CPUs ({m['uname']}), shared with other jobs: 1-minute load average "
        f"{min(loads, default=0):.2f}-{max(loads, default=0):.2f} during the run "
        f"(median {statistics.median(loads) if loads else 0:.2f}; at start {m['loadavg_start']}).",
        f"Pythons: attnlens/HF `{res['setup']['attnlens_python']}`; TransformerLens: {res['setup'].get('tl_hooked', 'not run')}.",
        "",
    ]
    a = res["args"]
    if "speed" in res:
        s = res["speed"]
        a = s.get("context", res["args"])
        lines += [
            "## Speed (tokens/s, higher is better)",
            "",
            *_section_note(res["speed"]),
            f"GPT-2-small-shaped checkpoint (12 layers, 12 heads, d_model 768, vocab 50257, seeded random weights, "
            f"`benchmarks/make_checkpoint.py`), fp32 CPU, {a['threads']} thread(s) per process; {a['windows']} "
            f"windows of {a['seq_len']} tokens in batches of {a['batch_size']} per timed loop, after one untimed "
            f"warm-up batch; {a['reps']} repetitions, tools interleaved within each. Ratio = scan / loop, taken "
            "within each repetition: median (min-max).",
            "",
            "| tool | tokens/s median (min-max) | scan / tool |",
            "| --- | --- | --- |",
        ]
        for t, sp in s["tokens_per_s"].items():
            ratio = s["ratio_scan_over"].get(t)
            lines.append(
                f"| {LABELS[t]} | {sp['median']:.0f} ({sp['min']:.0f}-{sp['max']:.0f}) | "
                f"{_fmt_spread(ratio) if ratio else '-'} |"
            )
        for t, v in s["runs"].items():
            errs = [r["error"] for r in v if "error" in r]
            if errs:
                lines.append(f"\n{LABELS[t]} failed in {len(errs)} of {len(v)} runs: {errs[0]}")
        if s.get("best_loop"):
            best = s["best_loop"]
            r = s["ratio_scan_over"][best]["median"]
            lines += [
                "",
                f"Target scan >= 1.5x the best loop ({LABELS[best]}): **{'met' if s['target_met'] else 'not met'}** "
                f"({r:.2f}x).",
            ]
        if s["max_abs_diff_of_means_vs_scan"]:
            diffs = ", ".join(f"{LABELS[t]} {d:.1e}" for t, d in s["max_abs_diff_of_means_vs_scan"].items())
            lines += [
                "",
                f"Same work: the hand-averaged means of all seven statistics differ from scan's by at most: {diffs}.",
            ]
        lines.append("")
    if "memory" in res:
        mm = res["memory"]
        a = mm.get("context", res["args"])
        shape = "GPT-2 small (12 layers, 768)" if mm["shape"] == "gpt2" else (
            f"a small GPT-2 ({SMALL_SHAPE['n_layer']} layers, {SMALL_SHAPE['n_head']} heads, d_model "
            f"{SMALL_SHAPE['n_embd']}, vocab 50257, seeded)")  # fmt: skip
        lines += [
            "## Peak memory as the corpus grows",
            "",
            *_section_note(res["memory"]),
            f"{shape}, seq_len {mm['seq_len']}, batch {a['batch_size']}, one fresh process each. Process peak: "
            "`getrusage` `ru_maxrss` of the whole process (import and model load included, whose transient peak can "
            "hide the loop's); loop peak: `VmHWM` after resetting it (`/proc/self/clear_refs`) just before the "
            "loop; growth = loop peak minus the RSS after loading.",
            "",
            "| loop | tokens | process peak MiB (ru_maxrss) | loop peak MiB (VmHWM) | growth MiB | seconds |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in mm["rows"]:
            if "error" in r:
                lines.append(f"| {r.get('tool', '?')} | {r['max_tokens']} | failed: {r['error']} | | |")
                continue
            name = "attnlens.scan" if r["tool"] == "scan" else "trace, keep every pattern"
            loop = r["loop_peak_kb"] or r["peak_rss_kb"]
            lines.append(
                f"| {name} | {r['tokens']:,} ({r['factor']:.0f}x) | {r['peak_rss_kb'] / 1024:.0f} | {loop / 1024:.0f} | "
                f"{(loop - r['rss_before_kb']) / 1024:.0f} | {r['seconds']:.1f} |"
            )
        scans = [r for r in mm["rows"] if r.get("tool") == "scan" and "peak_rss_kb" in r]
        if len(scans) >= 2:

            def growth(r: dict) -> float:
                return ((r["loop_peak_kb"] or r["peak_rss_kb"]) - r["rss_before_kb"]) / 1024

            grow = growth(scans[-1]) - growth(scans[0])
            flat = abs(grow) <= 32
            lines += [
                "",
                f"scan's growth from {scans[0]['tokens']:,} to {scans[-1]['tokens']:,} tokens: {grow:+.0f} MiB "
                f"(target flat, read as within 32 MiB: **{'met' if flat else 'not met'}**).",
            ]
            mm["flat"] = flat
        lines.append("")
    if "dist" in res:
        d = res["dist"]
        a = d.get("context", res["args"])
        lines += [
            "## 2 processes x 1 thread against 1 process x 2 threads",
            "",
            *_section_note(res["dist"]),
            "`python -m torch.distributed.run --standalone --nproc_per_node 2` (gloo) running scan on the speed "
            f"section's windows, against one process with `torch.set_num_threads(2)`; {a['dist_reps']} repetitions, "
            "interleaved.",
            "",
        ]
        for k, sp in d["tokens_per_s"].items():
            lines.append(f"- {k}: {sp['median']:.0f} tokens/s ({sp['min']:.0f}-{sp['max']:.0f})")
        if d["ratio_2x1_over_1x2"]:
            lines.append(f"- ratio 2x1 / 1x2: {_fmt_spread(d['ratio_2x1_over_1x2'])}")
        errs = [r["error"] for v in d["runs"].values() for r in v if "error" in r]
        if errs:
            lines.append(f"- {len(errs)} runs failed: {errs[0]}")
        if "dist_first_attempt" in res:
            lines += ["", res["dist_first_attempt"]["note"] + " (`dist_first_attempt` in scan.json)."]
        lines.append("")
    if "inprocess" in res:
        ip = res["inprocess"]
        lines += [
            "## In one process: the floor",
            "",
            *_section_note(ip),
            "One process, the four calls interleaved per repetition after one warm-up each: a bare SDPA forward of "
            "the base model (no statistics: the floor every loop pays), scan, and the per-batch work of the trace "
            "and HF loops, on one batch of windows in which every token repeats. Time / forward and scan's speed-up, "
            "median (min-max).",
            "",
            "| batch x seq | forward s | scan / forward | trace loop / forward | HF loop / forward | scan speed-up over trace, HF |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        sizes = ip["sizes"]
        if "error" in sizes:
            lines.append(f"| failed: {sizes['error']} | | | | | |")
        for size, v in sizes.items():
            if not isinstance(v, dict) or "ratio_to_forward" not in v:
                continue
            rf, so = v["ratio_to_forward"], v["ratio_scan_over"]
            fwd = statistics.median(v["seconds"]["forward"])
            lines.append(
                f"| {size} | {fwd:.2f} | {_fmt_spread(rf['scan'])} | {_fmt_spread(rf['trace'])} | "
                f"{_fmt_spread(rf['hf'])} | {so['trace']['median']:.2f}x, {so['hf']['median']:.2f}x |"
            )
        lines.append("")
    return "\n".join(lines)


def _section_note(sec: dict) -> list[str]:
    c = sec.get("context")
    if not c:
        return []
    load = c["loadavg_1min"]
    return [
        f"Run {c['created']} by `{c['command']}`; 1-minute load average {load['min']:.1f}-{load['max']:.1f} "
        f"(median {load['median']:.1f}) on the 2 cores during this section.",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
