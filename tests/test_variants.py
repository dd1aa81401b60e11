"""Tests for LoRA's variants: DoRA, PiSSA, LoRA+ and the 4-bit (NF4) frozen base.

Each variant is checked against Hugging Face PEFT where PEFT has it (logits, gradients, optimiser
groups; adapters both ways), against its paper's definition, and on its bad inputs, which must
be clear errors that change nothing. Adapters are randomised (B ≠ 0, m ≠ ‖W‖) and their effect on
the logits asserted first, so a lost adapter cannot pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer as peft_loraplus
from torch import nn

from lora_lab.lora import apply_lora_to_model, load_adapter, lora_modules, merge_lora, save_adapter
from lora_lab.lora.dora import DoRALinear
from lora_lab.lora.inject import mark_only_lora_as_trainable
from lora_lab.lora.layers import LoRALinear
from lora_lab.lora.loraplus import create_loraplus_optimizer, loraplus_param_groups
from lora_lab.lora.nf4 import (
    NF4Linear,
    dequantize_nf4,
    frozen_bytes,
    nf4_code_book,
    quantize_base,
    quantize_nf4,
)
from lora_lab.lora.pissa import pissa_to_lora
from lora_lab.model import GPT, GPTConfig
from lora_lab.seeding import make_generator, seed_everything
from lora_lab.training import TrainConfig, train

VOCAB, CONTEXT, WIDTH, HEADS = 13, 8, 16, 2
TARGETS = ["q", "v", "up", "down", "lm_head"]
# Float32, two summation orders (PEFT's and lora_lab's): ~1e-6 apart on logits of size ~1.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
# The NF4 levels as published (QLoRA, arXiv 2305.14314, appendix E; bitsandbytes' NF4 table).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds hand-offs
    yield
    torch.set_num_threads(threads)


def make_base() -> GPT:
    seed_everything(0, deterministic=False)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=CONTEXT, n_layer=2, n_head=HEADS, n_embd=WIDTH)).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, CONTEXT), generator=make_generator(7))


def logits(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens() if x is None else x)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random A and B (lora_lab's or PEFT's), and magnitudes 0.5-1.5 × their start, so everything shows."""
    generator = make_generator(seed)
    for name, param in sorted(model.named_parameters()):
        if "lora_A" in name or "lora_B" in name:
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        elif "lora_magnitude_vector" in name:
            param.mul_(0.5 + torch.rand(param.shape, generator=generator))
    return model.eval()


@pytest.fixture
def warnings_fail(no_warnings: Callable[[], AbstractContextManager[None]]) -> Iterator[None]:
    """Any warning during the test fails it: PEFT's only sign of an adapter it could not place is a warning."""
    with no_warnings():
        yield


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


# --- DoRA --------------------------------------------------------------------------------------


def test_dora_starts_as_the_base_with_peft_norm_axis() -> None:
    base = make_base()
    model = apply_lora_to_model(base, rank=4, alpha=8, target_modules=TARGETS, use_dora=True)
    for name, layer in lora_modules(model).items():
        assert isinstance(layer, DoRALinear)
        # PEFT's axis: one norm per output feature, over the input dimension (the paper's column norm).
        torch.testing.assert_close(layer.lora_magnitude_vector, base.get_submodule(name).weight.norm(dim=1))
    torch.testing.assert_close(logits(model), logits(base), **TOLERANCE)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude_vector"}


def test_dora_adapter_round_trips_with_peft_both_ways(tmp_path: Path, warnings_fail: None) -> None:
    base = make_base()
    ours = randomise(apply_lora_to_model(base, rank=4, alpha=8, target_modules=TARGETS, use_dora=True))
    expected = logits(ours)
    assert (expected - logits(base)).abs().max() > 0.1
    save_adapter(ours, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(peft_model), expected, **TOLERANCE)

    theirs = randomise(get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                        use_dora=True)), seed=2)  # fmt: skip
    theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=False)  # lm_head is a Linear here
    loaded = apply_lora_to_model(base, rank=4, alpha=8, target_modules=TARGETS, use_dora=True)
    load_adapter(loaded, tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded.eval()), logits(theirs), **TOLERANCE)


