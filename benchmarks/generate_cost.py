"""The cost of attnlens.trace_generate against a plain model.generate() on the demo model, and its memory.

Runs are interleaved (plain, traced, plain, traced, ...) so that a machine whose load drifts charges both alike;
each pair starts from the same seed, and the script checks that both produce the same sequences. Prints the median,
the interquartile range and the ratio of medians per kernel, then the bytes a trace holds as new tokens grow.

    .venv/bin/python benchmarks/generate_cost.py [--repeats 21] [--new-tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import attnlens


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = attnlens.load_demo()
    ids = tokenizer(["The cat sat on the mat, and the dog"], return_tensors="pt")["input_ids"]  # one row: no padding
    options = {"max_new_tokens": args.new_tokens, "do_sample": True, "eos_token_id": None, "pad_token_id": 0}
    print(f"torch {torch.__version__}, threads {args.threads}, prompt {ids.shape[1]}, new tokens {args.new_tokens}")
    for kernel in ("sdpa", "eager"):
        model.set_attn_implementation(kernel)
        plain_s: list[float] = []
        traced_s: list[float] = []
        for i in range(args.repeats + 2):  # the first two pairs warm up, and are not counted
            torch.manual_seed(i)
            t0 = time.perf_counter()
            with torch.no_grad():
                plain = model.generate(ids, **options)
            t1 = time.perf_counter()
            torch.manual_seed(i)
            g = attnlens.trace_generate(model, ids, **options)
            t2 = time.perf_counter()
            assert torch.equal(plain, g.sequences), "tracing changed what was generated"
            if i >= 2:
                plain_s.append(t1 - t0)
                traced_s.append(t2 - t1)
        p, t = quartiles(plain_s), quartiles(traced_s)
        ratios = sorted(b / a for a, b in zip(plain_s, traced_s, strict=True))
        r = quartiles(ratios)
        print(
            f"{kernel:5s} plain {p[1] * 1e3:7.1f} ms (IQR {p[0] * 1e3:.1f}-{p[2] * 1e3:.1f})  traced {t[1] * 1e3:7.1f} ms "
            f"(IQR {t[0] * 1e3:.1f}-{t[2] * 1e3:.1f})  ratio of medians {t[1] / p[1]:.2f}, per-pair ratio median "
            f"{r[1]:.2f} (IQR {r[0]:.2f}-{r[2]:.2f})"
        )
        t0 = time.perf_counter()
        g.check()
        print(f"{kernel:5s} check(): {(time.perf_counter() - t0) * 1e3:.1f} ms")
    print("memory held by a trace (float32, all layers and heads, batch 1):")
    for n in (16, 64, 128, 240):
        g = attnlens.trace_generate(model, ids, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
        rows = g.rows.numel() * g.rows.element_size()
        cache = 2 * g.cache_keys.numel() * g.cache_keys.element_size()
        print(f"  {n:4d} new tokens: rows {rows / 1024:8.1f} KiB {tuple(g.rows.shape)}, cache {cache / 1024:7.1f} KiB")


if __name__ == "__main__":
    main()
