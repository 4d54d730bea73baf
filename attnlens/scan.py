"""scan(): per-head attention statistics over a whole corpus, streamed, resumable, and torch.distributed-aware.

The corpus is tokenized and packed into windows (:mod:`attnlens.scan_data`), run through the model in batches, and
each scanned layer's pattern, from the pattern tap (:mod:`attnlens.patterns`) exactly as :func:`attnlens.trace` gets
it, is reduced at once to per-head sums: no pattern outlives its layer. Per batch, the sums, sums of
squares and row counts are taken in float64, and the per-batch sums are added in global batch order, so the result is
the same bit for bit whatever the number of processes (given the same device type, torch build and thread count per
process) and whether or not the scan was interrupted and resumed.

Caveats:

* Every process reads and tokenizes the whole corpus (the windows must be cut identically everywhere); only the
  forward passes are shared out. Tokenization is rarely the cost that matters.
* Windows are full (no padding), so every query row ``i`` sees keys ``0..i`` of its window; the window's first token
  plays the part of a sequence's first token, even where it lies inside a document.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from einops import einsum
from torch import Tensor, nn

from attnlens import _rows, capture
from attnlens._detection import token_keys
from attnlens._indices import check_indices
from attnlens.loading import resolve
from attnlens.models import QKV, Adapter, AttentionSpec, adapt
from attnlens.patterns import Sink, Tap, Wants, kernel_specs
from attnlens.scan_data import Packer
from attnlens.scan_result import SCORE_NAMES, ScanResult
from attnlens.scan_state import Group, Progress, check_checkpoint, save_checkpoint, weights_sha256

__all__ = ["DEFAULT_SEQ_LEN", "SCORE_NAMES", "ScanResult", "scan"]

DEFAULT_SEQ_LEN = 2048
"""The longest default window: ``n_ctx`` up to this (GPT-2's 1024 and Pythia's 2048 unchanged), this beyond it."""

# A checkpoint is written after the batch that brings either count past its threshold (or at the end).
_CHECKPOINT_BATCHES = 64
_CHECKPOINT_SECONDS = 60.0


# ---------------------------------------------------------------------------------------------- statistics ---


def row_values(
    pattern: Tensor, duplicate: Tensor, induction: Tensor, names: Iterable[str] = SCORE_NAMES
) -> list[tuple[Tensor, Tensor]]:
    r"""Per-row values ``[batch, head, q_pos]`` (float32) and qualifying rows ``[batch, q_pos]`` of some scores.

    With ``P`` the pattern of a full window (no padding) and ``R`` a score's rows:

    * ``previous_token``: ``P[i, i-1]``, rows ``i >= 1``;
    * ``duplicate_token``: ``sum_{j < i, t_j = t_i} P[i, j]``, rows with such a ``j``;
    * ``induction``: ``sum_{j + 1 < i, t_j = t_i} P[i, j+1]``, rows with such a ``j``;
    * ``first_token``: ``P[i, 0]``, rows ``i >= 1``;
    * ``entropy``: ``-sum_j P[i, j] log P[i, j]`` in nats, rows ``i >= 1``;
    * ``distance``: ``sum_j P[i, j] (i - j)``, the mean distance attended back, rows ``i >= 1``;
    * ``self``: ``P[i, i]``, rows ``i >= 1``.

    The first five are :mod:`attnlens.metrics`'s definitions; row 0 is left out of the last two as of entropy (it
    can attend only to itself).

    Args:
        pattern: ``[batch, head, q_pos, k_pos]``.
        duplicate: ``[batch, q_pos, k_pos]`` key set from :func:`attnlens._detection.token_keys`.
        induction: ``[batch, q_pos, k_pos]`` key set from :func:`attnlens._detection.token_keys`.
        names: the scores wanted, from :data:`SCORE_NAMES`.

    Returns:
        ``(values, rows)`` per score, in the order of ``names``.
    """
    p = pattern.to(torch.float32)
    batch, _, n_pos, _ = p.shape
    after_first = torch.ones(batch, n_pos, dtype=torch.bool, device=p.device)
    after_first[:, 0] = False

    # Sums of the pattern against a [q_pos, k_pos] weight, as einsum contractions (a batched matrix product): an
    # elementwise product and sum would write a temporary the size of the pattern, and takes about 15x as long.
    def on_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
        value = einsum(p, keys.to(torch.float32), "batch head q_pos k_pos, batch q_pos k_pos -> batch head q_pos")
        return value, keys.any(dim=-1)

    def distance() -> Tensor:
        positions = torch.arange(n_pos, device=p.device, dtype=torch.float32)
        back = (positions[:, None] - positions[None, :]).clamp_(min=0)  # [q_pos, k_pos]: i - j, 0 above the diagonal
        return einsum(p, back, "batch head q_pos k_pos, q_pos k_pos -> batch head q_pos")

    compute = {
        "previous_token": lambda: torch.nn.functional.pad(torch.diagonal(p, offset=-1, dim1=-2, dim2=-1), (1, 0)),
        "first_token": lambda: p[..., 0],
        "entropy": lambda: -torch.special.xlogy(p, p).sum(dim=-1),
        "distance": distance,
        "self": lambda: torch.diagonal(p, dim1=-2, dim2=-1),
    }
    out = []
    for name in names:
        if name == "duplicate_token":
            out.append(on_keys(duplicate))
        elif name == "induction":
            out.append(on_keys(induction))
        else:
            out.append((compute[name](), after_first))
    return out


def batch_sums(values: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``[2, score, head]`` float64 sums and sums of squares over each score's rows (the rest is zeroed)."""
    out = []
    for value, rows in values:
        v = value.to(torch.float64) * rows.unsqueeze(1)
        out.append(torch.stack([v.sum(dim=(0, 2)), (v * v).sum(dim=(0, 2))]))
    return torch.stack(out, dim=1)


