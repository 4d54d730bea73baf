"""Build the offline GPT-2-small-shaped checkpoints used by the benchmarks.

Run with a Python that has torch, transformers, safetensors and tokenizers
(``run.py`` uses the attnlens venv).  For each variant it writes a complete
local Hugging Face hub cache entry named ``gpt2``::

    <out>/<variant>/hub/models--gpt2/refs/main
    <out>/<variant>/hub/models--gpt2/snapshots/<hash>/{config.json,
        model.safetensors, generation_config.json, vocab.json, merges.txt,
        tokenizer_config.json, special_tokens_map.json}

so that ``HF_HOME=<out>/<variant> HF_HUB_OFFLINE=1`` makes ``"gpt2"`` resolve
to these weights for every library that insists on a hub name.  The same
entry is also linked as ``openai-community/gpt2`` (the canonical repo id some
libraries map "gpt2" to).

Variants
--------
random  GPT2Config() defaults, ``torch.manual_seed(seed)`` initialisation.
sharp   the same weights with the query and key projections (weights and
        biases) of every layer multiplied by a common factor ``s``, chosen by
        bisection so that the mean row maximum of all attention patterns (on
        seeded random token ids, 1 x 128) is about ``target`` (default 0.85),
        i.e. peaked like a trained GPT-2 rather than near-uniform.

The tokenizer is a synthetic byte-level BPE with exactly 50257 entries
(256 byte symbols, 50000 two-byte merges, ``<|endoftext|>`` = 50256); the
real GPT-2 vocabulary cannot be downloaded here and the benchmarks feed
token ids directly, so only its shape matters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer(snap: Path, vocab_size: int, n_ctx: int) -> None:
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {s: i for i, s in enumerate(symbols)}
    merges: list[str] = []
    n_merges = vocab_size - 1 - len(symbols)
    for a in symbols:
        for b in symbols:
            if len(merges) == n_merges:
                break
            merges.append(f"{a} {b}")
            vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) == vocab_size, len(vocab)
    (snap / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (snap / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    eot = "<|endoftext|>"
    (snap / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "model_max_length": n_ctx,
                "bos_token": eot,
                "eos_token": eot,
                "unk_token": eot,
                "add_prefix_space": False,
            },
            indent=2,
        )
    )
    (snap / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": eot, "eos_token": eot, "unk_token": eot}, indent=2)
    )


@torch.no_grad()
def mean_row_max(model, ids: torch.Tensor) -> float:
    out = model(ids, output_attentions=True)
    return float(torch.stack([a.amax(-1).mean() for a in out.attentions]).mean())


@torch.no_grad()
def scale_qk(model, factor: float) -> None:
    d = model.config.n_embd
    for block in model.transformer.h:
        block.attn.c_attn.weight[:, : 2 * d] *= factor
        block.attn.c_attn.bias[: 2 * d] *= factor


def calibrate_sharp(model, ids: torch.Tensor, target: float) -> tuple[float, float]:
    """Find a q/k scale factor giving mean row max ~= target (bisection on log scale)."""
    base = {
        i: (b.attn.c_attn.weight.detach().clone(), b.attn.c_attn.bias.detach().clone())
        for i, b in enumerate(model.transformer.h)
    }

    def at(factor: float) -> float:
        with torch.no_grad():
            for i, b in enumerate(model.transformer.h):
                b.attn.c_attn.weight.copy_(base[i][0])
                b.attn.c_attn.bias.copy_(base[i][1])
        scale_qk(model, factor)
        return mean_row_max(model, ids)

    lo, hi = 1.0, 2.0
    while at(hi) < target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise RuntimeError("could not reach the target sharpness")
    for _ in range(14):
        mid = (lo * hi) ** 0.5
        if at(mid) < target:
            lo = mid
        else:
            hi = mid
    value = at(hi)  # leaves the model scaled by `hi`
    return hi, value


def write_cache(root: Path, model, variant: str, seed: int) -> dict:
    hub = root / "hub"
    repo = hub / "models--gpt2"
    if repo.exists():
        shutil.rmtree(repo)
    commit = hashlib.sha1(f"attnlens-benchmarks/{variant}/seed{seed}".encode()).hexdigest()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    model.save_pretrained(snap, safe_serialization=True)
    # transformers 5 no longer writes GPT-2's legacy "n_ctx"; the original hub
    # config has it and TransformerLens 3.x reads it
    cfg_path = snap / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("n_ctx", model.config.n_positions)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_tokenizer(snap, model.config.vocab_size, model.config.n_positions)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    alias = hub / "models--openai-community--gpt2"
    if alias.is_symlink() or alias.exists():
        if alias.is_symlink():
            alias.unlink()
        else:
            shutil.rmtree(alias)
    alias.symlink_to("models--gpt2")
    files = sorted(p.name for p in snap.iterdir())
    return {"hf_home": str(root), "hub_cache": str(hub), "snapshot": str(snap), "commit": commit, "files": files}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="directory receiving <variant>/hub/...")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.85, help="mean row max for the sharp variant")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    config = GPT2Config()
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, config.vocab_size, (1, 128), generator=gen)

    meta: dict = {
        "seed": args.seed,
        "config": {k: getattr(config, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")},
    }
    random_rowmax = mean_row_max(model, ids)
    meta["random"] = {"mean_row_max": random_rowmax, **write_cache(args.out / "random", model, "random", args.seed)}
    print(f"random: mean row max of attention patterns = {random_rowmax:.4f}")

    factor, sharp_rowmax = calibrate_sharp(model, ids, args.target)
    meta["sharp"] = {
        "mean_row_max": sharp_rowmax,
        "qk_scale": factor,
        **write_cache(args.out / "sharp", model, "sharp", args.seed),
    }
    print(f"sharp:  q/k scaled by {factor:.3f}; mean row max = {sharp_rowmax:.4f} (target {args.target})")
    if sharp_rowmax <= 0.8:
        print("sharp variant is not sharp enough", file=sys.stderr)
        return 1
    (args.out / "checkpoints.json").write_text(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
