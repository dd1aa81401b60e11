"""Checks a student runs on their own code in the notebooks' exercises.

Each ``check_*`` function calls the student's function or class on small, seeded examples and
PRINTS one line per property — ``ok`` or ``FAIL`` — and, for each failure, what it most likely
means and a hint. It returns a :class:`CheckResult`, which is truthy only when every property
holds, so a grading cell can simply ``assert check_lora_layer(MyLoRALayer)``. A wrong answer
never raises: exceptions raised by the student's code are caught and reported as failures.

The checks draw their random numbers inside ``torch.random.fork_rng``, so calling one neither
depends on nor disturbs the notebook's own random state, and what they print is the same on
every run.

Conventions checked (the paper's, Hu et al. 2021, and PEFT's, in PyTorch's row layout):
``nn.Linear`` stores ``W`` as ``(out_features, in_features)`` and computes ``y = x Wᵀ + b``;
``lora_A`` is ``(rank, in_features)``, ``lora_B`` is ``(out_features, rank)``, ``ΔW = B A`` and
the adapter's output is ``(α / r) · x Aᵀ Bᵀ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "CheckResult",
    "check_lora_layer",
    "check_lora_linear",
    "check_truncated_svd",
    "check_parameter_count",
    "check_compression_ratio",
    "check_model_lora_count",
]

# Default shapes for the layer checks: in, out and rank all different, so a transposed factor
# has a shape of its own, and α/r = 2 differs from 1, r/α and α, so a wrong scaling shows.
_IN, _OUT, _RANK, _ALPHA = 12, 10, 3, 6.0
_TOKENS = 5  # rows of the 2-D test input: fewer than in/out, so materialising ΔW costs visibly more
_SEED = 0


@dataclass
class CheckResult:
    """What a check found, in the order it was checked: ``(passed, message, hint)`` entries.

    ``bool(result)`` is True when nothing failed (and something was checked); ``passed`` lists
    the properties that hold and ``failed`` the ``(problem, hint)`` pairs of those that do not.
    """

    name: str
    entries: list[tuple[bool, str, str]] = field(default_factory=list)

    def ok(self, message: str) -> None:
        self.entries.append((True, message, ""))

    def fail(self, problem: str, hint: str) -> None:
        if _NOT_WRITTEN in problem:  # the student's stub: say so before the hint for the finished code
            hint = f"replace `raise NotImplementedError()` with your code; then: {hint}"
        self.entries.append((False, problem, hint))

    @property
    def passed(self) -> list[str]:
        return [message for ok, message, _ in self.entries if ok]

    @property
    def failed(self) -> list[tuple[str, str]]:
        return [(message, hint) for ok, message, hint in self.entries if not ok]

    def __bool__(self) -> bool:
        return bool(self.entries) and all(ok for ok, _, _ in self.entries)

    def report(self) -> str:
        """The printed report: every property in order, then a one-line verdict."""
        lines = [f"{self.name}:"]
        for ok, message, hint in self.entries:
            if ok:
                lines.append(f"  ok    {message}")
            else:
                lines += [f"  FAIL  {message}", f"        hint: {hint}"]
        failed, passed = len(self.failed), len(self.passed)
        lines.append(f"{failed} failed, {passed} passed." if failed else f"All {passed} passed.")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CheckResult({self.name!r}, passed={len(self.passed)}, failed={len(self.failed)})"


@contextmanager
def _private_rng(seed: int = _SEED) -> Iterator[torch.Generator]:
    """Seed the global generator for the student's constructors, restore it afterwards, and hand
    out a private generator for the check's own tensors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def _run_check(title: str, check: Callable[..., None], *args) -> CheckResult:
    """Run ``check(result, *args, generator)`` under :func:`_private_rng`, print and return the result."""
    result = CheckResult(title)
    with _private_rng() as generator:
        check(result, *args, generator)
    print(result.report())
    return result


_NOT_WRITTEN = "raised NotImplementedError (the exercise is not written yet)"


def _describe_error(error: BaseException) -> str:
    if isinstance(error, NotImplementedError):
        return _NOT_WRITTEN
    text = str(error).strip().splitlines()
    return f"raised {type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol))


def _as_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return None


def _fmt(number: float) -> str:
    return f"{number:g}"


# --- the LoRA layer ---------------------------------------------------------------------------


