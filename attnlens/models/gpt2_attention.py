"""The attention of each GPT-2 layer, read from its module as the installed transformers release runs it.

Each ``GPT2Attention`` copies the config's flags when it is built and then reads only its own copy, so the modules,
not the config, say what runs: the scale (and in which arithmetic order it is applied: 4.x divides, 5.x multiplies),
the inverse-layer scaling and the float32 upcast. A module whose shape or place disagrees with the config is refused.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from attnlens.errors import UnsupportedModelError
from attnlens.models.base import AttentionSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["attention_specs", "check_attention_modules", "ignores_scale_flags", "transformers_major"]


@functools.cache
def transformers_major() -> int:
    """The installed transformers release's major version (4 or 5: they scale GPT-2's scores differently)."""
    import transformers

    return int(transformers.__version__.split(".")[0])


def attention_specs(config: PretrainedConfig, attns: list[Any]) -> tuple[AttentionSpec, ...]:
    """Each layer's :class:`AttentionSpec`, read from its attention module as the installed release does.

    Each ``GPT2Attention`` copies the config's flags when it is built and then reads only its own copy: 5.x its
    precomputed ``scaling``, 4.x its ``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx`` and ``layer_idx``;
    both their ``reorder_and_upcast_attn``. A config edited after the model was built no longer says what runs, so
    the modules, not the config, give the maths (after :func:`check_attention_modules` has checked the shapes).
    """
    check_attention_modules(config, attns)
    legacy = transformers_major() < 5
    n_heads = int(config.n_head)
    specs = []
    for attn in attns:
        upcast = bool(attn.reorder_and_upcast_attn)
        if not legacy:
            # 5.x hands every kernel this one number (eager multiplies by it, sdpa passes it as its scale).
            specs.append(AttentionSpec(float(attn.scaling), n_heads, n_heads, upcast=upcast))
            continue
        d_head = int(attn.head_dim)
        scale = 1.0
        divisors: list[float] = []
        if attn.scale_attn_weights:
            scale = 1.0 / float(d_head) ** 0.5
            divisors.append(d_head**0.5)
        if attn.scale_attn_by_inverse_layer_idx:
            scale /= float(attn.layer_idx + 1)
            divisors.append(float(attn.layer_idx + 1))
        specs.append(AttentionSpec(scale, n_heads, n_heads, upcast=upcast, divisors=tuple(divisors)))
    return tuple(specs)


def check_attention_modules(config: PretrainedConfig, attns: list[Any]) -> None:
    """Refuse attention modules whose shape or place disagrees with the config (a config edited after building).

    attnlens splits heads by the config; the modules split them by their own ``num_heads`` / ``head_dim``, and
    index their cache and inverse-layer scale by their own ``layer_idx``.

    Raises:
        UnsupportedModelError: naming each disagreement.
    """
    d_model, n_heads = config.n_embd, config.n_head
    want = {"embed_dim": d_model, "num_heads": n_heads, "head_dim": d_model // n_heads, "split_size": d_model}
    implementation = str(config._attn_implementation)
    problems = []
    for layer, attn in enumerate(attns):
        have = {name: getattr(attn, name, None) for name in want}
        if have != want:
            problems.append(f"layer {layer}'s attention module has {have}, the config says {want}")
        if getattr(attn, "layer_idx", None) != layer:
            problems.append(f"layer {layer}'s attention module has layer_idx={getattr(attn, 'layer_idx', None)!r}")
        if getattr(attn, "is_cross_attention", False):
            problems.append(f"layer {layer}'s attention module is a cross-attention module")
        own = getattr(getattr(attn, "config", None), "_attn_implementation", implementation)
        if str(own) != implementation:
            problems.append(f"layer {layer}'s attention module runs {own!r}, model.config says {implementation!r}")
    if problems:
        raise UnsupportedModelError(
            "the model's attention modules disagree with its config (was the config edited after the model was "
            "built? build the model from the edited config instead): " + "; ".join(problems)
        )


def ignores_scale_flags(kernel: str, attns: list[Any]) -> bool:
    """Whether a kernel ignores the attention modules' scale flags (scaling by ``1/sqrt(d_head)`` instead).

    transformers 4.x's GPT-2 calls every kernel but eager (sdpa, flash) without its scale, so those kernels use their
    default ``1/sqrt(d_head)`` even under ``scale_attn_weights=False`` or ``scale_attn_by_inverse_layer_idx=True``:
    such a model computes other attention than its flags (and its eager twin) say. 5.x passes the scale. The flags
    are the modules' own, which is what the eager kernel reads (not the config's).
    """
    if transformers_major() >= 5 or kernel == "eager":
        return False
    return any(not attn.scale_attn_weights or bool(attn.scale_attn_by_inverse_layer_idx) for attn in attns)