def test_dora_gradients_match_peft_with_the_norm_detached() -> None:
    base = make_base()
    ours = randomise(apply_lora_to_model(base, rank=4, alpha=8, target_modules=TARGETS, use_dora=True))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():  # the same weights in both
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                path, factor = name.removeprefix("base_model.model.").split(".lora_", 1)
                factor = "lora_" + factor.split(".")[0]
                key = f"{path}.{factor}" if factor == "lora_magnitude_vector" else f"{path}.lora.{factor}"
                param.copy_(ours_params[key])
    x, y = tokens(), tokens()
    ours.train()(x, y)[1].backward()
    theirs.train()(x, y)[1].backward()
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(peft_grads) == 3 * len(lora_modules(ours)) == 27  # A, B and m in 9 layers
    for name, grad in peft_grads.items():
        path, factor = name.removeprefix("base_model.model.").split(".lora_", 1)
        factor = "lora_" + factor.split(".")[0]
        key = f"{path}.{factor}" if factor == "lora_magnitude_vector" else f"{path}.lora.{factor}"
        torch.testing.assert_close(ours_params[key].grad, grad, rtol=1e-4, atol=1e-6)


def test_dora_gradcheck_in_float64() -> None:
    """gradcheck applies to x and m (the detached norm does not depend on them); A and B get the
    gradient of the formula with ‖V‖ held constant, as the paper's §4.3 prescribes."""
    seed_everything(0, deterministic=False)
    layer = DoRALinear(nn.Linear(6, 5).double(), rank=2, alpha=4)
    randomise(layer)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    magnitude = layer.lora_magnitude_vector

    def as_function(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            magnitude.copy_(m.detach())
        return torch.func.functional_call(layer, {"lora_magnitude_vector": m}, (x,))

    assert torch.autograd.gradcheck(as_function, (x, magnitude.detach().clone().requires_grad_()))
    layer.zero_grad()
    layer(x).square().sum().backward()
    W, b = layer.original_layer.weight, layer.original_layer.bias
    A = layer.lora.lora_A.detach().clone().requires_grad_()
    B = layer.lora.lora_B.detach().clone().requires_grad_()
    norm = (W + layer.lora.scaling * B @ A).norm(dim=1).detach()
    (((x @ (W + layer.lora.scaling * B @ A).t()) * (magnitude / norm) + b).square().sum()).backward()
    torch.testing.assert_close(layer.lora.lora_A.grad, A.grad)
    torch.testing.assert_close(layer.lora.lora_B.grad, B.grad)
    assert layer.original_layer.weight.grad is None


def test_dora_merge_unmerge_exact_and_merge_lora() -> None:
    base = make_base()
    model = randomise(apply_lora_to_model(base, rank=4, alpha=8, target_modules=TARGETS, use_dora=True))
    expected, layer = logits(model), lora_modules(model)["blocks.0.attn.q"]
    weight = layer.original_layer.weight.clone()
    for module in lora_modules(model).values():
        module.merge()
    torch.testing.assert_close(logits(model), expected, **TOLERANCE)
    for module in lora_modules(model).values():
        module.unmerge()
    assert torch.equal(layer.original_layer.weight, weight)
    merged = merge_lora(model)
    assert not lora_modules(merged) and isinstance(merged.get_submodule("blocks.0.attn.q"), nn.Linear)
    torch.testing.assert_close(logits(merged), expected, **TOLERANCE)


def test_dora_refuses_a_weight_row_without_norm() -> None:
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight[1].zero_()
    before = state(linear)
    with pytest.raises(ValueError, match=r"non-zero norm.*rows \[1\]"):
        DoRALinear(linear, rank=2)
    assert_same_state(linear, before)
    assert all(p.requires_grad for p in linear.parameters())


# --- PiSSA -------------------------------------------------------------------------------------


def test_pissa_equals_base_at_step_zero_with_peft_factors() -> None:
    base = make_base()
    model = apply_lora_to_model(base, rank=4, alpha=8, target_modules=TARGETS, init="pissa")
    torch.testing.assert_close(logits(model), logits(base), **TOLERANCE)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                             init_lora_weights="pissa"))  # fmt: skip
    layer = lora_modules(model)["blocks.1.mlp.up"]
    peft_layer = theirs.base_model.model.blocks[1].mlp.up
    torch.testing.assert_close(layer.lora.lora_A, peft_layer.lora_A["default"].weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.lora.lora_B, peft_layer.lora_B["default"].weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.original_layer.weight, peft_layer.base_layer.weight, rtol=0, atol=1e-6)
    # The residual is the base without its top-4 singular directions: its largest singular value is W's 5th.
    original = base.blocks[1].mlp.up.weight
    torch.testing.assert_close(torch.linalg.svdvals(layer.original_layer.weight)[0], torch.linalg.svdvals(original)[4])
    assert torch.equal(base.blocks[1].mlp.up.weight, original)  # the base itself is not touched