def _adapter_output(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    return scaling * (x @ A.t()) @ B.t()


def _diagnose_adapter(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rank: int, alpha: float, base: torch.Tensor
) -> tuple[str, str] | None:
    """None when ``y == base + (α/r)·x Aᵀ Bᵀ``, else the likeliest mistake and a hint."""
    scaling = alpha / rank
    unscaled = _adapter_output(x, A, B, 1.0)
    if _close(y, base + scaling * unscaled):
        return None
    candidates = [
        (
            base + unscaled,
            "the adapter's output is not scaled: it equals x Aᵀ Bᵀ, without α/r",
            "multiply the adapter's output by self.scaling = alpha / rank",
        ),
        (
            base + unscaled * rank / alpha,
            "the adapter's output is scaled by r/α instead of α/r",
            "scaling = alpha / rank (α on top)",
        ),
        (
            base + unscaled * alpha,
            "the adapter's output is scaled by α instead of α/r",
            "scaling = alpha / rank: dividing by r keeps the update's size the same when r changes",
        ),
    ]
    if A.shape[1] == B.shape[0]:  # square layer: x ΔW type-checks as well as x ΔWᵀ
        wrong = x @ (B @ A) * scaling
        candidates.append(
            (
                base + wrong,
                "the adapter computes x·ΔW instead of x·ΔWᵀ (it multiplies by B A untransposed)",
                "nn.Linear computes x Wᵀ, so the adapter is x (B A)ᵀ = (x Aᵀ) Bᵀ; the mistake only type-checks "
                "when in_features == out_features",
            )
        )
    for expected, problem, hint in candidates:
        if _close(y, expected):
            return problem, hint
    difference = (y - base - scaling * unscaled).abs().max().item() if y.shape == base.shape else float("nan")
    return (
        f"the output differs from (α/r)·x Aᵀ Bᵀ by up to {difference:.3g} for random A and B",
        "compute (x @ self.lora_A.T) @ self.lora_B.T * self.scaling",
    )


def _randomise(params: list[nn.Parameter], generator: torch.Generator) -> None:
    with torch.no_grad():
        for param in params:
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))


def _factor_parameters(result: CheckResult, layer: nn.Module, where: str = "") -> tuple[nn.Parameter, ...] | None:
    """``(lora_A, lora_B)`` if both exist and are registered parameters; reports otherwise."""
    factors = []
    for name in ("lora_A", "lora_B"):
        value = getattr(layer, name, None)
        if value is None:
            result.fail(
                f"{where}has no attribute {name}",
                "name the two factors self.lora_A and self.lora_B (the seed's, loralib's and PEFT's names)",
            )
            return None
        if not isinstance(value, nn.Parameter):
            result.fail(
                f"{where}{name} is a {type(value).__name__}, not an nn.Parameter: model.parameters() and the "
                "optimizer never see it, so it would never be trained",
                f"wrap it: self.{name} = nn.Parameter(...)",
            )
            return None
        factors.append(value)
    result.ok(f"{where}lora_A and lora_B are nn.Parameters")
    return tuple(factors)


def _check_factor_shapes(
    result: CheckResult, A: torch.Tensor, B: torch.Tensor, d_in: int, d_out: int, rank: int
) -> bool:
    shapes_ok = True
    if tuple(A.shape) == (rank, d_in):
        result.ok(f"lora_A has shape (rank, in_features) = {(rank, d_in)}")
    else:
        shapes_ok = False
        if tuple(A.shape) == (d_in, rank):
            result.fail(
                f"lora_A has shape {(d_in, rank)} = (in_features, rank): it is transposed (the seed's layout)",
                f"A is r × k in the paper, so lora_A must be (rank, in_features) = {(rank, d_in)}; then "
                "ΔW = B A has nn.Linear.weight's shape (out, in), as in PEFT",
            )
        else:
            result.fail(
                f"lora_A has shape {tuple(A.shape)}, expected (rank, in_features) = {(rank, d_in)}",
                "lora_A maps the input (in_features) down to rank dimensions",
            )
    if tuple(B.shape) == (d_out, rank):
        result.ok(f"lora_B has shape (out_features, rank) = {(d_out, rank)}")
    else:
        shapes_ok = False
        if tuple(B.shape) == (rank, d_out):
            result.fail(
                f"lora_B has shape {(rank, d_out)} = (rank, out_features): it is transposed",
                f"B is d × r in the paper, so lora_B must be (out_features, rank) = {(d_out, rank)}",
            )
        else:
            result.fail(
                f"lora_B has shape {tuple(B.shape)}, expected (out_features, rank) = {(d_out, rank)}",
                "lora_B maps rank dimensions up to the output (out_features)",
            )
    return shapes_ok


