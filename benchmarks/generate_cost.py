"""The cost of attnlens.trace_generate against a plain model.generate(), and its memory, on three small models.

The models: the demo GPT-2; a tiny Pythia-shaped GPT-NeoX (parallel residual, a quarter of each head rotated); a tiny
Llama-shaped model (8 query heads on 2 key/value heads, tied embeddings). The last two are built from a config with
seeded random weights (no hub), the sizes below.

Runs are interleaved (plain, traced, plain, traced, ...) so that a machine whose load drifts charges both alike;
each pair starts from the same seed, and the script checks that both produce the same sequences. Prints the median,
the interquartile range and the ratio of medians per model and kernel, then the bytes a trace holds as new tokens grow.

    .venv/bin/python benchmarks/generate_cost.py [--repeats 21] [--new-tokens 32] [--threads 1] [--models demo,...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import attnlens

PROMPT = 12  # tokens, one row: no padding
SIZES = {"hidden_size": 128, "num_hidden_layers": 4, "vocab_size": 512, "max_position_embeddings": 512}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def build(name: str) -> tuple[Any, torch.Tensor]:
    """The model (eval mode) and a prompt ``[1, PROMPT]``."""
    if name == "demo":
        model, tokenizer = attnlens.load_demo()
        return model, tokenizer(["The cat sat on the mat, and the dog"], return_tensors="pt")["input_ids"]
    import transformers

    torch.manual_seed(0)
    if name == "pythia":  # Pythia's layout: parallel residual, rotary_pct 0.25, untied
        config: Any = transformers.GPTNeoXConfig(
            **SIZES, num_attention_heads=4, intermediate_size=512, rotary_pct=0.25, use_parallel_residual=True
        )
        model = transformers.GPTNeoXForCausalLM(config)
    else:  # Llama 3.2's layout: grouped-query attention (4 query heads per key/value head), tied embeddings
        config = transformers.LlamaConfig(
            **SIZES, num_attention_heads=8, num_key_value_heads=2, head_dim=16, intermediate_size=344,
            tie_word_embeddings=True,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(1)
    return model.eval(), torch.randint(0, SIZES["vocab_size"], (1, PROMPT), generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="demo,pythia,llama")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {"max_new_tokens": args.new_tokens, "do_sample": True, "eos_token_id": None, "pad_token_id": 0}
    print(f"torch {torch.__version__}, threads {args.threads}, new tokens {args.new_tokens}, {args.repeats} pairs")
    for name in args.models.split(","):
        model, ids = build(name)
        print(f"{name}: {type(model).__name__}, prompt {ids.shape[1]}")
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
            r = quartiles(sorted(b / a for a, b in zip(plain_s, traced_s, strict=True)))
            print(
                f"  {kernel:5s} plain {p[1] * 1e3:7.1f} ms (IQR {p[0] * 1e3:.1f}-{p[2] * 1e3:.1f})  traced "
                f"{t[1] * 1e3:7.1f} ms (IQR {t[0] * 1e3:.1f}-{t[2] * 1e3:.1f})  ratio of medians {t[1] / p[1]:.2f}, "
                f"per-pair ratio median {r[1]:.2f} (IQR {r[0]:.2f}-{r[2]:.2f})"
            )
            t0 = time.perf_counter()
            g.check()
            print(f"  {kernel:5s} check(): {(time.perf_counter() - t0) * 1e3:.1f} ms")
        print(f"  memory held by a trace ({model.dtype}, all layers and heads, batch 1):")
        for n in (16, 64, 128, 240):
            g = attnlens.trace_generate(model, ids, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
            rows = g.rows.numel() * g.rows.element_size()
            cache = 2 * g.cache_keys.numel() * g.cache_keys.element_size()
            print(
                f"    {n:4d} new tokens: rows {rows / 1024:8.1f} KiB {tuple(g.rows.shape)}, cache {cache / 1024:7.1f} KiB"
            )


if __name__ == "__main__":
    main()
