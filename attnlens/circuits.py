r"""Composition between heads, read from the weights: Q-, K- and V-composition scores and their random baseline.

Elhage et al. (2021), "A Mathematical Framework for Transformer Circuits", measure how much a later head reads what
an earlier head writes by the relative Frobenius norm of the product of their circuits. In attnlens's row-vector
convention a head writes ``x @ OV`` to the residual stream (``OV = W_V @ W_O``) and scores a query row ``x_q`` against a
key row ``x_k`` by ``x_q @ QK @ x_k^T`` (``QK = W_Q @ W_K^T``, times the layer's scale). For a head ``h1`` in an earlier
layer and a head ``h2`` in a later one, where ``h1``'s output enters ``h2``:

- **Q** (into the query side): ``(y @ OV_h1) @ QK_h2 @ x_k^T``, the matrix ``OV_h1 @ QK_h2``;
- **K** (into the key side): ``x_q @ QK_h2 @ (y @ OV_h1)^T``, the matrix ``QK_h2 @ OV_h1^T``, whose norm is that of
  ``OV_h1 @ QK_h2^T``;
- **V** (into the values): ``(y @ OV_h1) @ OV_h2``, the matrix ``OV_h1 @ OV_h2``;

and the score is that matrix's Frobenius norm divided by the product of the two circuits' norms, e.g.
``||OV_h1 QK_h2^T||_F / (||OV_h1||_F ||QK_h2||_F)`` for K. It lies in ``[0, 1]`` and is 1 only when every direction
``h1`` writes is one ``h2`` reads, with matching spectra.

What is in the circuits, and what is not:

- Biases are not: ``b_Q``, ``b_K``, ``b_V`` and ``b_O`` add terms that do not depend on the earlier head's output (or
  depend on it linearly, not bilinearly), so they have no place in the products above.
- The attention scale (``1/sqrt(d_head)``, and ``1/(layer + 1)`` under ``scale_attn_by_inverse_layer_idx``) multiplies
  ``QK`` and cancels in the ratio.
- Layer norms are not folded by default: the scores are those of the raw weights, as the checkpoint stores them.
  ``fold_ln=True`` folds what each reading layer's ``ln_1`` does linearly into ``W_Q``, ``W_K`` and ``W_V``: its scale
  (``W -> diag(w) @ W``) and its centring (the mean over ``d_model`` is removed before anything is read, so the
  folded ``W`` has its mean row removed), exactly as :meth:`attnlens.ModelWeights.processed` does with
  ``fold_ln=True``. The per-position division by the standard deviation is not linear and stays out, as does
  ``ln_1``'s shift (a bias). ``center_writing_weights=True`` also removes the mean over ``d_model`` from ``W_O``
  (as ``processed`` does), which changes only the norms in the denominators. Both options together give the
  weights TransformerLens's ``HookedTransformer.from_pretrained`` loads by default. Under an RMSNorm (the Llama
  family) ``fold_ln`` folds the scale only (an RMSNorm does not remove the mean), and ``center_writing_weights`` is
  refused: it would change what the next RMSNorm reads.
- Under rotary (GPT-NeoX, the Llama family) no position-free QK exists: Q and K composition are refused by name
  (:class:`~attnlens.PositionDependentCircuitError`); V composition reads only OV circuits and is offered.

All products are taken through :class:`~attnlens.factored.FactoredMatrix`: nothing ``d_model x d_model`` is formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlens._progress import Bar
from attnlens.factored import FactoredMatrix
from attnlens.weights import ModelWeights, _centre

__all__ = ["KINDS", "CompositionBaseline", "composition_baseline", "composition_scores", "top_pairs"]

KINDS: tuple[str, ...] = ("Q", "K", "V")
"""The kinds of composition: where the earlier head's output enters the later head."""

_DTYPES = (torch.float32, torch.float64)
_CHUNK = 64  # random pairs drawn at once by composition_baseline: bounds its memory at 64 * 4 * d_model * d_head


