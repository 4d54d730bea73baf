"""The config policy for Hugging Face GPT-NeoX: which config keys attnlens reproduces, ignores, refuses or warns about.

GPT-NeoX here is every ``model_type: gpt_neox`` checkpoint: Pythia, GPT-NeoX-20B, RedPajama-INCITE and fine-tunes.

The four kinds are those of :mod:`attnlens.models.gpt2_config` (modelled, inert with a reason, refused values,
unknown: warned about, refused under :func:`attnlens.strict_config`); the keys every config carries and the check
itself live in :mod:`attnlens.models._config_policy`.

The rotary embedding has had three spellings, and the two releases attnlens supports read different ones:

* transformers up to 4.44 wrote ``rotary_pct`` and ``rotary_emb_base``; 4.57 reads only those (it copies them into
  ``partial_rotary_factor`` and ``rope_theta``, overwriting any value given under those names);
* 4.45 to 4.57 write ``partial_rotary_factor`` and ``rope_theta`` besides them;
* 5.x reads only ``rope_parameters`` (``rope_type``, ``rope_theta``, ``partial_rotary_factor``), built from
  ``rotary_pct`` / ``rotary_emb_base`` when the config has them and else from defaults (a top-level
  ``partial_rotary_factor`` alone is ignored), and writes ``rope_parameters`` on save.

So one config.json can mean two rotations, one per release (a 5.x-saved config loaded by 4.57 falls back to
``rotary_pct`` 0.25). The policy refuses a config whose spellings disagree, naming both values, instead of
reproducing whichever one the installed release happens to read. Scaled rotary variants (``rope_scaling`` in 4.x,
another ``rope_type`` in 5.x) are refused: attnlens checks its rotation against the default (unscaled) one.

Whether a key is inert was checked against ``configuration_gpt_neox`` and ``modeling_gpt_neox`` of transformers 4.57
and 5.x.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from attnlens.errors import UnsupportedModelError
from attnlens.functional import ACTIVATIONS
from attnlens.models import _config_policy
from attnlens.models._config_policy import COMMON_INERT_KEYS, DROPOUT

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["INERT_KEYS", "MODELLED_KEYS", "REFUSED_VALUES", "check_config", "rotary", "unknown_keys"]

_ROTARY = "the rotation is taken from the cos/sin the attention modules receive and checked against this value"

MODELLED_KEYS: dict[str, str] = {
    "model_type": "must be 'gpt_neox'",
    "vocab_size": "d_vocab (the embedding's own shape is what is read)",
    "hidden_size": "d_model",
    "num_attention_heads": "heads per layer; d_head = hidden_size // num_attention_heads",
    "num_hidden_layers": "layers",
    "intermediate_size": "d_mlp (the MLP weights' own shape is what is read)",
    "hidden_act": "the MLP activation, one of attnlens.functional.ACTIVATIONS (else refused)",
    "layer_norm_eps": "read from each LayerNorm module's eps",
    "max_position_embeddings": "n_ctx, the trained context length (rotary has no position table to bound the input)",
    "use_parallel_residual": "the block's form: x + attn(ln1(x)) + mlp(ln2(x)) if true, else attention then MLP",
    "attention_bias": "whether query_key_value and dense have biases (read from the modules themselves)",
    "tie_word_embeddings": "W_U is read from the LM head itself (embed_out in 4.x, lm_head in 5.x), tied or not",
    "use_cache": "attnlens passes use_cache explicitly; the cache holds keys after rotation",
    "rotary_pct": "rotary fraction of each head (4.x name); " + _ROTARY,
    "partial_rotary_factor": "rotary fraction of each head (4.45+ name); " + _ROTARY,
    "rotary_emb_base": "rotary base (4.x name); " + _ROTARY,
    "rope_theta": "rotary base (4.45+ name); " + _ROTARY,
    "rope_parameters": "5.x's rotary settings: rope_type 'default' (others refused), rope_theta, partial_rotary_factor",
    "rope_scaling": "4.x's scaled rotary variants: must be null (scaled rotations are refused)",
    "head_dim": "5.x sizes the rotary embedding by it: must equal hidden_size // num_attention_heads (else refused)",
}
"""Keys whose effect attnlens reproduces or checks, each with how."""

INERT_KEYS: dict[str, str] = {
    # GPT-NeoX's own keys.
    "attention_dropout": DROPOUT,
    "hidden_dropout": DROPOUT,
    "classifier_dropout": DROPOUT,
    "attention_probs_dropout_prob": "dropout under the name of the first GPT-NeoX port (GPT-NeoX-20B's 4.19-4.27 "
    "configs); read by no release since",
    "hidden_dropout_prob": "dropout under the name of the first GPT-NeoX port (GPT-NeoX-20B's 4.19-4.27 configs); "
    "read by no release since",
    "initializer_range": "the std of freshly initialised weights; loaded weights do not depend on it",
    "is_decoder": "read by no GPT-NeoX module of 4.57/5.x (GPT-NeoX attention is always causal)",
    "custom_pipelines": "the pipeline class pipeline() loads for this checkpoint; the forward does not read it",
    "architectures": "which class load() builds; every GPT-NeoX class has the same transformer",
    "chunk_size_feed_forward": "read by no GPT-NeoX module (its MLP is never chunked)",
    # Bookkeeping, output switches, token ids, generation defaults and task-head keys of every config.
    **COMMON_INERT_KEYS,
}
"""Keys that cannot change what the model computes in eval mode, each with the reason."""

REFUSED_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "add_cross_attention": ((False, None), "cross-attention (GPT-NeoX has none; the config belongs to something else)"),
    "is_encoder_decoder": ((False, None), "an encoder-decoder model"),
    "pruned_heads": (({}, None), "pruned heads (the fused query_key_value no longer splits evenly)"),
    "quantization_config": ((None,), "quantized weights (GPT-NeoX's Linear layers are replaced)"),
}
"""Keys whose value changes the maths in a way attnlens does not reproduce: key -> (allowed values, what it means)."""


def unknown_keys(config: PretrainedConfig) -> tuple[str, ...]:
    """The config's keys whose effect attnlens does not know (neither modelled, inert nor value-checked), sorted."""
    return _config_policy.unknown_keys(config, MODELLED_KEYS, INERT_KEYS, REFUSED_VALUES)


