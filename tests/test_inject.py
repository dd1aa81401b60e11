"""Tests for lora_lab.lora.inject: apply_lora_to_model and the API around it.

``apply_lora_to_model(model, rank=4, alpha=1.0)`` is the course's contract: it returns an adapted
*copy* and leaves the original model alone. Target matching follows Hugging Face PEFT: a list
entry matches a module name exactly or as a dotted suffix, a single string is a regex that must
match the whole name.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_lab.lora.inject import (
    apply_lora_to_model,
    count_parameters,
    disable_lora,
    find_target_modules,
    lora_modules,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    replace_module,
)
from lora_lab.lora.layers import LoRALayer, LoRALinear
from lora_lab.seeding import make_generator, seed_everything

SEED = 1234
VOCAB, DIM = 13, 8


@pytest.fixture(autouse=True)
def _seeded() -> None:
    # Module constructors draw from the global generator; deterministic=False leaves the
    # process-wide torch.use_deterministic_algorithms switch alone for other test files.
    seed_everything(SEED, deterministic=False)


# --------------------------------------------------------------------------- a small test model
# Names chosen to exercise the matching rules: "q" must match blocks.*.attn.q but neither
# blocks.*.attn.qq nor the top-level "seq".


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.qq = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / math.sqrt(x.shape[-1])
        causal = torch.ones(x.shape[-2], x.shape[-2], dtype=torch.bool).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.o(weights @ self.v(x) + self.qq(x))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return x + self.attn(h) + self.mlp(h)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = DIM, n_blocks: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(n_blocks))
        self.seq = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.seq(x))


BLOCK_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.qq", "attn.o", "mlp.0", "mlp.2")
ALL_LINEARS = [f"blocks.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS] + ["seq", "head"]


@pytest.fixture
def model() -> TinyLM:
    return TinyLM()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 6), generator=make_generator(7))


def _snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    return {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}


def _assert_unchanged(model: nn.Module, snapshot: dict[str, tuple[torch.Tensor, bool]]) -> None:
    """Same parameter names, bit-identical values, same requires_grad flags, no adapters."""
    current = dict(model.named_parameters())
    assert current.keys() == snapshot.keys()
    for name, (value, requires_grad) in snapshot.items():
        assert torch.equal(current[name], value), f"{name} changed"
        assert current[name].requires_grad == requires_grad, f"{name}.requires_grad changed"
    assert not any(isinstance(m, (LoRALinear, LoRALayer)) for m in model.modules())


def _randomise_adapters(model: nn.Module, seed: int = 11) -> None:
    """Give every adapter A and B values drawn from ``seed`` alone, B non-zero (a fresh
    adapter is the identity and would hide merge bugs)."""
    with torch.no_grad():
        for i, module in enumerate(lora_modules(model).values()):
            a, b = module.lora.lora_A, module.lora.lora_B
            a.copy_(torch.randn(a.shape, generator=make_generator(seed + 2 * i)) / math.sqrt(a.shape[1]))
            b.copy_(0.1 * torch.randn(b.shape, generator=make_generator(seed + 2 * i + 1)))


def _trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _adapter_names(targets: list[str]) -> set[str]:
    return {f"{t}.lora.{ab}" for t in targets for ab in ("lora_A", "lora_B")}


# --------------------------------------------------------------------------- the course's contract


def test_returns_an_adapted_copy_and_leaves_the_original_alone(model: TinyLM, tokens: torch.Tensor) -> None:
    model.emb.weight.requires_grad_(False)  # a flag the copy must not propagate back
    snapshot = _snapshot(model)
    expected = model(tokens)

    lora_model = apply_lora_to_model(model, rank=4, alpha=1.0)  # the course's call

    assert lora_model is not model
    assert list(lora_modules(lora_model)) == ALL_LINEARS  # None → every nn.Linear
    for name in ALL_LINEARS:
        assert type(model.get_submodule(name)) is nn.Linear
        assert lora_model.get_submodule(name).lora.rank == 4
    _assert_unchanged(model, snapshot)
    # A real copy: no tensor shared with the original.
    original_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not original_ptrs & {p.data_ptr() for p in lora_model.parameters()}
    # A fresh adapter is the identity, so the copy computes exactly what the original does.
    assert torch.equal(lora_model(tokens), expected)


def test_only_adapters_are_trainable(model: TinyLM) -> None:
    lora_model = apply_lora_to_model(model, rank=2, alpha=4.0)
    assert _trainable_names(lora_model) == _adapter_names(ALL_LINEARS)
    # Spelled out for what people forget: embeddings, norms and biases are frozen too.
    assert not lora_model.emb.weight.requires_grad
    assert not lora_model.blocks[0].ln.weight.requires_grad and not lora_model.blocks[0].ln.bias.requires_grad
    assert not lora_model.blocks[1].mlp[0].original_layer.bias.requires_grad


def test_seed_training_recipe_changes_only_adapters(model: TinyLM, tokens: torch.Tensor) -> None:
    snapshot = _snapshot(model)
    lora_model = apply_lora_to_model(model, rank=4, alpha=1.0)
    frozen = {name: p.detach().clone() for name, p in lora_model.named_parameters() if not p.requires_grad}
    adapters = {name: p.detach().clone() for name, p in lora_model.named_parameters() if p.requires_grad}
    optimizer_lora = torch.optim.AdamW(filter(lambda p: p.requires_grad, lora_model.parameters()), lr=1e-3)
    assert sum(len(group["params"]) for group in optimizer_lora.param_groups) == 2 * len(ALL_LINEARS)

    targets = torch.randint(0, VOCAB, tokens.shape, generator=make_generator(8))
    for step in range(4):
        optimizer_lora.zero_grad()
        logits = lora_model(tokens)
        F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)).backward()
        if step == 0:
            # B = 0 ⇒ every A's first gradient is exactly zero and every B's is not.
            for name, module in lora_modules(lora_model).items():
                assert torch.count_nonzero(module.lora.lora_A.grad) == 0, name
                assert torch.count_nonzero(module.lora.lora_B.grad) > 0, name
            for name, p in lora_model.named_parameters():
                assert (p.grad is None) == (name not in adapters), name
        optimizer_lora.step()

    for name, p in lora_model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(p, adapters[name]), f"adapter {name} did not train"
    _assert_unchanged(model, snapshot)


# --------------------------------------------------------------------------- target matching


@pytest.mark.parametrize(
    ("target_modules", "expected"),
    [
        (None, ALL_LINEARS),
        (["q"], ["blocks.0.attn.q", "blocks.1.attn.q"]),  # not attn.qq, not seq
        (("q",), ["blocks.0.attn.q", "blocks.1.attn.q"]),  # any sequence, not only a list
        (["qq", "head"], ["blocks.0.attn.qq", "blocks.1.attn.qq", "head"]),
        (["attn.q", "attn.v"], ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]),
        (["blocks.1.attn.o"], ["blocks.1.attn.o"]),  # a full name matches exactly
        (["mlp.2"], ["blocks.0.mlp.2", "blocks.1.mlp.2"]),
        (["seq"], ["seq"]),
        (r"blocks\.0\.attn\..*", [f"blocks.0.attn.{n}" for n in ("q", "k", "v", "qq", "o")]),
        (r".*\.q", ["blocks.0.attn.q", "blocks.1.attn.q"]),  # fullmatch: .q but not .qq
        (r"blocks\.\d\.attn\.(q|v)", ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]),
    ],
)
def test_target_modules_matching(model: TinyLM, target_modules, expected: list[str]) -> None:
    assert find_target_modules(model, target_modules) == expected
    lora_model = apply_lora_to_model(model, rank=2, target_modules=target_modules)
    assert list(lora_modules(lora_model)) == expected
    assert _trainable_names(lora_model) == _adapter_names(expected)
    for name in set(ALL_LINEARS) - set(expected):
        assert type(lora_model.get_submodule(name)) is nn.Linear


@pytest.mark.parametrize("target_modules", [["tn.q"], ["Q"], ["q "], "q", r"blocks\.0", "attn.q"])
def test_suffix_is_dotted_and_regex_is_fullmatch(model: TinyLM, target_modules) -> None:
    # "tn.q" is a string suffix of "blocks.0.attn.q" but not a dotted one; "q" and "attn.q"
    # as a regex would be found by re.search but do not fullmatch any name. r"blocks\.0"
    # fullmatches the Block itself, which is no nn.Linear.
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="matched no module|not nn.Linear"):
        apply_lora_to_model(model, target_modules=target_modules)
    _assert_unchanged(model, snapshot)


def test_regex_matching_a_norm_names_it(model: TinyLM) -> None:
    # As in PEFT, every module a target matches must be adaptable: r"blocks\.0\..*" also
    # matches blocks.0.ln and the containers blocks.0.attn / blocks.0.mlp.
    with pytest.raises(ValueError, match=r"not nn.Linear: blocks\.0\.ln \(LayerNorm\), blocks\.0\.attn \(Attention\)"):
        apply_lora_to_model(model, target_modules=r"blocks\.0\..*")


def test_replace_module_puts_a_module_at_a_dotted_name(model: TinyLM, tokens: torch.Tensor) -> None:
    old_q, new_q = model.blocks[1].attn.q, nn.Linear(DIM, DIM)
    assert replace_module(model, "blocks.1.attn.q", new_q) is old_q
    assert model.blocks[1].attn.q is new_q and model.get_submodule("blocks.1.attn.q") is new_q
    assert model.blocks[0].attn.q is not new_q  # only the named one
    old_mlp_in, new_mlp_in = model.blocks[0].mlp[0], nn.Linear(DIM, 2 * DIM)
    assert replace_module(model, "blocks.0.mlp.0", new_mlp_in) is old_mlp_in  # inside an nn.Sequential
    assert model.blocks[0].mlp[0] is new_mlp_in
    old_head, new_head = model.head, nn.Linear(DIM, VOCAB, bias=False)
    assert replace_module(model, "head", new_head) is old_head  # a child of the root itself
    assert model.head is new_head
    assert model(tokens).shape == (*tokens.shape, VOCAB)


# --------------------------------------------------------------------------- errors


def test_target_matching_nothing_names_the_linear_layers(model: TinyLM) -> None:
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"\['query'\] matched no module") as error:
        apply_lora_to_model(model, target_modules=["query"])
    message = str(error.value)
    assert "linear layers are: " + ", ".join(ALL_LINEARS) in message
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize(("target_modules", "culprit"), [(["ln"], r"blocks\.0\.ln \(LayerNorm\)"), (["emb"], "emb")])
def test_target_matching_a_non_linear_is_refused(model: TinyLM, target_modules: list[str], culprit: str) -> None:
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=rf"not nn.Linear: {culprit}.*linear layers are: blocks\.0\.attn\.q"):
        apply_lora_to_model(model, target_modules=target_modules)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("target_modules", [[], [""], ["q", 3], [None], 5])
def test_malformed_target_list_is_refused(model: TinyLM, target_modules) -> None:
    message = "regex string or a non-empty list of names, got " + re.escape(repr(target_modules))
    with pytest.raises(ValueError, match=message):
        apply_lora_to_model(model, target_modules=target_modules)


def test_invalid_target_regex_is_refused(model: TinyLM) -> None:
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"target_modules='\[' is not a valid regex \(unterminated"):
        apply_lora_to_model(model, target_modules="[")
    _assert_unchanged(model, snapshot)


def test_model_without_linear_is_refused() -> None:
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        apply_lora_to_model(nn.Sequential(nn.Embedding(4, 4), nn.ReLU()))


def test_model_already_holding_lora_is_refused(model: TinyLM) -> None:
    lora_model = apply_lora_to_model(model, target_modules=["q"])
    snapshot = _snapshot(lora_model)
    expected = r"already holds LoRA layers \(blocks\.0\.attn\.q, blocks\.1\.attn\.q\).*merge_lora"
    with pytest.raises(ValueError, match=expected):
        apply_lora_to_model(lora_model, target_modules=["k"])
    current = dict(lora_model.named_parameters())
    assert all(torch.equal(current[n], v) and current[n].requires_grad == g for n, (v, g) in snapshot.items())


def test_multihead_attention_is_refused() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"nn.MultiheadAttention \(1\).*out_proj"):
        apply_lora_to_model(model)
    with pytest.raises(ValueError, match="out_proj"):
        apply_lora_to_model(model, target_modules=["0"])
    _assert_unchanged(model, snapshot)


def test_non_module_is_refused() -> None:
    with pytest.raises(TypeError, match="needs an nn.Module, got dict"):
        apply_lora_to_model({"weight": torch.zeros(2, 2)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be a positive int"),
        ({"rank": -4}, "rank must be a positive int"),
        ({"rank": 4.0}, "rank must be a positive int"),
        ({"rank": True}, "rank must be a positive int"),
        ({"alpha": 0}, "alpha must be a positive finite number"),
        ({"alpha": -1.0}, "alpha must be a positive finite number"),
        ({"alpha": math.nan}, "alpha must be a positive finite number"),
        ({"alpha": math.inf}, "alpha must be a positive finite number"),
        ({"init": "xavier"}, "init must be one of"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
    ],
)
def test_bad_options_are_refused_and_leave_the_model_unchanged(model: TinyLM, kwargs: dict, message: str) -> None:
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        apply_lora_to_model(model, **kwargs)
    _assert_unchanged(model, snapshot)


def test_layer_options_reach_every_adapter(model: TinyLM) -> None:
    lora_model = apply_lora_to_model(model, rank=4, alpha=8.0, init="course", use_rslora=True, dropout=0.1)
    for module in lora_modules(lora_model).values():
        assert module.lora.init == "course"
        assert module.lora.scaling == pytest.approx(8.0 / 2.0)
        assert isinstance(module.lora.dropout, nn.Dropout) and module.lora.dropout.p == 0.1


# --------------------------------------------------------------------------- trainable flags & counts


@pytest.mark.parametrize(
    ("bias", "extra"),
    [
        ("none", set()),
        # every parameter named ...bias, adapted or not, LayerNorm's too (loralib's "all")
        (
            "all",
            {"blocks.0.attn.q.original_layer.bias", "blocks.1.attn.q.original_layer.bias", "seq.bias"}
            | {f"blocks.{i}.{m}.bias" for i in range(2) for m in (*BLOCK_LINEARS[1:], "ln")},
        ),
        # only the biases of adapted layers
        ("lora_only", {"blocks.0.attn.q.original_layer.bias", "blocks.1.attn.q.original_layer.bias"}),
    ],
)
def test_mark_only_lora_as_trainable_bias_modes(model: TinyLM, bias: str, extra: set[str]) -> None:
    lora_model = apply_lora_to_model(model, target_modules=["q"])
    for p in lora_model.parameters():
        p.requires_grad_(True)  # start from everything trainable
    mark_only_lora_as_trainable(lora_model, bias=bias)
    assert _trainable_names(lora_model) == _adapter_names(["blocks.0.attn.q", "blocks.1.attn.q"]) | extra


def test_mark_only_lora_as_trainable_bad_bias_changes_nothing(model: TinyLM) -> None:
    lora_model = apply_lora_to_model(model, target_modules=["q"])
    lora_model.emb.weight.requires_grad_(True)
    flags = {name: p.requires_grad for name, p in lora_model.named_parameters()}
    with pytest.raises(ValueError, match=r"bias must be one of \('none', 'all', 'lora_only'\), got 'some'"):
        mark_only_lora_as_trainable(lora_model, bias="some")
    assert {name: p.requires_grad for name, p in lora_model.named_parameters()} == flags


def test_count_parameters_by_hand() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 10, bias=False))
    # Embedding 10·8 = 80; Linear 8·16 + 16 = 144; LayerNorm 2·16 = 32; Linear 16·10 = 160.
    assert count_parameters(model) == (416, 416)
    lora_model = apply_lora_to_model(model, rank=2, alpha=1.0)
    # Adapters: 2·(8 + 16) = 48 and 2·(16 + 10) = 52.
    assert count_parameters(lora_model) == (100, 516)
    assert count_parameters(model) == (416, 416)  # the original is untouched
    lora_only = copy.deepcopy(lora_model)
    mark_only_lora_as_trainable(lora_only, bias="lora_only")
    assert count_parameters(lora_only) == (116, 516)  # + the first Linear's 16 biases


def test_count_parameters_counts_a_tied_weight_once() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    model[1].weight = model[0].weight  # weight tying, as GPT-2 does
    assert count_parameters(model) == (80, 80)
    assert count_parameters(apply_lora_to_model(model, rank=2)) == (2 * (8 + 10), 80 + 36)


def test_lora_state_dict_holds_only_the_adapters(model: TinyLM) -> None:
    targets = ["blocks.0.attn.q", "blocks.1.attn.q", "head"]
    lora_model = apply_lora_to_model(model, rank=3, target_modules=["q", "head"])
    _randomise_adapters(lora_model)
    state = lora_state_dict(lora_model)
    assert set(state) == _adapter_names(targets)
    for name in targets:
        module = lora_model.get_submodule(name)
        assert torch.equal(state[f"{name}.lora.lora_A"], module.lora.lora_A)
        assert torch.equal(state[f"{name}.lora.lora_B"], module.lora.lora_B)
        assert state[f"{name}.lora.lora_A"].shape == (3, module.in_features)
        assert state[f"{name}.lora.lora_B"].shape == (module.out_features, 3)
    assert not any(t.requires_grad for t in state.values())
    # Loading it into another adapted copy reproduces the adapted model.
    other = apply_lora_to_model(model, rank=3, target_modules=["q", "head"])
    missing, unexpected = other.load_state_dict(state, strict=False)
    assert not unexpected and set(missing).isdisjoint(state)
    tokens = torch.randint(0, VOCAB, (2, 5), generator=make_generator(3))
    assert torch.equal(other(tokens), lora_model(tokens))


# --------------------------------------------------------------------------- merge_lora


def test_merge_lora_returns_plain_linears_with_the_same_outputs(model: TinyLM, tokens: torch.Tensor) -> None:
    lora_model = apply_lora_to_model(model, rank=4, alpha=8.0)
    _randomise_adapters(lora_model)
    adapted_out = lora_model(tokens)
    assert not torch.allclose(adapted_out, model(tokens), atol=1e-3)  # the adapters do matter
    snapshot = _snapshot(lora_model)

    merged = merge_lora(lora_model)

    assert merged is not lora_model
    assert not lora_modules(merged)
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
    for name in ALL_LINEARS:
        assert type(merged.get_submodule(name)) is nn.Linear
    assert set(merged.state_dict()) == set(model.state_dict())  # the base model's layout
    torch.testing.assert_close(merged(tokens), adapted_out, rtol=1e-5, atol=1e-5)
    # The adapted model is untouched: still adapters, unmerged, same values.
    current = dict(lora_model.named_parameters())
    assert current.keys() == snapshot.keys()
    assert all(torch.equal(current[n], v) and current[n].requires_grad == g for n, (v, g) in snapshot.items())
    assert all(not m.merged for m in lora_modules(lora_model).values())
    assert list(lora_modules(lora_model)) == ALL_LINEARS


def test_merge_lora_does_not_merge_an_already_merged_layer_twice(model: TinyLM, tokens: torch.Tensor) -> None:
    lora_model = apply_lora_to_model(model, rank=4, alpha=8.0, target_modules=["q", "o"])
    _randomise_adapters(lora_model)
    expected = lora_model(tokens)
    lora_model.blocks[0].attn.q.merge()
    merged = merge_lora(lora_model)
    torch.testing.assert_close(merged(tokens), expected, rtol=1e-5, atol=1e-5)


def test_merge_lora_refuses_non_finite_adapters(model: TinyLM) -> None:
    lora_model = apply_lora_to_model(model, target_modules=["q"])
    with torch.no_grad():
        lora_model.blocks[1].attn.q.lora.lora_B.fill_(math.inf)
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters()}
    message = r"merging blocks\.1\.attn\.q would produce non-finite weights.*the model was not merged"
    with pytest.raises(ValueError, match=message):
        merge_lora(lora_model)
    assert all(torch.equal(p, before[n]) for n, p in lora_model.named_parameters())


def test_merge_lora_with_tied_weights_keeps_outputs(tokens: torch.Tensor) -> None:
    # GPT-2 / nanoGPT tie the output head to the token embedding. Merging ΔW into the head
    # must not leak into the embedding that shares its tensor, or the merged model computes
    # something else than the adapted one.
    model = TinyLM()
    model.head.weight = model.emb.weight
    lora_model = apply_lora_to_model(model, rank=4, alpha=8.0, target_modules=["head", "q"])
    _randomise_adapters(lora_model)
    adapted_out = lora_model(tokens)
    embedding = lora_model.emb.weight.detach().clone()

    merged = merge_lora(lora_model)

    assert torch.equal(lora_model.emb.weight, embedding)  # the adapted model is untouched
    torch.testing.assert_close(merged(tokens), adapted_out, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- disable_lora


def test_disable_lora_runs_the_base_model(model: TinyLM, tokens: torch.Tensor) -> None:
    lora_model = apply_lora_to_model(model, rank=4, alpha=8.0)
    _randomise_adapters(lora_model)
    adapted_out = lora_model(tokens)
    base_out = model(tokens)
    assert not torch.allclose(adapted_out, base_out, atol=1e-3)

    with disable_lora(lora_model) as inside:
        assert inside is lora_model
        assert torch.equal(lora_model(tokens), base_out)
        with disable_lora(lora_model):  # nesting keeps it off when the inner block ends
            pass
        assert torch.equal(lora_model(tokens), base_out)
    assert torch.equal(lora_model(tokens), adapted_out)
    assert all(not m.disabled for m in lora_modules(lora_model).values())


def test_disable_lora_is_restored_after_an_exception(model: TinyLM, tokens: torch.Tensor) -> None:
    lora_model = apply_lora_to_model(model, rank=4, alpha=8.0)
    _randomise_adapters(lora_model)
    adapted_out = lora_model(tokens)
    with pytest.raises(KeyError, match="boom"), disable_lora(lora_model):
        raise KeyError("boom")
    assert all(not m.disabled for m in lora_modules(lora_model).values())
    assert torch.equal(lora_model(tokens), adapted_out)


def test_disable_lora_refuses_merged_layers(model: TinyLM, tokens: torch.Tensor) -> None:
    lora_model = apply_lora_to_model(model, rank=4, alpha=8.0, target_modules=["q", "v"])
    _randomise_adapters(lora_model)
    lora_model.blocks[1].attn.v.merge()
    expected = lora_model(tokens)
    with pytest.raises(RuntimeError, match=r"cannot disable merged LoRA layers \(blocks\.1\.attn\.v\).*unmerge\(\)"):  # noqa: SIM117
        with disable_lora(lora_model):
            pass
    assert all(not m.disabled for m in lora_modules(lora_model).values())
    assert torch.equal(lora_model(tokens), expected)


# --------------------------------------------------------------------------- properties

_features = st.integers(min_value=1, max_value=64)


def _mlp(widths: list[int], bias: bool, seed: int) -> nn.Sequential:
    """A stack of Linear+Tanh layers whose weights come from ``seed`` alone."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:], strict=False)):
        linear = nn.Linear(fan_in, fan_out, bias=bias)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's own init range
            for j, p in enumerate(linear.parameters()):
                p.copy_((torch.rand(p.shape, generator=make_generator(seed + 2 * i + j)) * 2 - 1) * bound)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers)


