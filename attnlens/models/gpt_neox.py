"""Everything attnlens knows about Hugging Face GPT-NeoX (Pythia, GPT-NeoX-20B), and nothing else does.

:class:`GPTNeoXAdapter`, registered for ``model_type: gpt_neox``:

* Module paths: ``gpt_neox.embed_in``, ``gpt_neox.layers[i].{input_layernorm, attention.query_key_value,
  attention.dense, post_attention_layernorm, mlp}``, ``gpt_neox.final_layer_norm``; the LM head is ``embed_out`` in
  transformers 4.x and ``lm_head`` in 5.x (read through ``get_output_embeddings()``).
* ``nn.Linear`` layout (``[out, in]``). The fused ``query_key_value`` output is laid out ``[head, (q k v), d_head]``
  (per head its query, key and value, one after the other), not GPT-2's ``[(q k v), head, d_head]``; ``dense`` takes
  ``[(head d_head)]``, so ``W_O`` is ``dense.weight`` rearranged ``d_model (head d_head) -> head d_head d_model``.
* Rotary position embedding: the first ``rotary_dim = int(d_head * rotary_pct)`` features of each query and key
  head are turned by position (rotate-half convention) before the scores; the rest pass through. The rotation is the
  ``position_embeddings`` ``(cos, sin)`` the attention module receives, captured per forward pass
  (:meth:`GPTNeoXAdapter.rotation`) and applied with :func:`attnlens.functional.apply_rotary`, which is bitwise
  transformers' ``apply_rotary_pos_emb``. ``W_Q``/``W_K`` are the projections before the rotation, and there is no
  position embedding (``ModelWeights.W_pos`` is ``None``).
* Parallel residual (``use_parallel_residual``, Pythia's default): ``x + attn(ln_1(x)) + mlp(ln_2(x))``; otherwise
  ``a = x + attn(ln_1(x))``, ``a + mlp(ln_2(a))`` (:attr:`Adapter.parallel_residual`).
* Attention: ``softmax(q_rot k_rot^T * d_head**-0.5 + mask)`` soft-maxed in float32 and cast back (eager); no upcast
  flag and no layer scale. sdpa computes the same with its own rounding and hands out no pattern.
* The config policy lives in :mod:`attnlens.models.gpt_neox_config`.

transformers is imported lazily, inside functions, so that ``import attnlens`` stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from attnlens import functional
from attnlens._live import zeros_beside
from attnlens.errors import AttentionCaptureError, UnsupportedModelError
from attnlens.models import _hf
from attnlens.models.base import QKV, Adapter, AttentionSpec, LayerSites, Rotation, Sites
from attnlens.models.gpt_neox_config import check_config, rotary
from attnlens.models.wrappers import check_exact, check_state, plain, unwrap
from attnlens.weights import LayerNormWeights, LayerWeights, MLPWeights, ModelWeights

__all__ = ["EXACT_KERNELS", "SUPPORTED_CLASSES", "GPTNeoXAdapter"]

SUPPORTED_CLASSES = (
    "GPTNeoXModel",
    "GPTNeoXForCausalLM",
    "GPTNeoXForSequenceClassification",
    "GPTNeoXForTokenClassification",
    "GPTNeoXForQuestionAnswering",
)
"""Every GPT-NeoX class of transformers 4.57 and 5.x: each is ``GPTNeoXModel`` (``gpt_neox``) plus a plain head."""

EXACT_KERNELS: tuple[str, ...] = ("eager", "sdpa")
"""The kernels whose patterns attnlens has shown to be the model's own (tests/test_hub_configs_neox.py, every
published config, both transformers majors): eager bitwise against ``output_attentions`` of an eager twin, sdpa
recomputed from the rotated q and k within a tolerance derived from the dtype's unit roundoff."""