def test_pissa_converted_adapter_reproduces_the_trained_model(tmp_path: Path, warnings_fail: None) -> None:
    base = make_base()
    model = apply_lora_to_model(base, rank=4, alpha=8, target_modules=TARGETS, init="pissa", fused=False)
    with torch.no_grad():  # "training": move A and B away from their start
        for layer in lora_modules(model).values():
            layer.lora.lora_A.add_(0.2 * torch.randn_like(layer.lora.lora_A))
            layer.lora.lora_B.add_(0.2 * torch.randn_like(layer.lora.lora_B))
    expected = logits(model)
    assert (expected - logits(base)).abs().max() > 0.1
    converted = pissa_to_lora(model, base)
    assert {layer.lora.rank for layer in lora_modules(converted).values()} == {8}
    torch.testing.assert_close(logits(converted), expected, **TOLERANCE)
    save_adapter(converted, tmp_path / "converted")
    peft_converted = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "converted").eval()
    torch.testing.assert_close(logits(peft_converted), expected, **TOLERANCE)
    # Unconverted: the loader redoes the SVD from the plain base.
    save_adapter(model, tmp_path / "pissa")
    peft_pissa = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "pissa").eval()
    torch.testing.assert_close(logits(peft_pissa), expected, **TOLERANCE)


def test_peft_pissa_adapter_loads_in_lora_lab(tmp_path: Path, warnings_fail: None) -> None:
    base = make_base()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                             init_lora_weights="pissa"))  # fmt: skip
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.add_(0.2 * torch.randn_like(param))
    theirs.save_pretrained(tmp_path, save_embedding_layers=False)
    plain = apply_lora_to_model(base, rank=4, alpha=8, target_modules=TARGETS)
    before = state(plain)
    with pytest.raises(ValueError, match=r"init_lora_weights=pissa.*init='pissa'"):
        load_adapter(plain, tmp_path)
    assert_same_state(plain, before)
    ours = apply_lora_to_model(base, rank=4, alpha=8, target_modules=TARGETS, init="pissa")
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours.eval()), logits(theirs.eval()), **TOLERANCE)


def test_pissa_bad_inputs() -> None:
    linear = nn.Linear(3, 8)
    before = state(linear)
    with pytest.raises(ValueError, match=r"only 3; choose rank ≤ 3"):
        LoRALinear(linear, rank=4, init="pissa")
    assert_same_state(linear, before)
    assert all(p.requires_grad for p in linear.parameters())
    base, other = make_base(), GPT(GPTConfig(vocab_size=VOCAB, block_size=CONTEXT, n_layer=2, n_head=HEADS,
                                             n_embd=WIDTH))  # fmt: skip
    model = apply_lora_to_model(base, rank=2, alpha=4, target_modules=["q"], init="pissa")
    with pytest.raises(ValueError, match="residual weight is not W − s·B₀A₀ of this base"):
        pissa_to_lora(model, other)
    with pytest.raises(ValueError, match="initialised with init='pissa'"):
        pissa_to_lora(apply_lora_to_model(base, rank=2, alpha=4, target_modules=["q"]), base)


