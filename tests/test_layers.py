"""Tests for lora_lab.lora.layers: LoRALayer and LoRALinear (and, where the layer's contract
must hold for both, lora_lab.lora.fused's FusedLoRALinear, the same layer on the fast path).

The course (the original course module) fixed the API these tests hold to:
``LoRALayer(in_features, out_features, rank, alpha)``, ``LoRALinear(original_layer, rank=4,
alpha=1.0)`` with attributes ``original_layer`` and ``lora``, and training with
``AdamW(filter(lambda p: p.requires_grad, ...), lr=1e-3)``. The parameter layout is the
paper's / PEFT's, not the course README's slip: ``lora_A`` is ``(rank, in)``, ``lora_B`` is
``(out, rank)`` and ``ΔW = scaling · B A`` is ``(out, in)``, the shape of the frozen weight.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from lora_lab.lora.fused import FusedLoRALinear
from lora_lab.lora.layers import INIT_METHODS, LoRALayer, LoRALinear
from lora_lab.seeding import make_generator, seed_everything

SEED = 1234

# LoRALinear is the plain readable layer, original_layer(x) + lora(x); FusedLoRALinear (a subclass,
# what apply_lora_to_model builds by default) computes the same function on lora_lab.lora.fused's
# fast path. Every contract of the layer holds for both; the fast path also switches between a
# merged-weight and a factorised graph by token count, so sizes below cover both.
_LAYER_CLASSES = pytest.mark.parametrize("layer_class", [FusedLoRALinear, LoRALinear], ids=["fused", "plain"])


@pytest.fixture(autouse=True)
def _seeded() -> None:
    # Module constructors draw from the global generator; seeding it per test makes every
    # test reproducible on its own. deterministic=False: don't flip the process-wide
    # torch.use_deterministic_algorithms switch under other test files.
    seed_everything(SEED, deterministic=False)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=make_generator(seed), dtype=dtype)


def _linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    """An nn.Linear whose weights come from ``seed`` alone (not from the global generator),
    so a Hypothesis example is reproduced exactly when it is replayed."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's own init range
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=make_generator(seed)) * 2 * bound - bound)
        if bias:
            layer.bias.copy_(torch.rand(out_features, generator=make_generator(seed + 1)) * 2 * bound - bound)
    return layer


def _randomise_adapter(lora: LoRALayer, seed: int = 1) -> None:
    """Give A and B random values (B starts at zero, which would hide most bugs)."""
    with torch.no_grad():
        lora.lora_A.copy_(_randn(*lora.lora_A.shape, seed=seed, dtype=lora.lora_A.dtype))
        lora.lora_B.copy_(_randn(*lora.lora_B.shape, seed=seed + 1, dtype=lora.lora_B.dtype))


