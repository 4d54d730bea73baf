"""Everything attnlens knows about Hugging Face GPT-2, and nothing else does: :class:`GPT2Adapter`.

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

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from attnlens.errors import UnsupportedModelError
from attnlens.models import _hf
from attnlens.models.base import QKV, Adapter, LayerSites, Rotation, Sites
from attnlens.models.gpt2_attention import attention_specs, ignores_scale_flags
from attnlens.models.gpt2_config import check_config, unknown_keys
from attnlens.models.wrappers import check_exact, check_state, plain, unwrap
from attnlens.weights import LayerNormWeights, LayerWeights, MLPWeights, ModelWeights

if TYPE_CHECKING:
    from transformers import GPT2Model, PreTrainedModel

__all__ = [
    "EXACT_KERNELS",
    "SUPPORTED_CLASSES",
    "GPT2Adapter",
    "base_model",
    "check_config",
    "is_gpt2",
    "kernel_pattern",
    "load",
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
``"paged_attention"``) are refused by the adapter (``Adapter.kernel_refusal``): they serve continuous batching with a
paged cache, and on a plain forward they fail or attend to other keys (4.57's ``"sdpa_paged"`` ran, and its patterns
were 1.4e-3 off).
"""


def _gpt2_classes() -> tuple[type, ...]:
    import transformers

    return tuple(getattr(transformers, name) for name in SUPPORTED_CLASSES)


def is_gpt2(model: object) -> bool:
    """Whether ``model`` is one of the supported GPT-2 classes (or a subclass), or one wrapped as :func:`unwrap` says.

    Only the class is checked; :func:`base_model` also checks the config and the model's state.
    """
    inner = unwrap(model)
    return isinstance(inner, nn.Module) and isinstance(inner, _gpt2_classes())


def base_model(model: nn.Module) -> GPT2Model:
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


def _layer_norm(module: Any) -> LayerNormWeights:
    return LayerNormWeights(w=module.weight, b=module.bias, eps=float(module.eps))


def _extract(adapter: GPT2Adapter) -> ModelWeights:
    """Per-head weights of a GPT-2 model, as views of its parameters (see :func:`attnlens.extract_weights`)."""
    model: Any = adapter.module
    config = model.config
    n_heads, d_model, d_head, act = adapter.n_heads, adapter.d_model, adapter.d_head, config.activation_function
    layers = []
    base: Any = adapter.own_sites.base
    hf_blocks: list[Any] = list(base.h)  # HF modules are dynamically typed: Any, not nn.Module's Tensor | Module
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
        spec = adapter.specs[i]
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
                scale=spec.scale,
                upcast=spec.upcast,
                score_divisors=spec.divisors,
            )
        )
    lm_head = plain(getattr(model, "lm_head", None))
    W_E, W_pos = plain(base.wte).weight, plain(base.wpe).weight
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
        ln_f=_layer_norm(plain(base.ln_f)),
        layers=tuple(layers),
        name=adapter.name,
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
    model: PreTrainedModel = _hf.load(
        name_or_path,
        model_type="gpt2",
        family="GPT-2",
        check=check_config,
        classes=SUPPORTED_CLASSES,
        default="GPT2LMHeadModel",
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        mismatch=f"; attnlens supports GPT-2 ({', '.join(SUPPORTED_CLASSES)})",
        unreadable=": not a local checkpoint folder, and the hub did not provide it",
    )
    return model


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


