"""verify and trace on CUDA: GPT-2-small-shaped models, every dtype, eager and SDPA kernels.

Not a test (CI has no GPU): run it where CUDA exists, e.g. ``python benchmarks/cuda_check.py --out results.json``.
For each weight variant (``random``: GPT2Config() defaults, seeded; ``sharp``: the same with the query and key
projections scaled so that attention rows peak like a trained GPT-2's), dtype and attention kernel, it runs
:func:`attnlens.verify` on a padded batch and prints, per quantity, the worst error as a fraction of its tolerance
(``ratio`` < 1 passes), and the largest difference between ``trace``'s patterns and the eager twin's
``output_attentions`` on valid rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

import attnlens

SHARP = 6.21  # q/k factor that makes the mean row maximum of GPT-2-small-shaped random weights about 0.85


def make_model(variant: str, dtype: torch.dtype, kernel: str) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config()
    config._attn_implementation = kernel
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and "ln_" not in name:
                param.normal_(0.0, 0.02)
        if variant == "sharp":
            d = config.n_embd
            for block in model.transformer.h:
                block.attn.c_attn.weight[:, : 2 * d] *= SHARP
                block.attn.c_attn.bias[: 2 * d] *= SHARP
    return model.to(device="cuda", dtype=dtype)


def inputs(batch: int, n_pos: int, d_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, d_vocab, (batch, n_pos), generator=g)
    mask = torch.ones(batch, n_pos, dtype=torch.long)
    mask[1, : n_pos // 4] = 0  # left padding on the second row
    return ids.cuda(), mask.cuda()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, attnlens {attnlens.__version__}")
    results = []
    failed = 0
    for variant in ("random", "sharp"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            eager = make_model(variant, dtype, "eager")
            ids, mask = inputs(args.batch, args.pos, eager.config.vocab_size)
            with torch.no_grad():
                reference = eager(ids, attention_mask=mask, output_attentions=True).attentions
            for kernel in ("eager", "sdpa"):
                model = eager if kernel == "eager" else make_model(variant, dtype, kernel)
                start = time.perf_counter()
                report = attnlens.verify(model, ids, mask)
                seconds = time.perf_counter() - start
                ratios = {}
                for row in report.rows:
                    ratio = row.max_rel_error / row.tolerance if row.tolerance > 0 else float(row.max_abs_error > 0)
                    ratios[row.quantity] = max(ratios.get(row.quantity, 0.0), ratio)
                traced = attnlens.trace(model, ids, mask)
                valid = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
                trace_diff = max(
                    float(((traced.pattern(i).double() - reference[i].double()).abs() * valid).max())
                    for i in range(model.config.n_layer)
                )
                name = str(dtype).removeprefix("torch.")
                failed += not report.ok
                results.append(
                    {
                        "variant": variant,
                        "dtype": name,
                        "kernel": kernel,
                        "ok": report.ok,
                        "ratios": ratios,
                        "trace_vs_eager_max_abs": trace_diff,
                        "verify_seconds": seconds,
                        "failures": [str(r) for r in report.failures[:5]],
                    }
                )
                worst = max(ratios, key=lambda q: ratios[q])
                print(
                    f"{variant:6} {name:8} {kernel:5} verify {'ok  ' if report.ok else 'FAIL'} "
                    f"worst {worst}={ratios[worst]:.3g} of tolerance; trace vs eager {trace_diff:.3g}; {seconds:.2f}s"
                )
                print("    " + "  ".join(f"{q} {r:.2g}" for q, r in ratios.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
