"""How a training step uses its device: precision, compilation, the optimiser's kernel, batch transfer.

:class:`ComputeSettings` is plain data held by a profile (``--set compute.precision=bf16``,
``--set compute.compile=true``). Its defaults change nothing on a CPU, so the committed CPU results
stay bit-identical: ``precision="auto"`` means fp32 there and bf16 autocast on a CUDA GPU that has
bf16 (Ampere and later); ``compile`` is off unless asked for. On CUDA the loop also uses AdamW's
fused kernel and copies batches from pinned memory, which cost nothing in accuracy (the fused
kernel computes the same update in one launch instead of several per parameter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..validation import check_flag

__all__ = ["PRECISIONS", "ComputeSettings", "ResolvedCompute", "make_adamw", "to_device"]

#: What ``ComputeSettings.precision`` accepts. No fp16: it needs loss scaling, and bf16 does not.
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ComputeSettings:
    """Precision of the training step's forward pass and whether it is compiled (``torch.compile``)."""

    precision: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"compute.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r} "
                "(fp16 is not offered: it needs a gradient scaler; bf16 has fp32's range and does not)"
            )
        check_flag("compute.compile", self.compile)

    def resolve(self, device: torch.device | str) -> ResolvedCompute:
        """What these settings mean on ``device``; a clear error where the device cannot honour them."""
        device = torch.device(device)
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                "compute.precision=bf16 was asked for, but this GPU has no bf16 support (it needs an Ampere "
                "or later NVIDIA GPU); use compute.precision=fp32"
            )
        if precision == "bf16" and device.type not in ("cuda", "cpu"):
            raise ValueError(f"compute.precision=bf16 runs on cuda or cpu, not on {device.type}; use fp32 there")
        return ResolvedCompute(precision, self.compile, device)


@dataclass(frozen=True)
class ResolvedCompute:
    """:class:`ComputeSettings` resolved for one device: what the training loop actually does."""

    precision: str  # "fp32" or "bf16"
    compile: bool
    device: torch.device

    def is_default(self) -> bool:
        """Whether the step is the plain fp32, uncompiled one (the cache keys leave the defaults out,
        so the artifacts of runs without these options keep their keys)."""
        return self.precision == "fp32" and not self.compile

    def key(self) -> dict:
        """The part of a cache key these options decide (empty for the defaults)."""
        return {} if self.is_default() else {"precision": self.precision, "compile": self.compile}

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast around a forward pass when asked for; nothing at all otherwise (not even
        a disabled autocast, so that the fp32 step is exactly the one it always was)."""
        if self.precision == "bf16":
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def compiled(self, model: nn.Module) -> nn.Module:
        """``torch.compile(model)`` when asked for, else ``model`` itself. The compiled module shares
        the parameters, so training it trains ``model``."""
        return torch.compile(model) if self.compile else model


def make_adamw(groups: list[dict], lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over parameter ``groups``; on CUDA its fused kernel (one launch for every tensor)."""
    if device.type == "cuda":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.AdamW(groups, lr=lr)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; to a CUDA device through pinned memory, so that the copy runs
    asynchronously while the GPU works (pinning is CUDA's, so elsewhere a plain ``.to``)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