def _seed_style_delta(lora: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """The course's forward, translated to the (rank, in) / (out, rank) layout: it builds the
    full ``ΔW`` (out × in) first. Used as a numerical reference and as the control that proves
    the materialisation detectors below can see a materialised ΔW."""
    delta_w = lora.lora_B @ lora.lora_A
    return (x @ delta_w.t()) * lora.scaling


# --------------------------------------------------------------------------- seed contract


def test_seed_lora_layer_positional_signature_and_paper_layout() -> None:
    in_features, out_features, rank, alpha = 16, 32, 4, 1.0
    lora = LoRALayer(in_features, out_features, rank, alpha)  # positional, as the course writes it
    assert lora.lora_A.shape == (rank, in_features)
    assert lora.lora_B.shape == (out_features, rank)
    assert lora.scaling == alpha / rank == 0.25
    assert torch.count_nonzero(lora.lora_B) == 0
    assert torch.count_nonzero(lora.lora_A) > 0
    # ΔW = B·A has the frozen weight's shape (out, in); the course README's A ∈ R^(d×r),
    # B ∈ R^(r×d) would make BA an r×r matrix.
    _randomise_adapter(lora)
    delta = lora.delta_weight()
    assert delta.shape == (out_features, in_features) == nn.Linear(in_features, out_features).weight.shape
    torch.testing.assert_close(delta, lora.scaling * lora.lora_B @ lora.lora_A)


def test_seed_defaults_are_rank_4_alpha_1() -> None:
    lora = LoRALayer(8, 8)
    assert (lora.rank, lora.alpha, lora.scaling, lora.init) == (4, 1.0, 0.25, "kaiming")
    layer = LoRALinear(nn.Linear(8, 8))
    assert (layer.lora.rank, layer.lora.alpha) == (4, 1.0)


@pytest.mark.parametrize(
    ("rank", "alpha", "use_rslora", "expected"),
    [
        (4, 1.0, False, 0.25),
        (8, 16.0, False, 2.0),
        (1, 0.5, False, 0.5),
        (16, 16.0, True, 4.0),  # rsLoRA: α / √r
        (4, 1.0, True, 0.5),
        (9, 6, True, 2.0),  # an int alpha is accepted
    ],
)
def test_scaling_is_alpha_over_rank_or_sqrt_rank(rank: int, alpha: float, use_rslora: bool, expected: float) -> None:
    lora = LoRALayer(8, 8, rank, alpha, use_rslora=use_rslora)
    assert lora.scaling == pytest.approx(expected, rel=1e-12)
    expected_formula = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    assert lora.scaling == pytest.approx(expected_formula, rel=1e-12)
    # The scaling is what forward actually applies.
    _randomise_adapter(lora)
    x = _randn(3, 8, seed=7)
    torch.testing.assert_close(lora(x), expected * (x @ lora.lora_A.t() @ lora.lora_B.t()))


@_LAYER_CLASSES
def test_seed_lora_linear_contract(layer_class: type[LoRALinear]) -> None:
    base = nn.Linear(16, 32)
    layer = layer_class(base, rank=4, alpha=1.0)  # the course's call
    assert layer.original_layer is base  # wrapped in place, not copied
    assert isinstance(layer.lora, LoRALayer)
    assert (layer.lora.in_features, layer.lora.out_features, layer.lora.rank) == (16, 32, 4)
    assert layer.lora.scaling == 0.25
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora.lora_A.requires_grad and layer.lora.lora_B.requires_grad
    assert (layer.in_features, layer.out_features) == (16, 32)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.merged is False
    # Positional rank/alpha work too.
    positional = layer_class(nn.Linear(16, 32), 8, 2.0)
    assert (positional.lora.rank, positional.lora.scaling) == (8, 0.25)


@_LAYER_CLASSES
def test_lora_linear_follows_base_dtype(layer_class: type[LoRALinear]) -> None:
    layer = layer_class(nn.Linear(6, 5, dtype=torch.float64), rank=2)
    assert layer.lora.lora_A.dtype == torch.float64 and layer.lora.lora_B.dtype == torch.float64
    out = layer(_randn(3, 6, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_lora_layer_factory_kwargs() -> None:
    lora = LoRALayer(6, 5, 2, 1.0, dtype=torch.float64, device="cpu")
    assert lora.lora_A.dtype == lora.lora_B.dtype == torch.float64
    assert lora.lora_A.device.type == "cpu"


# --------------------------------------------------------------------------- initialisation


def test_init_methods_constant() -> None:
    assert INIT_METHODS == ("kaiming", "gaussian", "course")


def test_kaiming_init_is_uniform_with_fan_in_bound() -> None:
    # kaiming_uniform_(a=√5) on A (rank, in) has bound √(6 / ((1 + a²) · fan_in)) = 1/√in,
    # the bound nn.Linear uses for its own weight (and PEFT/loralib for lora_A).
    in_features, rank = 256, 16
    lora = LoRALayer(in_features, 8, rank, 1.0)
    a = lora.lora_A.detach()
    bound = 1.0 / math.sqrt(in_features)
    assert a.abs().max() <= bound
    # 4096 uniform draws: the largest |a| lies within 1% of the bound unless the distribution
    # is narrower than claimed (a correct init fails this with probability 0.99^4096 ≈ 1e-18;
    # the seed is fixed anyway, so the test is deterministic).
    assert a.abs().max() > 0.99 * bound
    # Uniform on [-b, b] has std b/√3; 4096 draws estimate it to ~1.1%.
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(lora.lora_B) == 0


@pytest.mark.parametrize(
    ("init", "rank", "expected_std"), [("gaussian", 4, 0.25), ("course", 4, 0.01), ("course", 2, 0.01)]
)
def test_gaussian_inits_have_the_documented_std(init: str, rank: int, expected_std: float) -> None:
    # "gaussian" is PEFT's N(0, std=1/r); "course" is the course module's randn·0.01.
    in_features = 4096 // rank  # 4096 draws: std estimated to ≈ 1/√(2·4096) ≈ 1.1%
    lora = LoRALayer(in_features, 8, rank, 1.0, init=init)
    a = lora.lora_A.detach().double()
    n = a.numel()
    assert a.std().item() == pytest.approx(expected_std, rel=0.05)
    assert abs(a.mean().item()) < 5 * expected_std / math.sqrt(n)
    # Normal, not uniform: P(|a| < σ) is 0.683 for a normal, 0.577 for a uniform of equal std.
    within_one_sigma = (a.abs() < expected_std).double().mean().item()
    assert within_one_sigma == pytest.approx(0.6827, abs=0.03)
    assert torch.count_nonzero(lora.lora_B) == 0


def test_inits_differ_from_each_other() -> None:
    stds = {init: LoRALayer(1024, 8, 4, 1.0, init=init).lora_A.std().item() for init in INIT_METHODS}
    assert stds["kaiming"] == pytest.approx(1 / math.sqrt(1024) / math.sqrt(3), rel=0.05)
    assert stds["gaussian"] == pytest.approx(0.25, rel=0.05)
    assert stds["course"] == pytest.approx(0.01, rel=0.05)


def test_reset_parameters_zeroes_b_and_redraws_a() -> None:
    lora = LoRALayer(32, 16, 4, 1.0)
    _randomise_adapter(lora)
    a_before = lora.lora_A.detach().clone()
    lora.reset_parameters()
    assert torch.count_nonzero(lora.lora_B) == 0
    assert not torch.equal(lora.lora_A, a_before)
    assert lora.lora_A.abs().max() <= 1 / math.sqrt(32)


# --------------------------------------------------------------------------- zero-init identity


@_LAYER_CLASSES
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(5,), (2, 5), (), (64, 3)], ids=["2d", "3d", "1d", "many-tokens"])
@pytest.mark.parametrize("init", INIT_METHODS)
def test_fresh_lora_linear_equals_base_exactly(
    bias: bool, batch_shape: tuple, init: str, layer_class: type[LoRALinear]
) -> None:
    base = nn.Linear(12, 7, bias=bias)
    reference = copy.deepcopy(base)
    layer = layer_class(base, rank=3, alpha=5.0, init=init)
    x = _randn(*batch_shape, 12, seed=3)
    # B = 0 makes the adapter's output exactly zero, and W x + b + 0 is W x + b bit for bit.
    assert torch.equal(layer(x), reference(x))


@_LAYER_CLASSES
def test_fresh_lora_linear_with_dropout_in_training_equals_base_exactly(layer_class: type[LoRALinear]) -> None:
    base = nn.Linear(12, 7)
    reference = copy.deepcopy(base)
    layer = layer_class(base, rank=3, alpha=5.0, dropout=0.5).train()
    x = _randn(4, 12, seed=3)
    assert torch.equal(layer(x), reference(x))


# --------------------------------------------------------------------------- forward = the math


@pytest.mark.parametrize("batch_shape", [(6,), (2, 3)], ids=["2d", "3d"])
def test_lora_layer_forward_equals_scaled_x_At_Bt(batch_shape: tuple[int, ...]) -> None:
    lora = LoRALayer(10, 6, 3, 7.0)
    _randomise_adapter(lora)
    x = _randn(*batch_shape, 10, seed=5)
    out = lora(x)
    assert out.shape == (*batch_shape, 6)
    # Reference in float64 so the comparison measures only float32 rounding of the layer.
    a, b, x64 = lora.lora_A.double(), lora.lora_B.double(), x.double()
    expected = lora.scaling * x64 @ a.t() @ b.t()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # And it equals the course's materialised formula numerically.
    torch.testing.assert_close(out, _seed_style_delta(lora, x), rtol=1e-5, atol=1e-5)


@_LAYER_CLASSES
@pytest.mark.parametrize("batch_shape", [(2, 4), (64, 3)], ids=["few-tokens", "many-tokens"])
def test_lora_linear_forward_is_base_plus_adapter(layer_class: type[LoRALinear], batch_shape: tuple[int, ...]) -> None:
    base = nn.Linear(10, 6)
    layer = layer_class(base, rank=3, alpha=7.0)
    _randomise_adapter(layer.lora)
    x = _randn(*batch_shape, 10, seed=5)
    expected = F.linear(x.double(), base.weight.double(), base.bias.double()) + layer.lora.scaling * (
        x.double() @ layer.lora.lora_A.double().t() @ layer.lora.lora_B.double().t()
    )
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer(x), base(x))  # the adapter does something


