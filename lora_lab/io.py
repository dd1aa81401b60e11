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
from safetensors.torch import save_file

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_safetensors"]


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


def atomic_write_json(destination: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(destination, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(
    destination: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file``, atomically; tensors are made contiguous CPU copies."""
    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(destination) as tmp:
        save_file(prepared, str(tmp), metadata=metadata)
