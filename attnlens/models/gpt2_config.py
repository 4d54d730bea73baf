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
none of the inert keys is read by ``modeling_gpt2`` except by task heads and training-only paths.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from attnlens.errors import UnknownConfigWarning, UnsupportedModelError, config_is_strict
from attnlens.functional import ACTIVATIONS

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

_DROPOUT = "dropout: off in eval mode, the only mode attnlens runs a model in"
_GENERATION = "a generation default, read only by generate() (5.x keeps these in generation_config.json)"
_TASK_HEAD = "a task-head setting, used after the transformer (attention and hidden states do not depend on it)"
_BOOKKEEPING = "bookkeeping written by save_pretrained; nothing reads it to compute"
_OUTPUTS = "what the forward returns, not what it computes (attnlens asks for what it needs itself)"

# Generation defaults that PretrainedConfig wrote into config.json until 5.x moved them to generation_config.json.
_GENERATION_KEYS = (
    "bad_words_ids", "begin_suppress_tokens", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "forced_bos_token_id", "forced_eos_token_id",
    "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_scores", "remove_invalid_values", "repetition_penalty", "return_dict_in_generate",
    "suppress_tokens", "temperature", "top_k", "top_p", "typical_p",
)  # fmt: skip

INERT_KEYS: dict[str, str] = {
    # GPT-2's own keys.
    "n_ctx": "read by no GPT-2 module of 4.57/5.x (the causal mask is built per call, up to n_positions); transformers "
    "2.x sized its causal mask with it, which only limited the length",
    "resid_pdrop": _DROPOUT,
    "embd_pdrop": _DROPOUT,
    "attn_pdrop": _DROPOUT,
    "initializer_range": "the std of freshly initialised weights; loaded weights do not depend on it",
    "summary_type": "GPT2DoubleHeadsModel's multiple-choice head (" + _TASK_HEAD + ")",
    "summary_use_proj": "GPT2DoubleHeadsModel's multiple-choice head (" + _TASK_HEAD + ")",
    "summary_activation": "GPT2DoubleHeadsModel's multiple-choice head (" + _TASK_HEAD + ")",
    "summary_proj_to_labels": "GPT2DoubleHeadsModel's multiple-choice head (" + _TASK_HEAD + ")",
    "summary_first_dropout": _DROPOUT,
    "summary_last_dropout": _DROPOUT,
    "classifier_dropout": _DROPOUT,
    "hidden_dropout": _DROPOUT,
    # Legacy keys of early hub checkpoints (gpt2-medium/large/xl, distilgpt2) and of transformers 2.x-4.x.
    "n_special": "an OpenAI-GPT key (extra special-token embeddings) copied into early GPT-2 configs; never read",
    "predict_special_tokens": "an OpenAI-GPT key copied into early GPT-2 configs; never read",
    "output_past": "transformers 2.x's name for use_cache (return the key/value cache); no current release reads it",
    "num_labels": "size of a classification head (transformers 2.x spelling; " + _TASK_HEAD + ")",
    "_num_labels": "size of a classification head (transformers 2.x-3.x spelling; " + _TASK_HEAD + ")",
    "gradient_checkpointing": "recomputes activations during backward in training; eval-mode values are the same",
    "use_bfloat16": "a TensorFlow/TPU hint of transformers 2.x-4.x, read by no PyTorch code",
    "xla_device": "a TPU placement hint written by early 4.x releases (4.3 saved it), read by no GPT-2 module",
    "torchscript": "ties the LM head by copying instead of sharing for TorchScript export; the values are the same",
    "tf_legacy_loss": "the TensorFlow loss; " + _TASK_HEAD,
    # Bookkeeping.
    "_name_or_path": _BOOKKEEPING,
    "_commit_hash": _BOOKKEEPING,
    "transformers_version": _BOOKKEEPING,
    "architectures": "which class load() builds; any supported GPT-2 class has the same transformer",
    "dtype": "the dtype to load in; attnlens reads the parameters' own dtype",
    "torch_dtype": "the dtype to load in (4.x name); attnlens reads the parameters' own dtype",
    "attn_implementation": "the kernel to load with; attnlens reads the model's own kernel",
    "_attn_implementation_autoset": "the kernel to load with; attnlens reads the model's own kernel",
    "tokenizer_class": "which tokenizer to load with the model",
    "prefix": "a text prefix for pipelines",
    "task_specific_params": "pipeline defaults per task",
    "finetuning_task": _BOOKKEEPING,
    "id2label": "label names of a classification head (" + _TASK_HEAD + ")",
    "label2id": "label names of a classification head (" + _TASK_HEAD + ")",
    "problem_type": "the loss of a classification head (" + _TASK_HEAD + ")",
    "return_dict": _OUTPUTS,
    "use_return_dict": _OUTPUTS,
    "output_attentions": _OUTPUTS,
    "output_hidden_states": _OUTPUTS,
    "chunk_size_feed_forward": "read by no GPT-2 module (GPT-2's MLP is never chunked)",
    "tie_encoder_decoder": "concerns encoder-decoder wrappers only",
    "cross_attention_hidden_size": "concerns encoder-decoder wrappers only (cross-attention is refused)",
    # Token ids: tokenisation, generation, and the classification head's search for the last real token.
    "bos_token_id": "a token id for tokenisation and generation",
    "eos_token_id": "a token id for tokenisation and generation",
    "pad_token_id": "a token id for padding and for the classification head's last-token search",
    "sep_token_id": "a token id for tokenisation and generation",
    "decoder_start_token_id": "a token id for generation",
    **dict.fromkeys(_GENERATION_KEYS, _GENERATION),
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
    known = MODELLED_KEYS.keys() | INERT_KEYS.keys() | REFUSED_VALUES.keys()
    return tuple(sorted(set(config.to_dict()) - known))


def check_config(config: PretrainedConfig) -> tuple[str, ...]:
    """Refuse a config whose maths attnlens does not reproduce; warn about keys of unknown effect.

    Returns:
        The unknown keys (see :func:`unknown_keys`), after an :class:`~attnlens.UnknownConfigWarning` naming them.

    Raises:
        UnsupportedModelError: the config is not GPT-2, asks for maths attnlens does not reproduce (naming every
            offending key), or has unknown keys inside :func:`attnlens.strict_config`.
    """
    model_type = getattr(config, "model_type", None)
    if model_type != "gpt2":
        raise UnsupportedModelError(f"attnlens supports GPT-2 checkpoints (model_type 'gpt2'), got {model_type!r}")
    problems = []
    for key, (allowed, meaning) in REFUSED_VALUES.items():
        value = getattr(config, key, None)
        if value not in allowed:
            problems.append(f"{meaning}: {key}={value!r} (need {' or '.join(map(repr, allowed))})")
    if config.activation_function not in ACTIVATIONS:
        problems.append(f"activation_function={config.activation_function!r} (known: {', '.join(ACTIVATIONS)})")
    unknown = unknown_keys(config)
    if unknown and config_is_strict():
        problems.append(f"config key(s) of unknown effect {', '.join(unknown)} (refused under attnlens.strict_config)")
    if problems:
        raise UnsupportedModelError(
            "this GPT-2 config asks for something attnlens does not compute exactly: " + "; ".join(problems)
        )
    if unknown:
        # Reported from this line, so Python's default filter shows each distinct message (keys and checkpoint) once,
        # however many times one verify or trace call checks the config.
        name = str(getattr(config, "_name_or_path", "") or "")
        of = f" of {name!r}" if name else ""
        warnings.warn(
            f"GPT-2 config key(s) {', '.join(unknown)}{of} have an effect attnlens does not know, so nothing "
            "guarantees that its numbers are this model's: run attnlens.verify(model, input_ids) on your inputs to "
            "prove them (report.ok), or refuse such configs with attnlens.strict_config()",
            UnknownConfigWarning,
            stacklevel=1,
        )
    return unknown