def test_plain_lora_linear_is_exactly_the_readable_formula_and_fused_matches_it() -> None:
    # The lesson's layer holds no fast-path plumbing: its forward is original_layer(x) + lora(x),
    # spelled out, and nothing else (the fast path lives in FusedLoRALinear alone).
    source = inspect.getsource(LoRALinear.forward)
    for plumbing in ("lora_linear", "_fast_path_applies", "fused", "autocast", "hook"):
        assert plumbing not in source, f"LoRALinear.forward mentions {plumbing!r}"
    base = nn.Linear(4, 3)
    layer = LoRALinear(base)
    _randomise_adapter(layer.lora)  # B ≠ 0: the adapter's rounding shows in the output
    fused = FusedLoRALinear(copy.deepcopy(base))
    fused.load_state_dict(layer.state_dict())
    for batch_shape in ((5,), (2, 7), (64,)):
        x = _randn(*batch_shape, 4, seed=3, dtype=torch.float32).requires_grad_()
        out = layer(x)
        assert type(out.grad_fn).__name__ == "AddBackward0"  # the plain sum, not a fused Function
        # Bit for bit: the same two modules, the same ops, summed once.
        assert torch.equal(out, base(x) + layer.lora(x))
        fused_out = fused(x)
        assert type(fused_out.grad_fn).__name__ == "_LoRALinearFunctionBackward"  # the fast path did run
        torch.testing.assert_close(fused_out, out, rtol=1e-5, atol=1e-6)


