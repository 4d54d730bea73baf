"""The config policy for Hugging Face GPT-2: which config keys attnlens reproduces, ignores, refuses or warns about.

Every key of a GPT-2 config (``config.to_dict()``) falls in one of four kinds:

* **modelled**: attnlens reads it, or reads the module it shapes, and reproduces its effect (sizes, the scale flags,
  the activation, the layer-norm epsilon, ...);
* **inert**: it cannot change what the model computes in eval mode (bookkeeping of any transformers era, generation
  defaults, task-head settings, dropout, legacy keys that no current release reads). Accepted silently; each has its
  reason in :data:`INERT_KEYS`;
* **refused values**: flags that change the maths in a way attnlens does not reproduce (cross-attention, pruned
  heads, quantized weights, an unknown activation). :class:`~attnlens.UnsupportedModelError`, always;
* **unknown**: anything else, e.g. a flag added by a future release or a fork. attnlens cannot know whether it
  changes the numbers, so it never passes silently, but it does not lock the user out either: an
  :class:`~attnlens.UnknownConfigWarning` names the keys and points to :func:`attnlens.verify`, whose report (and
  every trace's provenance) records them. Inside :func:`attnlens.strict_config` they are refused instead.

Whether a key is inert was checked against the GPT-2 configuration and modelling code of transformers 4.57 and 5.x:
none of the inert keys is read by ``modeling_gpt2`` except by task heads and training-only paths. The keys every
config carries and the check itself are shared with the other architectures' policies in
:mod:`attnlens.models._config_policy`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attnlens.functional import ACTIVATIONS
from attnlens.models import _config_policy
from attnlens.models._config_policy import COMMON_INERT_KEYS, DROPOUT, TASK_HEAD

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["INERT_KEYS", "MODELLED_KEYS", "REFUSED_VALUES", "check_config", "unknown_keys"]

MODELLED_KEYS: dict[str, str] = {
    "model_type": "must be 'gpt2'",
    "vocab_size": "d_vocab (the embedding's own shape is what is read)",
    "n_positions": "n_ctx: rows of W_pos; input lengths and position ids are checked against it",
    "n_embd": "d_model",
    "n_head": "heads per layer; d_head = n_embd // n_head",
    "n_layer": "layers",
    "n_inner": "d_mlp (the MLP weights' own shape is what is read)",
    "activation_function": "the MLP activation, one of attnlens.functional.ACTIVATIONS (else refused)",
    "layer_norm_epsilon": "read from each LayerNorm module's eps",
    "scale_attn_weights": "the attention scale 1/sqrt(d_head), in the installed release's arithmetic order",
    "scale_attn_by_inverse_layer_idx": "the extra 1/(layer + 1) scale, in the installed release's arithmetic order",
    "reorder_and_upcast_attn": "the eager kernel's float32 upcast of the scores",
    "use_cache": "trace matches the key layout the kernel gets back from the cache",
    "tie_word_embeddings": "W_U is read from the LM head itself, tied to W_E or not",
}
"""Keys whose effect attnlens reproduces, each with how."""

INERT_KEYS: dict[str, str] = {
    # GPT-2's own keys.
    "n_ctx": "read by no GPT-2 module of 4.57/5.x (the causal mask is built per call, up to n_positions); transformers "
    "2.x sized its causal mask with it, which only limited the length",
    "resid_pdrop": DROPOUT,
    "embd_pdrop": DROPOUT,
    "attn_pdrop": DROPOUT,
    "initializer_range": "the std of freshly initialised weights; loaded weights do not depend on it",
    "summary_type": "GPT2DoubleHeadsModel's multiple-choice head (" + TASK_HEAD + ")",
    "summary_use_proj": "GPT2DoubleHeadsModel's multiple-choice head (" + TASK_HEAD + ")",
    "summary_activation": "GPT2DoubleHeadsModel's multiple-choice head (" + TASK_HEAD + ")",
    "summary_proj_to_labels": "GPT2DoubleHeadsModel's multiple-choice head (" + TASK_HEAD + ")",
    "summary_first_dropout": DROPOUT,
    "summary_last_dropout": DROPOUT,
    "classifier_dropout": DROPOUT,
    "hidden_dropout": DROPOUT,
    # Legacy keys of early hub checkpoints (gpt2-medium/large/xl, distilgpt2) and of transformers 2.x-4.x.
    "n_special": "an OpenAI-GPT key (extra special-token embeddings) copied into early GPT-2 configs; never read",
    "predict_special_tokens": "an OpenAI-GPT key copied into early GPT-2 configs; never read",
    "output_past": "transformers 2.x's name for use_cache (return the key/value cache); no current release reads it",
    "xla_device": "a TPU placement hint written by early 4.x releases (4.3 saved it), read by no GPT-2 module",
    "architectures": "which class load() builds; any supported GPT-2 class has the same transformer",
    "chunk_size_feed_forward": "read by no GPT-2 module (GPT-2's MLP is never chunked)",
    # Bookkeeping, output switches, token ids, generation defaults and task-head keys of every config.
    **COMMON_INERT_KEYS,
}
"""Keys that cannot change what the model computes in eval mode, each with the reason."""

REFUSED_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "add_cross_attention": ((False, None), "cross-attention blocks (attention to an encoder's states)"),
    "is_encoder_decoder": ((False, None), "an encoder-decoder model"),
    "is_decoder": ((False, None), "the decoder of an encoder-decoder pair"),
    "pruned_heads": (({}, None), "pruned heads (the fused q/k/v projection no longer splits evenly)"),
    "quantization_config": ((None,), "quantized weights (GPT-2's Conv1D layers are replaced)"),
}
"""Keys whose value changes the maths in a way attnlens does not reproduce: key -> (allowed values, what it means)."""


def unknown_keys(config: PretrainedConfig) -> tuple[str, ...]:
    """The config's keys whose effect attnlens does not know (neither modelled, inert nor value-checked), sorted."""
    return _config_policy.unknown_keys(config, MODELLED_KEYS, INERT_KEYS, REFUSED_VALUES)


def _activation(config: PretrainedConfig) -> list[str]:
    if config.activation_function not in ACTIVATIONS:
        return [f"activation_function={config.activation_function!r} (known: {', '.join(ACTIVATIONS)})"]
    return []


def check_config(config: PretrainedConfig) -> tuple[str, ...]:
    """Refuse a config whose maths attnlens does not reproduce; warn about keys of unknown effect.

    Returns:
        The unknown keys (see :func:`unknown_keys`), after an :class:`~attnlens.UnknownConfigWarning` naming them.

    Raises:
        UnsupportedModelError: the config is not GPT-2, asks for maths attnlens does not reproduce (naming every
            offending key), or has unknown keys inside :func:`attnlens.strict_config`.
    """
    return _config_policy.check_config(
        config,
        family="GPT-2",
        model_type="gpt2",
        modelled=MODELLED_KEYS,
        inert=INERT_KEYS,
        refused=REFUSED_VALUES,
        problems=_activation,
    )
