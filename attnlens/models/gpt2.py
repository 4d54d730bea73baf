"""Everything attnlens knows about Hugging Face GPT-2, and nothing else does.

* Module paths: ``transformer.wte``, ``transformer.h[i].attn.c_attn`` and so on.
* Conv1D layout: GPT-2's linear layers are ``transformers.pytorch_utils.Conv1D``, which stores its weight as
  ``[in, out]`` and computes ``x @ weight + bias`` (the transpose of ``nn.Linear``). So ``c_attn.weight`` is
  ``[d_model, 3 * d_model]``: its columns are the queries, keys and values of all heads, ``(qkv head d_head)``.
* The attention spec of each layer from its attention module (which keeps its own copy of the config's flags, and
  is what runs): the scale, the inverse-layer scaling and the float32 upcast, and in which arithmetic order the
  installed transformers release applies the scale (4.x divides, 5.x multiplies), so that recomputed scores can
  match the model's bit for bit. A config whose shapes disagree with the modules is refused.
* The attention kernels attnlens reproduces (:data:`EXACT_KERNELS`); any other is refused by name.
* The config policy (keys modelled, inert, refused, or of unknown effect) lives in :mod:`attnlens.models.gpt2_config`;
  :func:`check_config` is re-exported here.
* The states users leave a model in: wrappers seen through when that is exact (``torch.compile``, a PEFT model
  whose adapters are merged or disabled), and states refused by name (active LoRA adapters, weights on the meta
  device or offloaded by accelerate, blocks compiled one by one, kernels that compute other attention).

transformers is imported lazily, inside functions, so that ``import attnlens`` stays light.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from torch import Tensor, nn

from attnlens.errors import UnsupportedModelError
from attnlens.models.gpt2_config import check_config
from attnlens.models.wrappers import check_exact, check_state, plain, unwrap
from attnlens.weights import LayerNormWeights, LayerWeights, MLPWeights, ModelWeights

if TYPE_CHECKING:
    from transformers import GPT2Model, PretrainedConfig, PreTrainedModel

__all__ = [
    "EXACT_KERNELS",
    "SUPPORTED_CLASSES",
    "LayerSites",
    "Sites",
    "attn_implementation",
    "base_model",
    "check_config",
    "check_inputs",
    "check_kernel",
    "extract",
    "is_gpt2",
    "kernel_ignores_scale_flags",
    "kernel_pattern",
    "layout_lines",
    "load",
    "lock_key",
    "set_attn_implementation",
    "sites",
    "split_qkv",
    "unwrap",
]

SUPPORTED_CLASSES = (
    "GPT2Model",
    "GPT2LMHeadModel",
    "GPT2DoubleHeadsModel",
    "GPT2ForSequenceClassification",
    "GPT2ForTokenClassification",
    "GPT2ForQuestionAnswering",
)

EXACT_KERNELS: tuple[str, ...] = ("eager", "sdpa")
"""The attention kernels under which attnlens has shown trace's patterns to be the model's own; trace refuses others.

* ``"eager"``: bitwise equal to the eager twin's ``output_attentions`` (tests/test_trace.py, every config flag,
  left/right padding; tests/test_checkpoints.py, every loading path).
* ``"sdpa"``: equal to the eager twin's within float rounding (float32: at most 3e-8 measured, asserted at 1e-6), on
  transformers 4.57 and 5.x (same tests).

