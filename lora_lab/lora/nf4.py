"""A 4-bit frozen base, QLoRA-style (Dettmers et al. 2023, arXiv 2305.14314), in plain torch.

QLoRA keeps the frozen weights in **NF4** (4-bit NormalFloat) and trains full-precision LoRA
adapters on top. Three steps, each a few lines below:

1. **The code book.** Pretrained weights are roughly normal, so the 16 levels are placed at
   quantiles of N(0, 1), normalised to [−1, 1], with an exact zero. The paper's definition
   (its eq. 4 and bitsandbytes' ``create_normal_map``): 8 positive levels at
   ``Φ⁻¹(linspace(δ, ½, 9)[:-1])``, 7 negative ones at ``−Φ⁻¹(linspace(δ, ½, 8)[:-1])``, and 0, with
   ``δ = 1 − ½(1/30 + 1/32) = 0.9677083``, all divided by the largest. Asymmetric on purpose: 16
   levels cannot be symmetric around an exact zero.
2. **Block-wise absmax.** The flattened weight is cut into blocks of 64; each block is divided by
   its largest ``|w|`` (its *absmax*, kept in float32) and every value is rounded to the nearest
   level: a 4-bit index. Two indices share a byte. Per weight: 4 bits + 32/64 = **4.5 bits**.
3. **Double quantisation** (optional). The absmax constants are themselves quantised: their mean
   is subtracted and blocks of 256 are stored as 8-bit codes with one float32 scale each, so a weight
   costs 4 + 8/64 + 32/(64·256) ≈ **4.127 bits**. The paper uses an 8-bit *float* code for them;
   here they are 8-bit *linear* (int8, absmax-scaled): the same bits, one fewer code book to read.

Forward and backward dequantise the weight on the fly (:class:`NF4Linear`): nothing of full
size is kept between the two, only the 4-bit codes (:class:`_NF4Matmul` saves them, not ``W``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..validation import check_flag, check_positive_int

__all__ = [
    "nf4_code_book", "NF4Tensor", "quantize_nf4", "dequantize_nf4", "NF4Linear", "quantize_base", "NF4_BLOCK",
    "frozen_bytes",
]  # fmt: skip

#: Weights per absmax block (the paper's 64) and absmax constants per double-quantisation block (256).
NF4_BLOCK, ABSMAX_BLOCK = 64, 256
_OFFSET = 1 - 0.5 * (1 / 30 + 1 / 32)  # δ: halfway between the 1/(2·15) and 1/(2·16) tail cut-offs


def nf4_code_book() -> torch.Tensor:
    """The 16 NF4 levels, ascending, in [−1, 1] with an exact 0 (see the module docstring)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = normal.icdf(torch.linspace(_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.abs().max()).float()


_CODE = nf4_code_book()
# Rounding to the nearest level is a search among the 15 midpoints between neighbouring levels.
_MIDPOINTS = (_CODE[1:] + _CODE[:-1]) / 2


@dataclass(frozen=True)
class NF4Tensor:
    """A weight in NF4: ``codes`` (two 4-bit indices per uint8, first in the high nibble) and the
    per-block absmax — as float32 (``absmax``) or, double-quantised, as int8 ``absmax_codes`` with
    float32 ``absmax_scales`` per 256 constants and their ``absmax_mean``."""

    codes: torch.Tensor
    absmax: torch.Tensor | None
    absmax_codes: torch.Tensor | None
    absmax_scales: torch.Tensor | None
    absmax_mean: torch.Tensor | None
    shape: tuple[int, ...]
    block_size: int = NF4_BLOCK

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes and constants."""
        parts = (self.codes, self.absmax, self.absmax_codes, self.absmax_scales, self.absmax_mean)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / torch.Size(self.shape).numel()


def _blocks(values: torch.Tensor, size: int) -> torch.Tensor:
    """``values`` flattened, zero-padded to a multiple of ``size``, as rows of ``size``."""
    flat = values.reshape(-1)
    return F.pad(flat, (0, -flat.numel() % size)).view(-1, size)


def quantize_nf4(weight: torch.Tensor, block_size: int = NF4_BLOCK, double_quant: bool = False) -> NF4Tensor:
    """``weight`` in NF4 with block-wise absmax (``double_quant``: the absmax constants in 8 bits)."""
    check_positive_int("block_size", block_size)
    if block_size % 2:
        raise ValueError(f"block_size must be even (two 4-bit codes share a byte), got {block_size}")
    check_flag("double_quant", double_quant)
    if not weight.is_floating_point() or not torch.isfinite(weight).all():
        raise ValueError("NF4 quantises a finite floating-point weight; this one holds NaN/inf or is not float")
    blocks = _blocks(weight.detach().float(), block_size)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block has absmax 0: divide by 1 instead (its codes are the exact zero level anyway).
    normalised = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    index = torch.bucketize(normalised, _MIDPOINTS.to(normalised.device)).to(torch.uint8).view(-1)
    codes = (index[0::2] << 4) | index[1::2]
    if not double_quant:
        return NF4Tensor(codes, absmax, None, None, None, tuple(weight.shape), block_size)
    mean = absmax.mean()
    centred = _blocks(absmax - mean, ABSMAX_BLOCK)
    scales = centred.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    absmax_codes = torch.round(centred / scales.unsqueeze(1) * 127).to(torch.int8).view(-1)[: absmax.numel()]
    return NF4Tensor(codes, None, absmax_codes, scales, mean, tuple(weight.shape), block_size)


def _absmax(q: NF4Tensor) -> torch.Tensor:
    if q.absmax is not None:
        return q.absmax
    centred = _blocks(q.absmax_codes.float(), ABSMAX_BLOCK) / 127 * q.absmax_scales.unsqueeze(1)
    return centred.view(-1)[: q.absmax_codes.numel()] + q.absmax_mean


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight back from its codes: ``level[index] × absmax of its block``."""
    index = torch.stack([q.codes >> 4, q.codes & 0x0F], dim=1).view(-1).long()
    values = _CODE.to(q.codes.device)[index].view(-1, q.block_size) * _absmax(q).unsqueeze(1)
    return values.view(-1)[: torch.Size(q.shape).numel()].view(q.shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """``x Wᵀ`` with ``W`` rebuilt from its 4-bit codes in forward and again in backward, so the
    full-size ``W`` never stays alive between the two (what QLoRA saves). ``W`` is frozen: only
    the input gradient is computed."""

    @staticmethod
    def forward(ctx, x, layer):  # type: ignore[override]
        ctx.layer = layer
        return x @ layer.dequantized_weight(x.dtype).t()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad @ ctx.layer.dequantized_weight(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in NF4 (its bias stays in full precision).

    ``weight`` gives the dequantised weight (a new float tensor on every read): what
    :func:`lora_lab.merge_lora` and DoRA's norm need. There is nothing to train here.
    """

    def __init__(self, linear: nn.Linear, block_size: int = NF4_BLOCK, double_quant: bool = False) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear quantises an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q = quantize_nf4(linear.weight, block_size, double_quant)
        self.block_size = q.block_size
        for name in ("codes", "absmax", "absmax_codes", "absmax_scales", "absmax_mean"):
            self.register_buffer(name, getattr(q, name))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def quantized(self) -> NF4Tensor:
        return NF4Tensor(self.codes, self.absmax, self.absmax_codes, self.absmax_scales, self.absmax_mean,
                         (self.out_features, self.in_features), self.block_size)  # fmt: skip

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.quantized, dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias

    def to_linear(self) -> nn.Linear:
        """A plain float32 ``nn.Linear`` holding the dequantised weight (and the bias)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.codes.device)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)  # frozen, as the base it stands for

    def extra_repr(self) -> str:
        double = self.absmax is None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nf4, block={self.block_size}, "
            f"double_quant={double}"
        )


