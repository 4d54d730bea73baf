"""The config policy for Llama-shaped models: Llama, Mistral, Qwen2 and Qwen3 (and SmolLM, TinyLlama, fine-tunes).

One policy serves the four ``model_type`` values, as penzai's ``llamalike_common`` serves them: the transformer is
the same (RMSNorm before attention and MLP, rotary queries and keys, grouped key/value heads, a gated MLP) and the
families differ in a few switches, each read here from the config as the installed release loaded it:

* Llama: ``attention_bias`` (q/k/v/o biases), ``mlp_bias``; no sliding window.
* Mistral: one ``sliding_window`` for every layer (``null``: none); no biases.
* Qwen2: q/k/v biases always (o_proj none); ``use_sliding_window`` / ``sliding_window`` / ``max_window_layers``,
  which both releases turn into ``layer_types`` (a window on layers ``>= max_window_layers`` when enabled).
* Qwen3: ``attention_bias``; per-head RMSNorm ``q_norm`` / ``k_norm`` on ``d_head`` before the rotation;
  ``layer_types`` as Qwen2.

The four kinds are those of :mod:`attnlens.models.gpt2_config` (modelled, inert with a reason, refused values,
unknown: warned about, refused under :func:`attnlens.strict_config`); the keys every config carries and the check
itself live in :mod:`attnlens.models._config_policy`.

Rotary embeddings. transformers 4.57 reads ``rope_theta`` and ``rope_scaling`` (``rope_type`` or the older ``type``);
5.x reads ``rope_parameters`` (built from those two when a config has them) and writes only it on save, so a config
saved by 5.x and loaded by 4.57 runs 4.57's default rotation (base 10000, unscaled) whatever ``rope_parameters`` says.
The policy refuses a config whose spellings disagree, naming both, instead of describing a rotation the installed
release does not run. The rotation the
attention modules apply is ``q * cos + rotate_half(q) * sin`` with the ``cos``/``sin`` the model's rotary embedding
hands them (``position_embeddings``); attnlens takes those as the model ran, so every variant whose angles are fixed
by the positions is followed exactly: ``default``, ``linear``, ``llama3``, ``yarn`` and ``longrope`` (their scaling
is folded into ``cos``/``sin``). ``dynamic`` is refused: its module rescales its frequencies in place whenever an
input is longer than any seen before, so the same input can be rotated differently in two calls.

Whether a key is inert was checked against the Llama, Mistral, Qwen2 and Qwen3 configuration and modelling code of
transformers 4.57 and 5.x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from attnlens.errors import UnsupportedModelError
from attnlens.functional import ACTIVATIONS
from attnlens.models import _config_policy
from attnlens.models._config_policy import COMMON_INERT_KEYS, DROPOUT

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "FAMILIES",
    "FOLLOWED_ROPE_TYPES",
    "INERT_KEYS",
    "MODELLED_KEYS",
    "REFUSED_VALUES",
    "LlamaLikeSettings",
    "check_config",
    "settings",
    "unknown_keys",
]

FAMILIES: dict[str, str] = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
"""The ``model_type`` values this policy serves, with the family's name in messages."""

FOLLOWED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
"""Rotary variants whose ``cos``/``sin`` depend on the positions alone: taken from the model as it ran, exactly."""

_ROTARY = "the rotation is taken from the cos/sin the attention modules receive (position_embeddings)"
_WINDOW = "which layers attend through a sliding window, and how wide (read per layer by settings())"

MODELLED_KEYS: dict[str, str] = {
    "model_type": "one of 'llama', 'mistral', 'qwen2', 'qwen3'",
    "vocab_size": "d_vocab (the embedding's own shape is what is read)",
    "hidden_size": "d_model",
    "intermediate_size": "d_mlp (the MLP weights' own shape is what is read)",
    "num_hidden_layers": "layers",
    "num_attention_heads": "query heads per layer",
    "num_key_value_heads": "key/value heads per layer (grouped-query attention: each serves n_heads / n_kv_heads)",
    "head_dim": "d_head (may differ from hidden_size // num_attention_heads: Mistral-Nemo, Qwen3); scale d_head**-0.5",
    "hidden_act": "the gated MLP's activation, one of attnlens.functional.ACTIVATIONS (else refused)",
    "max_position_embeddings": "n_ctx, the trained context length (rotary has no position table to bound the input)",
    "rms_norm_eps": "read from each RMSNorm module's variance_epsilon",
    "tie_word_embeddings": "W_U is read from the LM head itself, tied or not",
    "use_cache": "attnlens passes use_cache explicitly; the cache holds keys after rotation",
    "attention_bias": "whether q/k/v/o projections have biases (Llama, Qwen3; read from the modules themselves)",
    "mlp_bias": "whether gate/up/down projections have biases (Llama; read from the modules themselves)",
    "rope_theta": "rotary base (4.x); " + _ROTARY,
    "rope_scaling": "4.x's rotary variant: null or a rope_type in FOLLOWED_ROPE_TYPES; " + _ROTARY,
    "rope_parameters": "5.x's rotary settings (rope_type in FOLLOWED_ROPE_TYPES, rope_theta, ...); " + _ROTARY,
    "partial_rotary_factor": "must be null or 1: the Llama-family default rotation turns every feature of a head",
    "sliding_window": _WINDOW,
    "use_sliding_window": "Qwen2/Qwen3: whether sliding_window applies at all; " + _WINDOW,
    "max_window_layers": "Qwen2/Qwen3: layers below it attend fully; " + _WINDOW,
    "layer_types": "'full_attention' or 'sliding_attention' per layer (Qwen2/Qwen3); " + _WINDOW,
}
"""Keys whose effect attnlens reproduces or checks, each with how."""