def _check_init(result: CheckResult, A: torch.Tensor, B: torch.Tensor) -> None:
    if torch.count_nonzero(B) == 0:
        result.ok("lora_B is zero at init, so ΔW = B A = 0 and the wrapped model starts unchanged")
    else:
        result.fail(
            "lora_B is not zero at init: ΔW = B A ≠ 0, so wrapping a pretrained layer would change its outputs "
            "before any training",
            "initialise B with zeros (torch.zeros or nn.init.zeros_) and A randomly",
        )
    if torch.count_nonzero(A) > 0:
        result.ok("lora_A is random (non-zero) at init")
    else:
        result.fail(
            "lora_A is zero at init too: with A = B = 0 both gradients dL/dA and dL/dB are zero, so the adapter "
            "can never start learning",
            "draw A randomly (e.g. torch.randn(rank, in_features) * 0.01, or nn.init.kaiming_uniform_)",
        )


def _square_layer_diagnosis(cls, dim: int, rank: int, alpha: float) -> tuple[str, str] | None:
    """Run the adapter on a square layer, where ``x·ΔW`` type-checks as well as ``x·ΔWᵀ`` and only
    the values tell them apart. None when right."""
    generator = torch.Generator().manual_seed(_SEED + 1)
    try:
        layer = cls(dim, dim, rank, alpha)
        A, B = layer.lora_A, layer.lora_B
        _randomise([A, B], generator)
        x = torch.randn(_TOKENS, dim, generator=generator)
        with torch.no_grad():
            y = layer(x)
            return _diagnose_adapter(y, x, A.detach(), B.detach(), rank, alpha, torch.zeros_like(y))
    except Exception as error:
        return (
            f"a square layer ({dim} → {dim}) {_describe_error(error)}",
            "compute (x @ self.lora_A.T) @ self.lora_B.T * self.scaling",
        )


def _forward_flops(module: nn.Module, x: torch.Tensor) -> int | None:
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
    except Exception:  # reported by the output check already
        return None
    return counter.get_total_flops()


def check_lora_layer(
    cls: Callable[..., nn.Module],
    in_features: int = _IN,
    out_features: int = _OUT,
    rank: int = _RANK,
    alpha: float = _ALPHA,
) -> CheckResult:
    """Check a LoRA adapter class built as ``cls(in_features, out_features, rank, alpha)``.

    Properties: ``lora_A``/``lora_B`` are parameters of shapes ``(rank, in)``/``(out, rank)``
    (a transposed A is named as such); B is zero and A non-zero at init; ``forward(x)`` equals
    ``(α/r)·x Aᵀ Bᵀ`` for random A and B (a missing or inverted scaling, and ``x·ΔW`` for
    ``x·ΔWᵀ``, are named); 2-D and 3-D inputs give ``(..., out_features)``; gradients reach A and
    B; and the forward is factorised (it does not build the ``out × in`` matrix ``ΔW``).
    """
    title = f"check_lora_layer({getattr(cls, '__name__', repr(cls))})"
    return _run_check(title, _check_lora_layer, cls, in_features, out_features, rank, alpha)