Flash kernels (CUDA only) are not listed: they cannot run where the test suite runs. ``"flex_attention"`` is refused
for GPT-2 by transformers itself. The paged kernels (``"paged|eager"``, ``"sdpa_paged"``, ``"eager_paged"``,
``"paged_attention"``) are refused by :func:`sites`: they serve continuous batching with a paged cache, and on a
plain forward they fail or attend to other keys (4.57's ``"sdpa_paged"`` ran, and its patterns were 1.4e-3 off).
"""


@functools.cache
def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _gpt2_classes() -> tuple[type, ...]:
    import transformers

    return tuple(getattr(transformers, name) for name in SUPPORTED_CLASSES)


def is_gpt2(model: object) -> bool:
    """Whether ``model`` is one of the supported GPT-2 classes (or a subclass), or one wrapped as :func:`unwrap` says.

    Only the class is checked; :func:`base_model` also checks the config and the model's state.
    """
    inner = unwrap(model)
    return isinstance(inner, nn.Module) and isinstance(inner, _gpt2_classes())


def base_model(model: PreTrainedModel) -> GPT2Model:
    """The ``GPT2Model`` inside any supported class, after checking the class, the config and the model's state.

    Wrappers are seen through (see :func:`unwrap`); so are PEFT adapter layers whose adapters are merged or disabled
    (the base layer then computes what the model computes).

    Raises:
        UnsupportedModelError: for anything that is not a supported GPT-2 model, whose config asks for maths
            that attnlens does not reproduce, or whose state hides its weights: active (unmerged) PEFT adapters,
            parameters on the meta device (offloaded by accelerate, or never loaded), blocks compiled on their own.
    """
    inner: Any = unwrap(model)
    if not is_gpt2(inner):
        raise UnsupportedModelError(
            f"attnlens needs a Hugging Face GPT-2 model, got {type(model).__module__}.{type(model).__qualname__}; "
            f"supported: {', '.join(SUPPORTED_CLASSES)} (or a hub name / local path of a GPT-2 checkpoint; "
            "torch.compile and PEFT wrappers of one)"
        )
    check_config(inner.config)
    from transformers import GPT2Model

    base: Any = inner if isinstance(inner, GPT2Model) else inner.transformer
    base = unwrap(base)  # model.transformer = torch.compile(model.transformer)
    check_state(inner, base)
    # The projections whose weights attnlens reads: exactly transformers' Conv1D and torch's Linear, nothing wrapped.
    # (Read from _modules: nn.Module's attribute fallback would cost more than the rest of this check.)
    from transformers.pytorch_utils import Conv1D

    at = "" if base is inner else "transformer."
    named = (
        (f"layer {i}'s {a}.{b} ({at}h.{i}.{a}.{b})", block._modules[a]._modules.get(b))
        for i, block in enumerate(base.h)
        for a, b in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))
    )
    check_exact(named, Conv1D, "transformers' Conv1D")
    if isinstance(getattr(inner, "lm_head", None), nn.Module):
        check_exact([("lm_head", inner.lm_head)], nn.Linear, "torch's nn.Linear")
    return base


def _attention_specs(config: PretrainedConfig, attns: list[Any]) -> list[tuple[float, bool, tuple[float, ...] | None]]:
    """``(scale, upcast, score_divisors)`` of each layer, read from its attention module as the installed release does.

    Each ``GPT2Attention`` copies the config's flags when it is built and then reads only its own copy: 5.x its
    precomputed ``scaling``, 4.x its ``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx`` and ``layer_idx``;
    both their ``reorder_and_upcast_attn``. A config edited after the model was built no longer says what runs, so
    the modules, not the config, give the maths (after :func:`_check_attention_modules` has checked the shapes).
    """
    _check_attention_modules(config, attns)
    legacy = _transformers_major() < 5
    specs: list[tuple[float, bool, tuple[float, ...] | None]] = []
    for attn in attns:
        upcast = bool(attn.reorder_and_upcast_attn)
        if not legacy:
            # 5.x hands every kernel this one number (eager multiplies by it, sdpa passes it as its scale).
            specs.append((float(attn.scaling), upcast, None))
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
        specs.append((scale, upcast, tuple(divisors)))
    return specs


def _check_attention_modules(config: PretrainedConfig, attns: list[Any]) -> None:
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


def _layer_norm(module: Any) -> LayerNormWeights:
    return LayerNormWeights(w=module.weight, b=module.bias, eps=float(module.eps))


def extract(model: PreTrainedModel) -> ModelWeights:
    """Per-head weights of a GPT-2 model, as views of its parameters (see :func:`attnlens.extract_weights`)."""
    base = base_model(model)
    model = unwrap(model)
    config = model.config
    n_heads, d_model, act = config.n_head, config.n_embd, config.activation_function
    d_head = d_model // n_heads
    layers = []
    hf_blocks: list[Any] = list(base.h)  # HF modules are dynamically typed: Any, not nn.Module's Tensor | Module
    specs = _attention_specs(config, [block.attn for block in hf_blocks])
    for i, block in enumerate(hf_blocks):
        attn, mlp = block.attn, block.mlp
        c_attn, c_proj, c_fc, mlp_proj = (plain(m) for m in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj))
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
                ln_1=_layer_norm(plain(block.ln_1)),
                ln_2=_layer_norm(plain(block.ln_2)),
                mlp=MLPWeights(W_in=c_fc.weight, b_in=c_fc.bias, W_out=mlp_proj.weight, b_out=mlp_proj.bias, act=act),
                scale=scale,
                upcast=upcast,
                score_divisors=divisors,
            )
        )
    lm_head = plain(getattr(model, "lm_head", None))
    hf_base: Any = base
    W_E, W_pos = plain(hf_base.wte).weight, plain(hf_base.wpe).weight
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
        ln_f=_layer_norm(plain(hf_base.ln_f)),
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
    ``GPT2LMHeadModel``. Without ``dtype`` the weights keep the dtype they are stored in (``dtype="auto"``, on every
    transformers release: 4.x would otherwise load float32). A checkpoint with only ``pytorch_model.bin`` is read by
    transformers' own weights-only loader; attnlens never unpickles anything itself.

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
    kwargs: dict[str, Any] = {"trust_remote_code": False, "dtype": "auto" if dtype is None else dtype}
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
        spec: ``(scale, upcast, score_divisors)``, the layer's attention arithmetic as its module runs it (the same
            as the layer's :class:`~attnlens.weights.LayerWeights` carry), read without extracting any weight.
        mlp: its output is the MLP's contribution to the residual stream ``[batch, pos, d_model]`` (after its
            dropout, which is the identity in eval mode).
    """

    attn_input: Any
    qkv: Any
    z: Any
    attn: Any
    spec: tuple[float, bool, tuple[float, ...] | None]
    mlp: Any


@dataclass(frozen=True)
class Sites:
    """Where a GPT-2 model computes what attnlens reads: the interface trace, verify and the rest are written against.

    Attributes:
        base: the transformer without any task head; run it with :meth:`run` (``input_ids=..., attention_mask=...,
            position_ids=..., use_cache=..., output_attentions=...``).
        layers: one :class:`LayerSites` per layer.
        embed: the token embedding (its ``weight`` is ``W_E``; its dtype and device are the model's).
        final_norm: its output is the final hidden state ``[batch, pos, d_model]``.
        unembed: the language-model head (``hidden @ W_U``), or ``None`` for classes without one.
        pos_embed: the position embedding (its ``weight`` is ``W_pos``); its output is added to the token
            embedding's to start the residual stream.
        kernel_returns_pattern: whether the model's attention kernel hands its pattern out in each
            ``LayerSites.attn`` output (read it with :func:`kernel_pattern`): true for the eager kernel.
    """

    base: Any
    layers: tuple[LayerSites, ...]
    embed: Any
    final_norm: Any
    unembed: nn.Linear | None
    pos_embed: Any
    kernel_returns_pattern: bool = False

    def run(self, **kwargs: Any) -> Any:
        """Run the transformer, uncompiled, on keyword arguments (see ``base``), every output switch explicit.

        ``output_attentions``, ``output_hidden_states`` default to False and ``return_dict`` to True whatever the
        config says, so that the config neither changes what runs nor makes transformers 5.x install its recording
        hooks on the model (it does, for good, the first time it is asked for attentions).
        """
        kwargs = {"output_attentions": False, "output_hidden_states": False, "return_dict": True, **kwargs}
        # Module.compile() in place routes __call__ to compiled code; _call_impl is the plain path (hooks, forward),
        # so a transformer compiled this way is seen through exactly as torch.compile's wrapper is (see unwrap).
        compiled = getattr(self.base, "_compiled_call_impl", None) is not None
        return (self.base._call_impl if compiled else self.base)(**kwargs)


def sites(model: PreTrainedModel) -> Sites:
    """The :class:`Sites` of a supported GPT-2 model (after the checks of :func:`base_model`).

    Raises:
        UnsupportedModelError: what :func:`base_model` refuses, and a model running a paged attention kernel (see
            :data:`EXACT_KERNELS`).
    """
    base: Any = base_model(model)
    model = unwrap(model)
    kernel = attn_implementation(model)
    if "paged" in kernel:
        raise UnsupportedModelError(
            f"attn_implementation={kernel!r} is a kernel for continuous batching with a paged cache; on a plain "
            "forward it fails or attends to other keys than the model's mask allows. Switch the model to "
            f"{' or '.join(repr(k) for k in EXACT_KERNELS)} (model.set_attn_implementation('sdpa')) to trace it"
        )
    blocks: list[Any] = list(base.h)
    specs = _attention_specs(model.config, [block.attn for block in blocks])
    layers = tuple(
        LayerSites(plain(block.ln_1), plain(block.attn.c_attn), plain(block.attn.c_proj), block.attn, spec, block.mlp)
        for block, spec in zip(blocks, specs, strict=True)
    )
    lm_head = plain(getattr(model, "lm_head", None))
    unembed = lm_head if isinstance(lm_head, nn.Linear) else None
    return Sites(
        base,
        layers,
        plain(base.wte),
        plain(base.ln_f),
        unembed,
        plain(base.wpe),
        kernel_returns_pattern=kernel == "eager",
    )


def kernel_pattern(output: Any) -> Tensor | None:
    """The attention pattern in the output of a layer's attention module (``LayerSites.attn``), or ``None``.

    ``GPT2Attention`` returns ``(attn_output, attn_weights)`` on transformers 4.57 and 5.x alike, whatever
    ``output_attentions`` says. Under the eager kernel ``attn_weights`` is the softmax ``[batch, head, q_pos, k_pos]``
    that the kernel multiplies the values by, in their dtype (soft-maxed in float32 first under
    ``reorder_and_upcast_attn``): the probabilities themselves in eval mode, after dropout in training mode (and on
    4.x after any ``head_mask``). Rows of queries with no key to attend to hold whatever the additive mask leaves
    there. Other kernels (sdpa) return ``None`` there. The tensor is the model's: copy what you keep.
    """
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    return weights if isinstance(weights, Tensor) and weights.ndim == 4 else None


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


def check_kernel(model: PreTrainedModel) -> None:
    """Refuse a model whose attention kernel attnlens has not been shown to reproduce (see :data:`EXACT_KERNELS`).

    Raises:
        UnsupportedModelError: naming the kernel and the ones that are supported.
    """
    name = attn_implementation(model)
    if name not in EXACT_KERNELS:
        raise UnsupportedModelError(
            f"this model runs the attention kernel {name!r}, which attnlens has not been shown to reproduce (it "
            f"recomputes {', '.join(map(repr, EXACT_KERNELS))} exactly); load the model with "
            f"attn_implementation='eager' or 'sdpa', or call model.set_attn_implementation('sdpa') first"
        )


def lock_key(model: nn.Module) -> nn.Module:
    """The module that a model's per-model lock is kept for: the ``GPT2Model`` that every supported class wraps.

    A task-head model and its ``transformer`` share one key, so calls on either wait for each other. Anything that is
    not a supported GPT-2 model is its own key (the call then refuses it).
    """
    if not is_gpt2(model):
        return model
    from transformers import GPT2Model

    base: Any = model if isinstance(model, GPT2Model) else getattr(model, "transformer", model)
    return base if isinstance(base, nn.Module) else model


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

    Token ids and positions may come in any integer dtype (``int8`` to ``int64``, ``uint8``), as tensors, numpy
    arrays or nested lists; they are returned as ``int64``. ``attention_mask`` may also be ``bool``.

    Raises:
        ValueError: naming the problem: an empty input, a wrong dtype (floats, and bool token ids) or rank, ids
            outside the vocabulary, more positions than the model has, an ``attention_mask`` or ``position_ids`` of
            the wrong shape or values, a row of padding only.
        TypeError: something that is not token ids at all (text, ``None``, a list mixing numbers and strings,
            rows of different lengths).
    """
    config = model.config
    device = next(model.parameters()).device

    def has_text(x: Any) -> bool:
        return isinstance(x, str) or (isinstance(x, (list, tuple)) and any(has_text(item) for item in x))

    def as_2d(x: Any, name: str, *, allow_bool: bool = False) -> Tensor:
        if has_text(x):
            raise TypeError(
                f"{name} holds strings, but token ids are needed: text needs a tokenizer, e.g. "
                "tokenizer(texts, return_tensors='pt', padding=True), or attnlens.trace(..., tokenizer=tokenizer)"
            )
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"{name} must be integer token ids ([batch, pos] or [pos]: a tensor, a numpy array or a list of "
                f"equally long lists of ints), got {type(x).__name__} that torch cannot read as one ({error})"
            ) from None
        if x.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one token")
        if x.dtype == torch.bool and not allow_bool:
            raise ValueError(f"{name} is a bool tensor; it must hold integer token ids (e.g. x.long())")
        if x.dtype.is_floating_point or x.dtype.is_complex:
            raise ValueError(f"{name} must hold integers, got dtype {x.dtype}; convert with .long() if exact")
        if x.ndim == 1:
            x = x.unsqueeze(0)
        if x.ndim != 2:
            raise ValueError(f"{name} must be [batch, pos] (or [pos]), got shape {tuple(x.shape)}")
        # The embedding takes int32/int64 only; narrower and unsigned ids are widened (exactly) here.
        return x.to(device=device, dtype=torch.bool if x.dtype == torch.bool else torch.long)

    ids = as_2d(input_ids, "input_ids")
    batch, n_pos = ids.shape
    if n_pos > config.n_positions:
        raise ValueError(f"input_ids has {n_pos} positions; this model has n_ctx={config.n_positions}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= config.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {config.vocab_size}) (d_vocab), got values from {low} to {high}")
    mask = None
    if attention_mask is not None:
        mask = as_2d(attention_mask, "attention_mask", allow_bool=True)
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


def kernel_ignores_scale_flags(model: PreTrainedModel) -> bool:
    """Whether the model's attention kernel ignores its attention modules' scale flags (scaling by ``1/sqrt(d_head)``).

    transformers 4.x's GPT-2 calls every kernel but eager (sdpa, flash) without its scale, so those kernels use their
    default ``1/sqrt(d_head)`` even under ``scale_attn_weights=False`` or ``scale_attn_by_inverse_layer_idx=True``:
    such a model computes other attention than its flags (and its eager twin) say. 5.x passes the scale. The flags
    are the modules' own, which is what the eager kernel reads (not the config's).
    """
    if _transformers_major() >= 5 or attn_implementation(model) == "eager":
        return False
    attns: list[Any] = [layer.attn for layer in sites(model).layers]
    return any(not attn.scale_attn_weights or bool(attn.scale_attn_by_inverse_layer_idx) for attn in attns)
