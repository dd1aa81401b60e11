"""Where a run happens: picking the device, and describing the machine in results."""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["select_device", "machine_description", "machine_facts"]


def select_device(preference: str | None = None) -> torch.device:
    """``"cuda"`` if available, else ``"mps"`` (Apple GPU), else ``"cpu"``; or the named device
    (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), with an error if it is unavailable."""
    mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if preference is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available else "cpu")
    try:
        device = torch.device(preference)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {preference!r}; use 'cuda', 'cuda:N', 'mps', 'cpu' or None (auto)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but PyTorch sees no CUDA GPU; use 'cpu' or None (auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {preference!r} requested but there are {torch.cuda.device_count()} CUDA GPUs")
    elif device.type == "mps" and not mps_available:
        raise RuntimeError("device 'mps' requested but this PyTorch has no usable Apple MPS backend; use 'cpu'")
    elif device.type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device type {device.type!r} is not supported here; use 'cuda', 'mps' or 'cpu'")
    return device


def machine_facts() -> dict:
    """What decides a run's speed and its last bits: the CPU model and the vector instructions
    torch uses on it (AVX2 and AVX-512 kernels round differently, so the same seed gives
    bit-identical results only on the same kind of machine), cores, versions and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:  # not Linux: keep platform's name
        pass
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def machine_description() -> str:
    """:func:`machine_facts` in one line, for ``results.json``."""
    f = machine_facts()
    return (f"{f['cpu']} ({f['cpu_capability']}) · {f['logical_cores']} CPUs · torch {f['torch']} · "
            f"{f['torch_threads']} threads")  # fmt: skip
