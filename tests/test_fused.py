"""Tests for lora_lab.lora.fused: FusedLoRALinear, the fast path of LoRALinear.

The fast path must compute exactly what the plain readable path computes —
``original_layer(x) + lora(x)`` — forward and backward, in every case it takes: both graphs of
the per-shape choice (merged weight W + s·B·A, or factorised), 2-D and batched inputs, with
and without bias, with dropout (same random state → same mask), with W/b unfrozen, without
autograd (inference), in float32 (allclose) and float64 (gradcheck, double backward included),
and inside a whole GPT training step. It must also cost what it claims: no gradient product
for the frozen weight, counted in FLOPs.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from lora_lab import apply_lora_to_model, disable_lora, lora_modules
from lora_lab.lora.fused import (
    FACTORISED_CALL_OVERHEAD,
    MERGED_WEIGHT_CROSSOVER,
    STRATEGIES,
    FusedLoRALinear,
    choose_merged_weight,
    lora_linear,
)
from lora_lab.lora.layers import LoRALinear
from lora_lab.seeding import make_generator, seed_everything

FORCED = ("merged", "factorised")  # the two graphs "auto" chooses between
# float32 tolerance: the merged graph rounds x·(W + s·B·A)ᵀ, the plain one x·Wᵀ + s·(x·Aᵀ)·Bᵀ;
# with these O(1) inputs the two differ by a few float32 ulps of the output.
TOL = {"rtol": 1e-5, "atol": 2e-5}


@pytest.fixture(autouse=True)
def _seeded() -> None:
    seed_everything(1234, deterministic=False)  # do not flip the process-wide determinism switch


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=make_generator(seed), dtype=dtype).requires_grad_(grad)


def _tensors(d_in=11, d_out=7, rank=3, bias=True, dtype=torch.float32):
    """Frozen W (and b) and trainable A, B with non-zero values (B = 0 would hide most bugs)."""
    w = _randn(d_out, d_in, seed=1, dtype=dtype)
    b = _randn(d_out, seed=2, dtype=dtype) if bias else None
    a = _randn(rank, d_in, seed=3, dtype=dtype, grad=True)
    bb = _randn(d_out, rank, seed=4, dtype=dtype, grad=True)
    return w, b, a, bb


def _plain(x, w, b, a, bb, scaling, x_lora=None):
    """The readable path, spelled as the plain LoRALinear computes it."""
    return F.linear(x, w, b) + ((x if x_lora is None else x_lora) @ a.t() * scaling) @ bb.t()


def _grads(out: torch.Tensor, tensors: list[torch.Tensor], seed: int = 9) -> list[torch.Tensor | None]:
    upstream = torch.randn(out.shape, generator=make_generator(seed), dtype=out.dtype)
    for t in tensors:
        t.grad = None
    out.backward(upstream)
    return [t.grad for t in tensors]


# --------------------------------------------------------------------------- the function


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(9,), (2, 5), (2, 3, 4), ()], ids=["2d", "3d", "4d", "1d"])
def test_matches_plain_path_forward_and_all_gradients(strategy: str, bias: bool, batch_shape: tuple) -> None:
    w, b, a, bb = _tensors(bias=bias)
    x = _randn(*batch_shape, 11, seed=5, grad=True)
    fast = lora_linear(x, w, b, a, bb, 0.75, strategy=strategy)
    fast_grads = _grads(fast, [x, a, bb])
    plain = _plain(x, w, b, a, bb, 0.75)
    plain_grads = _grads(plain, [x, a, bb])
    assert fast.shape == plain.shape == (*batch_shape, 7)
    torch.testing.assert_close(fast, plain, **TOL)
    for name, got, expected in zip(("x", "A", "B"), fast_grads, plain_grads, strict=True):
        assert got is not None, f"no gradient for {name}"
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m, n=name: f"gradient of {n}: {m}")


@pytest.mark.parametrize("strategy", FORCED)
@pytest.mark.parametrize("trainable", [("weight", "bias"), ("bias",), ("weight",)])
def test_unfrozen_weight_and_bias_get_their_gradients(strategy: str, trainable: tuple[str, ...]) -> None:
    w, b, a, bb = _tensors()
    w.requires_grad_("weight" in trainable)
    b.requires_grad_("bias" in trainable)
    x = _randn(3, 4, 11, seed=5, grad=True)
    fast_grads = _grads(lora_linear(x, w, b, a, bb, 2.0, strategy=strategy), [x, w, b, a, bb])
    plain_grads = _grads(_plain(x, w, b, a, bb, 2.0), [x, w, b, a, bb])
    for name, got, expected in zip(("x", "W", "b", "A", "B"), fast_grads, plain_grads, strict=True):
        if expected is None:
            assert got is None, f"{name} is frozen but received a gradient"
        else:
            torch.testing.assert_close(got, expected, **TOL, msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_input_without_grad_gets_none_and_adapter_still_trains() -> None:
    # The first layer of a frozen network: x does not require grad, so dx is skipped.
    w, b, a, bb = _tensors()
    x = _randn(6, 11, seed=5)
    lora_linear(x, w, b, a, bb, 1.0).sum().backward()
    assert x.grad is None and a.grad is not None and bb.grad is not None


def test_dropout_input_same_mask_same_gradients() -> None:
    # Dropout's output is passed as x_lora: autograd's dropout node keeps the mask.
    w, b, a, bb = _tensors()
    x = _randn(4, 6, 11, seed=5, grad=True)
    torch.manual_seed(7)
    fast = lora_linear(x, w, b, a, bb, 0.5, F.dropout(x, 0.4, training=True))
    fast_grads = _grads(fast, [x, a, bb])
    torch.manual_seed(7)
    plain = _plain(x, w, b, a, bb, 0.5, F.dropout(x, 0.4, training=True))
    plain_grads = _grads(plain, [x, a, bb])
    torch.testing.assert_close(fast, plain, **TOL)
    for got, expected in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, **TOL)
    assert not torch.allclose(fast, _plain(x, w, b, a, bb, 0.5))  # the mask did something


# (the merged graph with dropout is refused: tested below)
@pytest.mark.parametrize(("strategy", "with_dropout"), [("merged", False), ("factorised", False), ("factorised", True)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(strategy: str, bias: bool, with_dropout: bool) -> None:
    w, b, a, bb = _tensors(d_in=5, d_out=4, rank=2, bias=bias, dtype=torch.float64)
    w.requires_grad_()  # check W's and b's gradients too, as if the user had unfrozen them
    if b is not None:
        b.requires_grad_()
    x = _randn(2, 3, 5, seed=5, dtype=torch.float64, grad=True)
    mask = (torch.rand(x.shape, generator=make_generator(6), dtype=torch.float64) > 0.3).double() / 0.7

    def fn(x, w, b, a, bb):
        x_lora = x * mask if with_dropout else None  # dropout with a fixed mask: differentiable in x
        return lora_linear(x, w, b, a, bb, 1.5, x_lora, strategy=strategy)

    inputs = (x, w, b, a, bb)
    assert torch.autograd.gradcheck(fn, inputs)
    # Backward is written with differentiable ops on the saved inputs only, so second
    # derivatives (create_graph=True, e.g. gradient penalties) are right too.
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_merged_graph_with_dropout_is_refused() -> None:
    w, b, a, bb = _tensors()
    x = _randn(4, 11, seed=5)
    with pytest.raises(ValueError, match="strategy='merged' needs the adapter to see the same input"):
        lora_linear(x, w, b, a, bb, 1.0, F.dropout(x, 0.5), strategy="merged")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "fastest"}, "strategy must be one of"),
        ({"x": torch.zeros(3, 10)}, r"x must have shape \(\.\.\., 11\)"),
        ({"a": torch.zeros(3, 10)}, r"lora_A must be \(rank, 11\)"),
        ({"bb": torch.zeros(7, 2)}, r"lora_B \(7, rank\)"),
        ({"x_lora": torch.zeros(3, 4, 11)}, "x_lora must have the shape of x"),
        ({"scaling": float("nan")}, "scaling must be a finite number"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    w, b, a, bb = _tensors()
    args = {"x": torch.zeros(3, 11), "a": a, "bb": bb, "x_lora": None, "scaling": 1.0, "strategy": "auto", **kwargs}
    with pytest.raises(ValueError, match=message):
        lora_linear(args["x"], w, b, args["a"], args["bb"], args["scaling"], args["x_lora"],
                    strategy=args["strategy"])


@pytest.mark.parametrize("strategy", FORCED)
def test_empty_batch_and_non_contiguous_input(strategy: str) -> None:
    w, b, a, bb = _tensors()
    empty = torch.zeros(0, 11, requires_grad=True)
    out = lora_linear(empty, w, b, a, bb, 1.0, strategy=strategy)
    out.sum().backward()
    assert out.shape == (0, 7) and torch.equal(a.grad, torch.zeros_like(a))
    # A transposed (non-contiguous) input and an expanded upstream gradient (from .sum()).
    x = _randn(5, 2, 11, seed=5).transpose(0, 1).requires_grad_()
    fast_grads = _grads_of_sum(lora_linear(x, w, b, a, bb, 1.0, strategy=strategy), [x, a, bb])
    plain_grads = _grads_of_sum(_plain(x, w, b, a, bb, 1.0), [x, a, bb])
    for got, expected in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, **TOL)


def _grads_of_sum(out: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    for t in tensors:
        t.grad = None
    out.sum().backward()
    return [t.grad for t in tensors]


# --------------------------------------------------------------------------- the per-shape choice


class _ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor each ATen op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


# Pairwise-distinct sizes, so a (D_OUT, D_IN) tensor can only be the merged weight; large enough
# that "auto" takes the factorised graph for a few tokens.
D_IN, D_OUT = 190, 230


def _builds_merged_weight(n_tokens: int, strategy: str = "auto", dropout: bool = False) -> bool:
    w, b, a, bb = _tensors(d_in=D_IN, d_out=D_OUT)
    x = _randn(n_tokens, D_IN, seed=5)
    with torch.no_grad(), _ShapeRecorder() as recorder:
        lora_linear(x, w, b, a, bb, 1.0, F.dropout(x, 0.5) if dropout else None, strategy=strategy)
    return (D_OUT, D_IN) in recorder.shapes


def test_auto_picks_the_merged_weight_for_many_tokens_only() -> None:
    # N·(d_in + d_out) + overhead > crossover·d_in·d_out  ⇔  N > 13.01 for 190 → 230.
    threshold = (MERGED_WEIGHT_CROSSOVER * D_IN * D_OUT - FACTORISED_CALL_OVERHEAD) / (D_IN + D_OUT)
    few, many = int(threshold), int(threshold) + 1
    assert few >= 1
    assert not choose_merged_weight(few, D_IN, D_OUT) and choose_merged_weight(many, D_IN, D_OUT)
    assert not _builds_merged_weight(few) and _builds_merged_weight(many)
    assert _builds_merged_weight(1, "merged") and not _builds_merged_weight(500, "factorised")


def test_auto_merges_small_layers_even_for_one_token() -> None:
    # 11 × 7: building W + s·B·A costs less than the factorised branch's extra operator calls.
    assert choose_merged_weight(1, 11, 7)


def test_auto_never_merges_with_dropout() -> None:
    assert not _builds_merged_weight(500, dropout=True)


# --------------------------------------------------------------------------- what it costs


class _MatmulFlops(TorchDispatchMode):
    """Counts 2·m·n·k for every matrix product, in-place ``addmm_`` included (torch's
    FlopCounterMode registers only the out-of-place ops, and the fast path accumulates in place)."""

    OPS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.addmm.default: (1, 2),
           torch.ops.aten.addmm_.default: (1, 2)}

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            i, j = self.OPS[func]
            (m, k), (_, n) = args[i].shape, args[j].shape
            self.flops += 2 * m * n * k
        elif func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten.addmv,
                                     torch.ops.aten.mv, torch.ops.aten.dot):
            raise AssertionError(f"uncounted product {func}: extend _MatmulFlops")
        return func(*args, **(kwargs or {}))


def test_matmul_flop_counter_agrees_with_torch_on_out_of_place_ops() -> None:
    x, w = _randn(6, 5, seed=1), _randn(4, 5, seed=2)
    with _MatmulFlops() as mine, FlopCounterMode(display=False) as torchs:
        F.linear(x, w, torch.zeros(4))
        x @ w.t()
    assert mine.flops == torchs.get_total_flops() == 2 * (2 * 6 * 4 * 5)


@pytest.mark.parametrize("strategy", FORCED)
@pytest.mark.parametrize("weight_trainable", [False, True])
def test_frozen_weight_gradient_is_never_computed(strategy: str, weight_trainable: bool) -> None:
    # Full fine-tuning of a linear layer costs 6·N·d_in·d_out FLOPs (forward, input gradient,
    # weight gradient); with W frozen the weight-gradient product must vanish, leaving 4·N·d_in·d_out
    # plus the adapter's r-wide products — and it must come back if the user unfreezes W.
    n, d_in, d_out, r = 40, 13, 17, 3
    w, b, a, bb = _tensors(d_in=d_in, d_out=d_out, rank=r)
    w.requires_grad_(weight_trainable)
    x = _randn(n, d_in, seed=5, grad=True)
    with _MatmulFlops() as counter:
        lora_linear(x, w, b, a, bb, 1.0, strategy=strategy).sum().backward()
    if strategy == "merged":
        # W_eff = W + s·B·A built twice (forward, input gradient); then A's and B's r-wide products.
        adapter = 2 * (2 * r * d_in * d_out) + 2 * n * r * (2 * d_in + 2 * d_out)
    else:
        # u, dA, u again for dB and dx's adapter share over d_in; y += u·Bᵀ, g·B and dB over d_out.
        adapter = 2 * n * r * (4 * d_in + 3 * d_out)
    weight_gradient = 2 * n * d_in * d_out if weight_trainable else 0
    assert counter.flops == 4 * n * d_in * d_out + adapter + weight_gradient


# --------------------------------------------------------------------------- LoRALinear wiring


def _layer_pair(
    bias: bool = True, dropout: float = 0.0, dtype=torch.float32, d_in: int = 11, d_out: int = 7
) -> tuple[FusedLoRALinear, LoRALinear]:
    """A FusedLoRALinear and a plain LoRALinear holding the very same weights and adapter."""
    base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    plain_base = copy.deepcopy(base)
    fast = FusedLoRALinear(base, rank=3, alpha=6.0, dropout=dropout)
    with torch.no_grad():
        fast.lora.lora_B.copy_(_randn(d_out, 3, seed=4, dtype=dtype))
    plain = LoRALinear(plain_base, rank=3, alpha=6.0, dropout=dropout)
    plain.load_state_dict(fast.state_dict())
    assert type(fast) is FusedLoRALinear and type(plain) is LoRALinear
    return fast, plain


def test_apply_lora_builds_fused_layers_by_default_plain_ones_on_request() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    fused = apply_lora_to_model(model)
    assert [type(m) for m in lora_modules(fused).values()] == [FusedLoRALinear, FusedLoRALinear]
    plain = apply_lora_to_model(model, fused=False)  # exactly the readable layer, not the subclass
    assert [type(m) for m in lora_modules(plain).values()] == [LoRALinear, LoRALinear]
    assert issubclass(FusedLoRALinear, LoRALinear)  # so lora_modules, merge, adapters see both alike
    for flag in (1, 0, "no", None):
        with pytest.raises(TypeError, match="fused must be True or False"):
            apply_lora_to_model(model, fused=flag)
    assert not lora_modules(model)  # the original is never adapted, refused or not
    # The layers themselves have no flag: the class is the choice.
    assert not hasattr(LoRALinear(nn.Linear(4, 3)), "fused")
    with pytest.raises(TypeError, match="fused"):
        LoRALinear(nn.Linear(4, 3), fused=True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(6,), (2, 9)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_linear_fast_path_matches_plain_path(bias: bool, batch_shape: tuple, dtype: torch.dtype) -> None:
    fast, plain = _layer_pair(bias=bias, dtype=dtype)
    x = _randn(*batch_shape, 11, seed=5, dtype=dtype)
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fast, out_plain = fast(xf), plain(xp)
    assert type(out_fast.grad_fn).__name__ == "_LoRALinearFunctionBackward"  # the fast path ran
    assert type(out_plain.grad_fn).__name__ == "AddBackward0"  # original_layer(x) + lora(x)
    torch.testing.assert_close(out_fast, out_plain, **TOL)
    upstream = _randn(*out_fast.shape, seed=8, dtype=dtype)
    out_fast.backward(upstream)
    out_plain.backward(upstream)
    torch.testing.assert_close(xf.grad, xp.grad, **TOL)
    torch.testing.assert_close(fast.lora.lora_A.grad, plain.lora.lora_A.grad, **TOL)
    torch.testing.assert_close(fast.lora.lora_B.grad, plain.lora.lora_B.grad, **TOL)
    assert fast.original_layer.weight.grad is None  # frozen


def test_lora_linear_dropout_same_seed_same_mask() -> None:
    fast, plain = _layer_pair(dropout=0.3)
    fast.train()
    plain.train()
    x = _randn(4, 5, 11, seed=5)
    torch.manual_seed(11)
    out_fast = fast(x)
    torch.manual_seed(11)
    out_plain = plain(x)
    torch.testing.assert_close(out_fast, out_plain, **TOL)
    out_fast.square().sum().backward()
    out_plain.square().sum().backward()
    torch.testing.assert_close(fast.lora.lora_A.grad, plain.lora.lora_A.grad, **TOL)
    torch.testing.assert_close(fast.lora.lora_B.grad, plain.lora.lora_B.grad, **TOL)
    # In eval, dropout is off: the adapter sees x and the output is the dropout-free one.
    torch.testing.assert_close(fast.eval()(x), plain.eval()(x), **TOL)
    assert not torch.allclose(out_fast, fast(x))


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "frozen"])
@pytest.mark.parametrize("n_tokens", [1, 150], ids=["factorised", "merged"])  # what "auto" picks for 190 → 230
def test_inference_matches_and_builds_no_graph(context: str, n_tokens: int) -> None:
    assert choose_merged_weight(n_tokens, D_IN, D_OUT) == (n_tokens == 150)
    fast, plain = _layer_pair(d_in=D_IN, d_out=D_OUT)
    x = _randn(n_tokens, D_IN, seed=5)
    if context == "frozen":  # grad mode on, but nothing requires grad
        fast.requires_grad_(False)
        out = fast(x)
    else:
        with getattr(torch, context)():
            out = fast(x)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, plain(x).detach(), **TOL)


def test_merged_and_disabled_layers_run_the_base_layer_only() -> None:
    fast, plain = _layer_pair()
    x = _randn(5, 11, seed=5)
    expected = plain(x)
    fast.merge()
    torch.testing.assert_close(fast(x), expected, **TOL)
    assert type(fast(x).grad_fn).__name__ != "_LoRALinearFunctionBackward"
    fast.unmerge()
    base_only = fast.original_layer(x)
    wrapper = nn.Sequential(fast)
    with disable_lora(wrapper):
        assert torch.equal(fast(x), base_only)


def test_hooks_subclasses_and_autocast_take_the_plain_path() -> None:
    fast, plain = _layer_pair()
    x = _randn(5, 11, seed=5, grad=True)
    seen = []
    handle = fast.lora.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    out = fast(x)
    handle.remove()
    assert seen == [(5, 7)], "a forward hook on .lora must still see the adapter run"
    torch.testing.assert_close(out, plain(x), **TOL)

    class DoubledLinear(nn.Linear):  # a subclass that computes something else
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = DoubledLinear(11, 7)
    layer = FusedLoRALinear(doubled)
    torch.testing.assert_close(layer(x), 2 * F.linear(x, doubled.weight, doubled.bias))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_out, plain_out = fast(x), plain(x)
    assert fast_out.dtype == plain_out.dtype == torch.bfloat16
    torch.testing.assert_close(fast_out, plain_out)


def test_mixed_dtypes_behave_as_the_plain_path() -> None:
    fast, plain = _layer_pair()
    x = _randn(5, 11, seed=5, dtype=torch.float64)
    with pytest.raises(RuntimeError) as fast_error:
        fast(x)
    with pytest.raises(RuntimeError) as plain_error:
        plain(x)
    assert str(fast_error.value) == str(plain_error.value)


# --------------------------------------------------------------------------- a whole GPT step


@pytest.mark.skipif(importlib.util.find_spec("lora_lab.model") is None, reason="lora_lab.model not present")
@pytest.mark.parametrize("lora_dropout", [0.0, 0.2])
def test_gpt_training_step_fast_equals_plain(lora_dropout: float) -> None:
    from lora_lab.model import GPT, GPTConfig

    config = GPTConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=24)
    base = GPT(config)
    targets = ["q", "k", "v", "o", "up", "down"]
    fast = apply_lora_to_model(base, rank=4, alpha=8.0, target_modules=targets, dropout=lora_dropout)
    with torch.no_grad():  # non-zero adapters (B starts at zero)
        for i, (name, param) in enumerate(fast.named_parameters()):
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=make_generator(i)) * 0.1)
    # The very same weights and adapters, on the plain path.
    plain = apply_lora_to_model(base, rank=4, alpha=8.0, target_modules=targets, dropout=lora_dropout, fused=False)
    plain.load_state_dict(fast.state_dict())
    models = {True: fast, False: plain}
    idx = torch.randint(0, 29, (3, 16), generator=make_generator(1))
    tgt = torch.randint(0, 29, (3, 16), generator=make_generator(2))
    losses, params_after = {}, {}
    for fused, model in models.items():
        modules = lora_modules(model).values()
        assert len(modules) == 6 * config.n_layer
        assert all(type(m) is (FusedLoRALinear if fused else LoRALinear) for m in modules)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        torch.manual_seed(5)  # the same dropout masks in both
        _, loss = model(idx, tgt)
        loss.backward()
        losses[fused] = loss.detach()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        params_after[fused] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        models[fused] = (model, grads)
    torch.testing.assert_close(losses[True], losses[False], **TOL)
    fast_grads, plain_grads = models[True][1], models[False][1]
    assert fast_grads.keys() == plain_grads.keys() and len(fast_grads) == 2 * 6 * config.n_layer
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name in params_after[True]:
        torch.testing.assert_close(params_after[True][name], params_after[False][name], **TOL)
    assert all(p.grad is None for p in models[True][0].parameters() if not p.requires_grad)
