"""attnlens's processed weights against TransformerLens 4.3's, option by option, on the demo model.

Run with the Python of a virtual environment that has TransformerLens 4.x (``transformer-lens==4.3.0``, see
``envs.py``'s ``tl_bridge``); attnlens is imported from this checkout::

    /path/to/tl-venv/bin/python benchmarks/tl_processed.py [--json OUT]

For each setting, a fresh copy of the demo checkpoint is booted into a ``TransformerBridge`` and processed by
``enable_compatibility_mode(...)`` with TransformerLens's option names; another fresh copy is processed by
``attnlens.extract_weights(model).processed(...)`` with the same names. Printed per setting: the largest absolute
difference of each weight, relative to the weight's largest entry (the refactored factors compared through what
defines them, up to the sign of each singular direction), and each side's logits against the model's own (minus
their mean over the vocabulary where ``center_unembed``). Everything runs in float32, as both libraries process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnlens
from attnlens._verify_recompute import rebuild
from attnlens.demo import DEMO_PATH

NAMES = ("W_E", "W_pos", "W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O", "W_in", "b_in", "W_out", "b_out")
NAMES_U = ("W_U", "b_U")
SETTINGS: dict[str, dict[str, bool]] = {
    "defaults (fold_ln, center_writing_weights, center_unembed, fold_value_biases)": {},
    "fold_value_biases=False": {"fold_value_biases": False},
    "center_unembed=False": {"center_unembed": False},
    "fold_ln=False": {"fold_ln": False},
    "refactor_factored_attn_matrices=True": {"refactor_factored_attn_matrices": True},
}


def tl_weights(settings: dict[str, bool], ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """TransformerLens's processed weights (stacked, its names) and its logits, from a fresh demo model."""
    from transformer_lens.model_bridge import TransformerBridge

    model, tokenizer = attnlens.load_demo()
    bridge = TransformerBridge.boot_transformers(str(DEMO_PATH), hf_model=model, tokenizer=tokenizer, device="cpu")
    bridge.enable_compatibility_mode(disable_warnings=True, **settings)
    with torch.no_grad():
        logits = bridge(ids)
        weights = {name: getattr(bridge, name).detach().clone() for name in NAMES + NAMES_U}
    return weights, logits


def attnlens_weights(settings: dict[str, bool], ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """attnlens's processed weights (stacked) and the logits of a forward pass on them, from a fresh demo model."""
    model, _ = attnlens.load_demo()
    processed = attnlens.extract_weights(model).processed(**settings)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    allowed = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    with torch.no_grad():
        _, logits = rebuild(processed, ids, pos, allowed)
        weights: dict[str, Any] = {name: getattr(processed, name) for name in NAMES[:2] + NAMES_U}
        for name in NAMES[2:10]:
            weights[name] = processed.stacked(name)
        for name in NAMES[10:]:
            weights[name] = torch.stack([getattr(layer.mlp, name) for layer in processed.layers])
    assert logits is not None
    return weights, logits


def relative(a: torch.Tensor | None, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``; attnlens has no ``b_U`` where TransformerLens has zeros (no final norm folded)."""
    a = torch.zeros_like(b) if a is None else a
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def refactored_differences(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Compare the refactored factors through what defines them, and each factor up to its directions' signs."""

    def qk(w: dict[str, torch.Tensor]) -> torch.Tensor:
        q = torch.cat([w["W_Q"], w["b_Q"][..., None, :]], -2)
        k = torch.cat([w["W_K"], w["b_K"][..., None, :]], -2)
        return q @ k.mT

    out = {
        "[W_Q; b_Q] @ [W_K; b_K]^T": relative(qk(ours), qk(theirs)),
        "W_V @ W_O": relative(ours["W_V"] @ ours["W_O"], theirs["W_V"] @ theirs["W_O"]),
    }
    # Each singular direction d of a head is defined up to its sign: align ours on theirs by the sign of W_O's row.
    sign = torch.sign((ours["W_O"] * theirs["W_O"]).sum(-1, keepdim=True))  # [layer, head, d_head, 1]
    out["W_O (up to sign)"] = relative(ours["W_O"] * sign, theirs["W_O"])
    out["W_V (up to sign)"] = relative(ours["W_V"] * sign.mT, theirs["W_V"])
    q_sign = torch.sign((ours["W_Q"] * theirs["W_Q"]).sum(-2, keepdim=True))  # [layer, head, 1, d_head]
    for name in ("W_Q", "W_K"):
        out[f"{name} (up to sign)"] = relative(ours[name] * q_sign, theirs[name])
    for name in ("b_Q", "b_K"):
        out[f"{name} (up to sign)"] = relative(ours[name] * q_sign[..., 0, :], theirs[name])
    for name in ("b_V", "b_O", "W_E", "W_pos", "W_U", "b_U"):
        out[name] = relative(ours[name], theirs[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    model, tokenizer = attnlens.load_demo()
    ids = torch.tensor([tokenizer.encode("The cat sat on the mat. The cat sat on the mat again, and again.")])
    with torch.no_grad():
        reference = model(ids).logits
    results: dict[str, Any] = {}
    for label, settings in SETTINGS.items():
        theirs, tl_logits = tl_weights(settings, ids)
        ours, our_logits = attnlens_weights(settings, ids)
        expected = reference
        if settings.get("center_unembed", True):
            expected = reference - reference.mean(-1, keepdim=True)
        if settings.get("refactor_factored_attn_matrices"):
            weights = refactored_differences(ours, theirs)
        else:
            weights = {name: relative(ours[name], theirs[name]) for name in NAMES + NAMES_U}
        results[label] = {
            "weights, max |attnlens - TL| / max |TL|": weights,
            "logits, attnlens vs the model": (our_logits - expected).abs().max().item(),
            "logits, TL vs the model": (tl_logits - expected).abs().max().item(),
            "logits, attnlens vs TL": (our_logits - tl_logits).abs().max().item(),
        }
        print(f"## {label}")
        for key, value in results[label].items():
            if isinstance(value, dict):
                print(f"  {key}: " + ", ".join(f"{k} {v:.1e}" for k, v in value.items()))
            else:
                print(f"  {key}: {value:.1e}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