INERT_KEYS: dict[str, str] = {
    "attention_dropout": DROPOUT,
    "initializer_range": "the std of freshly initialised weights; loaded weights do not depend on it",
    "architectures": "which class load() builds; every class of a family has the same transformer",
    "pretraining_tp": "Meta's tensor-parallel degree; read by no Llama module of 4.57 or 5.x (the slicing was removed)",
    "is_llama_config": "a flag of nanotron's exporter (SmolLM); read by no transformers code",
    "rope_interleaved": "a flag of nanotron's exporter (SmolLM, false); transformers rotates halves whatever it says",
    "use_mrope": "Qwen2-VL's multimodal rotary switch (false); read by no Qwen2 text module",
    "is_decoder": "read by no Llama-family module (their attention is always causal)",
    "chunk_size_feed_forward": "read by no Llama-family module (their MLP is never chunked)",
    **COMMON_INERT_KEYS,
}
"""Keys that cannot change what the model computes in eval mode, each with the reason."""

REFUSED_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "add_cross_attention": ((False, None), "cross-attention (Llama-family models have none)"),
    "is_encoder_decoder": ((False, None), "an encoder-decoder model"),
    "pruned_heads": (({}, None), "pruned heads (the grouped key/value heads no longer pair evenly)"),
    "quantization_config": ((None,), "quantized weights (the Linear layers are replaced)"),
}
"""Keys whose value changes the maths in a way attnlens does not reproduce: key -> (allowed values, what it means)."""


@dataclass(frozen=True)
class LlamaLikeSettings:
    """What a Llama-family adapter needs from the config, as the installed release loaded it.

    Attributes:
        family: "Llama", "Mistral", "Qwen2" or "Qwen3".
        n_heads: query heads per layer.
        n_kv_heads: key/value heads per layer (``n_heads`` for multi-head, 1 for multi-query).
        d_head: features per head (``head_dim``, else ``hidden_size // n_heads``).
        rope_type: one of :data:`FOLLOWED_ROPE_TYPES`.
        rope_theta: the rotary base.
        rope_parameters: the variant's settings as the config states them (factor, original context, ...).
        windows: per layer, the sliding window (at most this many keys, itself included) or None (full causal).
        qk_norm: Qwen3's per-head RMSNorm on queries and keys before the rotation.
        qkv_bias: q/k/v projections have biases (Qwen2 always; Llama and Qwen3 with ``attention_bias``).
        o_bias: o_proj has a bias (Llama and Qwen3 with ``attention_bias``).
        mlp_bias: gate/up/down projections have biases (Llama's ``mlp_bias``).
        tied: the LM head shares the embedding's weight.
    """

    family: str
    n_heads: int
    n_kv_heads: int
    d_head: int
    rope_type: str
    rope_theta: float
    rope_parameters: dict[str, Any]
    windows: tuple[int | None, ...]
    qk_norm: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tied: bool


def unknown_keys(config: PretrainedConfig) -> tuple[str, ...]:
    """The config's keys whose effect attnlens does not know (neither modelled, inert nor value-checked), sorted."""
    return _config_policy.unknown_keys(config, MODELLED_KEYS, INERT_KEYS, REFUSED_VALUES)


def _rope(config: PretrainedConfig) -> tuple[str, float, dict[str, Any], list[str]]:
    raw = config.to_dict()
    # What each release reads: 4.57 rope_scaling and rope_theta, 5.x rope_parameters. A config written by 5.x and
    # loaded by 4.57 carries both (4.57 keeps rope_parameters unread and defaults the others), and so does one edited by
    # hand: the spellings must agree, or the rotation would depend on the installed release.
    spelled: dict[str, dict[str, Any]] = {}
    if raw.get("rope_parameters") is not None:
        spelled["rope_parameters"] = dict(raw["rope_parameters"])
    if "rope_scaling" in raw or "rope_theta" in raw or not spelled:
        legacy = dict(raw.get("rope_scaling") or {})
        if raw.get("rope_theta") is not None:
            legacy["rope_theta"] = raw["rope_theta"]
        spelled["rope_scaling/rope_theta"] = legacy
    readings = {
        where: (str(p.get("rope_type", p.get("type", "default"))), p.get("rope_theta"))
        for where, p in spelled.items()
    }  # fmt: skip
    problems = []
    if len(set(readings.values())) > 1:
        problems.append(
            "the rotary embedding is spelled with different values ("
            + "; ".join(f"{where}: rope_type={t!r}, rope_theta={b!r}" for where, (t, b) in readings.items())
            + "): transformers 4.x reads rope_scaling and rope_theta, 5.x rope_parameters, so the rotation depends on "
            "the release; re-save the config with the release you run"
        )
    params = next(iter(spelled.values()))
    rope_type, theta = next(iter(readings.values()))
    if rope_type not in FOLLOWED_ROPE_TYPES:
        why = (
            "its frequencies are rescaled in place by the longest input seen so far, so one input can be rotated "
            "differently in two calls"
            if rope_type == "dynamic"
            else "a rotary variant attnlens has not checked"
        )
        problems.append(f"rope_type={rope_type!r}: {why} (followed: {', '.join(FOLLOWED_ROPE_TYPES)})")
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if factor not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={factor!r} (need null or 1: a partial rotation is not checked here)")
    if theta is None:
        problems.append("no rotary base (rope_theta) in the config")
    return rope_type, float(theta or 0.0), params, problems