def test_merged_weight_is_w_plus_delta_w_and_leaves_w_alone() -> None:
    layer = _adapted_linear()
    weight = layer.original_layer.weight
    before = weight.detach().clone()
    merged = layer.merged_weight()
    assert merged is not weight and merged.dtype == weight.dtype and not merged.requires_grad
    torch.testing.assert_close(merged, before + layer.lora.delta_weight())
    assert layer.original_layer.weight is weight and torch.equal(weight, before) and layer.merged is False
    with torch.no_grad():
        layer.lora.lora_B[0, 0] = math.nan
    with pytest.raises(ValueError, match="would produce non-finite weights"):
        layer.merged_weight()
    assert torch.equal(weight, before)


def test_lora_layer_dropout_applies_to_its_input() -> None:
    # PEFT's lora_dropout: s · dropout(x) Aᵀ Bᵀ, not dropout(s · x Aᵀ Bᵀ). Same RNG state → same mask.
    p = 0.5
    lora = LoRALayer(10, 6, 3, 2.0, dropout=p)
    _randomise_adapter(lora)
    x = _randn(8, 10, seed=5)
    torch.manual_seed(99)
    out = lora.train()(x)
    torch.manual_seed(99)
    expected = lora.scaling * F.dropout(x, p, training=True) @ lora.lora_A.t() @ lora.lora_B.t()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lora.eval()(x), lora.scaling * x @ lora.lora_A.t() @ lora.lora_B.t())


@_LAYER_CLASSES
def test_dropout_applies_to_the_adapter_input_only(layer_class: type[LoRALinear]) -> None:
    # PEFT's lora_dropout: y = W x + b + s · B A dropout(x). Same RNG state → same mask.
    p = 0.5
    layer = layer_class(nn.Linear(10, 6), rank=3, alpha=2.0, dropout=p)
    _randomise_adapter(layer.lora)
    x = _randn(8, 10, seed=5)
    torch.manual_seed(99)
    out = layer.train()(x)
    torch.manual_seed(99)
    dropped = F.dropout(x, p, training=True)
    expected = layer.original_layer(x) + layer.lora.scaling * dropped @ layer.lora.lora_A.t() @ layer.lora.lora_B.t()
    torch.testing.assert_close(out, expected)
    # In eval mode dropout is off: the plain formula.
    eval_expected = layer.original_layer(x) + layer.lora.scaling * x @ layer.lora.lora_A.t() @ layer.lora.lora_B.t()
    torch.testing.assert_close(layer.eval()(x), eval_expected)
    assert not torch.allclose(out, eval_expected)


# --------------------------------------------------------------------------- no materialised ΔW


