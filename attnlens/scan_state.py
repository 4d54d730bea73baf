"""The bookkeeping of a long :func:`attnlens.scan`: processes, checkpoints and progress.

* :class:`Group`: this process's place among torch.distributed processes, the gather of per-batch sums, and rank 0's
  checkpoint text sent to every rank as bytes in a tensor (never pickled).
* Checkpoints: JSON written to a temporary file, flushed to disk, then renamed over the old one (``os.replace``), so a
  process killed at any moment leaves a whole checkpoint behind; refused by name when written for other arguments or
  another model, or when damaged (a field missing, unknown, of the wrong type or length); the data is checked by the
  caller, while it skips the batches a checkpoint holds.
* :class:`Progress`: tqdm on a terminal (imported only then), plain lines every few seconds otherwise.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import time
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Group", "Progress", "check_checkpoint", "save_checkpoint", "weights_sha256"]

PROGRESS_SECONDS = 10.0  # plain progress lines, when stderr is not a terminal
_CHECKPOINT_KIND = "attnlens.scan.checkpoint"
_CHECKPOINT_FIELDS = ("kind", "fingerprint", "position", "data", "sums", "count")  # what save_checkpoint writes


class Group:
    """This process's place among the torch.distributed processes (one process when not launched by torchrun)."""

    def __init__(self, device: torch.device) -> None:
        self.created = False
        self.rank, self.size = 0, 1
        self.device = torch.device("cpu")
        import torch.distributed as dist

        if not dist.is_available():
            return
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # nccl binds this process to the model's GPU, not to a guessed one
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            # Kept for the process's life: creating the group again in the same processes (a second scan) races
            # torchrun's store (refused connections, hangs); it is destroyed when the process exits.
            atexit.register(_destroy_if_initialized)
            self.created = True
        if dist.is_initialized():
            self.rank, self.size = dist.get_rank(), dist.get_world_size()
            if dist.get_backend() == "nccl":
                self.device = device  # nccl moves CUDA tensors only

    def all_gather(self, x: Tensor) -> list[Tensor]:
        """Every rank's ``x`` (same shape and dtype everywhere), in rank order, on the CPU."""
        if self.size == 1:
            return [x]
        import torch.distributed as dist

        x = x.to(self.device)
        out = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(out, x)
        return [t.cpu() for t in out]

    def broadcast_text(self, text: str | None) -> str | None:
        """Rank 0's text (or None) on every rank, as bytes in a tensor (never pickled)."""
        if self.size == 1:
            return text
        import torch.distributed as dist

        data = b"" if text is None else text.encode()
        length = torch.tensor([len(data) if text is not None else -1], dtype=torch.int64, device=self.device)
        dist.broadcast(length, 0)
        if int(length) < 0:
            return None
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 else None
        if buffer is None or buffer.numel() != int(length):
            buffer = torch.empty(int(length), dtype=torch.uint8)
        buffer = buffer.to(self.device)
        dist.broadcast(buffer, 0)
        return bytes(buffer.cpu().tolist()).decode()