@settings(max_examples=30, deadline=None)
@given(
    widths=st.lists(_features, min_size=2, max_size=4),
    rank=st.integers(min_value=1, max_value=16),
    alpha=st.floats(min_value=0.1, max_value=64.0),
    batch_shape=st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=2).map(tuple),
    bias=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_property_apply_count_identity_and_merge(
    widths: list[int], rank: int, alpha: float, batch_shape: tuple[int, ...], bias: bool, seed: int
) -> None:
    model = _mlp(widths, bias, seed)
    x = torch.randn(*batch_shape, widths[0], generator=make_generator(seed + 100))
    base_out = model(x)
    _, base_total = count_parameters(model)

    lora_model = apply_lora_to_model(model, rank=rank, alpha=alpha)

    # r·(in + out) trainable parameters per adapted layer, and nothing else.
    expected_trainable = sum(rank * (fan_in + fan_out) for fan_in, fan_out in zip(widths, widths[1:], strict=False))
    assert count_parameters(lora_model) == (expected_trainable, base_total + expected_trainable)
    # Zero-init identity, bit for bit.
    assert torch.equal(lora_model(x), base_out)

    # Merge equivalence with trained-looking (non-zero) adapters. Tanh keeps activations in
    # [-1, 1], so the error of each layer is bounded by a few float32 ulps of the magnitudes
    # involved; the tolerance scales with the widths and with s·|B||A|, the adapter's size.
    _randomise_adapters(lora_model, seed=seed + 200)
    adapted_out = lora_model(x)
    merged_out = merge_lora(lora_model)(x)
    eps = torch.finfo(torch.float32).eps
    scale = 1.0 + max(
        (m.lora.lora_B.abs() @ m.lora.lora_A.abs()).sum(1).max().item() * m.lora.scaling
        for m in lora_modules(lora_model).values()
    )
    tolerance = 8 * (max(widths) + rank + 4) * eps * scale * len(widths)
    assert (adapted_out - merged_out).abs().max().item() <= tolerance
