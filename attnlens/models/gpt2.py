"""Everything attnlens knows about Hugging Face GPT-2, and nothing else does.

* Module paths: ``transformer.wte``, ``transformer.h[i].attn.c_attn`` and so on.
* Conv1D layout: GPT-2's linear layers are ``transformers.pytorch_utils.Conv1D``, which stores its weight as
  ``[in, out]`` and computes ``x @ weight + bias`` (the transpose of ``nn.Linear``). So ``c_attn.weight`` is
  ``[d_model, 3 * d_model]``: its columns are the queries, keys and values of all heads, ``(qkv head d_head)``.
* The attention spec of each layer from the config: the scale, the inverse-layer scaling and the float32 upcast, and
  in which arithmetic order the installed transformers release applies the scale (4.x divides, 5.x multiplies),
  so that recomputed scores can match the model's bit for bit.
* The config policy (keys modelled, inert, refused, or of unknown effect) lives in :mod:`attnlens.models.gpt2_config`;
  :func:`check_config` is re-exported here.

transformers is imported lazily, inside functions, so that ``import attnlens`` stays light.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from torch import Tensor, nn

from attnlens.errors import UnsupportedModelError
from attnlens.models.gpt2_config import check_config
from attnlens.weights import LayerNormWeights, LayerWeights, MLPWeights, ModelWeights

if TYPE_CHECKING:
    from transformers import GPT2Model, PretrainedConfig, PreTrainedModel

__all__ = [
    "SUPPORTED_CLASSES",
    "LayerSites",
    "Sites",
    "attn_implementation",
    "base_model",
    "check_config",
    "check_inputs",
    "extract",
    "hooks_restored",
    "is_gpt2",
    "kernel_ignores_scale_flags",
    "layout_lines",
    "load",
    "set_attn_implementation",
    "sites",
    "split_qkv",
]

SUPPORTED_CLASSES = (
    "GPT2Model",
    "GPT2LMHeadModel",
    "GPT2DoubleHeadsModel",
    "GPT2ForSequenceClassification",
    "GPT2ForTokenClassification",
    "GPT2ForQuestionAnswering",
)


@functools.cache
def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _gpt2_classes() -> tuple[type, ...]:
    import transformers

    return tuple(getattr(transformers, name) for name in SUPPORTED_CLASSES)


def is_gpt2(model: object) -> bool:
    """Whether ``model`` is an instance of one of the supported GPT-2 classes (or a subclass)."""
    return isinstance(model, nn.Module) and isinstance(model, _gpt2_classes())


def base_model(model: PreTrainedModel) -> GPT2Model:
    """The ``GPT2Model`` inside any supported class, after checking the class and the config.

    Raises:
        UnsupportedModelError: for anything that is not a supported GPT-2 model, or whose config asks for maths
            that attnlens does not reproduce.
    """
    if not is_gpt2(model):
        raise UnsupportedModelError(
            f"attnlens needs a Hugging Face GPT-2 model, got {type(model).__module__}.{type(model).__qualname__}; "
            f"supported: {', '.join(SUPPORTED_CLASSES)} (or a hub name / local path of a GPT-2 checkpoint)"
        )
    check_config(model.config)
    from transformers import GPT2Model

    base: Any = model if isinstance(model, GPT2Model) else model.transformer
    return base


def _attention_specs(config: PretrainedConfig, d_head: int) -> list[tuple[float, bool, tuple[float, ...] | None]]:
    """``(scale, upcast, score_divisors)`` of each layer, in the arithmetic of the installed transformers."""
    legacy = _transformers_major() < 5
    by_weights, by_layer = config.scale_attn_weights, config.scale_attn_by_inverse_layer_idx
    upcast = bool(config.reorder_and_upcast_attn)
    specs = []
    for layer in range(config.n_layer):
        scale = 1.0
        divisors: list[float] = []
        if by_weights:
            scale = 1.0 / float(d_head) ** 0.5 if legacy else d_head**-0.5
            divisors.append(d_head**0.5)
        if by_layer:
            scale /= float(layer + 1)
            divisors.append(float(layer + 1))
        specs.append((scale, upcast, tuple(divisors) if legacy else None))
    return specs


def _layer_norm(module: Any) -> LayerNormWeights:
    return LayerNormWeights(w=module.weight, b=module.bias, eps=float(module.eps))


def extract(model: PreTrainedModel) -> ModelWeights:
    """Per-head weights of a GPT-2 model, as views of its parameters (see :func:`attnlens.extract_weights`)."""
    base = base_model(model)
    config = model.config
    n_heads, d_model, act = config.n_head, config.n_embd, config.activation_function
    d_head = d_model // n_heads
    specs = _attention_specs(config, d_head)
    layers = []
    hf_blocks: list[Any] = list(base.h)  # HF modules are dynamically typed: Any, not nn.Module's Tensor | Module
    for i, block in enumerate(hf_blocks):
        attn, mlp = block.attn, block.mlp
        c_attn, c_proj, c_fc, mlp_proj = attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
        W_attn = c_attn.weight
        if tuple(W_attn.shape) != (d_model, 3 * d_model):
            raise UnsupportedModelError(
                f"layer {i}: c_attn.weight has shape {tuple(W_attn.shape)}, expected "
                f"{(d_model, 3 * d_model)} (pruned or modified heads are not supported)"
            )
        # Conv1D stores [in, out] (x @ weight), so c_attn's columns are (qkv head d_head). Plain views rather than
        # einops here: extraction is meant to cost well under a millisecond, and rearrange costs 4x a view.
        #   c_attn.weight: d_model (qkv head d_head) -> qkv head d_model d_head
        #   c_attn.bias:   (qkv head d_head)         -> qkv head d_head
        #   c_proj.weight: (head d_head) d_model     -> head d_head d_model
        # Indexing, not unbind: unbind's views become unusable under autograd once the parameter is edited in place.
        W_qkv = W_attn.view(d_model, 3, n_heads, d_head).permute(1, 2, 0, 3)
        b_qkv = c_attn.bias.view(3, n_heads, d_head)
        W_Q, W_K, W_V = W_qkv[0], W_qkv[1], W_qkv[2]
        b_Q, b_K, b_V = b_qkv[0], b_qkv[1], b_qkv[2]
        scale, upcast, divisors = specs[i]
        layers.append(
            LayerWeights(
                layer=i,
                W_Q=W_Q,
                W_K=W_K,
                W_V=W_V,
                b_Q=b_Q,
                b_K=b_K,
                b_V=b_V,
                W_O=c_proj.weight.view(n_heads, d_head, d_model),
                b_O=c_proj.bias,
                ln_1=_layer_norm(block.ln_1),
                ln_2=_layer_norm(block.ln_2),
                mlp=MLPWeights(W_in=c_fc.weight, b_in=c_fc.bias, W_out=mlp_proj.weight, b_out=mlp_proj.bias, act=act),
                scale=scale,
                upcast=upcast,
                score_divisors=divisors,
            )
        )
    lm_head = getattr(model, "lm_head", None)
    hf_base: Any = base
    W_E, W_pos = hf_base.wte.weight, hf_base.wpe.weight
    return ModelWeights(
        n_layers=len(layers),
        n_heads=n_heads,
        d_model=d_model,
        d_head=d_head,
        d_mlp=layers[0].mlp.W_in.shape[1] if layers else (config.n_inner or 4 * d_model),
        d_vocab=W_E.shape[0],
        n_ctx=W_pos.shape[0],
        W_E=W_E,
        W_pos=W_pos,
        W_U=lm_head.weight.T if isinstance(lm_head, nn.Linear) else None,
        ln_f=_layer_norm(hf_base.ln_f),
        layers=tuple(layers),
        name=str(getattr(config, "_name_or_path", "") or ""),
    )


def load(
    name_or_path: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a GPT-2 checkpoint by hub name or local path, in eval mode (safetensors preferred, never remote code).

    The class is the checkpoint's own (its config's ``architectures``) when it is a supported GPT-2 class, else
    ``GPT2LMHeadModel``.

    Raises:
        UnsupportedModelError: the checkpoint is not GPT-2.
        OSError: it could not be found or read (no such folder and the hub unreachable, say).
    """
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise OSError(
            f"could not read a config for {name_or_path!r}: not a local checkpoint folder, and the hub did not "
            f"provide it ({error})"
        ) from error
    if getattr(config, "model_type", None) != "gpt2":
        raise UnsupportedModelError(
            f"{name_or_path!r} is a {config.model_type!r} checkpoint; "
            f"attnlens supports GPT-2 ({', '.join(SUPPORTED_CLASSES)})"
        )
    check_config(config)
    names = [name for name in (config.architectures or []) if name in SUPPORTED_CLASSES]
    cls = getattr(transformers, names[0] if names else "GPT2LMHeadModel")
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = cls.from_pretrained(name_or_path, config=config, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


@dataclass(frozen=True)
class LayerSites:
    """The modules of one attention layer that attnlens hooks, named by role rather than by Hugging Face path.

    Attributes:
        attn_input: its output is the attention's input ``[batch, pos, d_model]`` (the block's first layer norm).
        qkv: its output is the fused projection ``[batch, pos, (qkv head d_head)]``; see :func:`split_qkv`.
        z: its input is the heads' outputs merged, ``[batch, pos, (head d_head)]``; its ``weight`` is ``W_O``
            as ``[(head d_head), d_model]``.
        attn: its output (the first element when a tuple) is the attention output ``[batch, pos, d_model]``.
    """

    attn_input: Any
    qkv: Any
    z: Any
    attn: Any


@dataclass(frozen=True)
class Sites:
    """Where a GPT-2 model computes what attnlens reads: the interface trace, verify and the rest are written against.

    Attributes:
        base: the transformer without any task head; call it as ``base(input_ids=..., attention_mask=...,
            position_ids=..., use_cache=..., output_attentions=...)``.
        layers: one :class:`LayerSites` per layer.
        embed: the token embedding (its ``weight`` is ``W_E``; its dtype and device are the model's).
        final_norm: its output is the final hidden state ``[batch, pos, d_model]``.
        unembed: the language-model head (``hidden @ W_U``), or ``None`` for classes without one.
    """

    base: Any
    layers: tuple[LayerSites, ...]
    embed: Any
    final_norm: Any
    unembed: nn.Linear | None


def sites(model: PreTrainedModel) -> Sites:
    """The :class:`Sites` of a supported GPT-2 model (after the checks of :func:`base_model`)."""
    base: Any = base_model(model)
    layers = tuple(LayerSites(block.ln_1, block.attn.c_attn, block.attn.c_proj, block.attn) for block in base.h)
    lm_head = getattr(model, "lm_head", None)
    return Sites(base, layers, base.wte, base.ln_f, lm_head if isinstance(lm_head, nn.Linear) else None)


def layout_lines(model: PreTrainedModel, weights: ModelWeights, layer: int) -> list[str]:
    """How one layer's per-head weights are cut from GPT-2's fused Conv1D parameters, as lines of text."""
    d = weights.d_model
    c_attn = sites(model).layers[layer].qkv.weight
    per_head = weights.layers[layer]
    square = [d, d]
    return [
        f"layer {layer} c_attn.weight      {list(c_attn.shape)}  (Conv1D stores [in, out]: x @ W)",
        f"  W_Q = c_attn[:, 0:{d}]      {square} -> per head {list(per_head.W_Q.shape)}",
        f"  W_K = c_attn[:, {d}:{2 * d}]   {square} -> per head {list(per_head.W_K.shape)}",
        f"  W_V = c_attn[:, {2 * d}:{3 * d}]  {square} -> per head {list(per_head.W_V.shape)}",
        f"  W_O = c_proj.weight     {square} -> per head {list(per_head.W_O.shape)}",
    ]


def split_qkv(fused: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``c_attn``'s output ``[batch, pos, (qkv head d_head)]`` into q, k, v ``[batch, head, pos, d_head]``.

    The results are views of ``fused``, in the memory layout the model's own attention kernel receives.
    """
    qkv = rearrange(fused, "batch pos (qkv head d_head) -> qkv batch head pos d_head", qkv=3, head=n_heads)
    return qkv[0], qkv[1], qkv[2]


def attn_implementation(model: PreTrainedModel) -> str:
    """The attention kernel the model runs (``"eager"``, ``"sdpa"``, ...)."""
    return str(model.config._attn_implementation)


def set_attn_implementation(model: PreTrainedModel, name: str) -> None:
    """Switch the model's attention kernel in place (callers restore it)."""
    if attn_implementation(model) != name:
        model.set_attn_implementation(name)


def check_inputs(
    model: PreTrainedModel,
    input_ids: Tensor | Any,
    attention_mask: Tensor | Any | None = None,
    position_ids: Tensor | Any | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Validate and normalise inputs: ``[batch, pos]`` integer tensors on the model's device.

    Raises:
        ValueError: naming the problem: wrong dtype or rank, ids outside the vocabulary, more positions than the
            model has, an ``attention_mask`` or ``position_ids`` of the wrong shape or values, a row of padding only.
    """
    config = model.config
    device = next(model.parameters()).device

    def as_2d(x: Any, name: str) -> Tensor:
        x = torch.as_tensor(x)
        if x.dtype.is_floating_point or x.dtype.is_complex:
            raise ValueError(f"{name} must hold integers, got dtype {x.dtype}")
        if x.ndim == 1:
            x = x.unsqueeze(0)
        if x.ndim != 2:
            raise ValueError(f"{name} must be [batch, pos] (or [pos]), got shape {tuple(x.shape)}")
        return x.to(device)

    ids = as_2d(input_ids, "input_ids")
    batch, n_pos = ids.shape
    if ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(ids.shape)})")
    if n_pos > config.n_positions:
        raise ValueError(f"input_ids has {n_pos} positions; this model has n_ctx={config.n_positions}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= config.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {config.vocab_size}) (d_vocab), got values from {low} to {high}")
    mask = None
    if attention_mask is not None:
        mask = as_2d(attention_mask, "attention_mask")
        if tuple(mask.shape) != (batch, n_pos):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}, input_ids {(batch, n_pos)}: they must match"
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        empty = (mask == 0).all(dim=-1)
        if bool(empty.any()):
            raise ValueError(f"attention_mask rows {empty.nonzero().flatten().tolist()} are all padding")
        mask = mask.long()
    pos = None
    if position_ids is not None:
        pos = as_2d(position_ids, "position_ids")
        if pos.shape[-1] != n_pos or pos.shape[0] not in (1, batch):
            raise ValueError(f"position_ids has shape {tuple(pos.shape)}, input_ids {(batch, n_pos)}")
        if int(pos.min()) < 0 or int(pos.max()) >= config.n_positions:
            raise ValueError(
                f"position_ids must lie in [0, {config.n_positions}), got {int(pos.min())}..{int(pos.max())}"
            )
    return ids, mask, pos


# Set on a module by transformers 5.x once it has installed its output-recording hooks (see hooks_restored).
_CAPTURE_FLAG = "_output_capturing_hooks_installed"
_ABSENT = object()


@contextlib.contextmanager
def hooks_restored(model: nn.Module) -> Iterator[None]:
    """Leave every module's forward hooks as they were before the block, removing those added during it.

    transformers 5.x installs output-recording hooks on a model the first time it is asked for
    ``output_attentions=True``, keeps them for good and marks the model as hooked. Run such a forward inside this
    block to leave the model exactly as found: the hooks go, and so does the mark (without which transformers would
    think the hooks are still there and return no attentions the next time).
    """
    saved = [
        (
            module,
            dict(module._forward_hooks),
            dict(module._forward_pre_hooks),
            set(module._forward_hooks_with_kwargs),
            set(module._forward_hooks_always_called),
            module.__dict__.get(_CAPTURE_FLAG, _ABSENT),
        )
        for module in model.modules()
    ]
    try:
        yield
    finally:
        for module, hooks, pre_hooks, with_kwargs, always_called, flag in saved:
            for now, before in ((module._forward_hooks, hooks), (module._forward_pre_hooks, pre_hooks)):
                if now.keys() != before.keys():
                    now.clear()
                    now.update(before)
            for key in set(module._forward_hooks_with_kwargs) - with_kwargs:
                del module._forward_hooks_with_kwargs[key]
            for key in set(module._forward_hooks_always_called) - always_called:
                del module._forward_hooks_always_called[key]
            if flag is _ABSENT:
                module.__dict__.pop(_CAPTURE_FLAG, None)
            else:
                module.__dict__[_CAPTURE_FLAG] = flag


def kernel_ignores_scale_flags(model: PreTrainedModel) -> bool:
    """Whether the model's attention kernel ignores its config's scale flags, and so scales by ``1/sqrt(d_head)``.

    transformers 4.x's GPT-2 calls every kernel but eager (sdpa, flash) without its scale, so those kernels use their
    default ``1/sqrt(d_head)`` even under ``scale_attn_weights=False`` or ``scale_attn_by_inverse_layer_idx=True``:
    such a model computes other attention than its config (and its eager twin) says. 5.x passes the scale.
    """
    config = model.config
    flags = not config.scale_attn_weights or bool(config.scale_attn_by_inverse_layer_idx)
    return flags and _transformers_major() < 5 and attn_implementation(model) != "eager"