# The nn.Linear layers whose weights attnlens reads, as (module, attribute) inside each layer.
_PROJECTIONS = (
    ("attention", "query_key_value"),
    ("attention", "dense"),
    ("mlp", "dense_h_to_4h"),
    ("mlp", "dense_4h_to_h"),
)


def _classes() -> tuple[type, ...]:
    import transformers

    return tuple(getattr(transformers, name) for name in SUPPORTED_CLASSES)


def _is_neox(model: object) -> bool:
    return isinstance(model, nn.Module) and isinstance(model, _classes())


def _base(inner: Any) -> Any:
    """The ``GPTNeoXModel`` inside any supported class (seen through a compiled ``gpt_neox``)."""
    from transformers import GPTNeoXModel

    return unwrap(inner if isinstance(inner, GPTNeoXModel) else inner.gpt_neox)


def _check(model: nn.Module) -> tuple[Any, Any, tuple[str, ...]]:
    """``(inner model, GPTNeoXModel, unknown config keys)`` after checking the class, config, state and modules."""
    inner: Any = unwrap(model)
    if not _is_neox(inner):
        raise UnsupportedModelError(
            f"attnlens needs a Hugging Face GPT-NeoX model, got {type(model).__module__}.{type(model).__qualname__}; "
            f"supported: {', '.join(SUPPORTED_CLASSES)}"
        )
    unknown = check_config(inner.config)
    base = _base(inner)
    check_state(inner, base)
    at = "" if base is inner else "gpt_neox."
    named = [
        (f"layer {i}'s {a}.{b} ({at}layers.{i}.{a}.{b})", layer._modules[a]._modules.get(b))
        for i, layer in enumerate(base.layers)
        for a, b in _PROJECTIONS
    ]
    head = inner.get_output_embeddings() if base is not inner else None
    if head is not None:
        named.append(("the LM head (get_output_embeddings())", head))
    check_exact(named, nn.Linear, "torch's nn.Linear")
    return inner, base, unknown


def _specs(config: Any, attns: list[Any]) -> tuple[AttentionSpec, ...]:
    """Each layer's spec from its attention module (what runs), checked against the config's shapes and rotation."""
    n_heads, d_model = int(config.num_attention_heads), int(config.hidden_size)
    d_head = d_model // n_heads
    fraction, _ = rotary(config)
    specs = []
    for i, attn in enumerate(attns):
        shape = tuple(attn.query_key_value.weight.shape)
        if int(attn.head_size) != d_head or shape != (3 * d_model, d_model) or n_heads * d_head != d_model:
            raise UnsupportedModelError(
                f"layer {i}'s attention has head_size={attn.head_size} and query_key_value {list(shape)}, but the "
                f"config says {n_heads} heads of {d_model} // {n_heads} = {d_head} features ({d_model} wide): the "
                "config was edited after the model was built, or the heads do not divide hidden_size; reload it"
            )
        if int(attn.rotary_ndims) != int(d_head * fraction):
            raise UnsupportedModelError(
                f"layer {i}'s attention rotates {attn.rotary_ndims} features per head, but its config asks for "
                f"int({d_head} * {fraction}) = {int(d_head * fraction)}: the config was edited after the model was "
                "built; reload it"
            )
        # The eager kernel: softmax(scores, dtype=torch.float32).to(query.dtype), in 4.57 and 5.x alike.
        specs.append(
            AttentionSpec(
                float(attn.scaling), n_heads, n_heads, rotary_dim=int(attn.rotary_ndims), softmax_dtype=torch.float32
            )
        )
    return tuple(specs)


def _layer_norm(ln: nn.Module) -> LayerNormWeights:
    assert isinstance(ln, nn.LayerNorm) and ln.weight is not None and ln.bias is not None
    return LayerNormWeights(w=ln.weight, b=ln.bias, eps=float(ln.eps))


