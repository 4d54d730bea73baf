"""attnlens.trace on an eager-run model against Hugging Face's own forward passes, in one process, calls interleaved.

Five calls on a GPT-2-small-shaped GPT2LMHeadModel (12 layers, 12 heads, d_model 768, seeded random weights), every
one under ``torch.no_grad`` and returning every layer's pattern except the plain forward:

* ``trace_eager``: ``attnlens.trace(model, ids)`` on a model loaded with ``attn_implementation="eager"``;
* ``hf_eager_attn``: the eager twin's ``model(ids, output_attentions=True)`` (the usual way to get patterns);
* ``hf_sdpa``: a plain forward of the SDPA twin (no patterns: the floor);
* ``trace_sdpa``: ``attnlens.trace`` on the SDPA twin;
* ``hf_eager_base``: a plain forward of the eager model's ``GPT2Model`` (no task head, no patterns): the floor of any
  trace that lets an eager model run its own kernel (trace also skips the last layer's MLP, and copies patterns).

Each repetition runs the four once, in an order rotated from one repetition to the next, after one warm-up round;
ratios are taken within a repetition (paired) and reported as their median and min-max over the repetitions. Each
tool has its own model (equal weights): 5.x keeps recording hooks on a model once it was asked for attentions, and
those must not slow the others down.

    python benchmarks/trace_eager.py --sizes 1x128,4x1024 --repeats 5 --threads 1

Standard library, torch, transformers and attnlens only; no hub, no files written unless ``--json`` names one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers

import attnlens

TOOLS = ("trace_eager", "hf_eager_attn", "hf_sdpa", "trace_sdpa", "hf_eager_base")
RATIOS = (
    ("trace_eager", "hf_eager_attn"),
    ("trace_sdpa", "hf_eager_attn"),
    ("trace_eager", "hf_sdpa"),
    ("trace_sdpa", "hf_sdpa"),
    ("trace_eager", "trace_sdpa"),
    ("trace_eager", "hf_eager_base"),
    ("hf_eager_base", "hf_eager_attn"),
)


def build(attn_implementation: str, seed: int) -> Any:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    config._attn_implementation = attn_implementation
    return transformers.GPT2LMHeadModel(config).eval()


def tools(seed: int) -> dict[str, Callable[[torch.Tensor], Any]]:
    trace_eager, hf_eager, sdpa, trace_sdpa = (build(k, seed) for k in ("eager", "eager", "sdpa", "sdpa"))
    return {
        "trace_eager": lambda ids: attnlens.trace(trace_eager, ids).patterns,
        "hf_eager_attn": lambda ids: hf_eager(ids, output_attentions=True).attentions,
        "hf_sdpa": lambda ids: sdpa(ids).logits,
        "trace_sdpa": lambda ids: attnlens.trace(trace_sdpa, ids).patterns,
        # trace never asks this model for attentions, so 5.x's recording hooks are not on it either
        "hf_eager_base": lambda ids: trace_eager.transformer(ids, use_cache=False).last_hidden_state,
    }


def timed(call: Callable[[torch.Tensor], Any], ids: torch.Tensor) -> float:
    gc.collect()
    start = time.perf_counter()
    with torch.no_grad():
        out = call(ids)
    seconds = time.perf_counter() - start
    del out
    return seconds


def measure(calls: dict[str, Callable[[torch.Tensor], Any]], batch: int, pos: int, repeats: int) -> dict[str, Any]:
    ids = torch.randint(0, 50257, (batch, pos), generator=torch.Generator().manual_seed(1234 + batch + pos))
    for name in TOOLS:  # warm-up round, not counted
        timed(calls[name], ids)
    rounds: list[dict[str, float]] = []
    for rep in range(repeats):
        order = TOOLS[rep % len(TOOLS) :] + TOOLS[: rep % len(TOOLS)]
        rounds.append({name: timed(calls[name], ids) for name in order})
    seconds = {name: statistics.median(r[name] for r in rounds) for name in TOOLS}
    ratios = {}
    for a, b in RATIOS:
        per_round = [r[a] / r[b] for r in rounds]
        ratios[f"{a}/{b}"] = (statistics.median(per_round), min(per_round), max(per_round))
    return {"size": f"{batch}x{pos}", "seconds": seconds, "ratios": ratios, "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1x128,4x1024", help="comma-separated BATCHxPOS (default 1x128,4x1024)")
    parser.add_argument("--repeats", type=int, default=5, help="counted repetitions per size (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the raw timings to this file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    sizes = []
    for item in args.sizes.split(","):
        try:
            batch, pos = (int(x) for x in item.lower().split("x"))
        except ValueError:
            parser.error(f"--sizes: {item!r} is not BATCHxPOS")
        sizes.append((batch, pos))
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load = os.getloadavg()
    print(
        f"attnlens {attnlens.__version__} ({os.path.dirname(attnlens.__file__)}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}"
    )
    print(
        f"{os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, load average {load[0]:.2f} at start, "
        f"repeats {args.repeats}"
    )
    calls = tools(args.seed)
    results = []
    for batch, pos in sizes:
        result = measure(calls, batch, pos, args.repeats)
        results.append(result)
        print(f"\n## {result['size']}  (load average {os.getloadavg()[0]:.2f})")
        print("| call | median s |\n|---|---|")
        for name in TOOLS:
            print(f"| {name} | {result['seconds'][name]:.3f} |")
        print("\n| ratio | median | min-max |\n|---|---|---|")
        for key, (median, low, high) in result["ratios"].items():
            print(f"| {key} | {median:.2f} | {low:.2f}-{high:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "load_start": load, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