# --- LoRA+ -------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_loraplus_groups_are_peft_groups(use_dora: bool) -> None:
    base = make_base()
    ours = apply_lora_to_model(base, rank=4, alpha=8, target_modules=TARGETS, use_dora=use_dora)
    mark_only_lora_as_trainable(ours, bias="lora_only")  # trained biases go to B's group without decay
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                             use_dora=use_dora, bias="lora_only"))  # fmt: skip
    kwargs = {"lr": 2e-3, "loraplus_lr_ratio": 16.0, "loraplus_weight_decay": 0.01}
    mine = create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs)
    peft = peft_loraplus(theirs, torch.optim.AdamW, **kwargs)

    def describe(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[float, float, list[str]]]:
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [g for g in optimizer.param_groups if g["params"]]  # PEFT keeps its (empty) embedding group
        return [(g["lr"], g["weight_decay"], sorted(_canonical(names[id(p)]) for p in g["params"])) for g in groups]

    assert describe(ours, mine) == describe(theirs, peft)
    assert [g["lr"] for g in mine.param_groups][:2] == [2e-3, 32e-3]


def _canonical(name: str) -> str:
    """lora_lab's and PEFT's names of one parameter, written the same way."""
    name = name.removeprefix("base_model.model.").replace(".default", "")
    for theirs, ours in ((".base_layer.", "."), (".original_layer.", "."), (".lora.lora_", ".lora_")):
        name = name.replace(theirs, ours)
    return name.removesuffix(".weight") if ".lora_" in name else name


def test_loraplus_groups_drive_training_at_their_own_rates() -> None:
    """Adam's first step moves every entry with a gradient by about its group's lr: B by λ·lr
    (A's gradient is zero while B is zero)."""
    base = make_base()
    model = apply_lora_to_model(base, rank=4, alpha=8, target_modules=TARGETS)
    B = lora_modules(model)["blocks.0.attn.q"].lora.lora_B
    data = torch.randint(0, VOCAB, (400,), generator=make_generator(3))
    config = TrainConfig(epochs=0.01, lr=1e-3, batch_size=4, grad_clip=0.0)
    groups = loraplus_param_groups(model, config.lr, 16.0)
    history = train(model, data, None, config, block_size=CONTEXT, progress=False, param_groups=groups)
    assert history.steps == 1
    assert B.abs().max().item() == pytest.approx(16e-3, rel=1e-2)
    with pytest.raises(ValueError, match="each trainable parameter exactly once"):
        train(model, data, None, config, block_size=CONTEXT, progress=False, param_groups=groups[:1])


# --- NF4 ---------------------------------------------------------------------------------------


def test_nf4_code_book_is_the_papers() -> None:
    code = nf4_code_book()
    torch.testing.assert_close(code, torch.tensor(PUBLISHED_NF4), rtol=0, atol=1e-6)
    assert code[7] == 0 and code[0] == -1 and code[-1] == 1 and (code.diff() > 0).all()


