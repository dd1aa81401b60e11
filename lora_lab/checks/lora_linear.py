"""Grader of the student's wrapper, ``LoRALinear``: a frozen ``nn.Linear`` plus a trainable adapter.

The wrapper is built as ``cls(linear, rank=rank, alpha=alpha)`` and keeps the course's attributes
``original_layer`` (the very layer passed in) and ``lora`` (the adapter, holding ``lora_A`` and
``lora_B``); its output is ``original_layer(x) + (α/r)·x Aᵀ Bᵀ``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .factors import (
    _ALPHA,
    _IN,
    _OUT,
    _RANK,
    _TOKENS,
    _adapter_output,
    _backward,
    _check_3d_input,
    _check_factor_shapes,
    _diagnose_adapter,
    _factor_parameters,
    _randomise,
)
from .result import CheckResult, _attempt, _close, _describe_error, _name, _run_check, _title


def _seeded_linear(d_in: int, d_out: int, generator: torch.Generator) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    _randomise([layer.weight, layer.bias], generator)
    return layer


# The name under which the wrapper builds its adapter, as the course and notebook 02 write it.
ADAPTER_NAME = "LoRALayer"


def check_lora_linear(
    cls: Callable[..., nn.Module],
    in_features: int = _IN,
    out_features: int = _OUT,
    rank: int = _RANK,
    alpha: float = _ALPHA,
    *,
    layer_class: type[nn.Module] | None = None,
) -> CheckResult:
    """Check a wrapper built as ``cls(linear, rank=rank, alpha=alpha)`` with the course's
    attributes ``original_layer`` (the very layer passed in) and ``lora`` (holding ``lora_A``,
    ``lora_B``).

    Properties: the base layer is kept, frozen and unchanged; the adapter is trainable and holds
    exactly ``r·(in + out)`` parameters; at init the output equals the base layer's; with random
    A and B it equals ``base(x) + (α/r)·x Aᵀ Bᵀ`` (a missing base or adapter is named); 3-D
    inputs work; after backward only A and B have gradients.

    ``layer_class`` (e.g. ``lora_lab.LoRALayer``): while the check runs, the name ``LoRALayer`` in
    the namespace where ``cls`` was defined means ``layer_class``, so the wrapper is graded on a
    correct adapter underneath and a mistake in the student's own ``LoRALayer`` (another exercise)
    is not counted twice. Without it the wrapper is checked with whatever it builds.
    """
    title = _title("check_lora_linear", cls, repr(cls))
    if layer_class is not None:
        title = f"{title[:-1]}, on {getattr(layer_class, '__module__', '?')}.{_name(layer_class, 'layer_class')})"
    with _adapter_bound_to(cls, layer_class):
        return _run_check(title, _check_lora_linear, cls, in_features, out_features, rank, alpha)


@contextmanager
def _adapter_bound_to(cls: Callable[..., nn.Module], layer_class: type[nn.Module] | None) -> Iterator[None]:
    """Bind ``ADAPTER_NAME`` to ``layer_class`` in the globals of ``cls.__init__`` (a notebook's
    namespace, for a class defined there) and restore the old binding afterwards, even on errors."""
    with _global_bound(getattr(getattr(cls, "__init__", None), "__globals__", None), ADAPTER_NAME, layer_class):
        yield


@contextmanager
def _global_bound(namespace: object, name: str, value: object | None) -> Iterator[None]:
    """Bind ``name`` to ``value`` in ``namespace`` (a function's ``__globals__``) while the block runs and
    restore the old binding afterwards, even on errors; nothing happens when ``value`` is None or there
    is no namespace."""
    if value is None or not isinstance(namespace, dict):
        yield
        return
    missing = object()
    previous = namespace.get(name, missing)
    namespace[name] = value
    try:
        yield
    finally:
        if previous is missing:
            namespace.pop(name, None)
        else:
            namespace[name] = previous


def _check_lora_linear(
    result: CheckResult,
    cls: Callable[..., nn.Module],
    d_in: int,
    d_out: int,
    rank: int,
    alpha: float,
    generator: torch.Generator,
) -> None:
    base = _seeded_linear(d_in, d_out, generator)
    weight0, bias0 = base.weight.detach().clone(), base.bias.detach().clone()
    x = torch.randn(_TOKENS, d_in, generator=generator)
    with torch.no_grad():
        base_y = base(x)
    error, module = _attempt(cls, base, rank=rank, alpha=alpha)
    if error is not None:
        result.fail(
            f"{_name(cls, 'cls')}(linear, rank={rank}, alpha={alpha:g}) {error}",
            "the constructor takes (original_layer, rank=4, alpha=1.0), like the course's LoRALinear",
        )
        return
    if getattr(module, "original_layer", None) is base:
        result.ok("original_layer is the nn.Linear passed in (its pretrained weights are kept)")
    else:
        result.fail(
            "original_layer is not the nn.Linear passed in",
            "store it as is: self.original_layer = original_layer (a new nn.Linear would lose the pretrained weights)",
        )
        return
    if torch.equal(base.weight, weight0) and torch.equal(base.bias, bias0):
        result.ok("wrapping leaves the base weights unchanged")
    else:
        result.fail(
            "wrapping changed the base layer's weight or bias",
            "the constructor must only freeze the base layer, never write to it",
        )
    unfrozen = [n for n, p in base.named_parameters() if p.requires_grad]
    if unfrozen:
        result.fail(
            f"the base layer is not frozen: original_layer.{' and original_layer.'.join(unfrozen)} still "
            "require grad, so the optimizer would train all of W (full fine-tuning, not LoRA)",
            "set requires_grad = False on every parameter of self.original_layer (and only there)",
        )
    else:
        result.ok("the base layer is frozen (requires_grad False for its weight and bias)")
    lora = getattr(module, "lora", None)
    if lora is None:
        result.fail("has no attribute lora", "keep the adapter as self.lora = LoRALayer(in, out, rank, alpha)")
        return
    factors = _factor_parameters(result, lora, where="lora: ")
    if factors is None:
        return
    A, B = factors
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    expected_trainable = rank * (d_in + d_out)
    if not (A.requires_grad and B.requires_grad):
        result.fail(
            "the adapter is frozen too: lora_A / lora_B do not require grad, so nothing would train",
            "freeze only self.original_layer's parameters, not self.parameters()",
        )
    elif trainable == expected_trainable:
        result.ok(f"trainable parameters: exactly the adapter's r·(in + out) = {expected_trainable}")
    else:
        result.fail(
            f"{trainable} trainable parameters, expected the adapter's r·(in + out) = {expected_trainable}",
            "only lora_A and lora_B should require grad",
        )
    if not _check_factor_shapes(result, A, B, d_in, d_out, rank):
        result.fail(
            "forward not checked: fix the adapter's shapes first (run check_lora_layer on it)",
            "lora_A must be (rank, in_features) and lora_B (out_features, rank)",
        )
        return
    _check_linear_forward(result, module, base, x, base_y, A, B, d_in, rank, alpha, generator)


def _check_linear_forward(
    result: CheckResult,
    module: nn.Module,
    base: nn.Linear,
    x: torch.Tensor,
    base_y: torch.Tensor,
    A: nn.Parameter,
    B: nn.Parameter,
    d_in: int,
    rank: int,
    alpha: float,
    generator: torch.Generator,
) -> None:
    """The wrapper's output, at init and with random factors, on 2-D and 3-D inputs, and where
    its gradients go."""
    try:
        with torch.no_grad():
            y0 = module(x)
    except Exception as error:
        result.fail(
            f"forward on a ({_TOKENS}, {d_in}) input {_describe_error(error)}",
            "the output is the frozen layer's output plus the adapter's, both on the same x",
        )
        return
    if _close(y0, base_y, tol=1e-6):
        result.ok("at init (B = 0) the output equals the base layer's: the model starts unchanged")
    else:
        result.fail(
            "at init the output differs from the base layer's, although B = 0 should make ΔW = 0",
            "at init only the frozen layer may contribute: is lora_B zero, and is the base output passed on unchanged?",
        )

    _randomise([A, B], generator)
    with torch.no_grad():
        y = module(x)
        adapter = _adapter_output(x, A, B, alpha / rank)
    if _close(y, base_y, tol=1e-6):
        result.fail(
            "with random A and B the output still equals the base layer's: the adapter never runs",
            "the output must include the adapter's branch (self.lora) as well as the frozen layer's",
        )
    elif _close(y, adapter):
        result.fail(
            "the output is the adapter's alone: the frozen base layer's output is missing",
            "LoRA adds ΔW x to W x: the frozen layer's output is part of the result",
        )
    else:
        diagnosis = _diagnose_adapter(y, x, A.detach(), B.detach(), rank, alpha, base_y)
        if diagnosis is None:
            result.ok("forward(x) = original_layer(x) + (α/r)·x Aᵀ Bᵀ for random A and B")
        else:
            result.fail(*diagnosis)

    _check_3d_input(
        result,
        module,
        lambda x3: base(x3) + _adapter_output(x3, A.detach(), B.detach(), alpha / rank),
        d_in,
        generator,
        label="a 3-D input {input}",
        mismatch="a 3-D input {input} gives other values than row by row",
        mismatch_hint="use @ (torch.matmul) and transpose only the 2-D factors",
        error_hint="use @ (torch.matmul), which broadcasts over leading dimensions",
    )

    error = _backward(module, x.clone().requires_grad_(True), module.parameters())
    if error is not None:
        result.fail(f"backward {error}", "use the parameters themselves in forward")
        return
    with_grad = sorted(n for n, p in module.named_parameters() if p.grad is not None)
    base_grads = [n for n in with_grad if n.startswith("original_layer.")]
    factor_grads = [p.grad is not None for p in (A, B)]
    if not base_grads and all(factor_grads):
        result.ok("after backward only lora_A and lora_B have gradients")
    elif base_grads:
        result.fail(
            f"after backward the base layer has gradients ({', '.join(base_grads)})",
            "freeze the base layer: its parameters' requires_grad must be False",
        )
    else:
        result.fail(
            "after backward lora_A or lora_B has no gradient",
            "use the adapter's parameters in forward (not .data or .detach())",
        )