@dataclass(frozen=True, eq=False)
class GPTNeoXAdapter(Adapter):
    """Hugging Face GPT-NeoX as attnlens sees it (see :class:`~attnlens.models.base.Adapter` and the module docstring).

    Its sites: ``input_layernorm`` (attention input), ``attention.query_key_value`` (fused q/k/v, ``nn.Linear``
    ``[3 d_model, d_model]``, output features ``[head, (q k v), d_head]``), ``attention`` (whose eager kernel hands out
    its pattern, and whose ``position_embeddings`` argument is the rotation), ``attention.dense`` (z enters it),
    ``mlp``; ``embed_in``, no position embedding, ``final_layer_norm`` and the LM head.
    """

    model_type: ClassVar[str] = "gpt_neox"
    supported_classes: ClassVar[tuple[str, ...]] = SUPPORTED_CLASSES
    exact_kernels: ClassVar[tuple[str, ...]] = EXACT_KERNELS

    @classmethod
    def owns(cls, model: object) -> bool:
        """Whether ``model`` (wrappers seen through) is of a supported GPT-NeoX class."""
        return _is_neox(unwrap(model))

    @classmethod
    def from_model(cls, model: nn.Module) -> GPTNeoXAdapter:
        """Check a GPT-NeoX model once (class, config policy, state, module classes and shapes) and adapt it.

        Raises:
            UnsupportedModelError: another class, a config the policy refuses, a state attnlens cannot see through,
                or attention modules that disagree with the config.
        """
        inner, base, unknown = _check(model)
        config = inner.config
        layers_: list[Any] = list(base.layers)
        specs = _specs(config, [layer.attention for layer in layers_])
        kernel = str(config._attn_implementation)
        refusal = _hf.paged_refusal(kernel, EXACT_KERNELS)
        head = plain(inner.get_output_embeddings()) if base is not inner else None
        sites = Sites(
            base=base,
            layers=tuple(
                LayerSites(
                    attn_input=plain(layer.input_layernorm),
                    qkv=(plain(layer.attention.query_key_value),),
                    attn=layer.attention,
                    z=plain(layer.attention.dense),
                    mlp=layer.mlp,
                )
                for layer in layers_
            ),
            embed=plain(base.embed_in),
            pos_embed=None,
            final_norm=plain(base.final_layer_norm),
            unembed=head if isinstance(head, nn.Linear) else None,
        )
        n_heads, d_model = int(config.num_attention_heads), int(config.hidden_size)
        return cls(
            model=model,
            module=inner,
            n_layers=len(layers_),
            n_heads=n_heads,
            n_kv_heads=n_heads,
            d_model=d_model,
            d_head=d_model // n_heads,
            n_ctx=int(config.max_position_embeddings),
            d_vocab=int(config.vocab_size),
            specs=specs,
            kernel=kernel,
            kernel_specs=specs,
            kernel_departure=None,
            kernel_returns_pattern=kernel == "eager",
            kernel_refusal=refusal,
            unknown_config_keys=unknown,
            parallel_residual=bool(config.use_parallel_residual),
            own_sites=sites,
            **_hf.config_fields(config),
        )

    @classmethod
    def lock_key(cls, model: nn.Module) -> nn.Module:
        """The ``GPTNeoXModel`` every supported class wraps: a task-head model and its ``gpt_neox`` share a lock."""
        from transformers import GPTNeoXModel

        return _hf.base_of(model, GPTNeoXModel, "gpt_neox")

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        attn_implementation: str | None = None,
    ) -> nn.Module:
        """Load a GPT-NeoX checkpoint in eval mode: its own class (``architectures``), else ``GPTNeoXForCausalLM``.

        Without ``dtype`` the weights keep their stored dtype (``dtype="auto"``); never remote code.
        """
        return _hf.load(
            name_or_path,
            model_type="gpt_neox",
            family="GPT-NeoX",
            check=check_config,
            classes=SUPPORTED_CLASSES,
            default="GPTNeoXForCausalLM",
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
        )

    def split_qkv(self, layer: int, outputs: Sequence[Tensor], rotation: Rotation | None = None) -> QKV:
        """q, k, v ``[batch, head, pos, d_head]`` from ``query_key_value``'s output, q and k rotated as the model does.

        v is a view of the output; the rotated q and k are new tensors, contiguous as the model's own (its matmul
        then rounds as the model's does). Features past ``rotary_dim`` pass through unchanged.
        """
        n_heads, d_head = self.n_heads, self.d_head
        fused = outputs[0]
        q, k, v = fused.view(*fused.shape[:-1], n_heads, 3 * d_head).transpose(1, 2).chunk(3, dim=-1)
        rotary_dim = self.specs[layer].rotary_dim
        if not rotary_dim:
            return QKV(q, k, v)
        if rotation is None:
            raise AttentionCaptureError(f"layer {layer} rotates its queries and keys, but no rotation was captured")

        def rotate(x: Tensor) -> Tensor:
            # apply_rotary takes [batch, pos, head, d_head]; the values do not depend on the axis order.
            turned = functional.apply_rotary(x.transpose(1, 2), rotation.cos, rotation.sin, rotary_dim=rotary_dim)
            return turned.transpose(1, 2).contiguous()

        return QKV(rotate(q), rotate(k), v)

    def _weight(self, module: nn.Module) -> Tensor:
        weight = module.weight
        assert isinstance(weight, Tensor)
        return weight

    def W_O(self, layer: int) -> Tensor:
        """``dense.weight`` ``[d_model, (head d_head)]`` (``nn.Linear``: ``[out, in]``), ``[head, d_head, d_model]``."""
        weight = self._weight(self.own_sites.layers[layer].z)
        return rearrange(weight, "d_model (head d_head) -> head d_head d_model", head=self.n_heads)

    def b_O(self, layer: int) -> Tensor | None:
        """``dense.bias`` ``[d_model]``, or None under ``attention_bias=False``."""
        bias = self.own_sites.layers[layer].z.bias
        return bias if isinstance(bias, Tensor) else None

    def kernel_pattern(self, output: object) -> Tensor | None:
        """The eager kernel's probabilities, the second element of ``GPTNeoXAttention``'s output (None under sdpa).

        attnlens never passes a ``head_mask`` (4.57's multiplies the probabilities by it), so in eval mode this is
        the softmax the kernel multiplies the values by.
        """
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        return weights if isinstance(weights, Tensor) and weights.ndim == 4 else None

    def final_norm(self) -> LayerNormWeights:
        """``final_layer_norm``'s weight, bias and eps."""
        return _layer_norm(self.own_sites.final_norm)

    def extract(self) -> ModelWeights:
        """Per-head views of the ``nn.Linear`` parameters; ``W_pos`` is None and each layer carries its rotary width.

        ``query_key_value.weight`` ``[(head qkv d_head), d_model]`` is viewed as ``[head, qkv, d_head, d_model]``:
        ``W_Q = view[:, 0].transpose(-1, -2)`` ``[head, d_model, d_head]``, and so on. W_Q and W_K are the
        projections before the rotation. Without attention biases (``attention_bias=False``) the biases are zeros.
        """
        n_heads, d_head, d_model = self.n_heads, self.d_head, self.d_model
        module: Any = self.module
        act = str(module.config.hidden_act)
        blocks: Any = self.own_sites.base.layers  # a Hugging Face ModuleList (untyped attribute)
        layers = []
        for i, site in enumerate(self.own_sites.layers):
            fused = site.qkv[0]
            W = self._weight(fused).view(n_heads, 3, d_head, d_model).transpose(-1, -2)
            bias = fused.bias if isinstance(fused.bias, Tensor) else None
            b = bias.view(n_heads, 3, d_head) if bias is not None else zeros_beside(W, n_heads, 3, d_head)
            b_O = self.b_O(i)
            mlp: Any = site.mlp
            w_in, w_out = plain(mlp.dense_h_to_4h), plain(mlp.dense_4h_to_h)
            block = blocks[i]
            layers.append(
                LayerWeights(
                    layer=i,
                    W_Q=W[:, 0],
                    W_K=W[:, 1],
                    W_V=W[:, 2],
                    b_Q=b[:, 0],
                    b_K=b[:, 1],
                    b_V=b[:, 2],
                    W_O=self.W_O(i),
                    b_O=b_O if b_O is not None else zeros_beside(self.W_O(i), d_model),
                    ln_1=_layer_norm(site.attn_input),
                    ln_2=_layer_norm(plain(block.post_attention_layernorm)),
                    mlp=MLPWeights(W_in=w_in.weight.T, b_in=w_in.bias, W_out=w_out.weight.T, b_out=w_out.bias, act=act),
                    scale=self.specs[i].scale,
                    rotary_dim=self.specs[i].rotary_dim,
                )
            )
        unembed = self.own_sites.unembed
        W_E = self._weight(self.own_sites.embed)
        return ModelWeights(
            n_layers=self.n_layers,
            n_heads=n_heads,
            d_model=d_model,
            d_head=d_head,
            d_mlp=int(module.config.intermediate_size),
            d_vocab=W_E.shape[0],
            n_ctx=self.n_ctx,
            W_E=W_E,
            W_pos=None,
            W_U=unembed.weight.T if unembed is not None else None,
            ln_f=self.final_norm(),
            layers=tuple(layers),
            name=self.name,
        )

    def describe(self) -> list[str]:
        """The config's sizes, activation, rotary width and residual form, two lines."""
        c: Any = self.module.config
        fraction, base = rotary(c)
        return [
            f"config: num_hidden_layers={c.num_hidden_layers} num_attention_heads={c.num_attention_heads} "
            f"hidden_size={c.hidden_size} max_position_embeddings={c.max_position_embeddings} "
            f"vocab_size={c.vocab_size} activation={c.hidden_act}",
            f"rotary: {self.specs[0].rotary_dim if self.specs else 0} of {self.d_head} features per head "
            f"(fraction {fraction:g}, base {base:g}); parallel residual: {self.parallel_residual}",
        ]

    def layout_lines(self, weights: ModelWeights, layer: int) -> list[str]:
        """How one layer's per-head weights are cut from the fused ``nn.Linear`` ``query_key_value``."""
        d, n, dh = weights.d_model, weights.n_heads, weights.d_head
        fused = self._weight(self.own_sites.layers[layer].qkv[0])
        per_head = weights.layers[layer]
        return [
            f"layer {layer} query_key_value.weight {list(fused.shape)}  (nn.Linear stores [out, in]: x @ W.T; "
            "rows laid out [head, (q k v), d_head])",
            f"  W_Q = weight.view({n}, 3, {dh}, {d})[:, 0].mT -> per head {list(per_head.W_Q.shape)} (before rotary)",
            f"  W_K = weight.view({n}, 3, {dh}, {d})[:, 1].mT -> per head {list(per_head.W_K.shape)} (before rotary)",
            f"  W_V = weight.view({n}, 3, {dh}, {d})[:, 2].mT -> per head {list(per_head.W_V.shape)}",
            f"  W_O = dense.weight [{d}, {d}] as (head d_head) d_model -> per head {list(per_head.W_O.shape)}",
            f"  rotary: the first {per_head.rotary_dim} of {dh} features of each q and k head turn by position",
        ]

    def notes(self) -> tuple[str, ...]:
        """What verify's report should say about rotary maths and the parallel residual."""
        notes = [
            "rotary: q and k are compared after the rotation, which is taken from the position_embeddings the "
            "attention modules received and applied by attnlens.functional.apply_rotary"
        ]
        if self.parallel_residual:
            notes.append("parallel residual: the hidden/logits rebuild adds attention and MLP to the same residual")
        return tuple(notes)