def test_nf4_matches_bitsandbytes_when_it_runs() -> None:
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(48, 40, generator=make_generator(5))
    try:
        codes, quant_state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        reference = functional.dequantize_4bit(codes, quant_state)
    except (RuntimeError, NotImplementedError) as error:  # no CPU kernel in this build
        pytest.skip(f"bitsandbytes does not run on this CPU: {error}")
    # Both are float32 roundings of the same definition (bitsandbytes' table was computed with scipy).
    torch.testing.assert_close(nf4_code_book(), quant_state.code.float(), rtol=0, atol=2e-7)
    torch.testing.assert_close(dequantize_nf4(quantize_nf4(weight)), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(quantize_nf4(weight).absmax, quant_state.absmax)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_error_bound_and_bits(double_quant: bool) -> None:
    weight = torch.randn(96, 100, generator=make_generator(4)) * 0.05  # 9600 weights: the last block padded
    q = quantize_nf4(weight, double_quant=double_quant)
    restored = dequantize_nf4(q)
    # Every weight lands within half the widest gap between levels, times its block's absmax.
    half_gap = nf4_code_book().diff().max().item() / 2
    blocks = torch.nn.functional.pad(weight.reshape(-1), (0, -weight.numel() % 64)).view(-1, 64)
    absmax = blocks.abs().amax(dim=1).repeat_interleave(64)[: weight.numel()].view_as(weight)
    slack = 0.01 if double_quant else 1e-6  # the 8-bit absmax adds at most 1/254 of its block's spread
    assert ((restored - weight).abs() <= absmax * (half_gap + slack)).all()
    assert (restored - weight).abs().mean() / weight.abs().mean() < 0.12
    assert q.bits_per_weight == pytest.approx(4.5 if not double_quant else 4 + 8 / 64, abs=0.01)


def test_nf4_base_logits_close_to_fp32_and_gradients_only_in_adapters() -> None:
    base = make_base()
    model = randomise(apply_lora_to_model(base, rank=4, alpha=8, fused=False))
    quantised = quantize_base(model)
    # Bound: NF4's relative weight error (~8% on average) gives logits within 0.25 of the fp32 ones
    # (measured 0.05-0.1 on this model, whose logits span several units).
    difference = (logits(quantised) - logits(model)).abs().max().item()
    assert 0 < difference < 0.25
    assert frozen_bytes(quantised) < 0.3 * frozen_bytes(model)
    quantised.train()(tokens(), tokens())[1].backward()
    with_grad = {n.rsplit(".", 1)[-1] for n, p in quantised.named_parameters() if p.grad is not None}
    assert with_grad == {"lora_A", "lora_B"}
    nf4 = NF4Linear(nn.Linear(5, 4).double())
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(nf4, (x,))


def test_nf4_base_refuses_in_place_merge_and_fused_layers() -> None:
    base = make_base()
    model = randomise(apply_lora_to_model(base, rank=4, alpha=8, target_modules=TARGETS, fused=False))
    quantised = quantize_base(model, double_quant=True)
    layer, before = lora_modules(quantised)["blocks.0.attn.q"], state(quantised)
    with pytest.raises(RuntimeError, match="cannot merge in place into a NF4Linear base.*merge_lora"):
        layer.merge()
    assert_same_state(quantised, before) and not layer.merged
    merged = merge_lora(quantised)
    assert isinstance(merged.get_submodule("blocks.0.attn.q"), nn.Linear)
    torch.testing.assert_close(logits(merged), logits(quantised), rtol=1e-4, atol=1e-4)  # W's rounding differs
    fused = apply_lora_to_model(base, rank=4, alpha=8, target_modules=TARGETS)
    fused_state = state(fused)
    with pytest.raises(ValueError, match=r"FusedLoRALinear.*fused=False"):
        quantize_base(fused)
    assert_same_state(fused, fused_state)


# --- the comparison (lora-lab variants), end to end on the smoke profile ----------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory):
    from lora_lab.experiment.stages import prepare, pretrained_base

    cache = tmp_path_factory.mktemp("variants-cache")
    overrides = {"pretrain.epochs": 0.3, "sample_tokens": 24}
    exp = prepare("builtin", "smoke", overrides=overrides, cache=cache, progress=False)
    return exp, pretrained_base(exp)


def test_variants_job_table_json_and_cache(smoke, tmp_path: Path, forbid_training) -> None:
    from lora_lab.experiment.variants import VariantsResults, run_variants, write_variants
    from lora_lab.experiment.variants_report import differences_from_lora, format_variants

    exp, base = smoke
    lrs = {"lora": 3e-3, "dora": 3e-3, "pissa": 1e-3, "loraplus": 1e-3, "qlora": 3e-3, "full": 1e-3}
    results = run_variants(exp, base, names=list(lrs), seeds=2, epochs=0.2, lrs=lrs, timing_rounds=2)
    by_name = {v.name: v for v in results.variants}
    assert [run.seed for run in by_name["lora"].runs] == [0, 1]
    assert by_name["lora"].runs[0].target_ppl != by_name["lora"].runs[1].target_ppl  # seeds differ
    assert by_name["qlora"].frozen_bytes < 0.5 * by_name["lora"].frozen_bytes
    assert by_name["dora"].trainable_params > by_name["lora"].trainable_params == by_name["pissa"].trainable_params
    assert by_name["lora"].step_time_ratio[0] == 1.0 and all(len(v.step_time_ratio) == 3 for v in results.variants)
    path = write_variants(results, tmp_path / "variants.json")
    again = VariantsResults.from_json(path.read_text())
    assert again == results
    table = format_variants(again)
    assert table.count("\n| ") == 1 + len(lrs) and "4-bit base + LoRA" in table
    assert {d.name for d in differences_from_lora(again)} == set(lrs) - {"lora"}
    forbid_training("a second run of the same variants must reuse the cache")
    rerun = run_variants(exp, base, names=list(lrs), seeds=2, epochs=0.2, lrs=lrs, timing_rounds=0)
    assert [v.runs for v in rerun.variants] == [v.runs for v in results.variants]
    with pytest.raises(ValueError, match="not a variants table"):
        VariantsResults.from_json('{"profile": "cpu"}')


def test_variants_sweep_picks_the_lowest_validation_loss(smoke) -> None:
    from lora_lab.experiment.variants import run_variants

    exp, base = smoke
    results = run_variants(exp, base, names=["rslora"], seeds=1, epochs=0.2, timing_rounds=0)
    (rslora,) = results.variants
    assert [lr for lr, _ in rslora.sweep] == [1e-3, 3e-3, 1e-2]
    assert rslora.lr == min((loss, lr) for lr, loss in rslora.sweep if loss is not None)[1]


# --- notebook 07's graders ------------------------------------------------------------------------


def _dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, *, axis=1, detach=True, norm_of_w=False,
          bias_inside=False, with_scaling=True):  # fmt: skip
    V = weight + (scaling if with_scaling else 1.0) * lora_B @ lora_A
    norm = torch.linalg.norm(weight if norm_of_w else V, dim=axis)
    norm = norm.detach() if detach else norm
    if bias_inside:
        return (magnitude / norm) * (x @ V.T + bias)
    return (magnitude / norm) * (x @ V.T) + bias


