"""attnlens.verify against a full Hugging Face SDPA forward of the same model on the same tokens.

Speed: one process, calls interleaved (order rotated per repetition, one warm-up round), on a GPT-2-small-shaped
GPT2LMHeadModel built from ``GPT2Config()`` (12 layers, 12 heads, d_model 768, vocab 50257, seeded random weights) in
its default attention implementation (SDPA), fp32, CPU, ``torch.set_num_threads(--threads)``:

* ``forward``: ``model(ids, use_cache=False)``, the whole model with its LM head: the unit;
* ``verify``: ``attnlens.verify(model, ids, progress=False)``, every layer.

Ratios are paired within a repetition, reported as median (min-max). ``--profile`` prints, per size, the top entries
of a cProfile of one more verify call (cumulative and own time). Run the code of another checkout by putting it first
on ``PYTHONPATH`` (the header records which attnlens was imported):

    python benchmarks/verify_bench.py --sizes 1x128,1x512,1x1024,4x256 --repeats 3 --json after.json
    PYTHONPATH=/tmp/verify-old python benchmarks/verify_bench.py --json before.json   # e.g. a worktree of main

Standard library, torch, transformers and attnlens only; no hub; writes only the ``--json`` file.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers
from rows_bench import environment, sizes, timed  # the rows benchmark's header, sizes and timing (gc first, no_grad)

import attnlens


def build(seed: int) -> Any:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()


def tokens(batch: int, pos: int) -> torch.Tensor:
    return torch.randint(0, 50256, (batch, pos), generator=torch.Generator().manual_seed(batch * 7919 + pos))


def measure(model: Any, batch: int, pos: int, repeats: int) -> dict[str, Any]:
    ids = tokens(batch, pos)
    calls: dict[str, Callable[[], Any]] = {
        "forward": lambda: model(ids, use_cache=False).logits,
        "verify": lambda: attnlens.verify(model, ids, progress=False),
    }
    names = tuple(calls)
    report = calls["verify"]()  # warm-up, not counted
    if not report.ok:
        raise RuntimeError(f"verify failed on the benchmark model:\n{report}")
    timed(calls["forward"])
    rounds: list[dict[str, float]] = []
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        rounds.append({name: timed(calls[name]) for name in order})
    per_round = [r["verify"] / r["forward"] for r in rounds]
    return {
        "size": f"{batch}x{pos}",
        "seconds": {name: statistics.median(r[name] for r in rounds) for name in names},
        "ratio": (statistics.median(per_round), min(per_round), max(per_round)),
        "rounds": rounds,
        "load": os.getloadavg()[0],
    }


def profile(model: Any, batch: int, pos: int, top: int) -> str:
    ids = tokens(batch, pos)
    profiler = cProfile.Profile()
    profiler.enable()
    attnlens.verify(model, ids, progress=False)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1x128,1x512,1x1024,4x256", help="BATCHxPOS sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, help="print the top N cProfile entries of one more call")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = {
        **environment(),
        "attnlens_path": os.path.dirname(attnlens.__file__),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(header), flush=True)
    model = build(args.seed)
    results: dict[str, Any] = {"header": header, "speed": [], "profiles": {}}
    for batch, pos in sizes(args.sizes):
        result = measure(model, batch, pos, args.repeats)
        results["speed"].append(result)
        median, low, high = result["ratio"]
        seconds = result["seconds"]
        print(
            f"{result['size']} (load {result['load']:.2f}): forward {seconds['forward']:.3f} s, "
            f"verify {seconds['verify']:.3f} s, verify/forward {median:.2f}x ({low:.2f}-{high:.2f}x)",
            flush=True,
        )
        if args.profile:
            text = profile(model, batch, pos, args.profile)
            results["profiles"][result["size"]] = text
            print(text, flush=True)
        if args.json:  # rewritten after every size, so an interrupted run keeps what it measured
            with open(args.json, "w") as f:
                json.dump({**results, "load_end": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