def _check_lora_layer(result, cls, d_in, d_out, rank, alpha, generator) -> None:
    try:
        layer = cls(d_in, d_out, rank, alpha)
    except Exception as error:
        result.fail(
            f"{getattr(cls, '__name__', 'cls')}({d_in}, {d_out}, {rank}, {alpha:g}) {_describe_error(error)}",
            "the constructor takes (in_features, out_features, rank, alpha), in that order, like the seed's LoRALayer",
        )
        return
    if not isinstance(layer, nn.Module):
        result.fail(
            f"the instance is a {type(layer).__name__}, not an nn.Module",
            "subclass nn.Module and call super().__init__() first",
        )
        return
    factors = _factor_parameters(result, layer)
    if factors is None:
        return
    A, B = factors
    if not _check_factor_shapes(result, A, B, d_in, d_out, rank):
        result.fail(
            "forward not checked: fix the shapes of lora_A and lora_B first",
            "the forward's expected value (α/r)·x Aᵀ Bᵀ needs A (rank, in) and B (out, rank)",
        )
        return
    _check_init(result, A, B)

    _randomise([A, B], generator)
    x = torch.randn(_TOKENS, d_in, generator=generator)
    square = _square_layer_diagnosis(cls, d_in + d_out, rank, alpha)
    try:
        y = layer(x)
    except Exception as error:
        problem = f"forward on a ({_TOKENS}, {d_in}) input {_describe_error(error)}"
        if square is not None and "x·ΔW instead" in square[0]:
            # The shape error is the symptom; the square layer, where the mistake type-checks, names it.
            mistake = square[0].removeprefix("the adapter ")
            result.fail(f"{problem}; on a square layer, where it type-checks, it {mistake}", square[1])
        else:
            result.fail(problem, "compute (x @ self.lora_A.T) @ self.lora_B.T * self.scaling")
        return
    if not isinstance(y, torch.Tensor) or y.shape != (_TOKENS, d_out):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        result.fail(
            f"forward on a ({_TOKENS}, {d_in}) input returned {shape}, expected ({_TOKENS}, {d_out})",
            "the adapter maps in_features to out_features: (x Aᵀ) Bᵀ",
        )
        return
    with torch.no_grad():
        diagnosis = _diagnose_adapter(y.detach(), x, A.detach(), B.detach(), rank, alpha, torch.zeros_like(y))
    if diagnosis is None:
        result.ok(f"forward(x) = (α/r)·x Aᵀ Bᵀ for random A and B, shape ({_TOKENS}, {d_out})")
    else:
        result.fail(*diagnosis)
        return
    if square is None:
        result.ok("forward is right for a square layer too (x·ΔWᵀ, not x·ΔW)")
    else:
        result.fail(*square)

    x3 = torch.randn(2, _TOKENS, d_in, generator=generator)
    try:
        with torch.no_grad():
            y3 = layer(x3)
        expected3 = _adapter_output(x3, A.detach(), B.detach(), alpha / rank)
        if _close(y3, expected3):
            result.ok(f"a 3-D input (batch, seq, in) = {tuple(x3.shape)} gives {tuple(y3.shape)}")
        else:
            shape = tuple(y3.shape) if isinstance(y3, torch.Tensor) else type(y3).__name__
            result.fail(
                f"a 3-D input {tuple(x3.shape)} gives {shape} with other values than row by row",
                "use @ (torch.matmul), which broadcasts over leading dimensions, and transpose only "
                "the 2-D factors (.T on A and B, not on x)",
            )
    except Exception as error:
        result.fail(
            f"a 3-D input (batch, seq, in) = {tuple(x3.shape)} {_describe_error(error)}",
            "use @ (torch.matmul), which broadcasts over leading dimensions, not torch.mm",
        )

    A.grad = B.grad = None
    try:
        layer(x).sum().backward()
        missing = [n for n, p in (("lora_A", A), ("lora_B", B)) if p.grad is None or torch.count_nonzero(p.grad) == 0]
    except Exception as error:
        missing = [f"any factor (backward {_describe_error(error)})"]
    if missing:
        result.fail(
            f"no gradient reaches {' and '.join(missing)} (random A and B, loss = output.sum())",
            "use the parameters themselves in forward: not .data, .detach(), a copy, or torch.no_grad()",
        )
    else:
        result.ok("gradients reach lora_A and lora_B")

    flops = _forward_flops(layer, x)
    factorised = 2 * _TOKENS * rank * (d_in + d_out)  # (x Aᵀ): 2·N·r·in, then (·) Bᵀ: 2·N·r·out
    if flops is not None and flops <= factorised:
        result.ok(f"forward is factorised: {flops} FLOPs for {_TOKENS} tokens = 2·N·r·(in + out), ΔW never built")
    elif flops is not None:
        result.fail(
            f"forward costs {flops} FLOPs for {_TOKENS} tokens, more than the factorised 2·N·r·(in + out) = "
            f"{factorised}: it builds ΔW = B·A ({d_out}×{d_in}), and under autograd every backward then computes a "
            "full out×in weight gradient — the cost LoRA exists to avoid",
            "compute (x @ self.lora_A.T) @ self.lora_B.T: two thin products, no out×in matrix",
        )


