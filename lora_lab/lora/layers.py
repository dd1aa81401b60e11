"""The LoRA layer (Hu et al. 2021, arXiv 2106.09685), with the course's API made right.

A frozen linear map ``y = x Wᵀ + b`` with ``W ∈ R^{d_out × d_in}`` is adapted by a
trainable low-rank update ``ΔW = B A`` with ``B ∈ R^{d_out × r}``, ``A ∈ R^{r × d_in}``:

    y = x Wᵀ + b + (α / r) · x Aᵀ Bᵀ

``lora_A`` has shape ``(rank, in_features)`` and ``lora_B`` shape ``(out_features, rank)``,
the paper's and Hugging Face PEFT's layout. B starts at zero, so a fresh adapter changes
nothing. The adapter is always applied factorised (``(x Aᵀ) Bᵀ``): building ``ΔW`` under
autograd would add a full ``d_out × d_in`` weight-gradient product to every backward pass,
which is the cost LoRA exists to avoid (the course's slip; see notebook 02).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..validation import check_flag, check_fraction, check_positive_int, check_positive_real
from .pissa import check_pissa_rank, pissa_initialise

__all__ = ["LoRALayer", "LoRALinear", "INIT_METHODS"]

#: How ``lora_A`` may be initialised. B is always zero.
INIT_METHODS = ("kaiming", "gaussian", "course")


class LoRALayer(nn.Module):
    """The adapter branch alone: ``forward(x) = scaling · x Aᵀ Bᵀ``.

    Args:
        in_features: size of each input sample (``d_in``).
        out_features: size of each output sample (``d_out``).
        rank: the rank ``r`` of ``ΔW = B A``.
        alpha: LoRA's ``α``; the update is scaled by ``α / r`` (or ``α / √r`` with rsLoRA),
            so the first Adam steps move the output by about the same amount at every rank and
            the learning rate need not be retuned per rank (Hu et al.); ``α / √r`` keeps large
            ranks from being damped later on.
        dropout: dropout probability on the adapter's input (PEFT's ``lora_dropout``).
        init: how ``lora_A`` starts: ``"kaiming"`` (PEFT and loralib's
            ``kaiming_uniform_(a=√5)``, the default), ``"gaussian"`` (``N(0, 1/r²)``: std ``1/r``, PEFT's
            ``init_lora_weights="gaussian"``) or ``"course"`` (``randn · 0.01``, as the
            original course module wrote it).
        use_rslora: scale by ``α / √r`` (Kalajdzievski 2023, "rank-stabilised LoRA").
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 4,
        alpha: float = 1.0,
        *,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.rank = check_positive_int("rank", rank)
        self.alpha = check_positive_real("alpha", alpha)
        dropout = check_fraction("dropout", dropout)
        if init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
        self.init = init
        self.use_rslora = check_flag("use_rslora", use_rslora)
        self.scaling = self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.rank, **factory))
        self.dropout = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw A with the chosen init and set B to zero (so ``ΔW = 0``)."""
        with torch.no_grad():
            if self.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif self.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.rank)
            else:  # "course"
                self.lora_A.copy_(torch.randn_like(self.lora_A) * 0.01)
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x Aᵀ) Bᵀ costs 2·N·r·(d_in + d_out) FLOPs and only r-wide activations; the
        # scaling is folded into the small r-wide tensor rather than the d_out-wide output.
        return (self.dropout(x) @ self.lora_A.t() * self.scaling) @ self.lora_B.t()

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = scaling · B A``, shape ``(out_features, in_features)``, for merging and
        analysis (never used in the training path)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:g}, init={self.init!r}"
        )


class LoRALinear(nn.Module):
    """An ``nn.Linear`` wrapped with a LoRA adapter: ``original_layer(x) + lora(x)``.

    ``original_layer`` is frozen in place (its ``requires_grad`` is set to False) and stays
    the very same module object, so its weights are shared with whatever else holds it.
    This is the readable layer the lessons build; :class:`lora_lab.lora.fused.FusedLoRALinear`
    computes the same function faster and is what :func:`~lora_lab.apply_lora_to_model` uses
    by default.

    Args:
        original_layer: the ``nn.Linear`` to adapt.
        rank, alpha: see :class:`LoRALayer`.
        **layer_options: forwarded to :class:`LoRALayer` (``dropout``, ``init``,
            ``use_rslora``); ``init="pissa"`` sets A and B from the top singular triplets of
            ``W`` and gives the base the residual (:mod:`lora_lab.lora.pissa`).
    """

    def __init__(self, original_layer: nn.Linear, rank: int = 4, alpha: float = 1.0, **layer_options) -> None:
        super().__init__()
        if not isinstance(original_layer, nn.Linear):
            raise TypeError(
                f"LoRALinear wraps an nn.Linear, got {type(original_layer).__name__}; "
                "use apply_lora_to_model to adapt a whole model"
            )
        pissa = layer_options.get("init") == "pissa"
        if pissa:  # A and B come from W's SVD below; checked first, so a refused layer is left as it was
            check_pissa_rank(original_layer, check_positive_int("rank", rank))
            layer_options = {**layer_options, "init": "kaiming"}
        self.original_layer = original_layer
        weight = original_layer.weight
        self.lora = LoRALayer(
            original_layer.in_features,
            original_layer.out_features,
            rank,
            alpha,
            device=weight.device,
            dtype=weight.dtype,
            **layer_options,
        )
        for param in self.original_layer.parameters():
            param.requires_grad = False
        if pissa:
            pissa_initialise(self)
        self.merged = False
        self.disabled = False  # set by lora_lab.disable_lora to run the base model alone

    @property
    def in_features(self) -> int:
        return self.original_layer.in_features

    @property
    def out_features(self) -> int:
        return self.original_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (``W``; ``W + ΔW`` while merged)."""
        return self.original_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.original_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.original_layer(x)
        return self.original_layer(x) + self.lora(x)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + ΔW`` as a new tensor in the weight's dtype (``W`` itself is not touched).

        Raises ``ValueError`` when the result would not be finite (an adapter holding NaN/inf,
        or a sum that overflows the weight's dtype), so nothing non-finite is ever merged."""
        weight = self.original_layer.weight
        merged = weight + self.lora.delta_weight().to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(
                "would produce non-finite weights (the adapter holds NaN/inf or overflows the weight's dtype); "
                "check the adapter's training"
            )
        return merged

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``ΔW`` into the base weight so inference costs exactly the base layer.

        The layer gets a new weight ``W + ΔW``; the original ``W`` is kept aside, untouched, so
        :meth:`unmerge` restores it bit for bit, and a weight shared with another module (a
        language-model head tied to the token embedding) is never changed through this layer.
        The price is one extra weight-sized tensor while merged. Refused when already merged,
        while disabled, and when the merged weight would not be finite (the layer is then left
        unchanged, as PEFT's ``safe_merge``)."""
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged; call unmerge() before merging again")
        if self.disabled:
            raise RuntimeError("cannot merge inside disable_lora(): the adapter is switched off; merge after the block")
        if not isinstance(self.original_layer.weight, nn.Parameter):  # an NF4 base computes its weight on read
            raise RuntimeError(
                f"cannot merge in place into a {type(self.original_layer).__name__} base (a quantised weight cannot "
                "hold W + ΔW); use lora_lab.merge_lora(model) for a full-precision merged copy"
            )
        weight = self.original_layer.weight
        try:
            merged_weight = self.merged_weight()
        except ValueError as error:
            raise ValueError(f"merging {error}; the layer was left unmerged") from None
        self._unmerged_weight = weight
        self.original_layer.weight = nn.Parameter(merged_weight, requires_grad=weight.requires_grad)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original base weight back (exactly: it was kept aside by :meth:`merge`)."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged; nothing to unmerge")
        self.original_layer.weight = self._unmerged_weight
        del self._unmerged_weight
        self.merged = False

    def extra_repr(self) -> str:
        return f"merged={self.merged}"
