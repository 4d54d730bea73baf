"""What every architecture's config policy shares: the keys any Hugging Face config carries, and the one check.

An architecture's policy (``gpt2_config``, ``gpt_neox_config``) sorts each key of ``config.to_dict()`` into four kinds:
modelled (attnlens reproduces its effect), inert (it cannot change what the model computes in eval mode; each with
its reason), refused values (maths attnlens does not reproduce) and unknown (warned about, refused under
:func:`attnlens.strict_config`). This module holds the inert keys that ``PretrainedConfig`` itself writes for every
architecture (bookkeeping, output switches, token ids, generation defaults, task-head settings) and
:func:`check_config`, which applies a policy and words its errors and warnings.

Whether a key here is inert was checked against ``configuration_utils`` and the GPT-2 and GPT-NeoX modelling code of
transformers 4.57 and 5.x.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from attnlens.errors import UnknownConfigWarning, UnsupportedModelError, config_is_strict

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["COMMON_INERT_KEYS", "DROPOUT", "TASK_HEAD", "check_config", "unknown_keys"]

DROPOUT = "dropout: off in eval mode, the only mode attnlens runs a model in"
GENERATION = "a generation default, read only by generate() (5.x keeps these in generation_config.json)"
TASK_HEAD = "a task-head setting, used after the transformer (attention and hidden states do not depend on it)"
BOOKKEEPING = "bookkeeping written by save_pretrained; nothing reads it to compute"
OUTPUTS = "what the forward returns, not what it computes (attnlens asks for what it needs itself)"

# Generation defaults that PretrainedConfig wrote into config.json until 5.x moved them to generation_config.json.
GENERATION_KEYS = (
    "bad_words_ids", "begin_suppress_tokens", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "forced_bos_token_id", "forced_eos_token_id",
    "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_scores", "remove_invalid_values", "repetition_penalty", "return_dict_in_generate",
    "suppress_tokens", "temperature", "top_k", "top_p", "typical_p",
)  # fmt: skip

COMMON_INERT_KEYS: dict[str, str] = {
    # Keys of PretrainedConfig itself (transformers 2.x to 5.x), read by no modelling code in eval mode.
    "num_labels": "size of a classification head (transformers 2.x spelling; " + TASK_HEAD + ")",
    "_num_labels": "size of a classification head (transformers 2.x-3.x spelling; " + TASK_HEAD + ")",
    "gradient_checkpointing": "recomputes activations during backward in training; eval-mode values are the same",
    "use_bfloat16": "a TensorFlow/TPU hint of transformers 2.x-4.x, read by no PyTorch code",
    "torchscript": "ties the LM head by copying instead of sharing for TorchScript export; the values are the same",
    "tf_legacy_loss": "the TensorFlow loss; " + TASK_HEAD,
    # Bookkeeping.
    "_name_or_path": BOOKKEEPING,
    "_commit_hash": BOOKKEEPING,
    "transformers_version": BOOKKEEPING,
    "dtype": "the dtype to load in; attnlens reads the parameters' own dtype",
    "torch_dtype": "the dtype to load in (4.x name); attnlens reads the parameters' own dtype",
    "attn_implementation": "the kernel to load with; attnlens reads the model's own kernel",
    "_attn_implementation_autoset": "the kernel to load with; attnlens reads the model's own kernel",
    "tokenizer_class": "which tokenizer to load with the model",
    "prefix": "a text prefix for pipelines",
    "task_specific_params": "pipeline defaults per task",
    "finetuning_task": BOOKKEEPING,
    "id2label": "label names of a classification head (" + TASK_HEAD + ")",
    "label2id": "label names of a classification head (" + TASK_HEAD + ")",
    "problem_type": "the loss of a classification head (" + TASK_HEAD + ")",
    "return_dict": OUTPUTS,
    "use_return_dict": OUTPUTS,
    "output_attentions": OUTPUTS,
    "output_hidden_states": OUTPUTS,
    "tie_encoder_decoder": "concerns encoder-decoder wrappers only",
    "cross_attention_hidden_size": "concerns encoder-decoder wrappers only (cross-attention is refused)",
    # Token ids: tokenisation, generation, and the classification head's search for the last real token.
    "bos_token_id": "a token id for tokenisation and generation",
    "eos_token_id": "a token id for tokenisation and generation",
    "pad_token_id": "a token id for padding and for the classification head's last-token search",
    "sep_token_id": "a token id for tokenisation and generation",
    "decoder_start_token_id": "a token id for generation",
    **dict.fromkeys(GENERATION_KEYS, GENERATION),
}
"""Keys every Hugging Face config may carry that cannot change what a decoder-only model computes in eval mode."""

Refused = Mapping[str, tuple[tuple[Any, ...], str]]


def unknown_keys(config: PretrainedConfig, *tables: Mapping[str, object]) -> tuple[str, ...]:
    """The config's keys found in none of ``tables`` (modelled, inert, refused values), sorted."""
    known: set[str] = set().union(*(table.keys() for table in tables))
    return tuple(sorted(set(config.to_dict()) - known))


def check_config(
    config: PretrainedConfig,
    *,
    family: str,
    model_type: str,
    modelled: Mapping[str, str],
    inert: Mapping[str, str],
    refused: Refused,
    problems: Callable[[PretrainedConfig], list[str]] | None = None,
) -> tuple[str, ...]:
    """Apply one architecture's policy: refuse what attnlens does not reproduce, warn about keys of unknown effect.

    Args:
        config: the model's config.
        family: the architecture's name in messages ("GPT-2").
        model_type: the ``config.model_type`` the policy is for.
        modelled: keys whose effect attnlens reproduces.
        inert: keys that cannot change the numbers in eval mode.
        refused: key -> (allowed values, what another value means).
        problems: the architecture's further checks (run once ``model_type`` is right); each string names one.

    Returns:
        The unknown keys, after an :class:`~attnlens.UnknownConfigWarning` naming them.

    Raises:
        UnsupportedModelError: another ``model_type``, maths attnlens does not reproduce (naming every offending
            key), or unknown keys inside :func:`attnlens.strict_config`.
    """
    found = getattr(config, "model_type", None)
    if found != model_type:
        raise UnsupportedModelError(
            f"attnlens supports {family} checkpoints (model_type {model_type!r}), got {found!r}"
        )
    errors = []
    for key, (allowed, meaning) in refused.items():
        value = getattr(config, key, None)
        if value not in allowed:
            errors.append(f"{meaning}: {key}={value!r} (need {' or '.join(map(repr, allowed))})")
    if problems is not None:
        errors.extend(problems(config))
    unknown = unknown_keys(config, modelled, inert, refused)
    if unknown and config_is_strict():
        errors.append(f"config key(s) of unknown effect {', '.join(unknown)} (refused under attnlens.strict_config)")
    if errors:
        raise UnsupportedModelError(
            f"this {family} config asks for something attnlens does not compute exactly: " + "; ".join(errors)
        )
    if unknown:
        # Reported from this line, so Python's default filter shows each distinct message (keys and checkpoint) once,
        # however many times one verify or trace call checks the config.
        name = str(getattr(config, "_name_or_path", "") or "")
        of = f" of {name!r}" if name else ""
        warnings.warn(
            f"{family} config key(s) {', '.join(unknown)}{of} have an effect attnlens does not know, so nothing "
            "guarantees that its numbers are this model's: run attnlens.verify(model, input_ids) on your inputs to "
            "prove them (report.ok), or refuse such configs with attnlens.strict_config()",
            UnknownConfigWarning,
            stacklevel=1,
        )
    return unknown
