"""Atomic file writes: a reader never sees a half-written checkpoint, adapter or download.

Everything is written to a temporary file in the destination's own folder (so the final
``os.replace`` is a same-filesystem rename, which POSIX and Windows make atomic), flushed and
fsynced, then moved into place. On any error the temporary file is removed and the
destination is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

__all__ = [
    "atomic_path",
    "format_bytes",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save_safetensors",
    "json_text",
    "safetensors_bytes",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``destination``; move it into place on success.

    The file gets ordinary permissions (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, destination)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write_bytes(destination: str | os.PathLike, data: bytes) -> None:
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(destination: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(destination, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    """How lora_lab writes JSON files: indented, keys in the given order, a final newline; NaN and
    infinity are refused (``ValueError``), since they are not JSON and other readers reject them."""
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, reproducible: tensors are made contiguous CPU copies, and the
    metadata entries are sorted by key.

    safetensors writes metadata in the random order of a Rust HashMap (safetensors issue #584), so
    with two entries two saves of the same tensors would differ in their header. Sorting changes only
    the order of entries, so the header keeps its length and padding; should safetensors ever escape
    text differently from ``json.dumps``, the lengths differ and its own bytes are kept.
    """
    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    data = safetensors_save(prepared, metadata=metadata)
    size = int.from_bytes(data[:8], "little")  # the format: 8-byte header length, JSON header, raw data
    header = json.loads(data[8 : 8 + size])
    if not header.get("__metadata__"):
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    sorted_header = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(sorted_header) != len(data[8 : 8 + size].rstrip(b" ")):
        return data
    return data[:8] + sorted_header.ljust(size, b" ") + data[8 + size :]


def atomic_save_safetensors(
    destination: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file (:func:`safetensors_bytes`), written atomically."""
    atomic_write_bytes(destination, safetensors_bytes(tensors, metadata))


def format_bytes(n: float) -> str:
    """A size for people, in powers of 1000 as disk sizes are: ``"79.6 KB"``, ``"1.7 MB"``."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
