"""LoRA's fast path: the whole adapted linear layer as one ``torch.autograd.Function``.

The readable path, ``original_layer(x) + lora(x)``, is what the lessons teach. Under autograd
it is slower than it needs to be: it writes the adapter's ``(N, d_out)`` output and adds it to
the base output, and in backward writes a second ``(N, d_in)`` input gradient and adds the two —
four extra passes over activation-sized tensors per layer, on a CPU where memory traffic, not
arithmetic, bounds those skinny rank-``r`` products. On a 7M-parameter GPT that left a LoRA
step nearly as slow as a full fine-tuning step (``benchmarks/bench.py`` measures both).

:func:`lora_linear` computes ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` (``s`` = ``scaling``) and its
gradients directly:

* **no weight gradient for a frozen ``W``** (nor ``b``): that product is a third of a full
  fine-tuning layer's cost and the reason LoRA can be cheaper at all. If the user unfroze
  ``W`` or ``b`` their gradients are computed too — ``requires_grad`` is respected.
* **per shape, one of two graphs** (RunLoRA, arXiv 2312.03415, makes the same choice):

  - *merged weight*: ``W_eff = W + s·B A`` costs ``2·r·d_in·d_out`` FLOPs to build and then
    the forward output and the input gradient are each **one** GEMM, exactly like a plain
    ``nn.Linear``; no extra ``(N, ·)`` pass at all. Only valid when the adapter sees the same
    input as ``W`` (no dropout, or dropout inactive in eval).
  - *factorised*: ``y = x Wᵀ + b``, then ``y += s·u Bᵀ`` in place with ``u = x Aᵀ``, costing
    ``2·N·r·(d_in + d_out)`` FLOPs and one read-modify-write of ``y``.

  By FLOPs the merged weight is cheaper when ``N·(d_in + d_out) > d_in·d_out`` (the note's
  crossover; measured, about half that N, see :data:`MERGED_WEIGHT_CROSSOVER`), i.e. for every
  training batch of a hundred tokens or more; the factorised graph wins for a handful of
  tokens (token-by-token generation) and is the only one allowed with dropout.
* **scaling folded into small things**: the GEMMs' ``alpha`` (building ``W_eff``, ``y += s·u Bᵀ``)
  or the r-wide matrices (``s·A`` is ``r × d_in``, ``s·B`` is ``d_out × r``), so no elementwise
  pass over an ``(N, d_out)`` tensor is spent on it.
* **A and B gradients by small GEMMs**: ``dA = (g·sB)ᵀ x`` and ``dB = gᵀ (x·sAᵀ)``, where
  ``g`` is the output gradient.
* **only the inputs are saved**: backward rebuilds ``W_eff`` and ``u`` from ``x, W, A, B`` (a
  fraction ``r/N`` and ``r/d_out`` of the layer's FLOPs), so the Function keeps no activation-sized
  intermediate alive and double backward (``create_graph=True``) stays correct.

Dropout on the adapter's input is applied *outside* the Function, by the caller, and its output
passed as ``x_lora``: autograd's own dropout node then keeps the mask, the mask is the one the
readable path would draw from the same random state, and the Function never has to store it.

At inference (``torch.is_grad_enabled()`` False, or nothing requires grad) the same kernels run
without the autograd bookkeeping: the unmerged layer then costs the base layer plus building
``W_eff`` (a fraction ``r/N`` of it) — or, for a few tokens, the factorised branch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .layers import LoRALayer, LoRALinear

__all__ = [
    "STRATEGIES", "MERGED_WEIGHT_CROSSOVER", "FACTORISED_CALL_OVERHEAD", "FusedLoRALinear", "lora_linear",
    "choose_merged_weight",
]

Strategy = Literal["auto", "merged", "factorised"]

#: Accepted values of ``strategy``: ``"auto"`` picks per shape; the other two force one graph.
STRATEGIES: tuple[str, ...] = ("auto", "merged", "factorised")

#: ``"auto"`` uses the merged weight when
#: ``N·(d_in + d_out) + FACTORISED_CALL_OVERHEAD > MERGED_WEIGHT_CROSSOVER·d_in·d_out``.
#: A crossover of 1.0 would be the FLOP break-even: building ``s·B A`` costs ``2·r·d_in·d_out``
#: FLOPs, the factorised branch ``2·N·r·(d_in + d_out)``. Timed on the project's 2-core CPU (torch
#: 2.13, forward + backward and no_grad forward, d = 128 and 384, N = 1…512) the merged weight
#: already wins at about half that N: the factorised branch also pays a memory-bound
#: read-modify-write of the ``(N, d_out)`` output, which FLOPs do not count.
MERGED_WEIGHT_CROSSOVER = 0.5

#: The factorised branch makes two more operator calls than the merged one, a few microseconds
#: each; in units of ``N·(d_in + d_out)`` that is worth about this much. It only matters for small
#: layers at a handful of tokens (token-by-token generation): timed at N = 1, the merged weight
#: wins up to ``d_in·d_out`` ≈ 192² (merged / factorised time: 0.84 at 128 × 128, 1.8 at 384 × 384).
FACTORISED_CALL_OVERHEAD = 16384


def choose_merged_weight(n_tokens: int, in_features: int, out_features: int) -> bool:
    """Whether ``"auto"`` uses the merged weight ``W + s·B A`` for ``n_tokens`` input rows."""
    return (n_tokens * (in_features + out_features) + FACTORISED_CALL_OVERHEAD
            > MERGED_WEIGHT_CROSSOVER * in_features * out_features)


def _merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    # addmm writes W + s·(B @ A) in one pass: no separate (d_out, d_in) temporary for B @ A.
    return torch.addmm(weight, lora_B, lora_A, alpha=scaling)


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    x_lora: torch.Tensor | None,
    scaling: float,
    merged: bool,
) -> torch.Tensor:
    """``x Wᵀ + b + s·(x_lora Aᵀ) Bᵀ``; ``x_lora`` None means the adapter sees ``x``."""
    if merged:
        return F.linear(x, _merged_weight(weight, lora_A, lora_B, scaling), bias)
    # F.linear on x as given (not a 2-D reshape of it) runs the very kernel nn.Linear runs, so
    # with B = 0 the result is bit-identical to the base layer's, as the readable path's is.
    y = F.linear(x, weight, bias).contiguous()  # fresh, so contiguous already: a no-op check
    u = (x if x_lora is None else x_lora).reshape(-1, x.shape[-1]) @ lora_A.t()  # (N, r): the only new activation
    # In place, y += s·u Bᵀ reads and writes y once, instead of writing a second (N, d_out)
    # tensor and then adding the two (three more passes); s rides on the GEMM (its alpha).
    y.view(-1, y.shape[-1]).addmm_(u, lora_B.t(), alpha=scaling)
    return y


class _LoRALinearFunction(torch.autograd.Function):
    """Autograd for :func:`lora_linear`; see there and the module docstring for the maths."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, x_lora, scaling, merged):  # type: ignore[override]
        ctx.scaling, ctx.merged = scaling, merged
        # Inputs only, no intermediates: see the module docstring.
        ctx.save_for_backward(x, weight, bias, lora_A, lora_B, x_lora)
        return _forward(x, weight, bias, lora_A, lora_B, x_lora, scaling, merged)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, bias, lora_A, lora_B, x_lora = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, need_xl = ctx.needs_input_grad[:6]
        s, d_in, d_out = ctx.scaling, weight.shape[1], weight.shape[0]
        g = grad_y.reshape(-1, d_out)  # may be a copy: autograd hands e.g. expanded gradients
        x2 = x.reshape(-1, d_in)
        adapter_input = x2 if x_lora is None else x_lora.reshape(-1, d_in)
        grad_x = grad_w = grad_b = grad_a = grad_bb = grad_xl = None

        # g·(sB): (N, r), shared by dA, the adapter's share of dx, and d(x_lora). The small
        # factor is laid out as the transpose of a contiguous (r, d_out) matrix: BLAS runs the
        # (N, d_out) × (d_out, r) product 2–5× faster in that layout than with B's own
        # row-major (d_out, r) storage (timed on the project's 2-core CPU, torch 2.13).
        gb = None
        if need_a or need_xl or (need_x and not ctx.merged and x_lora is None):
            gb = g @ (lora_B.t() * s).contiguous().t()
        if need_x:
            if ctx.merged:  # one GEMM, as nn.Linear's own input gradient
                grad_x = g @ _merged_weight(weight, lora_A, lora_B, s)
            else:
                grad_x = g @ weight
                if x_lora is None:  # the adapter saw x itself: its share goes into the same tensor
                    grad_x = grad_x.addmm_(gb, lora_A)
            grad_x = grad_x.reshape(x.shape)
        if need_xl:
            grad_xl = (gb @ lora_A).reshape(x_lora.shape)
        if need_a:
            grad_a = gb.t() @ adapter_input
        if need_bb:
            # dB = gᵀ u, computed as (uᵀ g)ᵀ: the same layout trick, 5–8× faster than gᵀ @ u.
            u = adapter_input @ (lora_A * s).t()
            grad_bb = (u.t() @ g).t()
        if need_w:  # only when the user unfroze W: the very product LoRA exists to skip
            grad_w = g.t() @ x2
        if need_b:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, grad_a, grad_bb, grad_xl, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
    *,
    strategy: Strategy = "auto",
) -> torch.Tensor:
    """``x Wᵀ + b + scaling · (x_lora Aᵀ) Bᵀ`` with LoRA's fast forward and backward.

    Args:
        x: input, shape ``(..., in_features)`` (any number of leading dimensions, or none).
        weight: base weight ``W``, ``(out_features, in_features)``; frozen unless it requires grad.
        bias: base bias ``(out_features,)`` or None.
        lora_A: ``(rank, in_features)``.
        lora_B: ``(out_features, rank)``.
        scaling: the adapter's ``α / r`` (or ``α / √r``).
        x_lora: the adapter's input when it differs from ``x`` — dropout's output, applied by
            the caller so that autograd keeps the mask; same shape as ``x``. None: ``x``.
        strategy: ``"auto"`` (per shape, see :func:`choose_merged_weight`), ``"merged"`` or
            ``"factorised"``. ``"merged"`` with ``x_lora`` is refused: with dropout the adapter
            and ``W`` see different inputs, so they cannot share one weight.

    Returns:
        ``(..., out_features)``, same dtype as ``x``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if x.shape[-1:] != weight.shape[1:] or x.dim() == 0:
        raise ValueError(f"x must have shape (..., {weight.shape[1]}) to match the weight, got {tuple(x.shape)}")
    if lora_A.shape != (lora_A.shape[0], weight.shape[1]) or lora_B.shape != (weight.shape[0], lora_A.shape[0]):
        raise ValueError(
            f"lora_A must be (rank, {weight.shape[1]}) and lora_B ({weight.shape[0]}, rank) for a weight of shape "
            f"{tuple(weight.shape)}; got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    if x_lora is not None and x_lora.shape != x.shape:
        raise ValueError(f"x_lora must have the shape of x, {tuple(x.shape)}; got {tuple(x_lora.shape)}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    if strategy == "merged" and x_lora is not None:
        raise ValueError(
            "strategy='merged' needs the adapter to see the same input as W; with dropout (x_lora given) "
            "use strategy='factorised' or 'auto'"
        )

    return _lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), x_lora, strategy)


def _lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None,
    strategy: Strategy = "auto",
) -> torch.Tensor:
    """:func:`lora_linear` without its argument checks, for ``LoRALinear``, which built A and B
    to fit W itself (a wrong ``x`` then fails in ``F.linear`` exactly as on the plain path).
    Token-by-token generation calls this once per layer per token, so every microsecond shows."""
    if strategy == "auto":
        n_tokens = x.numel() // x.shape[-1]  # rows of the (N, d_in) matrix the GEMMs see
        merged = x_lora is None and choose_merged_weight(n_tokens, weight.shape[1], weight.shape[0])
    else:
        merged = strategy == "merged"
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or lora_A.requires_grad or lora_B.requires_grad
        or (bias is not None and bias.requires_grad) or (x_lora is not None and x_lora.requires_grad)
    ):
        return _LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, x_lora, scaling, merged)
    return _forward(x, weight, bias, lora_A, lora_B, x_lora, scaling, merged)  # inference: no autograd bookkeeping


class FusedLoRALinear(LoRALinear):
    """:class:`~lora_lab.lora.layers.LoRALinear` computed by :func:`lora_linear`: same outputs and
    gradients up to float rounding, faster (no weight gradient for the frozen ``W``, no extra
    activation-sized passes). :func:`~lora_lab.apply_lora_to_model` builds these by default.

    The plain path, ``original_layer(x) + lora(x)``, is still taken wherever the fused one would
    compute something else: under autocast, with mixed dtypes, with forward hooks on the wrapped
    modules (they must see the modules run), and when a subclass overrides a ``forward``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.original_layer(x)
        # Each attribute is read once: nn.Module attribute lookups cost microseconds, which
        # token-by-token generation pays per layer per token.
        base, lora = self.original_layer, self.lora
        weight, lora_A, lora_B = base.weight, lora.lora_A, lora.lora_B
        if not _fast_path_applies(x, base, lora, weight, lora_A, lora_B):
            return base(x) + lora(x)
        # Dropout runs here, outside the fused Function, so autograd's dropout node keeps the mask,
        # and the mask is the one lora(x) would draw. nn.Identity, or Dropout in eval, hands back x
        # itself: the adapter then sees x, and the merged weight is allowed.
        dropout = lora.dropout
        x_lora = x if type(dropout) is nn.Identity else dropout(x)
        return _lora_linear(x, weight, base.bias, lora_A, lora_B, lora.scaling, None if x_lora is x else x_lora)


def _fast_path_applies(x, base, lora, weight, lora_A, lora_B) -> bool:
    """Whether :func:`lora_linear` computes exactly what ``original_layer(x) + lora(x)`` does."""
    if type(base).forward is not nn.Linear.forward or type(lora).forward is not LoRALayer.forward:
        return False  # a subclass computes something else
    dropout = lora.dropout
    if (base._forward_hooks or base._forward_pre_hooks or lora._forward_hooks or lora._forward_pre_hooks
            or dropout._forward_hooks or dropout._forward_pre_hooks
            or _global_forward_hooks or _global_forward_pre_hooks):
        return False  # hooks must see the modules run
    dtype = weight.dtype
    if x.dtype != dtype or lora_A.dtype != dtype or lora_B.dtype != dtype or not x.is_floating_point():
        return False  # mixed dtypes: the plain path's ops decide (and raise) as they always did
    # Autocast casts per op: leave that to the ops it was written for.
    return not torch.is_autocast_enabled("cpu" if x.is_cpu else x.device.type)