def composition_scores(
    weights: ModelWeights,
    kind: str,
    *,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""Q-, K- or V-composition scores of every ordered pair of heads in different layers.

    With ``OV = W_V W_O`` and ``QK = W_Q W_K^T`` per head (row vectors; see the module docstring for the derivation),
    the score of an earlier head ``h1`` into a later head ``h2`` is

    - ``kind="Q"``: ``||OV_h1 QK_h2||_F / (||OV_h1||_F ||QK_h2||_F)``,
    - ``kind="K"``: ``||OV_h1 QK_h2^T||_F / (||OV_h1||_F ||QK_h2||_F)``,
    - ``kind="V"``: ``||OV_h1 OV_h2||_F / (||OV_h1||_F ||OV_h2||_F)``

    (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"). Read a score against
    :func:`composition_baseline`: random circuits of these shapes score about ``1/sqrt(d_model)``.

    How it is computed: a circuit ``A @ B`` with ``A`` ``[d_model, d_head]`` acts on norms as ``R @ B``, where ``R`` is
    the ``[d_head, d_head]`` triangular square root of the Gram matrix ``A^T A`` (``A = Q R`` with ``Q``
    orthonormal, and ``||Q X||_F = ||X||_F``); on the right, ``A @ B`` acts as ``A @ R'^T`` with ``R'`` the root of
    ``B B^T``. The earlier head's ``OV`` becomes ``[d_head, d_model]``, the later head's circuit ``[d_model, d_head]``,
    and each pair costs one ``[d_head, d_model] @ [d_model, d_head]`` product: one matrix product per later layer for
    all heads of the earlier layers against all its heads (peak memory: one stacked ``W_O`` in ``dtype``). Pairs in
    the same or an earlier layer are never computed. Nothing ``d_model x d_model`` is formed.

    Args:
        weights: the model's weights, from :func:`attnlens.extract_weights` (any dtype and device).
        kind: ``"Q"``, ``"K"`` or ``"V"``: where ``h1``'s output enters ``h2``.
        fold_ln: fold each reading layer's ``ln_1`` scale and centring into ``W_Q``, ``W_K``, ``W_V`` (see the module
            docstring). Default: the raw weights.
        center_writing_weights: remove the mean over ``d_model`` from ``W_O``, as
            :meth:`~attnlens.ModelWeights.processed` does.
        dtype: the dtype of the computation and of the result: float64 (the default: half and single precision
            weights upcast exactly, and the few-thousand-entry result costs nothing to keep), or float32 (faster on
            a GPU; about 1e-6 absolute error on a score).

    Returns:
        ``[layer, head, layer, head]``: ``scores[l1, h1, l2, h2]`` for ``l1 < l2``, NaN where ``l1 >= l2``, on the
        weights' device, detached. A pair where either circuit is exactly zero (a pruned head) scores 0.

    Raises:
        ValueError: for a ``kind`` other than ``"Q"``, ``"K"``, ``"V"``, or a ``dtype`` other than float32/float64.
        TypeError: if ``weights`` is not a :class:`~attnlens.ModelWeights` (e.g. a model: extract its weights first).

    Example:
        >>> w = attnlens.extract_weights(model)
        >>> k = circuits.composition_scores(w, "K")        # [layer, head, layer, head]
        >>> k[0, :, 1, 0].argmax()                          # the layer-0 head that feeds L1H0's keys most
    """
    _check(weights, kind, dtype)
    with torch.no_grad():
        ov, right = _circuits(weights, kind, fold_ln, center_writing_weights, dtype)
        left_r, right_r = _root_left(ov), _root_right(right)  # [layer, head, d_head, d_model], [..., d_model, d_head]
        left_norm, right_norm = torch.linalg.matrix_norm(left_r), torch.linalg.matrix_norm(right_r)
        n_layers, n_heads = weights.n_layers, weights.n_heads
        scores = torch.full((n_layers, n_heads, n_layers, n_heads), math.nan, dtype=dtype, device=left_r.device)
        for l2 in range(1, n_layers):
            # Every head of the layers before l2 against every head of l2, as one matrix product.
            product = torch.einsum("lhxm,kmy->lhkxy", left_r[:l2], right_r[l2])
            scores[:l2, :, l2, :] = _ratio(
                torch.linalg.matrix_norm(product), left_norm[:l2, :, None] * right_norm[l2][None, None]
            )
    return scores


@dataclass(frozen=True)
class CompositionBaseline:
    """The composition score of random circuits of a model's shapes: what a score means nothing above.

    Attributes:
        kind: ``"Q"``, ``"K"`` or ``"V"``.
        mean: Monte Carlo estimate of the expected score of two random circuits (Gaussian factors).
        stderr: standard error of ``mean`` (the samples' standard deviation over ``sqrt(n_samples)``).
        rms: ``1/sqrt(d_model)``, the exact root-mean-square random score (see :func:`composition_baseline`);
            the expected score is slightly below it.
        n_samples: random pairs drawn.
        seed: seed of the generator that drew them.
        d_model: width of the residual stream of the circuits.
        d_head: inner dimension of the circuits.
    """

    kind: str
    mean: float
    stderr: float
    rms: float
    n_samples: int
    seed: int
    d_model: int
    d_head: int


def _baseline_chunk(generator: torch.Generator, n: int, d_model: int, d_head: int) -> Tensor:
    """``[n]`` composition scores of random circuit pairs (see :func:`composition_baseline`)."""
    # Four factors per sample; the second circuit is used as the right-hand side, as composition_scores does.
    tall = torch.randn(4, n, d_model, d_head, generator=generator, dtype=torch.float64)
    left_r = _root_left(FactoredMatrix(tall[0], tall[1].mT))
    right_r = _root_right(FactoredMatrix(tall[2], tall[3].mT))
    return _ratio(
        torch.linalg.matrix_norm(left_r @ right_r),
        torch.linalg.matrix_norm(left_r) * torch.linalg.matrix_norm(right_r),
    )


def composition_baseline(
    weights: ModelWeights, kind: str, *, n_samples: int = 200, seed: int = 0, progress: bool | None = None
) -> CompositionBaseline:
    r"""The expected composition score of random circuits with the shapes of ``weights``' circuits.

    Each sample draws the four factors of two circuits, ``OV_1 = W_V W_O`` and the later head's ``QK`` (for ``"Q"``
    and ``"K"``) or ``OV`` (for ``"V"``), with independent standard Gaussian entries in the shapes of ``weights``
    (``[d_model, d_head]`` and ``[d_head, d_model]``), and scores them as :func:`composition_scores` does, in float64
    on the CPU, from a seeded ``torch.Generator`` (so the same seed gives the same numbers on every machine). For
    Gaussian factors the three kinds have the same distribution; ``kind`` names which one you compare with.

    Read a score ``s`` as ``s / mean``: about 1 for heads whose subspaces are unrelated, well above 1 for heads that
    compose. How far above 1 is noise depends on the heads, not only on the shapes: a score's spread under random
    rotations grows as a head's norm concentrates in fewer singular directions, and real heads concentrate it far
    more than Gaussian circuits do (``docs/circuits.md`` gives the demo model's numbers). So the spread of these
    random samples is not reported as a yardstick: it would make real scores look more significant than they are.

    The root mean square is exact: for any circuit ``A`` and a random ``B`` whose distribution is unchanged by
    rotations ``B -> U B`` (Gaussian factors are), ``E[||A B||^2] = ||A||^2 ||B||^2 / d_model``, so
    ``E[score^2] = 1/d_model`` whatever the spectra. ``rms`` is ``1/sqrt(d_model)``, and the expected score lies just
    below it (Jensen's inequality): 1.6% below for ``d_head`` 4, within the estimate's error for GPT-2's 64. The rms
    is the same for a real head paired with a randomly rotated copy of another, so the baseline also reads as "no
    preferred alignment between the two heads' subspaces". With ``fold_ln=True`` and
    ``center_writing_weights=True`` both circuits live in the ``d_model - 1`` dimensions orthogonal to the mean
    direction, where the random level is ``1/sqrt(d_model - 1)`` (a relative ``1/(2 d_model)`` higher).

    Args:
        weights: the weights whose shapes (``d_model``, ``d_head``) the random circuits take; their values are unused.
        kind: ``"Q"``, ``"K"`` or ``"V"``.
        n_samples: random pairs to draw (at least 2, for a standard error).
        progress: a progress bar on stderr (tqdm): ``None`` (default) where interactive (a terminal, a notebook)
            and only after 2 s; ``True`` always; ``False`` never.
        seed: seed of the random generator.

    Returns:
        A :class:`CompositionBaseline`.

    Raises:
        ValueError: for a ``kind`` other than ``"Q"``, ``"K"``, ``"V"``, or fewer than 2 samples.
        TypeError: if ``weights`` is not a :class:`~attnlens.ModelWeights`.
    """
    _check(weights, kind, torch.float64)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2 (a standard error needs two samples), got {n_samples!r}")
    d_model, d_head = weights.d_model, weights.d_head
    generator = torch.Generator().manual_seed(seed)
    samples = []
    with Bar(n_samples, "composition_baseline", progress, unit="sample") as bar:
        for start in range(0, n_samples, _CHUNK):
            n = min(_CHUNK, n_samples - start)
            samples.append(_baseline_chunk(generator, n, d_model, d_head))
            bar.update(n)
    scores = torch.cat(samples)
    return CompositionBaseline(
        kind=kind,
        mean=scores.mean().item(),
        stderr=scores.std().item() / math.sqrt(n_samples),
        rms=1 / math.sqrt(d_model),
        n_samples=n_samples,
        seed=seed,
        d_model=d_model,
        d_head=d_head,
    )


def top_pairs(scores: Tensor, k: int = 5, *, largest: bool = True) -> list[tuple[int, int, int, int, float]]:
    """The ``k`` pairs of heads with the highest (or lowest) composition score: ``[(l1, h1, l2, h2, score)]``.

    Args:
        scores: ``[layer, head, layer, head]``, from :func:`composition_scores` (or the same shape of your own).
        k: how many pairs.
        largest: best = highest score (``False``: lowest).

    Returns:
        ``[(l1, h1, l2, h2, score)]``, best first, ties in index order. NaN entries (pairs that cannot compose: the
        later head is not in a later layer) are not pairs and are never listed, so fewer than ``k`` may come back.
    """
    if not isinstance(scores, Tensor) or scores.ndim != 4:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a [layer, head, layer, head] tensor, got {shape}")
    n_layers, n_heads = scores.shape[:2]
    values = scores.detach().flatten().tolist()
    finite = [i for i, v in enumerate(values) if not math.isnan(v)]
    order = sorted(finite, key=lambda i: -values[i] if largest else values[i])[: max(0, k)]

    def pair(i: int) -> tuple[int, int, int, int]:
        (l1, h1), (l2, h2) = divmod(i // (n_layers * n_heads), n_heads), divmod(i % (n_layers * n_heads), n_heads)
        return l1, h1, l2, h2

    return [(*pair(i), values[i]) for i in order]


def _check(weights: object, kind: object, dtype: object) -> None:
    if not isinstance(weights, ModelWeights):
        raise TypeError(
            f"composition scores are computed from weights: expected attnlens.ModelWeights, got "
            f"{type(weights).__name__}; pass attnlens.extract_weights(model)"
        )
    if kind not in KINDS:
        raise ValueError(
            f"kind must be 'Q', 'K' or 'V' (where the earlier head's output enters the later head: its queries, keys "
            f"or values), got {kind!r}"
        )
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype!r}")


def _circuits(
    weights: ModelWeights, kind: str, fold_ln: bool, center_writing: bool, dtype: torch.dtype
) -> tuple[FactoredMatrix, FactoredMatrix]:
    """``OV`` and the later head's circuit for ``kind`` ``[layer, head, d_model, d_model]``, folded as asked.

    The folding is done here in ``dtype`` rather than through ``ModelWeights.processed``, which returns the weights'
    own dtype: folded bfloat16 weights would be rounded to 3 significant digits before the scores see them, and
    ``processed`` also copies the embeddings and the unembedding, which the circuits never use. QK is formed only for
    Q and K composition: a rotary model has no position-free QK, and V composition does not read it.
    """
    rms = weights.layers[0].ln_1.rms
    if center_writing and rms:
        raise ValueError(
            "center_writing_weights=True removes the mean over d_model from W_O, which changes nothing only when "
            "every reader normalises with a layer norm (it removes the mean); this model's norms are RMSNorms, which "
            "read the mean: leave center_writing_weights=False"
        )
    w = (
        torch.stack([layer.ln_1.w for layer in weights.layers]).detach().to(dtype)[:, None, :, None]
        if fold_ln
        else None
    )

    def reading(W: Tensor) -> Tensor:
        """A matrix that reads ``ln_1``'s output, ``[layer, head, d_model, d_head]``, in ``dtype``, folded as asked."""
        W = W.detach().to(dtype)
        if w is None:
            return W
        # x_norm * w read by W is x_norm @ (w[:, None] * W); after a layer norm x_norm has mean 0, so W's mean row is
        # never read and is removed. An RMSNorm keeps the mean: only its scale folds.
        return w * W if rms else _centre(w * W, dim=-2)

    weights_ov = weights.OV  # built per access: read once
    W_O = weights_ov.B.detach().to(dtype)
    ov = FactoredMatrix(reading(weights_ov.A), _centre(W_O) if center_writing else W_O)
    if kind == "V":
        return ov, ov
    weights_qk = weights.QK
    qk = FactoredMatrix(reading(weights_qk.A), reading(weights_qk.B.mT).mT)
    return ov, qk if kind == "Q" else qk.T


def _root_left(circuit: FactoredMatrix) -> Tensor:
    """``R @ B`` ``[..., mdim, rdim]`` for ``circuit = A @ B``, ``A = Q R``: ``||R B X||_F = ||A B X||_F``."""
    return torch.linalg.qr(circuit.A, mode="r")[1] @ circuit.B


def _root_right(circuit: FactoredMatrix) -> Tensor:
    """``A @ R^T`` ``[..., ldim, mdim]`` for ``circuit = A @ B``, ``B^T = Q R``: ``||X A R^T||_F = ||X A B||_F``."""
    return circuit.A @ torch.linalg.qr(circuit.B.mT, mode="r")[1].mT


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, 0 where the denominator is 0 (a zero circuit composes with nothing)."""
    zero = denominator == 0
    return torch.where(zero, torch.zeros_like(numerator), numerator / torch.where(zero, 1, denominator))