def _windows(config: PretrainedConfig, model_type: str) -> tuple[int | None, ...]:
    raw = config.to_dict()
    window = raw.get("sliding_window")
    n_layers = int(raw["num_hidden_layers"])
    if model_type == "llama" or window is None:
        return (None,) * n_layers
    if model_type == "mistral":
        return (int(window),) * n_layers
    # Qwen2/Qwen3: both releases derive layer_types from use_sliding_window and max_window_layers when a config has
    # none, and null sliding_window when use_sliding_window is false; the attention modules read layer_types.
    types = raw.get("layer_types")
    if types is None:
        start = int(raw.get("max_window_layers", n_layers))
        types = ["sliding_attention" if raw.get("use_sliding_window") and i >= start else "full_attention"
                 for i in range(n_layers)]  # fmt: skip
    return tuple(int(window) if kind == "sliding_attention" else None for kind in types)


def _problems(config: PretrainedConfig) -> list[str]:
    raw = config.to_dict()
    problems = []
    if raw.get("hidden_act") not in ACTIVATIONS:
        problems.append(f"hidden_act={raw.get('hidden_act')!r} (known: {', '.join(ACTIVATIONS)})")
    problems.extend(_rope(config)[3])
    heads, kv_heads = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    if heads % kv_heads:
        problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    types = raw.get("layer_types")
    if types is not None and (
        len(types) != raw["num_hidden_layers"] or not set(types) <= {"full_attention", "sliding_attention"}
    ):
        problems.append(f"layer_types must name 'full_attention' or 'sliding_attention' per layer, got {types!r}")
    if types is not None and "sliding_attention" in types and config.model_type not in ("qwen2", "qwen3"):
        problems.append(f"layer_types with sliding layers on model_type {config.model_type!r} (its modules ignore it)")
    return problems


def check_config(config: PretrainedConfig) -> tuple[str, ...]:
    """Refuse a config whose maths attnlens does not reproduce; warn about keys of unknown effect.

    Returns:
        The unknown keys (see :func:`unknown_keys`), after an :class:`~attnlens.UnknownConfigWarning` naming them.

    Raises:
        UnsupportedModelError: the config is not of the Llama family, asks for maths attnlens does not reproduce
            (naming every offending key: an unknown activation, a ``dynamic`` or unchecked rotary variant, a partial
            rotation, heads that do not group evenly, cross-attention, pruned heads, quantized weights), or has
            unknown keys inside :func:`attnlens.strict_config`.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"attnlens's Llama-family policy serves model_type {', '.join(map(repr, FAMILIES))}, got {model_type!r}"
        )
    return _config_policy.check_config(
        config,
        family=FAMILIES[model_type],
        model_type=model_type,
        modelled=MODELLED_KEYS,
        inert=INERT_KEYS,
        refused=REFUSED_VALUES,
        problems=_problems,
    )


def settings(config: PretrainedConfig) -> LlamaLikeSettings:
    """What the adapter needs from a config that passes :func:`check_config` (call that first: it warns).

    Raises:
        UnsupportedModelError: as :func:`check_config`, for what this function cannot state exactly.
    """
    model_type = str(getattr(config, "model_type", None))
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"not a Llama-family config: model_type {model_type!r}")
    problems = _problems(config)
    if problems:
        raise UnsupportedModelError(
            f"this {FAMILIES[model_type]} config asks for something attnlens does not compute exactly: "
            + "; ".join(problems)
        )
    raw = config.to_dict()
    n_heads = int(raw["num_attention_heads"])
    rope_type, theta, params, _ = _rope(config)
    bias = bool(raw.get("attention_bias", False))
    return LlamaLikeSettings(
        family=FAMILIES[model_type],
        n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
        d_head=int(raw.get("head_dim") or raw["hidden_size"] // n_heads),
        rope_type=rope_type,
        rope_theta=theta,
        rope_parameters=params,
        windows=_windows(config, model_type),
        qk_norm=model_type == "qwen3",
        qkv_bias=model_type == "qwen2" or (bias and model_type in ("llama", "qwen3")),
        o_bias=bias and model_type in ("llama", "qwen3"),
        mlp_bias=bool(raw.get("mlp_bias", False)) and model_type == "llama",
        tied=bool(raw.get("tie_word_embeddings", False)),
    )