def quantize_base(model: nn.Module, *, block_size: int = NF4_BLOCK, double_quant: bool = False) -> nn.Module:
    """A copy of a LoRA model whose adapted layers' frozen base weights are NF4 (QLoRA's setting:
    the adapters stay in full precision). ``model`` is not modified.

    Needs plain :class:`~lora_lab.lora.layers.LoRALinear` layers (or DoRA ones):
    ``apply_lora_to_model(..., fused=False)``; the fused path reads ``W`` as one float tensor.
    """
    from .fused import FusedLoRALinear  # fused imports layers; kept local to keep this module standalone
    from .inject import lora_modules, mark_only_lora_as_trainable

    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; adapt it first with apply_lora_to_model(..., fused=False)")
    fused = [name for name, layer in layers.items() if isinstance(layer, FusedLoRALinear)]
    if fused:
        raise ValueError(
            f"layers {fused[:3]} are FusedLoRALinear, whose fast path needs W as one float tensor; adapt the model "
            "with apply_lora_to_model(..., fused=False) before quantize_base"
        )
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("unmerge the LoRA layers before quantising their base")
    quantised = copy.deepcopy(model)
    for layer in lora_modules(quantised).values():
        if not isinstance(layer.original_layer, NF4Linear):
            layer.original_layer = NF4Linear(layer.original_layer, block_size, double_quant)
    mark_only_lora_as_trainable(quantised)
    return quantised


def frozen_bytes(model: nn.Module) -> int:
    """Bytes held by what does not train: frozen parameters and buffers (NF4 codes and constants)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return params + sum(b.numel() * b.element_size() for b in model.buffers())