class _OutputShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor every ATen op returns, forward and backward.

    Why this way: a TorchDispatchMode sees each ATen op after autograd has decomposed the
    module, so it also sees the ops autograd runs in backward (which hooks on the module
    cannot), and it does not depend on how layers.py spells its forward (``@``, ``F.linear``,
    a custom autograd.Function, ...).
    """

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.shapes.append((str(func), tuple(tensor.shape)))
        return out


# Pairwise-distinct sizes, so an (out, in)- or (in, out)-shaped tensor can only be ΔW (or its
# gradient/transpose) and not, by coincidence, an activation.
_IN, _OUT, _RANK, _BATCH, _SEQ = 13, 17, 3, 2, 5


def _forward_backward(fn, x: torch.Tensor) -> None:
    fn(x).square().sum().backward()


def test_training_step_never_materialises_delta_w() -> None:
    lora = LoRALayer(_IN, _OUT, _RANK, 4.0)
    _randomise_adapter(lora)
    x = _randn(_BATCH, _SEQ, _IN, seed=2).requires_grad_()
    full_shapes = {(_OUT, _IN), (_IN, _OUT)}

    with _OutputShapeRecorder() as recorder:
        _forward_backward(lora, x)
    ops = [op for op, shape in recorder.shapes if shape in full_shapes]
    assert not ops, f"LoRALayer built a d_out × d_in tensor in forward/backward: {ops}"
    assert lora.lora_A.grad is not None and lora.lora_B.grad is not None  # backward did run

    # Control: the course's forward materialises B·A, and the recorder does see it.
    with _OutputShapeRecorder() as control:
        _forward_backward(lambda t: _seed_style_delta(lora, t), x)
    assert any(shape in full_shapes for _, shape in control.shapes)


def test_training_step_costs_factorised_flops() -> None:
    # Factorised: forward x·Aᵀ and (·)·Bᵀ, backward dB, dh, dA, dx: six matmuls whose FLOPs
    # add up to exactly 2·N·r·(in + out) each pair → 6·N·r·(in + out), linear in r and
    # never in·out. Building ΔW = B·A alone would cost 2·r·in·out more, plus its backward.
    lora = LoRALayer(_IN, _OUT, _RANK, 4.0)
    _randomise_adapter(lora)
    n_tokens = _BATCH * _SEQ
    x = _randn(_BATCH, _SEQ, _IN, seed=2).requires_grad_()

    with FlopCounterMode(display=False) as counter:
        _forward_backward(lora, x)
    assert counter.get_total_flops() == 6 * n_tokens * _RANK * (_IN + _OUT)

    with FlopCounterMode(display=False) as control:
        _forward_backward(lambda t: _seed_style_delta(lora, t), x)
    assert control.get_total_flops() > 6 * n_tokens * _RANK * (_IN + _OUT) + 2 * _RANK * _IN * _OUT


# --------------------------------------------------------------------------- merge / unmerge


def _adapted_linear(
    bias: bool = True, dtype: torch.dtype = torch.float32, layer_class: type[LoRALinear] = LoRALinear
) -> LoRALinear:
    layer = layer_class(nn.Linear(10, 6, bias=bias, dtype=dtype), rank=3, alpha=6.0)
    _randomise_adapter(layer.lora)
    return layer


@_LAYER_CLASSES
@pytest.mark.parametrize("bias", [True, False])
def test_merge_keeps_outputs_and_unmerge_restores_weights(bias: bool, layer_class: type[LoRALinear]) -> None:
    layer = _adapted_linear(bias=bias, layer_class=layer_class)
    x = _randn(2, 4, 10, seed=5)
    unmerged_out = layer(x)
    weight_before = layer.original_layer.weight.detach().clone()
    a_before, b_before = layer.lora.lora_A.detach().clone(), layer.lora.lora_B.detach().clone()

    layer.merge()
    assert layer.merged is True
    torch.testing.assert_close(layer.original_layer.weight, weight_before + layer.lora.delta_weight())
    torch.testing.assert_close(layer(x), unmerged_out, rtol=1e-5, atol=1e-5)
    # Merged inference is the base layer alone (no adapter branch on top of the merged W).
    assert torch.equal(layer(x), layer.original_layer(x))
    assert not layer.original_layer.weight.requires_grad  # merging under no_grad kept it frozen

    layer.unmerge()
    assert layer.merged is False
    torch.testing.assert_close(layer.original_layer.weight, weight_before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged_out, rtol=1e-5, atol=1e-5)
    # The adapter itself is untouched by merge/unmerge.
    assert torch.equal(layer.lora.lora_A, a_before) and torch.equal(layer.lora.lora_B, b_before)


def test_merge_twice_is_refused() -> None:
    layer = _adapted_linear()
    layer.merge()
    merged_weight = layer.original_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"already merged.*unmerge\(\)"):
        layer.merge()
    assert torch.equal(layer.original_layer.weight, merged_weight)  # not merged twice
    assert layer.merged is True


def test_unmerge_when_not_merged_is_refused() -> None:
    layer = _adapted_linear()
    weight = layer.original_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="not merged; nothing to unmerge"):
        layer.unmerge()
    assert torch.equal(layer.original_layer.weight, weight)
    assert layer.merged is False


@pytest.mark.parametrize("bad_value", [math.inf, -math.inf, math.nan])
def test_non_finite_merge_is_refused_and_leaves_the_layer_bit_identical(bad_value: float) -> None:
    layer = _adapted_linear()
    with torch.no_grad():
        layer.lora.lora_B[2, 1] = bad_value
    state_before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="non-finite weights.*left unmerged"):
        layer.merge()
    assert layer.merged is False
    state_after = layer.state_dict()
    assert state_after.keys() == state_before.keys()
    for key, value in state_before.items():
        # Compare the bits (B itself holds the NaN we put there, and NaN != NaN).
        assert torch.equal(state_after[key].view(torch.int32), value.view(torch.int32)), key


def test_merge_that_overflows_the_weight_dtype_is_refused() -> None:
    # Finite A and B whose product overflows float16 (max 65504).
    layer = LoRALinear(nn.Linear(4, 4, dtype=torch.float16), rank=1, alpha=1.0)
    with torch.no_grad():
        layer.lora.lora_A.fill_(300.0)
        layer.lora.lora_B.fill_(300.0)
    weight = layer.original_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.original_layer.weight, weight) and layer.merged is False


# --------------------------------------------------------------------------- gradients


@_LAYER_CLASSES
def test_backward_reaches_only_the_adapter(layer_class: type[LoRALinear]) -> None:
    layer = layer_class(nn.Linear(10, 6), rank=3, alpha=2.0)
    x = _randn(2, 4, 10, seed=5)
    layer(x).square().sum().backward()
    assert layer.original_layer.weight.grad is None
    assert layer.original_layer.bias.grad is None
    grad_a, grad_b = layer.lora.lora_A.grad, layer.lora.lora_B.grad
    assert grad_a is not None and grad_b is not None
    # B = 0 at step 0, and dL/dA = s · Bᵀ (dL/dy)ᵀ x, so A's first gradient is exactly zero;
    # dL/dB = s · (dL/dy)ᵀ (x Aᵀ) is not. Training starts by moving B, then A follows.
    assert torch.count_nonzero(grad_a) == 0
    assert torch.count_nonzero(grad_b) > 0


@_LAYER_CLASSES
def test_seed_optimiser_recipe_trains_only_the_adapter(layer_class: type[LoRALinear]) -> None:
    base = nn.Linear(10, 6)
    frozen = {name: p.detach().clone() for name, p in base.named_parameters()}
    layer = layer_class(base, rank=4, alpha=1.0)
    a0, b0 = layer.lora.lora_A.detach().clone(), layer.lora.lora_B.detach().clone()
    lora_model = layer
    optimizer = torch.optim.AdamW(filter(lambda p: p.requires_grad, lora_model.parameters()), lr=1e-3)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(trained) == 2
    assert trained[0] is layer.lora.lora_A and trained[1] is layer.lora.lora_B

    x, target = _randn(16, 10, seed=5), _randn(16, 6, seed=6)
    for _ in range(5):
        optimizer.zero_grad()
        F.mse_loss(lora_model(x), target).backward()
        optimizer.step()

    for name, p in base.named_parameters():
        assert torch.equal(p, frozen[name]), f"frozen {name} changed"
        assert p.grad is None
    assert not torch.equal(layer.lora.lora_B, b0)
    assert not torch.equal(layer.lora.lora_A, a0)  # moves from step 2 on, once B ≠ 0


def _functional(module: nn.Module, a_name: str, b_name: str):
    def call(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, {a_name: a, b_name: b}, (x,))

    return call


def test_gradcheck_lora_layer_float64() -> None:
    lora = LoRALayer(5, 4, 2, 3.0, dtype=torch.float64)
    x = _randn(3, 5, seed=1, dtype=torch.float64).requires_grad_()
    a = _randn(2, 5, seed=2, dtype=torch.float64).requires_grad_()
    b = _randn(4, 2, seed=3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(_functional(lora, "lora_A", "lora_B"), (x, a, b))


@_LAYER_CLASSES
@pytest.mark.parametrize("use_rslora", [False, True])
def test_gradcheck_lora_linear_float64(use_rslora: bool, layer_class: type[LoRALinear]) -> None:
    layer = layer_class(nn.Linear(5, 4, dtype=torch.float64), rank=2, alpha=3.0, use_rslora=use_rslora)
    x = _randn(2, 3, 5, seed=1, dtype=torch.float64).requires_grad_()
    a = _randn(2, 5, seed=2, dtype=torch.float64).requires_grad_()
    b = _randn(4, 2, seed=3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(_functional(layer, "lora.lora_A", "lora.lora_B"), (x, a, b))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("rank", [0, -1, 2.0, 4.5, True, False, "4", None])
def test_bad_rank_is_refused(rank: object) -> None:
    with pytest.raises(ValueError, match=r"rank must be a positive int, got"):
        LoRALayer(8, 8, rank, 1.0)
    base = nn.Linear(8, 8)
    with pytest.raises(ValueError, match=r"rank must be a positive int, got"):
        LoRALinear(base, rank=rank)
    # A refused wrap leaves the layer as it was: still trainable.
    assert base.weight.requires_grad and base.bias.requires_grad


@pytest.mark.parametrize("alpha", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, True, "1.0", None])
def test_bad_alpha_is_refused(alpha: object) -> None:
    with pytest.raises(ValueError, match=r"alpha must be a positive finite number, got"):
        LoRALayer(8, 8, 4, alpha)
    base = nn.Linear(8, 8)
    with pytest.raises(ValueError, match=r"alpha must be a positive finite number, got"):
        LoRALinear(base, rank=4, alpha=alpha)
    assert base.weight.requires_grad


@pytest.mark.parametrize(("in_features", "out_features", "name"), [(0, 8, "in_features"), (8, -2, "out_features")])
def test_bad_features_are_refused(in_features: int, out_features: int, name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be a positive int"):
        LoRALayer(in_features, out_features, 4, 1.0)


@pytest.mark.parametrize(
    "option, value, error, message",
    [
        *[
            ("dropout", v, ValueError, r"dropout must be a number in \[0, 1\), got")
            for v in (-0.1, 1.0, 1.5, math.nan, True, "0.1")
        ],
        *[("use_rslora", v, TypeError, "use_rslora must be True or False, got") for v in ("no", 1, None)],
    ],
)
def test_bad_dropout_or_rslora_is_refused(option: str, value: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        LoRALayer(8, 8, 4, 1.0, **{option: value})
    base = nn.Linear(8, 8)
    with pytest.raises(error, match=message):
        LoRALinear(base, rank=4, **{option: value})
    assert base.weight.requires_grad  # the refused wrapper froze nothing


@pytest.mark.parametrize("init", ["xavier", "Kaiming", "", None])
def test_bad_init_is_refused(init: object) -> None:
    with pytest.raises(ValueError, match=r"init must be one of \('kaiming', 'gaussian', 'course'\), got"):
        LoRALayer(8, 8, 4, 1.0, init=init)


@pytest.mark.parametrize("module", [nn.Conv1d(4, 4, 1), nn.Embedding(10, 4), nn.Sequential(nn.Linear(4, 4))])
def test_lora_linear_refuses_a_non_linear(module: nn.Module) -> None:
    flags = [p.requires_grad for p in module.parameters()]
    with pytest.raises(TypeError, match=rf"LoRALinear wraps an nn.Linear, got {type(module).__name__}.*apply_lora"):
        LoRALinear(module)
    assert [p.requires_grad for p in module.parameters()] == flags


# --------------------------------------------------------------------------- properties

_features = st.integers(min_value=1, max_value=64)
_ranks = st.integers(min_value=1, max_value=16)
_alphas = st.floats(min_value=0.1, max_value=64.0, allow_nan=False, allow_infinity=False)
_batch_shapes = st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=2).map(tuple)
_seeds = st.integers(min_value=0, max_value=2**31 - 1)


@_LAYER_CLASSES
@settings(max_examples=40, deadline=None)
@given(
    in_features=_features,
    out_features=_features,
    rank=_ranks,
    alpha=_alphas,
    batch_shape=_batch_shapes,
    bias=st.booleans(),
    init=st.sampled_from(INIT_METHODS),
    seed=_seeds,
)
def test_property_fresh_adapter_is_identity(
    layer_class: type[LoRALinear],
    in_features: int,
    out_features: int,
    rank: int,
    alpha: float,
    batch_shape: tuple[int, ...],
    bias: bool,
    init: str,
    seed: int,
) -> None:
    base = _linear(in_features, out_features, bias=bias, seed=seed)
    reference = copy.deepcopy(base)
    layer = layer_class(base, rank=rank, alpha=alpha, init=init)
    x = _randn(*batch_shape, in_features, seed=seed)
    assert torch.equal(layer(x), reference(x))
    # Parameters a LoRALinear adds: exactly r·(in + out), all trainable; the base's are frozen.
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == rank * (in_features + out_features)
    frozen = sum(p.numel() for p in layer.parameters() if not p.requires_grad)
    assert frozen == in_features * out_features + (out_features if bias else 0)


@_LAYER_CLASSES
@settings(max_examples=40, deadline=None)
@given(
    in_features=_features,
    out_features=_features,
    rank=_ranks,
    alpha=_alphas,
    batch_shape=_batch_shapes,
    bias=st.booleans(),
    use_rslora=st.booleans(),
    seed=_seeds,
)
def test_property_merge_preserves_outputs(
    layer_class: type[LoRALinear],
    in_features: int,
    out_features: int,
    rank: int,
    alpha: float,
    batch_shape: tuple[int, ...],
    bias: bool,
    use_rslora: bool,
    seed: int,
) -> None:
    base = _linear(in_features, out_features, bias=bias, seed=seed)
    layer = layer_class(base, rank=rank, alpha=alpha, use_rslora=use_rslora)
    _randomise_adapter(layer.lora, seed=seed + 2)
    x = _randn(*batch_shape, in_features, seed=seed + 7)
    unmerged = layer(x)
    weight_before = layer.original_layer.weight.detach().clone()
    layer.merge()
    merged = layer(x)

    # Tolerance from the standard float error bound of a dot product, |fl(Σ) − Σ| ≤ γ_n Σ|terms|,
    # with n = in + rank (+ a few roundings for the scaling, the bias and the merge add). It scales
    # with the magnitudes involved, so large α or wide layers don't cause false failures and a
    # wrong merge (e.g. ΔW transposed, scaled twice or missing) is still far outside it.
    s = layer.lora.scaling
    x64 = x.double().abs()
    magnitude = x64 @ weight_before.double().abs().t()
    magnitude = magnitude + s * (x64 @ layer.lora.lora_A.double().abs().t()) @ layer.lora.lora_B.double().abs().t()
    if bias:
        magnitude = magnitude + layer.original_layer.bias.double().abs()
    eps = torch.finfo(torch.float32).eps
    tolerance = 2 * (in_features + rank + 4) * eps * magnitude
    error = (merged.double() - unmerged.double()).abs()
    assert (error <= tolerance).all(), f"max error/tolerance {(error / tolerance).max().item():.3g}"

    layer.unmerge()
    weight_tolerance = 4 * eps * (weight_before.double().abs() + layer.lora.delta_weight().double().abs())
    assert ((layer.original_layer.weight.double() - weight_before.double()).abs() <= weight_tolerance).all()


@_LAYER_CLASSES
def test_merge_never_writes_through_a_shared_weight_and_unmerge_is_exact(layer_class: type[LoRALinear]):
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = embedding.weight  # tied, as in GPT-2
    layer = layer_class(head, rank=2, alpha=4.0)
    with torch.no_grad():
        layer.lora.lora_B.normal_()
    tied_before = embedding.weight.detach().clone()
    x = torch.randn(3, 6)
    unmerged_out = layer(x)
    layer.merge()
    assert torch.equal(embedding.weight, tied_before)  # the embedding is not changed by merging the head
    torch.testing.assert_close(layer(x), unmerged_out, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert layer.original_layer.weight is embedding.weight  # the very same tensor is back: exact, still tied
    assert torch.equal(embedding.weight, tied_before)  # and its values were never written
    assert torch.equal(layer(x), unmerged_out)  # the same weights, the same products: bit for bit


def test_merge_inside_disable_lora_is_refused():
    from lora_lab import disable_lora

    model = nn.Sequential(LoRALinear(nn.Linear(4, 4)))
    with disable_lora(model), pytest.raises(RuntimeError, match="cannot merge inside disable_lora"):
        model[0].merge()
    assert not model[0].merged


def test_numpy_integers_are_accepted_as_ranks():
    import numpy as np
    assert LoRALayer(4, 4, np.int64(2)).rank == 2