def _destroy_if_initialized() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of every parameter's name, shape, dtype and bytes, in the model's order."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        data = param.detach().reshape(-1).cpu().contiguous()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_atomic(path: str, text: str) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class Progress:
    """tqdm on a terminal (imported only then), plain lines every few seconds otherwise; rank 0 only."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled, self.start, self.last, self.bar = enabled, time.perf_counter(), time.perf_counter(), None
        if enabled and sys.stderr.isatty():
            from attnlens._progress import tqdm_class

            self.bar = tqdm_class()(total=total, unit="tok", unit_scale=True, desc="scan", file=sys.stderr)

    def note(self, text: str) -> None:
        """Print a line ``attnlens scan: text`` on stderr (when enabled)."""
        if self.enabled:
            print(f"attnlens scan: {text}", file=sys.stderr, flush=True)

    def update(self, tokens: int, n_tokens: int) -> None:
        """Count ``tokens`` more (``n_tokens`` in all): advance the bar, or print a line if one is due."""
        if self.bar is not None:
            self.bar.update(tokens)
        elif self.enabled and time.perf_counter() - self.last >= PROGRESS_SECONDS:
            self.last = time.perf_counter()
            rate = n_tokens / max(self.last - self.start, 1e-9)
            self.note(f"{n_tokens:,} tokens, {rate:,.0f} tokens/s")

    def summary(self, n_tokens: int) -> str:
        """The closing line: tokens, seconds and tokens/s since the start."""
        elapsed = time.perf_counter() - self.start
        return f"done: {n_tokens:,} tokens in {elapsed:.1f} s ({n_tokens / max(elapsed, 1e-9):,.0f} tokens/s)"

    def close(self) -> None:
        """Close the bar, if any (idempotent)."""
        if self.bar is not None:  # also on error: the terminal gets its line back
            self.bar.close()
            self.bar = None


def save_checkpoint(
    path: str, fingerprint: dict[str, str], position: int, data: Any, total: Tensor, count: Tensor
) -> None:
    """Write the partial sums, the position (batches done) and the fingerprints to ``path``, atomically."""
    state = {
        "kind": _CHECKPOINT_KIND,
        "fingerprint": fingerprint,
        "position": position,
        "data": data.hexdigest(),
        "sums": total.flatten().tolist(),  # float repr round-trips exactly
        "count": count.tolist(),
    }
    _write_atomic(path, json.dumps(state) + "\n")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _damage(saved: dict[str, Any], sizes: tuple[int, int] | None, lengths: bool) -> str | None:
    """What is wrong with a checkpoint's fields (``None`` when nothing is); with ``lengths``, their lengths too."""
    missing = [key for key in _CHECKPOINT_FIELDS if key not in saved]
    if missing:
        return f"it lacks {', '.join(map(repr, missing))}"
    unknown = [key for key in saved if key not in _CHECKPOINT_FIELDS]
    if unknown:
        return f"unknown field {', '.join(map(repr, unknown))}"
    fingerprint = saved["fingerprint"]
    if not isinstance(fingerprint, dict) or not all(
        isinstance(fingerprint.get(k), str) for k in ("arguments", "model")
    ):
        return f"'fingerprint' must be an object with 'arguments' and 'model' strings, got {fingerprint!r}"
    if not _count(saved["position"]):
        return f"'position' must be an integer >= 0, got {saved['position']!r}"
    digest = saved["data"]
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= set("0123456789abcdef"):
        return f"'data' must be a SHA-256 hex digest, got {digest!r}"
    n_sums, n_counts = sizes if sizes is not None else (None, None)
    sums, count = saved["sums"], saved["count"]
    if not isinstance(sums, list) or not all(map(_number, sums)) or (lengths and n_sums not in (None, len(sums))):
        return f"'sums' must be a list of {'' if n_sums is None else f'{n_sums} '}numbers"
    if not isinstance(count, list) or not all(map(_count, count)) or (lengths and n_counts not in (None, len(count))):
        return f"'count' must be a list of {'' if n_counts is None else f'{n_counts} '}integers >= 0"
    return None


def check_checkpoint(
    text: str, path: str, fingerprint: dict[str, str], sizes: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The checkpoint's contents, every field checked, or a ValueError naming what differs or what is damaged.

    Args:
        text: the file's text.
        path: the file, for the messages.
        fingerprint: the ``arguments`` and ``model`` digests of this scan.
        sizes: the lengths ``sums`` and ``count`` must have for this scan's arguments.
    """
    try:
        saved = json.loads(text)
        ok = saved.get("kind") == _CHECKPOINT_KIND
    except (json.JSONDecodeError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(f"{path} is not an attnlens scan checkpoint; delete it or name another checkpoint file")
    # Types first, then the fingerprint (a checkpoint of other arguments has other lengths), then the lengths.
    damage = _damage(saved, sizes, lengths=False)
    if damage is None:
        for key, what in (("arguments", "other scan arguments"), ("model", "another model (config or weights differ)")):
            if saved["fingerprint"][key] != fingerprint[key]:
                raise ValueError(f"checkpoint {path} was written for {what}; delete it or scan with the same ones")
        damage = _damage(saved, sizes, lengths=True)
    if damage is not None:
        raise ValueError(
            f"checkpoint {path} is damaged: {damage}; delete it to start the scan over (or name another "
            "checkpoint file)"
        )
    return dict(saved)
