"""Putting LoRA adapters into any model, and the small API around them.

``apply_lora_to_model`` follows the course's contract (it returns an adapted *copy*; the
original is not modified) and Hugging Face PEFT's ``target_modules`` rules, so a PEFT
user's list of module names works unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from ..validation import check_flag, check_positive_int, check_positive_real
from . import save_guard
from .conv1d import LoRAConv1D, is_conv1d, is_linear_like
from .dora import MAGNITUDE_NAME, DoRALinear
from .fused import FusedLoRALinear
from .layers import LoRALinear
from .nf4 import NF4Linear
from .peft_options import ALL_LINEAR, all_linear_targets, resolve_options
from .pissa import check_pissa_rank

__all__ = [
    "apply_lora_to_model",
    "find_target_modules",
    "lora_modules",
    "mark_only_lora_as_trainable",
    "count_parameters",
    "lora_state_dict",
    "merge_lora",
    "disable_lora",
    "replace_module",
]

BIAS_MODES = ("none", "all", "lora_only")


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list entry
    matches the name exactly or as a dotted suffix (``"q"`` matches ``"blocks.0.attn.q"``)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name, in ``named_modules`` order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def find_target_modules(model: nn.Module, target_modules: str | Sequence[str] | None = None) -> list[str]:
    """Names of the linear modules (``nn.Linear``, transformers' ``Conv1D``) that :func:`apply_lora_to_model`
    would adapt. ``"all-linear"`` is PEFT's rule (every linear layer but the output head, see
    :func:`~lora_lab.lora.peft_options.all_linear_targets`).

    Raises ``ValueError`` with the names of the model's linear layers when nothing matches,
    and when a matched module is not linear.
    """
    linear_names = [name for name, module in model.named_modules() if is_linear_like(module)]
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        target_modules = all_linear_targets(model)
        if not target_modules:
            raise ValueError(
                "target_modules='all-linear' found no linear layer apart from the output head; the model's linear "
                f"layers are: {', '.join(linear_names) or 'none'}"
            )
    if target_modules is None:
        if not linear_names:
            raise ValueError("the model has no nn.Linear layer, so there is nothing to adapt with LoRA")
        return linear_names
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as error:
            raise ValueError(
                f"target_modules={target_modules!r} is not a valid regex ({error}); a string is a regex over full "
                "module names, a list holds names"
            ) from error
    else:
        names = list(target_modules) if isinstance(target_modules, Iterable) else []
        if not names or not all(isinstance(t, str) and t for t in names):
            raise ValueError(
                f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}"
            )
        target_modules = names
    matched = [(name, module) for name, module in model.named_modules() if name and _matches(name, target_modules)]
    not_linear = [f"{name} ({type(module).__name__})" for name, module in matched if not is_linear_like(module)]
    if not_linear:
        raise ValueError(
            f"target_modules={target_modules!r} matched modules that are not nn.Linear: {', '.join(not_linear)}. "
            "LoRA here adapts nn.Linear layers (and transformers' Conv1D) only; the model's linear layers are: "
            f"{', '.join(linear_names) or 'none'}"
        )
    if not matched:
        raise ValueError(
            f"target_modules={target_modules!r} matched no module. A list entry must equal a module name or its "
            f"last dotted parts; a string is a regex over the full name. The model's linear layers are: "
            f"{', '.join(linear_names) or 'none'}"
        )
    return [name for name, _ in matched]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule called ``name`` (dotted, as ``named_modules`` gives it) is
    inside ``root``; return the module it replaced."""
    parent_name, _, child_name = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child_name)
    setattr(parent, child_name, new)
    return old


