"""GenerationTrace: what :func:`attnlens.trace_generate` kept, its check against recomputation, and its file format.

Rows are held as one stack ``[layer, batch, head, step, k_pos]`` with ``k_pos = prompt_len + n_steps - 1`` (the keys
of the last step); step ``s`` fills its first ``prompt_len + s`` entries and leaves the rest 0. A file is one
safetensors file (the tensors, and JSON metadata in its header); loading never unpickles.

:meth:`GenerationTrace.check` traces the sequence the model ran (every token but the last generated one) in one
forward pass, with the mask ``generate`` extends and the positions it derives from it, and compares:

* each step's rows with the same query row of that trace (absolute error of probabilities);
* the cache's keys and values, per key/value head (post-rotary, before any repetition for grouped-query heads), with
  the trace's (relative to that kv_head's largest), padding slots left out;
* the positions each step's query ran at (where they were recorded) with the mask's, exactly.

Nothing is bitwise there: the full-sequence pass multiplies matrices of other shapes than the one-token steps, so its
sums run in other orders. The tolerances are verify's (:mod:`attnlens.tolerances`), grown with depth: relative error
``e_l = tol_k + tol_hidden * (l + 1) / n_layers`` of q and k at layer ``l``, and a row error of at most
``4u + 4 * scale * max|q| * max|k| * e_l`` (a score error ``d`` moves a probability ``p`` by at most ``2 d p``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from attnlens._display import MAX_ROWS, json_text, nested, table
from attnlens.errors import AttentionCaptureError
from attnlens.tolerances import UNIT_ROUNDOFF, derived_tolerances

if TYPE_CHECKING:
    from attnlens.attention_trace import AttentionTrace
    from attnlens.models import Adapter

__all__ = ["GenerationCheck", "GenerationTrace"]

_FORMAT = 1
_META_KEY = "attnlens.generation"
_TENSORS = ("sequences", "prompt_mask", "rows", "finished_at", "cache_keys", "cache_values")


@dataclass(frozen=True)
class GenerationCheck:
    """The outcome of :meth:`GenerationTrace.check`.

    Attributes:
        ok: every compared number within its tolerance.
        mismatches: one line per mismatch (step, layer, head and size), first steps first.
        largest: per compared quantity (``"rows"``, ``"keys"``, ``"values"``), the largest ``error / tolerance``.
    """

    ok: bool
    mismatches: tuple[str, ...]
    largest: dict[str, float]

    def __str__(self) -> str:
        ratios = ", ".join(f"{name} {value:.3g}" for name, value in self.largest.items())
        head = f"generation check {'ok' if self.ok else 'FAILED'} (largest error / tolerance: {ratios})"
        return "\n".join([head, *self.mismatches[:20]])


@dataclass(frozen=True, eq=False, repr=False)
class GenerationTrace:
    """Every generated step's attention row, per traced layer and head, over the keys that step saw.

    Attributes:
        layers: the traced layers.
        heads: the heads kept.
        n_heads: heads per layer in the model.
        sequences: ``[batch, prompt + new]``, as ``generate`` returns them.
        prompt_mask: ``[batch, prompt]``, 1 for tokens and 0 for left padding (repeated per returned sequence).
        rows: ``[layer, batch, head, step, k_pos]``; see :meth:`row`.
        finished_at: ``[batch]``, the step that chose the row's first eos (the number of steps if none). Later
            steps of that row run on the pad token; their rows are stored as the model computed them.
        positions: ``[batch, step]``, the position each step's query ran at: what the position embedding received
            (GPT-2), or for rotary models the ``position_ids`` the base model was given (the rotation they lead to is
            checked through the post-rotary cached keys); None where the base model was given none.
        cache_keys: ``[layer, batch, kv_head, pos, d_head]``, the cache's keys after the last step (post-rotary),
            in the cache's own layout (key/value heads before positions, as transformers' cache holds them), so
            that they compare with ``past_key_values`` as they are; unlike :class:`~attnlens.AttentionTrace`'s
            ``k`` (``[batch, pos, head, d_head]``, per query head): ``cache_keys[i].transpose(1, 2)`` is
            ``[batch, pos, kv_head, d_head]``.
        cache_values: the same for values.
        tokens: the token strings of each sequence (with a tokenizer), else None.
        provenance: model, class, config hash, kernel, dtype, device, versions (as :func:`attnlens.trace`'s).
    """

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    n_heads: int
    sequences: Tensor
    prompt_mask: Tensor
    rows: Tensor
    finished_at: Tensor
    positions: Tensor | None
    cache_keys: Tensor
    cache_values: Tensor
    tokens: list[list[str]] | None
    provenance: dict[str, str]
    _adapter: Adapter | None = field(default=None, repr=False)

    @classmethod
    def from_steps(
        cls,
        *,
        adapter: Adapter,
        layers: tuple[int, ...],
        heads: tuple[int, ...],
        sequences: Tensor,
        prompt_mask: Tensor,
        rows: dict[int, list[Tensor]],
        final_kv: dict[int, tuple[Tensor, Tensor]],
        positions: Tensor | None,
        finished_at: Tensor,
        tokens: list[list[str]] | None,
        provenance: dict[str, str],
    ) -> GenerationTrace:
        """Stack the hooks' per-step rows ``[batch, head, prompt_len + s]`` into one zero-padded tensor."""
        prompt_len = prompt_mask.shape[1]
        n_steps = sequences.shape[1] - prompt_len
        n_keys = prompt_len + n_steps - 1
        first = rows[layers[0]][0]
        stack = first.new_zeros((len(layers), first.shape[0], first.shape[1], n_steps, n_keys))
        for slot, layer in enumerate(layers):
            for step, row in enumerate(rows[layer]):
                stack[slot, :, :, step, : row.shape[-1]] = row
        if positions is not None and positions.shape[0] != sequences.shape[0]:
            positions = positions.expand(sequences.shape[0], -1)  # one row of positions, broadcast by the model
        return cls(
            layers=layers,
            heads=heads,
            n_heads=adapter.n_heads,
            sequences=sequences,
            prompt_mask=prompt_mask,
            rows=stack,
            finished_at=finished_at,
            positions=None if positions is None else positions.clone(),
            cache_keys=torch.stack([final_kv[layer][0] for layer in layers]),
            cache_values=torch.stack([final_kv[layer][1] for layer in layers]),
            tokens=tokens,
            provenance=provenance,
            _adapter=adapter,
        )

    # ------------------------------------------------------------------------------------------------ access ---

    @property
    def prompt_len(self) -> int:
        """Positions of the (padded) prompt."""
        return int(self.prompt_mask.shape[1])

    @property
    def n_steps(self) -> int:
        """Forward passes of ``generate``: one per new token."""
        return int(self.sequences.shape[1]) - self.prompt_len

    @property
    def attention_mask(self) -> Tensor:
        """``[batch, prompt + new - 1]``: the mask of the sequence the model ran (generated tokens are all real)."""
        ones = self.prompt_mask.new_ones((self.prompt_mask.shape[0], max(self.n_steps - 1, 0)))
        return torch.cat([self.prompt_mask, ones], dim=1)

    def _slot(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not traced; traced layers: {list(self.layers)}")
        return self.layers.index(layer)

    def row(self, step: int, layer: int) -> Tensor:
        """Step ``step``'s attention ``[batch, head, k_pos]`` over its ``prompt_len + step`` keys (a view).

        Step ``s`` chose new token ``s``; its query is the token at position ``prompt_len - 1 + s``.
        """
        if not -self.n_steps <= step < self.n_steps:
            raise IndexError(f"step {step} out of range: {self.n_steps} steps")
        step %= self.n_steps
        return self.rows[self._slot(layer), :, :, step, : self.prompt_len + step]

    def step_tokens(self, batch: int = 0) -> list[str]:
        """The token chosen at each step of sequence ``batch`` (strings with a tokenizer, else the ids as text)."""
        new = self.sequences[batch, self.prompt_len :].tolist()
        if self.tokens is None:
            return [str(i) for i in new]
        return self.tokens[batch][self.prompt_len :]

    def view(self, batch: int = 0, *, heads: list[tuple[int, int]] | None = None, title: str = "") -> Any:
        """The text view (:func:`attnlens.viz.text_html`) of sequence ``batch``; a generated token shows its step.

        Only the generated tokens' query rows (and the last prompt token's, step 0's query) hold attention; the
        prompt's other tokens were never a query of a step and show none. Left padding is left out.
        """
        from attnlens.viz import text_html

        n = self.sequences.shape[1] - 1  # the last generated token was never a query
        square = self.rows.new_zeros((len(self.layers), len(self.heads), n, n))
        square[:, :, self.prompt_len - 1 :, :] = self.rows[:, batch]
        keep = self.attention_mask[batch].bool().cpu()
        square = square[..., keep, :][..., keep].float().cpu()
        texts = (
            self.tokens[batch][:n] if self.tokens is not None else [str(i) for i in self.sequences[batch, :n].tolist()]
        )
        texts = [t for t, k in zip(texts, keep.tolist(), strict=True) if k]
        first = int(keep[: self.prompt_len].sum()) - 1  # step 0's query, behind the padding
        return text_html(square, texts, layers=list(self.layers), heads=heads, token=first, title=title)

    def to_trace(self, model: Any = None) -> AttentionTrace:
        """The square patterns of the sequence the model ran, from one full-sequence :func:`attnlens.trace`.

        Its query rows ``prompt_len - 1 + s`` are step ``s``'s rows recomputed in one pass (:meth:`check` compares
        them); ``model`` is needed after :meth:`load`.
        """
        return self._full_trace(model, store=("pattern",), heads=self.heads)

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head: query head ``h`` reads cached key/value head ``h // kv_group``."""
        return self.n_heads // int(self.cache_keys.shape[2])

    def _full_trace(self, model: Any, store: tuple[str, ...], heads: tuple[int, ...]) -> AttentionTrace:
        from attnlens.trace import trace

        target = model if model is not None else self._adapter
        if target is None:
            raise ValueError("this trace was loaded from a file: pass the model, e.g. g.check(model)")
        mask = self.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate derives them; padding slots are never read
        ids = self.sequences[:, :-1]
        tokens = None if self.tokens is None else [row[:-1] for row in self.tokens]
        full = trace(target, ids, mask, layers=self.layers, heads=heads, store=store, position_ids=positions)
        return full if tokens is None else _with_tokens(full, tokens)

    # ------------------------------------------------------------------------------------------------ check ---

    def check(self, model: Any = None, *, raise_error: bool = True) -> GenerationCheck:
        """Compare every step's rows, and the cache, with one full-sequence trace of the sequence the model ran.

        Args:
            model: the model (default: the one traced; needed after :meth:`load`).
            raise_error: raise on a mismatch (else only report it).

        Raises:
            AttentionCaptureError: a row, a cached key or value, or a position outside its tolerance, named by step,
                layer, head and size.
        """
        if self.n_steps < 2:
            return GenerationCheck(True, (), {})
        # The full trace keeps the kept heads (for the rows) and the first query head of every key/value group (its
        # keys and values are that kv_head's, repeated): the cache is compared per kv_head, also for unkept heads.
        group = self.kv_group
        kv_first = tuple(range(0, self.n_heads, group))
        traced_heads = tuple(sorted(set(self.heads) | set(kv_first)))
        kept = torch.tensor([traced_heads.index(h) for h in self.heads], device=self.rows.device)
        per_kv = torch.tensor([traced_heads.index(h) for h in kv_first], device=self.rows.device)
        traced = self._full_trace(model, store=("pattern", "q", "k", "v"), heads=traced_heads)

        def full(name: str, layer: int, index: Tensor) -> Tensor:
            """Heads second, as the pattern and the cache hold them: q/k/v ``[batch, pos, head, d_head]`` transposed."""
            x = traced[name, layer].float().to(self.rows.device)
            return (x if name == "pattern" else x.transpose(1, 2)).index_select(1, index)

        dtype = str(self.rows.dtype).removeprefix("torch.")
        if dtype not in UNIT_ROUNDOFF:
            raise ValueError(f"no tolerances for {dtype}")
        u = UNIT_ROUNDOFF[dtype]
        n_layers = int(self.provenance["n_layers"])
        scales = [float(x) for x in self.provenance["scales"].split(",")]
        d_head = int(traced["q", self.layers[0]].shape[-1])
        d_model = d_head * self.n_heads
        table = derived_tolerances(dtype, d_model, d_head, n_layers, self.sequences.shape[1])
        p0, real = self.prompt_len - 1, self.attention_mask.bool().to(self.rows.device)
        mismatches: list[tuple[int, str]] = []
        largest = {"rows": 0.0, "keys": 0.0, "values": 0.0}
        if self.positions is not None:
            expected = (self.attention_mask.cumsum(-1) - 1)[:, p0:].to(self.positions.device)
            for b, s in (self.positions != expected).nonzero().tolist():
                mismatches.append(
                    (
                        s,
                        f"step {s}, sequence {b}: the query ran at position {int(self.positions[b, s])}, the mask "
                        f"puts it at {int(expected[b, s])}",
                    )
                )
        for slot, layer in enumerate(self.layers):
            e = table["k"] + table["hidden"] * (layer + 1) / n_layers
            q, k = full("q", layer, kept), full("k", layer, kept)
            tol = (
                4 * u + 4 * scales[slot] * q.norm(dim=-1).amax(dim=(0, 2)) * k.norm(dim=-1).amax(dim=(0, 2)) * e
            )  # [head]
            reference = full("pattern", layer, kept)[:, :, p0:]  # [batch, head, step, k_pos]
            error = (self.rows[slot].float() - reference).abs().amax(dim=(0, 3))  # [head, step]
            ratio = error / tol[:, None]
            largest["rows"] = max(largest["rows"], float(ratio.max()))
            for h, s in (ratio > 1).nonzero().tolist():
                mismatches.append(
                    (
                        s,
                        f"step {s}, layer {layer}, head {self.heads[h]}: row differs by {float(error[h, s]):.3g} "
                        f"(tolerance {float(tol[h]):.3g})",
                    )
                )
            for name, cached, recomputed in (
                ("keys", self.cache_keys[slot], full("k", layer, per_kv)),
                ("values", self.cache_values[slot], full("v", layer, per_kv)),
            ):  # cached and recomputed [batch, kv_head, pos, d_head]
                size = recomputed.abs().amax(dim=(0, 2, 3)).clamp(min=torch.finfo(torch.float32).tiny)  # [kv_head]
                diff = ((cached.float() - recomputed).abs().amax(dim=-1) * real[:, None, :]).amax(dim=0)
                ratio = diff / (e * size[:, None])  # [kv_head, pos]
                largest[name] = max(largest[name], float(ratio.max()))
                for g, pos in (ratio > 1).nonzero().tolist():
                    s = max(0, pos - p0)
                    heads = f"kv_head {g} (query heads {g * group}-{(g + 1) * group - 1})" if group > 1 else f"head {g}"
                    mismatches.append(
                        (
                            s,
                            f"step {s}, layer {layer}, {heads}: cached {name} at position {pos} differ by "
                            f"{float(diff[g, pos]):.3g} (tolerance {float(e * size[g]):.3g})",
                        )
                    )
        mismatches.sort(key=lambda item: item[0])
        report = GenerationCheck(not mismatches, tuple(line for _, line in mismatches), largest)
        if mismatches and raise_error:
            raise AttentionCaptureError(str(report))
        return report

    # --------------------------------------------------------------------------------------------- files ---

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trace to one safetensors file (tensors, and JSON metadata with provenance in its header)."""
        from safetensors.torch import save_file

        target = os.fspath(path)
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        if self.positions is not None:
            tensors["positions"] = self.positions.contiguous()
        meta = {
            "format": _FORMAT,
            "layers": list(self.layers),
            "heads": list(self.heads),
            "n_heads": self.n_heads,
            "tokens": self.tokens,
            "provenance": self.provenance,
        }
        try:
            save_file(tensors, target, metadata={_META_KEY: json.dumps(meta)})
        except Exception as error:  # safetensors raises its own error type for an unwritable path
            raise OSError(f"cannot save the generation trace to {target!r}: {error}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> GenerationTrace:
        """Read a file written by :meth:`save`; checks that its tensors fit its metadata.

        Raises:
            ValueError: not a generation trace file, or tensors that do not fit the metadata (saying which).
        """
        from safetensors import SafetensorError, safe_open

        source = os.fspath(path)
        try:
            with safe_open(source, framework="pt", device=str(device)) as f:
                header = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is no dict
        except SafetensorError as error:
            raise ValueError(f"{source!r} is not a readable safetensors file ({error})") from None
        try:
            meta = json.loads(header[_META_KEY])
            layers, heads, n_heads = tuple(meta["layers"]), tuple(meta["heads"]), int(meta["n_heads"])
            provenance, tokens = dict(meta["provenance"]), meta["tokens"]
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
            raise ValueError(f"{source!r} is not an attnlens generation trace ({error!r})") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"generation trace format {meta.get('format')!r} is not supported (reads {_FORMAT})")
        missing = [name for name in _TENSORS if name not in tensors]
        if missing:
            raise ValueError(f"{source!r} lacks the tensors {missing}")
        batch, total = tensors["sequences"].shape
        prompt_len = tensors["prompt_mask"].shape[1]
        want = (len(layers), batch, len(heads), total - prompt_len, total - 1)
        if tuple(tensors["rows"].shape) != want:
            raise ValueError(f"{source!r}: rows has shape {tuple(tensors['rows'].shape)}, the metadata needs {want}")
        return cls(
            layers=layers,
            heads=heads,
            n_heads=n_heads,
            tokens=tokens,
            provenance=provenance,
            positions=tensors.pop("positions", None),
            **{name: tensors[name] for name in _TENSORS},
        )

    # ------------------------------------------------------------------------------------------- display ---

    def to_dict(self, *, rows: bool = False) -> dict[str, Any]:
        """Plain Python data: sequences, masks, tokens, provenance; the rows as nested lists only with ``rows=True``.

        The cache is left out (keep the safetensors file of :meth:`save` for it); ``rows=True`` writes
        ``[layer, batch, head, step, k_pos]`` numbers, which grows as layers x heads x steps x length.
        """
        out: dict[str, Any] = {
            "format": _FORMAT,
            "kind": "generation_trace",
            "layers": list(self.layers),
            "heads": list(self.heads),
            "n_heads": self.n_heads,
            "prompt_len": self.prompt_len,
            "n_steps": self.n_steps,
            "sequences": nested(self.sequences),
            "prompt_mask": nested(self.prompt_mask),
            "finished_at": nested(self.finished_at),
            "positions": nested(self.positions),
            "tokens": self.tokens,
            "provenance": dict(self.provenance),
        }
        if rows:
            out["rows"] = nested(self.rows)
        return out

    def to_json(self, *, rows: bool = False, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict`; ``kwargs`` go to :func:`json.dumps`."""
        return json_text(self.to_dict(rows=rows), **kwargs)

    def __repr__(self) -> str:
        name = self.provenance.get("model") or self.provenance.get("model_class") or "?"
        return (
            f"GenerationTrace(model={name!r}, layers={list(self.layers)}, heads={len(self.heads)}, "
            f"batch={self.sequences.shape[0]}, prompt={self.prompt_len}, steps={self.n_steps}, "
            f"dtype={str(self.rows.dtype).removeprefix('torch.')})"
        )

    def _repr_html_(self) -> str:
        """A table of sequence 0's steps, at most ``MAX_ROWS`` (:meth:`view` draws the text view).

        Each row: the step's query token, the token it chose, and the key the last traced layer's heads attend to
        most on average.
        """
        texts = self.tokens[0] if self.tokens is not None else [str(i) for i in self.sequences[0].tolist()]
        slot = len(self.layers) - 1
        rows = []
        for step in range(min(self.n_steps, MAX_ROWS)):
            mean = self.rows[slot, 0, :, step, : self.prompt_len + step].float().mean(dim=0)  # [k_pos]
            top = int(mean.argmax())
            stop = " (eos)" if step == int(self.finished_at[0]) else ""
            query = self.prompt_len - 1 + step
            chosen = texts[query + 1] + stop
            rows.append([step, texts[query], chosen, f"{texts[top]!r} @{top}", f"{float(mean[top]):.3f}"])
        more = f"<div>... {self.n_steps - MAX_ROWS} more steps</div>" if self.n_steps > MAX_ROWS else ""
        header = ["step", "query token", "chose", f"most attended (layer {self.layers[-1]}, mean of heads)", "weight"]
        return table(header, rows, caption=repr(self)) + more


def _with_tokens(full: AttentionTrace, tokens: list[list[str]]) -> AttentionTrace:
    from dataclasses import replace

    return replace(full, tokens=tokens)