def rotary(config: PretrainedConfig) -> tuple[float, float]:
    """The rotary fraction and base the config asks for, as ``(fraction, base)``, whichever spelling it uses.

    Raises:
        UnsupportedModelError: the spellings disagree, or a scaled rotary embedding (see the module docstring).
    """
    fraction, base, problems = _rotary(config)
    if problems:
        raise UnsupportedModelError(
            "this GPT-NeoX config's rotary embedding is not one attnlens reproduces: " + "; ".join(problems)
        )
    return fraction, base


def _rotary(config: PretrainedConfig) -> tuple[float, float, list[str]]:
    raw = config.to_dict()
    params = raw.get("rope_parameters") or {}
    problems = []
    if raw.get("rope_scaling") is not None:
        problems.append(f"a scaled rotary embedding: rope_scaling={raw['rope_scaling']!r} (need null)")
    if params.get("rope_type", "default") != "default":
        problems.append(
            f"a scaled rotary embedding: rope_parameters rope_type={params['rope_type']!r} (need 'default')"
        )
    values = {}
    spellings = (("fraction", ("rotary_pct", "partial_rotary_factor")), ("base", ("rotary_emb_base", "rope_theta")))
    for what, names in spellings:
        spelled = {name: raw[name] for name in names if raw.get(name) is not None}
        if params.get(names[1]) is not None:
            spelled[f"rope_parameters[{names[1]!r}]"] = params[names[1]]
        if len({float(value) for value in spelled.values()}) > 1:
            problems.append(
                f"rotary {what} spelled with different values ({', '.join(f'{k}={v!r}' for k, v in spelled.items())}): "
                "transformers 4.x reads the first, 5.x rope_parameters, so the rotation depends on the release; "
                "re-save the config with one value"
            )
        # Neither spelling present: both releases default to GPT-NeoX-20B's 0.25 and 10000.
        values[what] = float(next(iter(spelled.values()), 0.25 if what == "fraction" else 10000))
    return values["fraction"], values["base"], problems


def _problems(config: PretrainedConfig) -> list[str]:
    problems = []
    if config.hidden_act not in ACTIVATIONS:
        problems.append(f"hidden_act={config.hidden_act!r} (known: {', '.join(ACTIVATIONS)})")
    fraction, _, rotary_problems = _rotary(config)
    problems.extend(rotary_problems)
    d_head = config.hidden_size // config.num_attention_heads
    head_dim = config.to_dict().get("head_dim")
    if head_dim is not None and head_dim != d_head:
        problems.append(
            f"head_dim={head_dim!r} differs from hidden_size // num_attention_heads = {d_head}: 5.x would size the "
            "rotary embedding by one and the attention heads by the other"
        )
    width = int(d_head * fraction) if math.isfinite(fraction) else -1
    if width % 2 or not 0 <= fraction <= 1:
        problems.append(
            f"a rotary width of int({d_head} * {fraction}) = {width} features per head: rotary turns pairs of "
            "features, so the width must be even and between 0 and d_head"
        )
    return problems


def check_config(config: PretrainedConfig) -> tuple[str, ...]:
    """Refuse a config whose maths attnlens does not reproduce; warn about keys of unknown effect.

    Returns:
        The unknown keys (see :func:`unknown_keys`), after an :class:`~attnlens.UnknownConfigWarning` naming them.

    Raises:
        UnsupportedModelError: the config is not GPT-NeoX, asks for maths attnlens does not reproduce (naming every
            offending key: an unknown activation, a scaled or ambiguously spelled rotary embedding, an odd rotary
            width, cross-attention, pruned heads, quantized weights), or has unknown keys inside
            :func:`attnlens.strict_config`.
    """
    return _config_policy.check_config(
        config,
        family="GPT-NeoX",
        model_type="gpt_neox",
        modelled=MODELLED_KEYS,
        inert=INERT_KEYS,
        refused=REFUSED_VALUES,
        problems=_problems,
    )