# --- the wrapped linear layer -----------------------------------------------------------------


def _seeded_linear(d_in: int, d_out: int, generator: torch.Generator) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    _randomise([layer.weight, layer.bias], generator)
    return layer


def check_lora_linear(
    cls: Callable[..., nn.Module],
    in_features: int = _IN,
    out_features: int = _OUT,
    rank: int = _RANK,
    alpha: float = _ALPHA,
) -> CheckResult:
    """Check a wrapper built as ``cls(linear, rank=rank, alpha=alpha)`` with the seed's
    attributes ``original_layer`` (the very layer passed in) and ``lora`` (holding ``lora_A``,
    ``lora_B``).

    Properties: the base layer is kept, frozen and unchanged; the adapter is trainable and holds
    exactly ``r·(in + out)`` parameters; at init the output equals the base layer's; with random
    A and B it equals ``base(x) + (α/r)·x Aᵀ Bᵀ`` (a missing base or adapter is named); 3-D
    inputs work; after backward only A and B have gradients.
    """
    title = f"check_lora_linear({getattr(cls, '__name__', repr(cls))})"
    return _run_check(title, _check_lora_linear, cls, in_features, out_features, rank, alpha)


def _check_lora_linear(result, cls, d_in, d_out, rank, alpha, generator) -> None:
    base = _seeded_linear(d_in, d_out, generator)
    weight0, bias0 = base.weight.detach().clone(), base.bias.detach().clone()
    x = torch.randn(_TOKENS, d_in, generator=generator)
    with torch.no_grad():
        base_y = base(x)
    try:
        module = cls(base, rank=rank, alpha=alpha)
    except Exception as error:
        result.fail(
            f"{getattr(cls, '__name__', 'cls')}(linear, rank={rank}, alpha={alpha:g}) {_describe_error(error)}",
            "the constructor takes (original_layer, rank=4, alpha=1.0), like the seed's LoRALinear",
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
            "for p in self.original_layer.parameters(): p.requires_grad = False",
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
    try:
        with torch.no_grad():
            y0 = module(x)
    except Exception as error:
        result.fail(
            f"forward on a ({_TOKENS}, {d_in}) input {_describe_error(error)}",
            "return self.original_layer(x) + self.lora(x)",
        )
        return
    if _close(y0, base_y, tol=1e-6):
        result.ok("at init (B = 0) the output equals the base layer's: the model starts unchanged")
    else:
        result.fail(
            "at init the output differs from the base layer's, although B = 0 should make ΔW = 0",
            "return self.original_layer(x) + self.lora(x), and start lora_B at zero",
        )

    _randomise([A, B], generator)
    with torch.no_grad():
        y = module(x)
        adapter = _adapter_output(x, A, B, alpha / rank)
    if _close(y, base_y, tol=1e-6):
        result.fail(
            "with random A and B the output still equals the base layer's: the adapter never runs",
            "return self.original_layer(x) + self.lora(x)",
        )
    elif _close(y, adapter):
        result.fail(
            "the output is the adapter's alone: the frozen base layer's output is missing",
            "return self.original_layer(x) + self.lora(x): LoRA adds ΔW x to W x",
        )
    else:
        diagnosis = _diagnose_adapter(y, x, A.detach(), B.detach(), rank, alpha, base_y)
        if diagnosis is None:
            result.ok("forward(x) = original_layer(x) + (α/r)·x Aᵀ Bᵀ for random A and B")
        else:
            result.fail(*diagnosis)
    x3 = torch.randn(2, _TOKENS, d_in, generator=generator)
    try:
        with torch.no_grad():
            y3 = module(x3)
        expected3 = base(x3) + _adapter_output(x3, A.detach(), B.detach(), alpha / rank)
        if _close(y3, expected3):
            result.ok(f"a 3-D input {tuple(x3.shape)} gives {tuple(y3.shape)}")
        else:
            result.fail(
                f"a 3-D input {tuple(x3.shape)} gives other values than row by row",
                "use @ (torch.matmul) and transpose only the 2-D factors",
            )
    except Exception as error:
        result.fail(
            f"a 3-D input {tuple(x3.shape)} {_describe_error(error)}",
            "use @ (torch.matmul), which broadcasts over leading dimensions",
        )
    for param in module.parameters():
        param.grad = None
    try:
        module(x.clone().requires_grad_(True)).sum().backward()
    except Exception as error:
        result.fail(f"backward {_describe_error(error)}", "use the parameters themselves in forward")
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


# --- truncated SVD ----------------------------------------------------------------------------


def _svd_candidates(M: torch.Tensor, r: int) -> list[tuple[torch.Tensor, str, str]]:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return [
        (
            U[:, :r] @ Vh[:r],
            "the singular values are missing: U_r V_rᵀ without Σ_r",
            "multiply by the singular values: U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]",
        ),
        (
            U[:, -r:] * S[-r:] @ Vh[-r:],
            "it keeps the r SMALLEST singular values",
            "torch.linalg.svd returns them in descending order: keep the first r (U[:, :r], S[:r], Vh[:r])",
        ),
        (
            U[:, :r] * S[:r] @ Vh[:, :r].T if Vh.shape[1] >= r else M,
            "it takes columns of Vh instead of rows",
            "torch.linalg.svd returns Vh = Vᵀ: its ROWS are the right singular vectors, so take Vh[:r]",
        ),
    ]


def check_truncated_svd(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> CheckResult:
    """Check ``fn(M, r)``, the best rank-``r`` approximation of ``M`` by truncated SVD.

    Properties, on seeded tall and wide float64 matrices and several ``r``: the result has M's
    shape; its rank is exactly ``r`` (an off-by-one is named); its error obeys Eckart–Young,
    ``‖M − M_r‖_F² = Σ_{i>r} σ_i²`` (forgetting Σ, keeping the smallest values, or confusing V
    and Vᵀ are named); ``r = min(d, k)`` gives M back; and the input is left unchanged.
    """
    return _run_check(f"check_truncated_svd({getattr(fn, '__name__', 'fn')})", _check_truncated_svd, fn)


def _truncated_svd_case(result: CheckResult, fn, M: torch.Tensor, r: int) -> bool:
    """Check ``fn(M, r)`` for one matrix; report the first failure and return False, or True."""
    given, shape = M.clone(), tuple(M.shape)
    try:
        value = fn(given, r)
    except Exception as error:
        result.fail(
            f"fn(M, {r}) for a {shape} matrix {_describe_error(error)}",
            "U, S, Vh = torch.linalg.svd(M, full_matrices=False); return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]",
        )
        return False
    approx = _as_tensor(value)
    if approx is None or tuple(approx.shape) != shape:
        got = tuple(approx.shape) if approx is not None else type(value).__name__
        result.fail(
            f"fn(M, {r}) for a {shape} matrix returned {got}, expected a {shape} tensor",
            "return the approximation itself (same shape as M), not its factors; Vh's ROWS are the right "
            "singular vectors (Vh[:r])",
        )
        return False
    if not torch.equal(given, M):
        result.fail("fn modified its input M in place", "work on the SVD's outputs; leave M as it is")
        return False
    approx = approx.to(torch.float64)
    got = int(torch.linalg.matrix_rank(approx).item())
    if got != r:
        off = {r + 1: " (one too many: keep indices 0..r-1, i.e. [:r])", r - 1: " (one too few)"}.get(got, "")
        result.fail(
            f"fn(M, {r}) for a {shape} matrix has rank {got}, expected {r}{off}",
            "keep exactly r singular triplets: U[:, :r], S[:r], Vh[:r]",
        )
        return False
    S = torch.linalg.svdvals(M)
    best = (S[r:] ** 2).sum()
    error = ((M - approx) ** 2).sum()
    if torch.isclose(error, best, rtol=1e-6, atol=1e-9):
        return True
    for candidate, problem, hint in _svd_candidates(M, r):
        if _close(approx, candidate, tol=1e-8):
            result.fail(f"fn(M, {r}) is rank {r} but not the best: {problem}", hint)
            return False
    result.fail(
        f"fn(M, {r}) has ‖M − M_r‖_F² = {error.item():.4g}, but the best rank-{r} approximation "
        f"has Σ_{{i>r}} σ_i² = {best.item():.4g} (Eckart–Young)",
        "keep the r LARGEST singular values and their vectors: U[:, :r] @ diag(S[:r]) @ Vh[:r]",
    )
    return False


def _check_truncated_svd(result, fn, generator) -> None:
    tall = torch.randn(20, 12, generator=generator, dtype=torch.float64)
    wide = torch.randn(9, 15, generator=generator, dtype=torch.float64)
    # Case by case, each property in turn, stopping at the first failure: the tall cases come
    # first, so a value mistake is named there before a wide matrix turns it into a shape error.
    for M, r in [(tall, 1), (tall, 3), (tall, 7), (wide, 2), (wide, 5)]:
        if not _truncated_svd_case(result, fn, M, r):
            return
    result.ok("returns a matrix of M's shape, for tall (20×12) and wide (9×15) M; M left unchanged")
    result.ok("the result has rank exactly r (r = 1, 3, 7 and 2, 5)")
    result.ok("‖M − M_r‖_F² = Σ_{i>r} σ_i²: the best rank-r approximation (Eckart–Young)")

    full = 12
    try:
        restored = _as_tensor(fn(tall.clone(), full))
        exact = restored is not None and _close(restored.to(torch.float64), tall, tol=1e-8)
    except Exception as error:
        result.fail(f"fn(M, {full}) (full rank) {_describe_error(error)}", "r = min(d, k) keeps every singular value")
        return
    if exact:
        result.ok("r = min(d, k) gives M back")
    else:
        result.fail(f"fn(M, {full}) for a 20×12 M does not give M back", "r = min(d, k) keeps every singular value")


# --- parameter counts -------------------------------------------------------------------------

_COUNT_CASES = ((768, 768, 4), (4096, 11008, 8), (10, 6, 2), (12288, 12288, 1))


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_parameter_count(fn: Callable[[int, int, int], int]) -> CheckResult:
    """Check ``fn(d, k, r)``: the trainable parameters of a rank-``r`` LoRA on a ``d × k`` weight,
    ``r·(d + k)`` (B is d×r, A is r×k). Typical mistakes are named: the full ``d·k``, ``r·d·k``,
    a square-only ``2·r·d``, or counting a bias."""
    result = CheckResult(f"check_parameter_count({getattr(fn, '__name__', 'fn')})")
    for d, k, r in _COUNT_CASES:
        try:
            got = fn(d, k, r)
        except Exception as error:
            result.fail(f"fn({d}, {k}, {r}) {_describe_error(error)}", "B is d×r and A is r×k: count their entries")
            break
        expected = r * (d + k)
        if _is_number(got) and got == expected:
            continue
        mistakes = {
            d * k: "that is d·k, the full weight matrix's count",
            r * d * k: "r·d·k counts a full matrix per rank; the factors have r·d and r·k entries",
            2 * r * d: "2·r·d assumes a square matrix (d = k)",
            2 * r * k: "2·r·k assumes a square matrix (d = k)",
            expected + d: "that counts a bias of size d as well; LoRA trains only A and B",
        }
        problem = mistakes.get(got, "") if _is_number(got) else f"returned a {type(got).__name__}, not a number"
        problem = f": {problem}" if problem else ""
        result.fail(
            f"fn({d}, {k}, {r}) = {got!r}, expected r·(d + k) = {expected}{problem}",
            "B ∈ R^(d×r) has d·r entries and A ∈ R^(r×k) has r·k: together r·(d + k)",
        )
        break
    else:
        result.ok("fn(d, k, r) = r·(d + k) for " + ", ".join(f"({d}, {k}, {r})" for d, k, r in _COUNT_CASES))
        if all(isinstance(fn(d, k, r), Integral) for d, k, r in _COUNT_CASES):
            result.ok("returns an int")
        else:
            result.fail("returns a float; a parameter count is an int", "use integer arithmetic (no /)")
    print(result.report())
    return result


def check_compression_ratio(fn: Callable[[int, int, int], float]) -> CheckResult:
    """Check ``fn(d, k, r)``: how many times fewer parameters LoRA trains than full fine-tuning
    of a ``d × k`` weight, ``d·k / (r·(d + k))``. The inverse and floor division are named."""
    result = CheckResult(f"check_compression_ratio({getattr(fn, '__name__', 'fn')})")
    for d, k, r in _COUNT_CASES:
        try:
            got = fn(d, k, r)
        except Exception as error:
            result.fail(f"fn({d}, {k}, {r}) {_describe_error(error)}", "divide the full count d·k by LoRA's r·(d + k)")
            break
        expected = d * k / (r * (d + k))
        if _is_number(got) and math.isclose(got, expected, rel_tol=1e-9):
            continue
        problem = ""
        if _is_number(got) and got != 0 and math.isclose(got, 1 / expected, rel_tol=1e-9):
            problem = ": that is the inverse, LoRA's count over the full count"
        elif _is_number(got) and got == d * k // (r * (d + k)):
            problem = ": floor division (//) drops the fraction"
        result.fail(
            f"fn({d}, {k}, {r}) = {got!r}, expected d·k / (r·(d + k)) = {_fmt(expected)}{problem}",
            "full fine-tuning trains d·k parameters, LoRA r·(d + k): return d * k / (r * (d + k))",
        )
        break
    else:
        result.ok("fn(d, k, r) = d·k / (r·(d + k)) for " + ", ".join(f"({d}, {k}, {r})" for d, k, r in _COUNT_CASES))
    print(result.report())
    return result


def _lora_count_models() -> list[tuple[str, nn.Module]]:
    from .model import GPT, GPTConfig  # deferred: lora_lab.model imports the layers

    nested = nn.Sequential(
        nn.Linear(10, 20), nn.ReLU(), nn.Sequential(nn.Linear(20, 20, bias=False), nn.GELU(), nn.Linear(20, 5))
    )
    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16))
    return [("a nested nn.Sequential MLP", nested), ("a 2-layer GPT", gpt)]