def _finish(total: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard error ``[score, layer, head]`` from sums ``[2, score, layer, head]`` and ``count [score]``."""
    n = count.to(torch.float64).view(-1, 1, 1)
    mean = total[0] / n
    variance = ((total[1] - total[0] * mean) / (n - 1)).clamp(min=0)
    stderr = (variance / n).sqrt()
    stderr = torch.where(n >= 2, stderr, torch.full_like(stderr, float("nan")))
    return mean, stderr


# ---------------------------------------------------------------------------------------------------- scan ---


def _from_lse(adapter: Adapter, layers: Sequence[int], specs: Sequence[AttentionSpec]) -> bool:
    """Whether scan computes the statistics from q, k and each row's lse (:func:`attnlens._rows.row_statistics`).

    Not for an eager kernel (it forms the pattern anyway, and hands it out), a half-precision model (the square's
    definitions reduce the pattern rounded to that dtype), or where torch's CPU flash kernel cannot give the lse
    (another device, a sliding window).
    """
    if adapter.kernel_returns_pattern:
        return False
    probe = torch.empty(0, dtype=adapter.dtype, device=adapter.device)
    return all(_rows.fused_lse_available(probe, specs[layer]) for layer in layers)


def _rounds(batches: Iterator[Tensor], size: int) -> Iterator[list[Tensor]]:
    round_: list[Tensor] = []
    for batch in batches:
        round_.append(batch)
        if len(round_) == size:
            yield round_
            round_ = []
    if round_:
        yield round_


class _Sums(Sink):
    """Reduces each layer of one batch to per-head sums as it comes: from its pattern, or from q, k and the lse.

    With ``specs`` (see :func:`_from_lse`) the sink takes each layer's q and k and computes the statistics without
    the square (:func:`attnlens._rows.row_statistics`); else it reduces the pattern (no pattern outlives its layer).
    """

    def __init__(
        self,
        layers: tuple[int, ...],
        scores: tuple[str, ...],
        shape: tuple[int, ...],
        specs: Sequence[AttentionSpec] | None = None,
    ) -> None:
        self.slots = {layer: slot for slot, layer in enumerate(layers)}
        self.specs = specs
        self.key_sets: tuple[_rows.KeySet, ...] = ()
        self.score_list, self.shape = scores, shape
        self.keys: tuple[Tensor, Tensor] = (torch.empty(0), torch.empty(0))
        self.sums = torch.zeros(shape, dtype=torch.float64)
        self.counts = torch.zeros(len(scores), dtype=torch.float64)

    def start(self, ids: Tensor) -> None:
        if self.specs is not None:  # pairs straight from the tokens: no [batch, q_pos, k_pos] mask (pos^2 bytes)
            self.key_sets = _rows.token_key_sets(ids)
        else:
            self.keys = token_keys(ids)
        self.sums = torch.zeros(self.shape, dtype=torch.float64)

    def pattern(self, layer: int, pattern: Tensor) -> None:
        duplicate, induction = self.keys
        self._add(layer, row_values(pattern, duplicate, induction, self.score_list))

    def qkv(self, layer: int, qkv: QKV) -> None:
        assert self.specs is not None  # asked for only with specs
        duplicate, induction = self.key_sets
        self._add(layer, _rows.row_statistics(qkv.q, qkv.k, self.specs[layer], duplicate, induction, self.score_list))

    def _add(self, layer: int, values: list[tuple[Tensor, Tensor]]) -> None:
        self.sums[:, :, self.slots[layer]] = batch_sums(values).cpu()
        # The rows that qualify depend on the tokens only: the same in every layer.
        self.counts = torch.stack([rows.sum() for _, rows in values]).to(torch.float64).cpu()


@capture.one_at_a_time
def scan(
    model: nn.Module | Adapter | str | os.PathLike[str],
    data: Any,
    *,
    tokenizer: Any = None,
    scores: Iterable[str] | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    layers: int | Iterable[int] | None = None,
    heads: int | Iterable[int] | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike[str] | None = None,
    text_field: str = "text",
    encoding: str = "utf-8",
) -> ScanResult:
    """Per-head attention statistics of a GPT-2 model over a corpus: mean, standard error and row count.

    The data is packed into windows of ``seq_len`` tokens (each document preceded by the end-of-text token; the
    tokens after the last full window are dropped and counted in ``provenance["dropped_tokens"]``), run in batches
    of ``batch_size`` windows, and each layer's pattern, computed as :func:`attnlens.trace` computes it, is reduced
    inside the layer's hook: memory beyond the model is a few patterns of one layer for one batch, whatever the
    corpus size. The statistics are defined in :func:`row_values`.

    Under ``torchrun`` (or in an initialised ``torch.distributed`` group) every process takes every ``N``-th batch;
    the per-batch sums are gathered and added in batch order on every process, so every process returns the same
    result, bit for bit the one of a single process. Collectives use gloo on CPU and nccl when the model is on CUDA
    (each process's model on its own device).

    Args:
        model: a Hugging Face GPT-2 model of any supported class (left exactly as found), or its Adapter;
            or a hub name / local folder / ``"demo"``, loaded for this call by :func:`attnlens.load` (with its
            tokenizer).
        data: a path to a ``.txt`` (blank-line-separated documents) or ``.jsonl`` file, an iterable of texts, of
            token-id sequences, or of dict rows (a Hugging Face ``datasets`` Dataset); see :mod:`attnlens.scan_data`.
        tokenizer: tokenizes texts; its ``eos_token_id`` separates documents (else the config's ``eos_token_id``).
        scores: the statistics to compute, a subset of :data:`SCORE_NAMES` (default all).
        seq_len: tokens per window (default the model's ``n_ctx``, at most :data:`DEFAULT_SEQ_LEN`: long-context
            models such as Llama 3.x have an ``n_ctx`` of 131072, a window few corpora fill and slow to scan).
        batch_size: windows per forward pass.
        max_tokens: scan at most this many tokens (``max_tokens // seq_len`` windows); default the whole data.
        layers: the layers to scan (default all); the forward pass stops after the last of them.
        heads: the heads to keep (default all).
        progress: report progress on stderr (tqdm on a terminal, else a line every few seconds), rank 0 only.
        checkpoint: a file to save partial sums to every few batches (atomically); when it exists, the scan
            resumes from it, after checking that it was written for the same arguments, model and data.
        text_field: the field holding the text in ``.jsonl`` lines and dict rows.
        encoding: the encoding of a ``.txt`` or ``.jsonl`` file (bytes that are not are named by file and line).

    Returns:
        The :class:`ScanResult` (on every process).

    Raises:
        ValueError: bad arguments, data with no full window, bad data (see :mod:`attnlens.scan_data`), or a
            checkpoint written for other arguments, another model or other data (named).
        UnsupportedModelError: as :func:`attnlens.trace`.
    """
    model, tokenizer = resolve(model, tokenizer, "scan")
    adapter = adapt(model)
    adapter.check_kernel()
    score_list = SCORE_NAMES if scores is None else tuple(s for s in SCORE_NAMES if s in set(scores))
    unknown = sorted(set(SCORE_NAMES if scores is None else scores) - set(SCORE_NAMES))
    if unknown or not score_list:
        raise ValueError(f"unknown or no score names {unknown}; choose from {', '.join(SCORE_NAMES)}")
    seq_len = min(adapter.n_ctx, DEFAULT_SEQ_LEN) if seq_len is None else seq_len
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if seq_len < 2 or seq_len > adapter.n_ctx:
        raise ValueError(f"seq_len must lie in [2, {adapter.n_ctx}] (n_ctx), got {seq_len}")
    max_windows = None
    if max_tokens is not None:
        max_windows = int(max_tokens) // seq_len
        if max_windows < 1:
            raise ValueError(f"max_tokens={max_tokens} is less than one window of seq_len={seq_len} tokens")
    layer_list = check_indices(layers, adapter.n_layers, "layers")
    head_list = check_indices(heads, adapter.n_heads, "heads")
    eot = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    eot = adapter.eos_token_id if eot is None else eot
    if eot is None:
        raise ValueError("no end-of-text token id: neither the tokenizer nor the model config has an eos_token_id")

    specs = kernel_specs(adapter, caller="scan", stacklevel=3)
    arguments = {
        "scores": list(score_list),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "layers": list(layer_list),
        "heads": list(head_list),
        "text_field": text_field,
        "eot_id": int(eot),
    }
    shape = (2, len(score_list), len(layer_list), len(head_list))
    total = torch.zeros(shape, dtype=torch.float64)
    count = torch.zeros(len(score_list), dtype=torch.int64)
    position = n_windows = 0  # batches and windows added to `total`
    data_hash = hashlib.sha256()

    group = Group(adapter.device)
    report = Progress(progress and group.rank == 0, None if max_windows is None else max_windows * seq_len)
    try:
        fingerprint = {}
        saved: dict[str, Any] | None = None
        if checkpoint is not None:
            checkpoint = os.fspath(checkpoint)
            fingerprint = {
                "arguments": hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest(),
                "model": f"{adapter.config_sha256}:{weights_sha256(adapter.model)}",
            }
            text = None
            if group.rank == 0 and os.path.exists(checkpoint):
                with open(checkpoint, encoding="utf-8", errors="replace") as file:  # junk is refused below
                    text = file.read()
            text = group.broadcast_text(text)
            if text is not None:
                saved = check_checkpoint(text, checkpoint, fingerprint, (total.numel(), count.numel()))
                report.note(f"resuming from {checkpoint} after batch {saved['position']}")

        from_lse = _from_lse(adapter, layer_list, specs)
        sink = _Sums(layer_list, score_list, shape, specs if from_lse else None)
        wants = Wants(pattern=False, qkv=True) if from_lse else Wants()
        tap = Tap(adapter, layer_list, head_list, sink, wants, specs)

        def run_batch(ids: Tensor) -> Tensor:
            ids, _, _ = adapter.check_inputs(ids)
            sink.start(ids)
            tap.run(ids, torch.ones_like(ids))  # windows are full; said, so the model does not warn
            return torch.cat([sink.sums.flatten(), sink.counts])

        packer = Packer(seq_len, batch_size, int(eot), tokenizer, max_windows)
        batches = packer.batches(data, text_field, encoding)
        if saved is not None:  # skip what the checkpoint holds, checking that the data is the same
            for _ in range(saved["position"]):
                batch = next(batches, None)
                if batch is None:
                    break
                data_hash.update(batch.numpy().tobytes())
                n_windows += batch.shape[0]
            if data_hash.hexdigest() != saved["data"]:
                raise ValueError(
                    f"checkpoint {checkpoint} was written for other data (the first {saved['position']} batches "
                    "differ); delete it or scan the same data"
                )
            position = saved["position"]
            total = torch.tensor(saved["sums"], dtype=torch.float64).view(shape)
            count = torch.tensor(saved["count"], dtype=torch.int64)

        last_saved, last_time = position, time.perf_counter()
        split = total.numel()
        with capture.preserved(adapter), torch.no_grad(), tap.hooked():
            for round_ in _rounds(batches, group.size):
                # Every process joins every gather, also one whose batch failed: the others would wait for it forever.
                # The last entry flags a failure; then every process stops, the failed one with its own error.
                payload = torch.zeros(split + len(score_list) + 1, dtype=torch.float64)
                error: Exception | None = None
                if group.rank < len(round_):
                    try:
                        payload[:-1] = run_batch(round_[group.rank])
                    except Exception as caught:
                        error, payload[-1] = caught, 1.0
                gathered = group.all_gather(payload)
                if error is not None:
                    raise error
                failed = [rank for rank, partial in enumerate(gathered) if partial[-1] != 0]
                if failed:
                    raise RuntimeError(
                        f"scan stopped: process {failed[0]} of {group.size} failed on batch {position + failed[0]} "
                        "(its own error says why); this process stops with it"
                    )
                for batch, partial in zip(round_, gathered, strict=False):  # in global batch order
                    total += partial[:split].view(shape)
                    count += partial[split:-1].round().to(torch.int64)
                    data_hash.update(batch.numpy().tobytes())
                    n_windows += batch.shape[0]
                    position += 1
                    report.update(batch.numel(), n_windows * seq_len)
                due = position - last_saved >= _CHECKPOINT_BATCHES
                if checkpoint is not None and (due or time.perf_counter() - last_time >= _CHECKPOINT_SECONDS):
                    if group.rank == 0:
                        save_checkpoint(checkpoint, fingerprint, position, data_hash, total, count)
                    last_saved, last_time = position, time.perf_counter()
        if n_windows == 0:
            raise ValueError(
                f"the data holds no full window of seq_len={seq_len} tokens ({packer.n_documents} documents, "
                f"{packer.n_empty} of them empty, {packer.dropped_tokens} tokens); pass more data or a smaller seq_len"
            )
        if checkpoint is not None and group.rank == 0:
            save_checkpoint(checkpoint, fingerprint, position, data_hash, total, count)
        report.close()
        report.note(report.summary(n_windows * seq_len))
    finally:
        report.close()

    mean, stderr = _finish(total, count)
    provenance = {
        **adapter.provenance(),
        "scan": arguments,
        "data_sha256": data_hash.hexdigest(),
        "documents": packer.n_documents,
        "empty_documents": packer.n_empty,
        "dropped_tokens": packer.dropped_tokens,
    }
    full = (len(layer_list), len(head_list))
    return ScanResult(
        scores=score_list,
        layers=layer_list,
        heads=head_list,
        mean={s: mean[i] for i, s in enumerate(score_list)},
        stderr={s: stderr[i] for i, s in enumerate(score_list)},
        count={s: count[i].expand(full).clone() for i, s in enumerate(score_list)},
        n_tokens=n_windows * seq_len,
        n_windows=n_windows,
        provenance=provenance,
    )