@pytest.mark.parametrize(
    ("options", "diagnosis"),
    [
        ({}, None),
        ({"axis": 0}, "taken over the wrong axis"),
        ({"norm_of_w": True}, "the norm is ‖W‖, not ‖W + s·B A‖"),
        ({"bias_inside": True}, "the bias is inside the rescaling"),
        ({"with_scaling": False}, "the scaling s = α/r is missing"),
        ({"detach": False}, "the norm ‖V‖ is not detached"),
    ],
)
def test_check_dora_forward_names_each_mistake(options: dict, diagnosis: str | None, capsys) -> None:
    from lora_lab.checks import check_dora_forward

    result = check_dora_forward(lambda *args: _dora(*args, **options))
    printed = capsys.readouterr().out
    assert bool(result) is (diagnosis is None)
    assert diagnosis is None or diagnosis in printed


def _nf4(weight, block_size, *, per_tensor=False, normalise=True, use_abs=True):
    blocks = weight.reshape(-1, block_size) if not per_tensor else weight.reshape(1, -1)
    absmax = (blocks.abs() if use_abs else blocks).amax(dim=1)
    normalised = blocks / absmax.unsqueeze(1) if normalise else blocks
    return (normalised.reshape(-1, 1) - nf4_code_book()).abs().argmin(dim=1), absmax


@pytest.mark.parametrize(
    ("options", "diagnosis"),
    [
        ({}, None),
        ({"per_tensor": True}, "one absmax for the whole tensor"),
        ({"normalise": False}, "round w itself, not w / absmax"),
        ({"use_abs": False}, "the largest value, not the largest |value|"),
    ],
)
def test_check_nf4_quantize_names_each_mistake(options: dict, diagnosis: str | None, capsys) -> None:
    from lora_lab.checks import check_nf4_quantize

    result = check_nf4_quantize(lambda w, size: _nf4(w, size, **options))
    printed = capsys.readouterr().out
    assert bool(result) is (diagnosis is None)
    assert diagnosis is None or diagnosis in printed


def test_cli_variants_refuses_bad_arguments_before_training(tmp_path: Path, capsys, forbid_training) -> None:
    from lora_lab import cli

    forbid_training("bad arguments must be refused before anything trains")
    for argv, message in ((["--only", "lora,nope"], "unknown variants ['nope']"), (["--seeds", "0"], "at least 1")):
        code = cli.main(["variants", "--profile", "smoke", "--cache", str(tmp_path), *argv])
        assert code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
