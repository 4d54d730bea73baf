"""AttentionTrace: what :func:`attnlens.trace` kept from one forward pass, and its safetensors file format.

A trace file is one safetensors file: the stacks, ``input_ids`` and ``attention_mask`` (and, for a trace of some query
rows, ``queries``) as tensors, and JSON metadata (layers, heads, what was stored, the number of rows, tokens,
provenance) in its header. Loading never unpickles, and checks the metadata against the tensors before trusting
either (:mod:`attnlens._tracefile`).

Format 2 holds q, k, v as ``[layer, batch, pos, head, d_head]``. Format 1 (attnlens 0.1) held them head-major,
``[layer, batch, head, pos, d_head]``; :meth:`AttentionTrace.load` reads such a file and permutes them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnlens._indices import numbers
from attnlens._tracefile import check_file

if TYPE_CHECKING:
    import numpy as np

__all__ = ["STORE_NAMES", "AttentionTrace"]

STORE_NAMES = ("pattern", "scores", "q", "k", "v", "z", "result")
"""What a trace can keep, per traced layer (see :class:`AttentionTrace` for the shapes)."""

_FORMAT = 2
_READS = (1, 2)  # format 1: q, k, v head-major, no query rows (attnlens 0.1)
_META_KEY = "attnlens.trace"
_HEAD_MAJOR_REMOVED_IN = "0.3.0"


@dataclass(frozen=True, eq=False, repr=False)
class AttentionTrace:
    """What :func:`trace` kept from one forward pass: per traced layer, the tensors named in ``store``.

    Every stored kind is held stacked over the traced layers, in the order of ``layers``; ``trace.pattern(layer)``
    and ``trace["q", layer]`` are views into those stacks, so nothing is copied on access.

    Shapes, per layer (``head`` runs over ``heads`` only):

    * ``pattern``: ``[batch, head, q_pos, k_pos]``, rows sum to 1 (rows of left padding are all 0);
    * ``scores``: ``[batch, head, q_pos, k_pos]``, pre-softmax, scaled, ``-inf`` where masked;
    * ``q``, ``k``, ``v``: ``[batch, pos, head, d_head]`` (post-rotary where the model rotates them), in the order of
      ``z`` and of TransformerLens's ``hook_q``; under grouped-query attention ``k`` and ``v`` are per query head
      (each key/value head repeated over its group, as the kernel reads them), so ``heads`` selects them as it does
      everything else. Their stacks are contiguous in this order. attnlens 0.1 stored them head-major, ``[batch,
      head, pos, d_head]``: :meth:`head_major` gives that order (a non-contiguous view) for one more release;
    * ``z``: ``[batch, pos, head, d_head]``, the input of the model's own output projection, split per head;
    * ``result``: ``[batch, pos, head, d_model]``, each head's contribution to the attention output (no ``b_O``).

    A trace of some query rows (``trace(..., queries=...)``) holds ``pattern`` and ``scores`` as ``[batch, head, row,
    k_pos]``, row ``r`` of sequence ``b`` being query position ``queries[b, r]``. Read them with :meth:`rows` (or
    ``trace["pattern", layer]``); what needs the whole square (:meth:`pattern`, :attr:`patterns`, the metrics, the
    views) refuses such a trace by name. :meth:`save` and :meth:`load` keep the rows and ``queries``.

    Attributes:
        layers: the traced layers, in the order asked for.
        heads: the heads kept in per-head tensors.
        n_heads: heads per layer in the model.
        stored: the kinds kept, in :data:`STORE_NAMES` order.
        input_ids: ``[batch, pos]``.
        attention_mask: ``[batch, pos]``, 1 for real tokens and 0 for padding (all 1 when none was given).
        tokens: the token strings of each row (when a tokenizer was given), else ``None``.
        provenance: model name, class, config hash (sha256 of its JSON), attention implementation, dtype, device,
            the torch / transformers / attnlens versions, and ``unknown_config_keys``: the config keys of unknown
            effect (comma-separated; empty when none, see :class:`~attnlens.UnknownConfigWarning`).
        queries: ``[batch, row]``, the query positions that ``pattern`` and ``scores`` hold; ``None``: every row.
    """

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    n_heads: int
    stored: tuple[str, ...]
    input_ids: Tensor
    attention_mask: Tensor
    tokens: list[list[str]] | None
    provenance: dict[str, str]
    _stacks: dict[str, Tensor] = field(repr=False)
    queries: Tensor | None = None

    @classmethod
    def from_patterns(
        cls,
        patterns: Tensor,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        tokens: list[list[str]] | None = None,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
    ) -> AttentionTrace:
        """A trace made from patterns computed elsewhere (to score heads with :mod:`attnlens.metrics`, say).

        Args:
            patterns: ``[layer, batch, head, q_pos, k_pos]``.
            input_ids: ``[batch, pos]``; default all zeros.
            attention_mask: ``[batch, pos]``; default all ones.
            tokens: the token strings of each row.
            layers: the layer number of each entry of ``patterns``; default ``0, 1, ...``.
            heads: the head number of each head of ``patterns``; default ``0, 1, ...``.
        """
        if not isinstance(patterns, Tensor):
            raise TypeError(
                f"patterns must be a tensor [layer, batch, head, q_pos, k_pos], got {type(patterns).__name__}"
            )
        if patterns.ndim != 5 or patterns.shape[-1] != patterns.shape[-2]:
            raise ValueError(
                f"patterns must be [layer, batch, head, q_pos, k_pos] with q_pos == k_pos, got {tuple(patterns.shape)}"
            )
        n_layers, batch, n_heads, n_pos, _ = patterns.shape
        if 0 in patterns.shape:
            raise ValueError(f"patterns is empty (shape {tuple(patterns.shape)}): every axis needs at least one entry")
        layer_list = numbers(layers, n_layers, "layers", "layer")
        head_list = numbers(heads, n_heads, "heads", "head")
        if input_ids is None:
            input_ids = torch.zeros(batch, n_pos, dtype=torch.long, device=patterns.device)
        if attention_mask is None:
            attention_mask = torch.ones(batch, n_pos, dtype=torch.long, device=patterns.device)
        for name, x in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a tensor {(batch, n_pos)}, got {type(x).__name__}")
            if tuple(x.shape) != (batch, n_pos):
                raise ValueError(f"{name} has shape {tuple(x.shape)}; the patterns need {(batch, n_pos)}")
        return cls(
            layers=layer_list,
            heads=head_list,
            n_heads=max(head_list) + 1,
            stored=("pattern",),
            input_ids=input_ids,
            attention_mask=attention_mask,
            tokens=tokens,
            provenance={},
            _stacks={"pattern": patterns},
        )

    # ------------------------------------------------------------------------------------------------ access ---

    @property
    def batch(self) -> int:
        """Number of sequences."""
        return int(self.input_ids.shape[0])

    @property
    def n_pos(self) -> int:
        """Number of positions (padding included)."""
        return int(self.input_ids.shape[1])

    @property
    def patterns(self) -> Tensor:
        """All patterns ``[layer, batch, head, q_pos, k_pos]``, over ``layers`` in their order."""
        self.require_square("patterns")
        return self._stack("pattern")

    def pattern(self, layer: int) -> Tensor:
        """The pattern of one traced layer, ``[batch, head, q_pos, k_pos]``."""
        self.require_square("pattern()")
        return self._stack("pattern")[self._slot(layer)]

    def rows(self, layer: int) -> Tensor:
        """The pattern rows of one traced layer, ``[batch, head, row, k_pos]``: the rows of :attr:`queries`.

        For a trace of every row this is :meth:`pattern` (row ``r`` is query position ``r``).
        """
        return self._stack("pattern")[self._slot(layer)]

    def require_square(self, what: str) -> None:
        """Refuse, naming ``what``, when this trace holds some query rows only (``trace(..., queries=...)``)."""
        if self.queries is not None:
            raise ValueError(
                f"{what} needs every query row, and this trace holds only rows {self._rows_text()} (traced with "
                "queries=...): read them with trace.rows(layer), or trace again without queries for the whole pattern"
            )

    def _rows_text(self) -> str:
        if self.queries is None:
            return "all"
        first = self.queries[0].tolist()
        same = bool((self.queries == self.queries[:1]).all())
        text = str(first if len(first) <= 8 else [*first[:8], "..."])
        return text if same else f"{text} (sequence 0; they differ per sequence)"

    def __getitem__(self, key: str | tuple[str, int]) -> Tensor:
        """``trace["q", layer]`` for one layer, ``trace["q"]`` for the stack ``[layer, ...]`` over ``layers``."""
        if isinstance(key, tuple):
            name, layer = key
            return self._stack(name)[self._slot(layer)]
        return self._stack(key)

    def head_major(self, name: str, layer: int | None = None) -> Tensor:
        """Deprecated: ``q``, ``k`` or ``v`` in attnlens 0.1's order, head before position.

        ``trace.head_major("q", layer)`` is ``trace["q", layer].transpose(1, 2)``, ``[batch, head, pos, d_head]``
        (without ``layer``: the stack ``[layer, batch, head, pos, d_head]``, ``trace["q"].transpose(2, 3)``): a view
        with the same numbers, not contiguous. Goes away in attnlens 0.3.0; spell it with ``transpose`` instead.

        Raises:
            ValueError: ``name`` is not one of ``"q"``, ``"k"``, ``"v"`` (no other tensor changed its order), or was
                not stored, or ``layer`` was not traced.
        """
        if name not in ("q", "k", "v"):
            raise ValueError(f"head_major is only for 'q', 'k' and 'v' (the tensors whose order changed), got {name!r}")
        spelling = f'trace["{name}"].transpose(2, 3)' if layer is None else f'trace["{name}", layer].transpose(1, 2)'
        warnings.warn(
            f"AttentionTrace.head_major is deprecated and goes away in attnlens {_HEAD_MAJOR_REMOVED_IN}: "
            f'trace["{name}", ...] is now [batch, pos, head, d_head]; for the old order write {spelling}',
            FutureWarning,
            stacklevel=2,
        )
        if layer is None:
            return self._stack(name).transpose(2, 3)
        return self[name, layer].transpose(1, 2)

    def _stack(self, name: str) -> Tensor:
        if name not in self._stacks:
            if name not in STORE_NAMES:
                raise ValueError(f"unknown trace tensor {name!r}; known: {', '.join(STORE_NAMES)}")
            raise ValueError(
                f"{name!r} was not stored (stored: {', '.join(self.stored)}); trace again with store=(..., {name!r})"
            )
        return self._stacks[name]

    def _slot(self, layer: int) -> int:
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise ValueError(f"layer {layer} was not traced (traced: {list(self.layers)})") from None

    # ---------------------------------------------------------------------------------------------- export ---

    def numpy(self) -> dict[str, np.ndarray]:
        """Every stored stack (``[layer, ...]``), ``input_ids``, ``attention_mask`` (and ``queries``) as numpy arrays.

        Half-precision tensors (which numpy lacks for bfloat16) come out as float32.
        """

        def to_numpy(x: Tensor) -> np.ndarray:
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            return x.detach().cpu().numpy()

        out = {name: to_numpy(stack) for name, stack in self._stacks.items()}
        out["input_ids"] = to_numpy(self.input_ids)
        out["attention_mask"] = to_numpy(self.attention_mask)
        if self.queries is not None:
            out["queries"] = to_numpy(self.queries)
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trace to one safetensors file: the stacks, ids and mask, and JSON metadata in its header.

        A trace of some query rows is saved with its ``queries`` (``[batch, row]``) and its number of rows in the
        metadata; :meth:`load` gives back the same tensors, bit for bit.

        Raises:
            OSError: the file cannot be written there (a missing folder, a folder's path, no permission), naming it.
        """
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        target = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(target))
        if os.path.isdir(target):
            raise IsADirectoryError(f"cannot save the trace to {target!r}: it is a folder; give a file name in it")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot save the trace to {target!r}: the folder {folder!r} does not exist")
        tensors = {name: stack.contiguous() for name, stack in self._stacks.items()}
        tensors["input_ids"] = self.input_ids.contiguous()
        tensors["attention_mask"] = self.attention_mask.contiguous()
        if self.queries is not None:
            tensors["queries"] = self.queries.contiguous()
        meta = {
            "format": _FORMAT,
            "layers": list(self.layers),
            "heads": list(self.heads),
            "n_heads": self.n_heads,
            "stored": list(self.stored),
            "rows": None if self.queries is None else int(self.queries.shape[1]),
            "tokens": self.tokens,
            "provenance": self.provenance,
        }
        try:
            save_file(tensors, target, metadata={_META_KEY: json.dumps(meta)})
        except (SafetensorError, OSError) as error:
            raise OSError(f"cannot save the trace to {target!r}: {error}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> AttentionTrace:
        """Read a trace written by :meth:`save` (safetensors only: nothing is ever unpickled).

        A file of format 1 (written by attnlens 0.1) holds ``q``, ``k`` and ``v`` head-major, ``[layer, batch, head,
        pos, d_head]``: they are permuted to this release's ``[layer, batch, pos, head, d_head]`` on load (a
        contiguous copy, as :func:`~attnlens.trace` stores them), so an old file never hands out the old order.

        Raises:
            OSError: the file cannot be read (missing, a folder, no permission).
            ValueError: it is not a valid attnlens trace (not safetensors, truncated, no or bad metadata, tensors
                that do not match the metadata); the message says why.
        """
        from safetensors import SafetensorError, safe_open

        source = os.fspath(path)
        if os.path.isdir(source):
            raise IsADirectoryError(f"cannot load a trace from {source!r}: it is a folder, not a trace file")
        with open(source, "rb"):  # FileNotFoundError / PermissionError naming the path, before safetensors' own
            pass

        def invalid(why: str) -> ValueError:
            return ValueError(f"{source!r} is not a valid attnlens trace: {why}")

        try:
            with safe_open(source, framework="pt", device=str(device)) as f:
                header = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is no dict
        except SafetensorError as error:
            raise invalid(f"not a readable safetensors file ({error})") from None
        if _META_KEY not in header:
            raise invalid("a safetensors file without attnlens metadata")
        try:
            meta = json.loads(header[_META_KEY])
        except json.JSONDecodeError as error:
            raise invalid(f"its metadata is not JSON ({error})") from None
        if not isinstance(meta, dict):
            raise invalid(f"its metadata is a {type(meta).__name__}, not a JSON object")
        version = meta.get("format")
        if isinstance(version, bool) or version not in _READS:
            raise ValueError(
                f"trace file format {version!r} is not supported (this attnlens reads formats "
                f"{', '.join(map(str, _READS))}); a newer attnlens wrote it: upgrade attnlens to read it"
            )
        try:
            fields = check_file(meta, tensors, STORE_NAMES, head_major=version == 1)
        except ValueError as error:
            raise invalid(str(error)) from None
        if version == 1:
            stacks = fields["_stacks"]
            for name in ("q", "k", "v"):
                if name in stacks:
                    stacks[name] = stacks[name].transpose(2, 3).contiguous()
        return cls(**fields)

    # --------------------------------------------------------------------------------------------- display ---

    def __repr__(self) -> str:
        name = self.provenance.get("model") or self.provenance.get("model_class") or "?"
        heads = f"all {self.n_heads}" if len(self.heads) == self.n_heads else list(self.heads)
        some = next(iter(self._stacks.values()), None)
        queries = "" if self.queries is None else f", queries={self._rows_text()}"
        where = "" if some is None else f", dtype={str(some.dtype).removeprefix('torch.')}, device={some.device}"
        return (
            f"AttentionTrace(model={name!r}, layers={list(self.layers)}, heads={heads}, batch={self.batch}, "
            f"pos={self.n_pos}, stored={self.stored}{queries}{where})"
        )

    def _repr_html_(self) -> str | None:
        """Notebook view of the first sequence's patterns, without its padding (needs ``attnlens.viz``)."""
        if "pattern" not in self._stacks or self.queries is not None:  # rows only: the plain repr says which
            return None
        from attnlens.viz import pattern_html

        # The view reads one head at a time and keeps a long input within a few MB (see pattern_html).
        title = f"{self.provenance.get('model') or 'attention'}: layers {list(self.layers)}"
        return pattern_html(self, title=title)