def apply_lora_to_model(
    model: nn.Module,
    rank: int = 4,
    alpha: float = 1.0,
    target_modules: str | Sequence[str] | None = None,
    *,
    fused: bool = True,
    inplace: bool = False,
    use_dora: bool = False,
    **layer_options,
) -> nn.Module:
    """Return a deep copy of ``model`` whose targeted linear layers are :class:`LoRALinear`
    (:class:`~lora_lab.lora.conv1d.LoRAConv1D` for transformers' ``Conv1D``), with every parameter
    that is not an adapter frozen.

    Args:
        model: any ``nn.Module``; it is not modified (unless ``inplace``).
        rank, alpha: the adapters' rank ``r`` and ``α`` (scaling ``α / r``). ``rank`` may also be a
            ``peft.LoraConfig``, which then gives every setting.
        target_modules: ``None`` (every linear layer, as the course does), ``"all-linear"`` (PEFT's
            rule: all but the output head), a list of module names matched exactly or as a dotted
            suffix, or one regex matched against the full module name (PEFT's rules).
        fused: build :class:`~lora_lab.lora.fused.FusedLoRALinear` layers (the default: the same
            function, computed faster); ``False`` builds the plain, readable :class:`LoRALinear`.
        inplace: adapt ``model`` itself and return it, instead of a copy (no second copy of a big
            model in memory); everything is checked before the model is touched.
        use_dora: build :class:`~lora_lab.lora.dora.DoRALinear` layers (PEFT's ``use_dora=True``; they
            have their own forward, so ``fused`` does not apply).
        **layer_options: ``dropout``, ``init`` (``"kaiming"``, ``"gaussian"``, ``"course"``, or
            ``"pissa"``: :mod:`lora_lab.lora.pissa`), ``use_rslora`` — see
            :class:`~lora_lab.lora.layers.LoRALayer` — and PEFT's names ``r``, ``lora_alpha``,
            ``lora_dropout``, ``init_lora_weights``, ``bias``, ``fan_in_fan_out``, ``use_dora``
            (see :mod:`~lora_lab.lora.peft_options`).

    A transformers model's ``save_pretrained`` is refused while it holds LoRA layers (see
    :mod:`~lora_lab.lora.save_guard`). For a 4-bit (NF4) frozen base, pass the result (built with
    ``fused=False``) to :func:`lora_lab.lora.nf4.quantize_base`.
    """
    resolved = resolve_options(rank, alpha, target_modules, layer_options)
    rank, alpha, target_modules, layer_options = (
        resolved.rank, resolved.alpha, resolved.target_modules, resolved.layer_options
    )
    check_positive_int("rank", rank)
    check_positive_real("alpha", alpha)
    if resolved.bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {resolved.bias!r}")
    layer_class = FusedLoRALinear if check_flag("fused", fused) else LoRALinear
    check_flag("inplace", inplace)
    from_config = layer_options.pop("use_dora", False)  # a LoraConfig's use_dora arrives among the options
    if check_flag("use_dora", use_dora) or check_flag("use_dora", from_config):
        layer_class = DoRALinear
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_lora_to_model needs an nn.Module, got {type(model).__name__}")
    existing = lora_modules(model)
    if existing:
        raise ValueError(
            f"the model already holds LoRA layers ({', '.join(existing)}); adapt the original base model, "
            "or merge the existing adapters first with merge_lora(model)"
        )
    attention = [name or "<root>" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if attention:
        raise ValueError(
            f"the model contains nn.MultiheadAttention ({', '.join(attention)}). Its out_proj is an nn.Linear "
            "whose .weight the attention reads directly (F.multi_head_attention_forward), so a wrapped out_proj "
            "would never run and its adapter would silently do nothing. Write attention with explicit nn.Linear "
            "projections (as lora_lab.model.GPT does), or target only other layers after replacing it."
        )
    targets = find_target_modules(model, target_modules)
    variant = None
    if layer_class is DoRALinear:
        variant = "use_dora=True"
    elif layer_options.get("init") == "pissa":
        variant = 'init="pissa"'
    conv1d = [name for name in targets if is_conv1d(model.get_submodule(name))]
    if variant and conv1d:
        raise ValueError(
            f"{variant} is built here for nn.Linear layers, and {', '.join(conv1d[:3])} "
            f"{'are' if len(conv1d) > 1 else 'is'} transformers' Conv1D (GPT-2); use PEFT's get_peft_model for "
            "DoRA or PiSSA on Conv1D, or plain LoRA here"
        )
    if variant == 'init="pissa"':  # PiSSA rewrites each base weight: every rank is checked before the first one
        for name in targets:
            check_pissa_rank(model.get_submodule(name), rank)
    # Build every layer before the first replacement, so that a bad option leaves an in-place model untouched.
    adapted = model if inplace else copy.deepcopy(model)
    new_layers = {}
    for name in targets:
        linear = adapted.get_submodule(name)
        new_class = LoRAConv1D if is_conv1d(linear) else layer_class
        new_layers[name] = new_class(linear, rank=rank, alpha=alpha, **layer_options)
    for name, layer in new_layers.items():
        replace_module(adapted, name, layer)
    mark_only_lora_as_trainable(adapted, bias=resolved.bias)
    save_guard.guard(adapted)
    return adapted


def _is_lora_parameter(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return "lora_A" in last or "lora_B" in last or last == MAGNITUDE_NAME


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter except the adapters' A and B (and DoRA's magnitudes) (loralib's API).

    ``bias="all"`` also trains every bias; ``"lora_only"`` the biases of adapted layers.
    """
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    for name, param in model.named_parameters():
        param.requires_grad = _is_lora_parameter(name)
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad = True
    elif bias == "lora_only":
        for module in lora_modules(model).values():
            if module.original_layer.bias is not None:
                module.original_layer.bias.requires_grad = True


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    trainable = total = 0
    for param in model.parameters():  # .parameters() already yields a shared tensor once
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors (``...lora.lora_A`` / ``...lora.lora_B``, DoRA's
    ``...lora_magnitude_vector``), detached."""
    return {name: tensor.detach() for name, tensor in model.state_dict().items() if _is_lora_parameter(name)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every :class:`LoRALinear` is a plain ``nn.Linear``
    holding ``W + scaling·B·A`` (DoRA: ``m ⊙ V/‖V‖``; a 4-bit base: in float32) — same outputs, the
    base model's cost (minLoRA's one-liner).
    The copy's parameters keep the ``requires_grad`` flags of the model's base weights."""
    merged = copy.deepcopy(model)
    for name, module in lora_modules(merged).items():
        linear = module.original_layer
        if not module.merged:
            try:
                new_weight = module.merged_weight()
            except ValueError as error:
                raise ValueError(f"merging {name} {error}; the model was not merged") from None
            if isinstance(linear, NF4Linear):  # a 4-bit base merges into a full-precision layer
                linear = linear.to_linear()
            # A new tensor, not an in-place write: the weight may be shared (a head tied to the embedding).
            linear.weight = nn.Parameter(new_weight, requires_grad=linear.weight.requires_grad)
        replace_module(merged, name, linear)
    save_guard.unguard(merged)
    save_guard.record_untied_head(merged)
    return merged


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model with every adapter switched off, without copying it::

        with disable_lora(lora_model):
            base_logits = lora_model(tokens)

    Refused for merged layers (their ΔW is inside the weight; unmerge them first).
    """
    modules = lora_modules(model)
    merged = [name for name, module in modules.items() if module.merged]
    if merged:
        raise RuntimeError(f"cannot disable merged LoRA layers ({', '.join(merged)}); call unmerge() on them first")
    previous = {name: module.disabled for name, module in modules.items()}
    try:
        for module in modules.values():
            module.disabled = True
        yield model
    finally:
        for name, module in modules.items():
            module.disabled = previous[name]