def split_qkv(fused: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``c_attn``'s output ``[batch, pos, (qkv head d_head)]`` into q, k, v ``[batch, head, pos, d_head]``.

    The results are views of ``fused``, in the memory layout the model's own attention kernel receives.
    """
    qkv = rearrange(fused, "batch pos (qkv head d_head) -> qkv batch head pos d_head", qkv=3, head=n_heads)
    return qkv[0], qkv[1], qkv[2]


@dataclass(frozen=True, eq=False)
class GPT2Adapter(Adapter):
    """Hugging Face GPT-2 as attnlens sees it (see :class:`~attnlens.models.base.Adapter`).

    Its sites: ``ln_1`` (attention input), ``attn.c_attn`` (the fused q/k/v, Conv1D ``[d_model, (qkv head d_head)]``),
    ``attn`` (whose eager kernel hands out its pattern), ``attn.c_proj`` (z enters it; Conv1D ``[(head d_head),
    d_model]``, so W_O is a plain view), ``mlp``; ``wte``, ``wpe``, ``ln_f`` and the LM head.
    """

    model_type: ClassVar[str] = "gpt2"
    supported_classes: ClassVar[tuple[str, ...]] = SUPPORTED_CLASSES
    exact_kernels: ClassVar[tuple[str, ...]] = EXACT_KERNELS

    @classmethod
    def owns(cls, model: object) -> bool:
        """Whether ``model`` is of a supported GPT-2 class (see :func:`is_gpt2`)."""
        return is_gpt2(model)

    @classmethod
    def from_model(cls, model: nn.Module) -> GPT2Adapter:
        """Check a GPT-2 model once (:func:`base_model`, the attention modules) and build its adapter.

        Raises:
            UnsupportedModelError: what :func:`base_model` refuses, and attention modules that disagree with the
                config.
        """
        base: Any = base_model(model)  # the class, the config policy, the model's state
        inner: Any = unwrap(model)
        config = inner.config
        blocks: list[Any] = list(base.h)  # HF modules are dynamically typed: Any, not nn.Module's Tensor | Module
        attns = [block.attn for block in blocks]
        specs = attention_specs(config, attns)  # checks the modules against the config first
        kernel = str(config._attn_implementation)
        n_heads, d_model = int(config.n_head), int(config.n_embd)
        departure, kernel_specs = None, specs
        if ignores_scale_flags(kernel, attns):
            import transformers

            departure = (
                f"transformers {transformers.__version__} runs this model's {kernel!r} attention without the scale its "
                "attention modules ask for (scale_attn_weights / scale_attn_by_inverse_layer_idx): the model computes "
                "softmax(q k^T / sqrt(d_head))"
            )
            d_head = d_model // n_heads
            kernel_specs = tuple(replace(spec, scale=d_head**-0.5, divisors=None) for spec in specs)
        refusal = _hf.paged_refusal(kernel, EXACT_KERNELS)
        layers = tuple(
            LayerSites(
                attn_input=plain(block.ln_1),
                qkv=(plain(block.attn.c_attn),),
                attn=block.attn,
                z=plain(block.attn.c_proj),
                mlp=block.mlp,
            )
            for block in blocks
        )
        lm_head = plain(getattr(inner, "lm_head", None))
        sites = Sites(
            base=base,
            layers=layers,
            embed=plain(base.wte),
            pos_embed=plain(base.wpe),
            final_norm=plain(base.ln_f),
            unembed=lm_head if isinstance(lm_head, nn.Linear) else None,
        )
        return cls(
            model=model,
            module=inner,
            n_layers=len(blocks),
            n_heads=n_heads,
            n_kv_heads=n_heads,
            d_model=d_model,
            d_head=d_model // n_heads,
            n_ctx=int(config.n_positions),
            d_vocab=int(config.vocab_size),
            specs=specs,
            kernel=kernel,
            kernel_specs=kernel_specs,
            kernel_departure=departure,
            kernel_returns_pattern=kernel == "eager",
            kernel_refusal=refusal,
            unknown_config_keys=unknown_keys(config),
            parallel_residual=False,
            own_sites=sites,
            **_hf.config_fields(config),
        )

    @classmethod
    def lock_key(cls, model: nn.Module) -> nn.Module:
        """The ``GPT2Model`` every supported class wraps: a task-head model and its ``transformer`` share a lock."""
        from transformers import GPT2Model

        return _hf.base_of(model, GPT2Model, "transformer")

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        attn_implementation: str | None = None,
    ) -> nn.Module:
        """Load a GPT-2 checkpoint (see :func:`load`)."""
        return load(name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation)

    def split_qkv(self, layer: int, outputs: Sequence[Tensor], rotation: Rotation | None = None) -> QKV:
        """q, k, v ``[batch, head, pos, d_head]`` as views of ``c_attn``'s output (see :func:`split_qkv`)."""
        return QKV(*split_qkv(outputs[0], self.n_heads))

    def W_O(self, layer: int) -> Tensor:
        """``c_proj.weight`` ``[(head d_head), d_model]`` (Conv1D ``[in, out]``) as ``[head, d_head, d_model]``."""
        weight = self.own_sites.layers[layer].z.weight
        assert isinstance(weight, Tensor)
        return weight.view(self.n_heads, self.d_head, self.d_model)

    def b_O(self, layer: int) -> Tensor | None:
        """``c_proj.bias`` ``[d_model]``."""
        bias = self.own_sites.layers[layer].z.bias
        return bias if isinstance(bias, Tensor) else None

    def kernel_pattern(self, output: object) -> Tensor | None:
        """The eager kernel's pattern in ``GPT2Attention``'s output (see :func:`kernel_pattern`)."""
        return kernel_pattern(output)

    def final_norm(self) -> LayerNormWeights:
        """``ln_f``'s weight, bias and eps."""
        return _layer_norm(self.own_sites.final_norm)

    def extract(self) -> ModelWeights:
        """Per-head views of the Conv1D parameters (see :func:`_extract`)."""
        return _extract(self)

    def describe(self) -> list[str]:
        """The config's sizes and activation, one line."""
        module: Any = self.module
        c = module.config
        return [
            f"config: n_layer={c.n_layer} n_head={c.n_head} n_embd={c.n_embd} n_positions={c.n_positions} "
            f"vocab_size={c.vocab_size} activation={c.activation_function}"
        ]

    def layout_lines(self, weights: ModelWeights, layer: int) -> list[str]:
        """How one layer's per-head weights are cut from GPT-2's fused Conv1D parameters."""
        d = weights.d_model
        c_attn = self.own_sites.layers[layer].qkv[0].weight
        assert isinstance(c_attn, Tensor)
        per_head = weights.layers[layer]
        square = [d, d]
        return [
            f"layer {layer} c_attn.weight      {list(c_attn.shape)}  (Conv1D stores [in, out]: x @ W)",
            f"  W_Q = c_attn[:, 0:{d}]      {square} -> per head {list(per_head.W_Q.shape)}",
            f"  W_K = c_attn[:, {d}:{2 * d}]   {square} -> per head {list(per_head.W_K.shape)}",
            f"  W_V = c_attn[:, {2 * d}:{3 * d}]  {square} -> per head {list(per_head.W_V.shape)}",
            f"  W_O = c_proj.weight     {square} -> per head {list(per_head.W_O.shape)}",
        ]

    def notes(self) -> tuple[str, ...]:
        """The 4.x kernels that ignore the scale flags, and ``reorder_and_upcast_attn`` outside the eager kernel."""
        notes = []
        if self.kernel_departure is not None:
            notes.append(
                f"this transformers release runs the {self.kernel!r} kernel without the config's attention scale "
                "(scale_attn_weights / scale_attn_by_inverse_layer_idx): the model computes other attention than its "
                "config says, so z and attn_out are expected to fail where the scale is not 1/sqrt(d_head)"
            )
        if any(spec.upcast for spec in self.specs) and self.kernel != "eager":
            notes.append(
                f"reorder_and_upcast_attn only affects the eager kernel; the {self.kernel!r} kernel ignores it"
            )
        return tuple(notes)