def check_model_lora_count(fn: Callable[[nn.Module, int], int]) -> CheckResult:
    """Check ``fn(model, rank)``: the number of parameters ``apply_lora_to_model(model, rank)``
    will train, predicted from the base model without adapting it — ``Σ r·(in + out)`` over its
    ``nn.Linear`` layers. Compared with lora_lab's count on a nested MLP and a small GPT; counting
    every parameter, full ``in·out`` matrices, biases, or only the top-level children is named,
    and so is changing the model."""
    return _run_check(f"check_model_lora_count({getattr(fn, '__name__', 'fn')})", _check_lora_counts, fn)


def _check_lora_counts(result: CheckResult, fn: Callable[[nn.Module, int], int], _generator) -> None:
    # No tensors of its own: the models, the student's fn and apply_lora_to_model's fresh adapters
    # draw from the global generator, which _run_check seeds and restores.
    from .inject import apply_lora_to_model, count_parameters, lora_modules

    for label, model in _lora_count_models():
        flags = [p.requires_grad for p in model.parameters()]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        for rank in (1, 4):
            try:
                got = fn(model, rank)
            except Exception as error:
                result.fail(
                    f"fn({label}, {rank}) {_describe_error(error)}",
                    "loop over model.modules(), keep the nn.Linear ones, add rank·(in + out) for each",
                )
                break
            expected = count_parameters(apply_lora_to_model(model, rank=rank))[0]
            if _is_number(got) and got == expected:
                continue
            mistakes = {
                sum(p.numel() for p in model.parameters()): "that is every parameter of the model",
                sum(m.in_features * m.out_features for m in linears): "that counts the full in·out weights",
                rank * sum(m.in_features * m.out_features for m in linears): "that counts r·in·out per layer",
                expected + sum(m.bias.numel() for m in linears if m.bias is not None): "that adds the biases; "
                "apply_lora_to_model freezes them",
                rank
                * sum(
                    m.in_features + m.out_features for m in model.children() if isinstance(m, nn.Linear)
                ): "that counts only the top-level nn.Linear children; nested layers count too (use .modules())",
            }
            problem = mistakes.get(got, "") if _is_number(got) else f"returned a {type(got).__name__}"
            problem = f": {problem}" if problem else ""
            result.fail(
                f"fn({label}, rank={rank}) = {got!r}, expected {expected}{problem}",
                "sum rank * (m.in_features + m.out_features) over every nn.Linear in model.modules()",
            )
            break
        else:
            changed = (
                [p.requires_grad for p in model.parameters()] != flags
                or lora_modules(model)
                or model.state_dict().keys() != state.keys()
                or any(not torch.equal(v, state[k]) for k, v in model.state_dict().items())
            )
            if changed:
                result.fail(
                    f"fn changed {label} (its weights, requires_grad flags or layers)",
                    "only read the model: the count follows from the nn.Linear shapes",
                )
            else:
                result.ok(f"{label}: matches count_parameters(apply_lora_to_model(model, r))[0] for r = 1 and 4")
            continue
        break
