"""Tests for lora_lab.lora.adapters: LoRA adapters in Hugging Face PEFT's on-disk format.

The interop tests run real PEFT (a declared test dependency) in both directions and compare
logits numerically, with adapters whose B is far from zero and whose effect on the logits is
asserted first, so a lost or mis-scaled adapter cannot pass. Rank 4 with alpha 8 (scaling 2),
rsLoRA (scaling 8/√4 = 4) and rank 2 with alpha 5 (scaling 2.5) make a wrong scaling visible.
Any warning PEFT raises while saving or loading fails the test: PEFT's only sign of an adapter
it could not place is a "Found missing adapter keys" warning, after which B stays zero.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lora_lab.files
import lora_lab.lora.adapters
from lora_lab.lora.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, load_adapter, save_adapter
from lora_lab.lora.fused import FusedLoRALinear
from lora_lab.lora.inject import apply_lora_to_model, lora_modules, lora_state_dict
from lora_lab.lora.layers import LoRALinear
from lora_lab.model import GPT, GPTConfig
from lora_lab.seeding import make_generator, seed_everything

VOCAB, CONTEXT, WIDTH, HEADS = 13, 8, 16, 2
ALL_LINEAR = ["q", "k", "v", "o", "up", "down", "lm_head"]
# (rank, alpha, use_rslora, target_modules), the same list handed to lora_lab and to PEFT.
CASES = {
    "all-r4-a8": (4, 8, False, ALL_LINEAR),
    "qv-r4-a8-rslora": (4, 8, True, ["q", "v"]),
    "subset-r2-a5": (2, 5, False, ["attn.o", "mlp.up", "lm_head"]),
}
# The safetensors metadata key under which save_adapter records the settings the weights were saved with.
SETTINGS_KEY = "lora_lab.adapter_config"
# Float32: PEFT computes B(A(x))·s, lora_lab (x Aᵀ·s) Bᵀ. The two orders round differently, by up
# to ~1e-6 on logits of size ~1 (measured), while the adapters change the logits by more than 0.1.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
# The type of tests/conftest.py's no_warnings fixture: ``with no_warnings(): ...`` fails on any warning inside.
NoWarnings = Callable[[], contextlib.AbstractContextManager[None]]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These matrices are tiny: a second thread only adds hand-offs, and on a busy 2-core machine it
    made every forward pass ~10× slower (measured: 2.4 s instead of 0.16 s per interop test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a small GPT-like model written here, and lora_lab's own GPT ---------------------------------


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, HEADS, C // HEADS).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(WIDTH), Attention(), nn.LayerNorm(WIDTH), MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.ln_f = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def make_base(kind: str) -> nn.Module:
    seed_everything(0, deterministic=False)  # the base weights come from the global generator
    if kind == "tiny":
        return TinyGPT().eval()
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=CONTEXT, n_layer=2, n_head=HEADS, n_embd=WIDTH)).eval()


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out[0] if isinstance(out, tuple) else out  # lora_lab's GPT returns (logits, loss)


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, CONTEXT), generator=make_generator(7))


@torch.no_grad()
def randomise_lora(model: nn.Module, seed: int) -> None:
    """Give every lora_A / lora_B (lora_lab's or PEFT's) random values, so that B ≠ 0."""
    generator = make_generator(seed)
    for name, param in sorted(model.named_parameters()):
        if "lora_A" in name or "lora_B" in name:
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def lora_lab_model(base: nn.Module, case: str, seed: int = 1) -> nn.Module:
    rank, alpha, use_rslora, targets = CASES[case]
    model = apply_lora_to_model(base, rank=rank, alpha=alpha, target_modules=targets, use_rslora=use_rslora)
    randomise_lora(model, seed)
    return model.eval()


def assert_adapter_matters(adapted: torch.Tensor, base: torch.Tensor) -> None:
    """The comparison below can only fail if the adapter visibly changes the logits."""
    assert (adapted - base).abs().max() > 0.1


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    params = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    return params, {name: layer.merged for name, layer in lora_modules(model).items()}


def assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, bool]]) -> None:
    params, merged = snapshot(model)
    assert params.keys() == before[0].keys() and merged == before[1]
    for name, tensor in params.items():  # compared as raw bytes: bit-identical, and NaN equals itself
        old = before[0][name]
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), old.reshape(-1).view(torch.uint8)), f"{name} changed"


def replace_layer(model: nn.Module, name: str, **options) -> None:
    """Swap one LoRA layer for a fresh one with other settings (apply_lora_to_model gives all the same),
    of the same class (FusedLoRALinear, apply_lora_to_model's default, or the plain LoRALinear)."""
    parent, _, child = name.rpartition(".")
    layer = lora_modules(model)[name]
    options = {"rank": layer.lora.rank, "alpha": layer.lora.alpha, "use_rslora": layer.lora.use_rslora, **options}
    setattr(model.get_submodule(parent), child, type(layer)(layer.original_layer, **options))


def test_no_warnings_passes_only_torchs_notices_about_itself(no_warnings: NoWarnings) -> None:
    """The guard the interop tests rely on: a warning from anywhere but torch's own files fails."""
    torch_file = str(Path(torch.__file__).parent / "utils" / "mkldnn.py")
    with no_warnings():
        warnings.warn_explicit("script_method is deprecated", DeprecationWarning, torch_file, 19)
    for category, filename in [(UserWarning, torch_file), (DeprecationWarning, peft.__file__)]:
        with pytest.raises(AssertionError, match="Found missing adapter keys"), no_warnings():
            warnings.warn_explicit("Found missing adapter keys", category, filename, 1)


# --- interop with PEFT -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tiny", "gpt"])
@pytest.mark.parametrize("case", CASES)
def test_lora_lab_adapter_gives_same_logits_in_peft(
    kind: str, case: str, tmp_path: Path, no_warnings: NoWarnings
) -> None:
    base = make_base(kind)
    model = lora_lab_model(base, case)
    x = tokens()
    expected = logits(model, x)
    assert_adapter_matters(expected, logits(base, x))

    save_adapter(model, tmp_path)
    with no_warnings():
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, x), expected, **TOLERANCE)


@pytest.mark.parametrize("kind", ["tiny", "gpt"])
@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_gives_same_logits_in_lora_lab(
    kind: str, case: str, tmp_path: Path, no_warnings: NoWarnings
) -> None:
    rank, alpha, use_rslora, targets = CASES[case]
    base = make_base(kind)
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora)
    )
    randomise_lora(peft_model, seed=2)
    peft_model.eval()
    x = tokens()
    expected = logits(peft_model, x)
    assert_adapter_matters(expected, logits(base, x))
    with no_warnings():  # PEFT counts "lm_head" as an embedding layer and would also save it unless told not to
        peft_model.save_pretrained(tmp_path, save_embedding_layers=False)

    model = apply_lora_to_model(base, rank=rank, alpha=alpha, target_modules=targets, use_rslora=use_rslora).eval()
    loaded = load_adapter(model, tmp_path)
    assert sorted(loaded) == sorted(lora_modules(model))
    torch.testing.assert_close(logits(model, x), expected, **TOLERANCE)


@pytest.mark.parametrize("saved_fused", [True, False], ids=["fused-to-plain", "plain-to-fused"])
def test_adapter_moves_between_fused_and_plain_layers(saved_fused: bool, tmp_path: Path) -> None:
    """The layer class is how the model computes, not part of the adapter: the same files load into a
    model of FusedLoRALinear layers (apply_lora_to_model's default) and one of plain LoRALinear layers."""
    base = make_base("gpt")
    rank, alpha, use_rslora, targets = CASES["qv-r4-a8-rslora"]
    options = {"rank": rank, "alpha": alpha, "target_modules": targets, "use_rslora": use_rslora}
    source = apply_lora_to_model(base, fused=saved_fused, **options)
    randomise_lora(source, seed=4)
    source.eval()
    x = tokens()
    expected = logits(source, x)
    assert_adapter_matters(expected, logits(base, x))
    save_adapter(source, tmp_path)

    target = apply_lora_to_model(base, fused=not saved_fused, **options).eval()
    assert {type(m) for m in lora_modules(target).values()} == {FusedLoRALinear if not saved_fused else LoRALinear}
    assert sorted(load_adapter(target, tmp_path)) == sorted(lora_modules(source))
    assert lora_state_dict(target).keys() == lora_state_dict(source).keys()
    for name, tensor in lora_state_dict(source).items():
        assert torch.equal(lora_state_dict(target)[name], tensor), name
    torch.testing.assert_close(logits(target, x), expected, **TOLERANCE)


def test_peft_only_warns_about_unprefixed_keys_and_load_adapter_refuses_them(tmp_path: Path) -> None:
    """The trap the interop tests guard against, shown to be real with this PEFT version."""
    base = make_base("tiny")
    model = lora_lab_model(base, "qv-r4-a8-rslora")
    save_adapter(model, tmp_path)
    weights = load_file(tmp_path / ADAPTER_WEIGHTS_NAME)
    save_file({k.removeprefix("base_model.model."): v for k, v in weights.items()}, tmp_path / ADAPTER_WEIGHTS_NAME)

    with pytest.warns(UserWarning, match="Found missing adapter keys"):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = tokens()
    torch.testing.assert_close(logits(peft_model, x), logits(base, x), rtol=0, atol=0)  # the adapter did nothing

    target = apply_lora_to_model(base, rank=4, alpha=8, target_modules=["q", "v"], use_rslora=True)
    before = snapshot(target)
    with pytest.raises(ValueError, match="lacks the 'base_model.model.' prefix"):
        load_adapter(target, tmp_path)
    assert_unchanged(target, before)


def test_peft_state_dict_keys_with_adapter_name_load(tmp_path: Path) -> None:
    """``PeftModel.state_dict()`` names tensors ``...lora_A.default.weight``; those load too."""
    base = make_base("tiny")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["k", "down"]))
    randomise_lora(peft_model, seed=3)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    lora_tensors = {k: v for k, v in peft_model.state_dict().items() if ".lora_" in k}
    assert all(".default.weight" in k for k in lora_tensors) and len(lora_tensors) == 8
    save_file(lora_tensors, tmp_path / ADAPTER_WEIGHTS_NAME)

    model = apply_lora_to_model(base, rank=4, alpha=8, target_modules=["k", "down"]).eval()
    load_adapter(model, tmp_path)
    x = tokens()
    assert_adapter_matters(logits(model, x), logits(base, x))
    torch.testing.assert_close(logits(model, x), logits(peft_model, x), **TOLERANCE)


def test_peft_rank_and_alpha_patterns_are_honoured(tmp_path: Path, no_warnings: NoWarnings) -> None:
    """PEFT's rank_pattern / alpha_pattern give chosen layers their own r and alpha; load_adapter reads
    them with PEFT's matching rule and accepts the adapter once the model's layers agree."""
    base = make_base("tiny")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], rank_pattern={"q": 2}, alpha_pattern={"v": 16})
    peft_model = get_peft_model(copy.deepcopy(base), config)
    randomise_lora(peft_model, seed=8)
    peft_model.eval()
    with no_warnings():
        peft_model.save_pretrained(tmp_path)

    model = apply_lora_to_model(base, rank=4, alpha=8, target_modules=["q", "v"]).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"r=2, lora_alpha=8, use_rslora=False for blocks\.0\.attn\.q"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)
    for name in lora_modules(model):
        if name.endswith(".q"):
            replace_layer(model, name, rank=2)
        else:
            replace_layer(model, name, alpha=16)
    load_adapter(model.eval(), tmp_path)
    x = tokens()
    assert_adapter_matters(logits(model, x), logits(base, x))
    torch.testing.assert_close(logits(model, x), logits(peft_model, x), **TOLERANCE)


# --- the files save_adapter writes ---------------------------------------------------------------


def test_saved_files_follow_peft_format(tmp_path: Path) -> None:
    model = lora_lab_model(make_base("gpt"), "subset-r2-a5")
    assert save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-gpt") == tmp_path / "adapter"
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]

    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert list(config) == sorted(config)
    names = ["blocks.0.attn.o", "blocks.0.mlp.up", "blocks.1.attn.o", "blocks.1.mlp.up", "lm_head"]
    assert config == {
        "alpha_pattern": {}, "base_model_name_or_path": "tiny-gpt", "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "lora_alpha": 5, "lora_bias": False, "lora_dropout": 0.0, "modules_to_save": None, "peft_type": "LORA",
        "r": 2, "rank_pattern": {}, "target_modules": names, "task_type": None, "use_dora": False,
        "use_rslora": False,
    }  # fmt: skip
    assert LoraConfig.from_pretrained(tmp_path / "adapter").target_modules == set(names)

    with safe_open(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME, framework="pt") as handle:
        metadata = handle.metadata()
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    layers = lora_modules(model)
    assert shapes == {
        f"base_model.model.{name}.lora_{factor}.weight": (
            (2, layers[name].in_features) if factor == "A" else (layers[name].out_features, 2)
        )
        for name in names
        for factor in "AB"
    }
    assert metadata.keys() == {"format", SETTINGS_KEY}
    assert json.loads(metadata[SETTINGS_KEY]) == {
        "r": 2, "lora_alpha": 5, "use_rslora": False, "target_modules": names, "rank_pattern": {}, "alpha_pattern": {},
    }  # fmt: skip


def test_saved_files_keep_their_byte_format(tmp_path: Path) -> None:
    """The weights keep PEFT's "format": "pt" entry, and the config is byte for byte what
    lora_lab.files.json_text gives (save_adapter writes it through its own temporary file)."""
    save_adapter(
        lora_lab_model(make_base("tiny"), "qv-r4-a8-rslora"), tmp_path / "adapter", base_model_name_or_path="é"
    )
    with safe_open(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME, framework="pt") as handle:
        assert handle.metadata()["format"] == "pt"
    written = (tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_bytes()
    assert written == lora_lab.files.json_text(json.loads(written)).encode("utf-8")


def test_saving_is_reproducible(tmp_path: Path) -> None:
    """safetensors writes metadata entries in random order (its issue #584); save_adapter sorts them, so
    saving one adapter again gives the same bytes (eight saves: a random order would show by chance 1 - 2⁻⁷)."""
    model = lora_lab_model(make_base("tiny"), "qv-r4-a8-rslora")
    saved = set()
    for attempt in range(8):
        directory = save_adapter(model, tmp_path / str(attempt))
        saved.add(tuple((directory / name).read_bytes() for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)))
    assert len(saved) == 1
    with safe_open(tmp_path / "0" / ADAPTER_WEIGHTS_NAME, framework="pt") as handle:
        assert handle.metadata().keys() == {"format", SETTINGS_KEY}


def test_lora_lab_round_trip_is_bit_exact(tmp_path: Path) -> None:
    base = make_base("tiny")
    source = lora_lab_model(base, "all-r4-a8", seed=4)
    save_adapter(source, tmp_path)
    target = lora_lab_model(base, "all-r4-a8", seed=5)  # different adapters to overwrite
    assert load_adapter(target, tmp_path) == list(lora_modules(target))
    for name, param in source.named_parameters():
        assert torch.equal(param, target.get_parameter(name)), name


def test_merged_layers_save_the_same_adapter(tmp_path: Path, no_warnings: NoWarnings) -> None:
    """Merging writes W + ΔW into the base weight only; A and B, hence the adapter, are unchanged."""
    base = make_base("tiny")
    model = lora_lab_model(base, "qv-r4-a8-rslora")
    x = tokens()
    expected = logits(model, x)
    save_adapter(model, tmp_path / "unmerged")
    for layer in lora_modules(model).values():
        layer.merge()
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)  # merged: W + ΔW in float32
    save_adapter(model, tmp_path / "merged")
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "unmerged" / name).read_bytes()
    with no_warnings():
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "merged").eval()
    torch.testing.assert_close(logits(peft_model, x), expected, **TOLERANCE)


# --- save_adapter refuses, writing nothing ---------------------------------------------------------


def _nan_in_b(model: nn.Module) -> None:
    with torch.no_grad():
        lora_modules(model)["blocks.1.attn.v"].lora.lora_B[0, 0] = float("nan")


SAVE_ERRORS: dict[str, tuple[Callable[[nn.Module], nn.Module | None], dict, type[Exception], str]] = {
    # name: (how the model is spoiled, extra save_adapter kwargs, error type, message)
    "no LoRA layers": (lambda m: make_base("tiny"), {}, ValueError, "no LoRA layers to save"),
    "mixed rank": (lambda m: replace_layer(m, "blocks.0.attn.v", rank=2), {}, ValueError, r"differ in \(rank, alpha"),
    "mixed alpha": (lambda m: replace_layer(m, "blocks.0.attn.v", alpha=3), {}, ValueError, "rank_pattern/alpha_"),
    "mixed rslora": (lambda m: replace_layer(m, "blocks.0.attn.v", use_rslora=False), {}, ValueError, "differ in"),
    "mixed dropout": (lambda m: replace_layer(m, "blocks.0.attn.v", dropout=0.1), {}, ValueError, "differ in"),
    "NaN in B": (_nan_in_b, {}, ValueError, r"blocks\.1\.attn\.v\.lora\.lora_B holds NaN"),
    "bad base model name": (lambda m: None, {"base_model_name_or_path": 3}, TypeError, "must be a str or None"),
    "model is a LoRALinear": (lambda m: LoRALinear(nn.Linear(3, 4)), {}, ValueError, "wrap it in a module"),
}  # fmt: skip


@pytest.mark.parametrize("error", SAVE_ERRORS)
def test_save_adapter_errors_leave_model_and_files_unchanged(error: str, tmp_path: Path) -> None:
    spoil, kwargs, error_type, message = SAVE_ERRORS[error]
    model = lora_lab_model(make_base("tiny"), "qv-r4-a8-rslora")
    save_adapter(model, tmp_path)  # an earlier, valid adapter that a failed save must not touch
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = spoil(model) or model
    before = snapshot(model)
    with pytest.raises(error_type, match=message):
        save_adapter(model, tmp_path, **kwargs)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    assert_unchanged(model, before)


def test_save_adapter_refuses_a_file_as_directory(tmp_path: Path) -> None:
    (tmp_path / "adapter").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        save_adapter(lora_lab_model(make_base("tiny"), "all-r4-a8"), tmp_path / "adapter")
    assert (tmp_path / "adapter").read_text() == "not a directory"


# --- load_adapter refuses, leaving the model bit-identical ----------------------------------------


def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / ADAPTER_CONFIG_NAME
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _edit_weights(
    edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> Callable[[Path], None]:
    """Rewrite the weights, by default with PEFT's metadata only (so no settings are compared)."""

    def apply(directory: Path) -> None:
        path = directory / ADAPTER_WEIGHTS_NAME
        save_file(edit(load_file(path)), path, metadata=metadata or {"format": "pt"})

    return apply


def _resave_with(**changes) -> Callable[[Path], None]:
    """Change settings in the config and, alike, in those the weights record: an adapter saved with other
    settings, whose config load_adapter must compare with the model (a config edited alone is refused sooner)."""

    def apply(directory: Path) -> None:
        _edit_config(**changes)(directory)
        path = directory / ADAPTER_WEIGHTS_NAME
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
        settings = json.loads(metadata[SETTINGS_KEY])
        assert changes.keys() <= settings.keys()
        save_file(load_file(path), path, metadata={**metadata, SETTINGS_KEY: json.dumps({**settings, **changes})})

    return apply


def _write(name: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / name
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)

    return apply


Q0 = "base_model.model.blocks.0.attn.q"
LOAD_ERRORS: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    # name: (how the saved adapter is spoiled, error type, message); the model targets q, v with r=4, α=8
    "missing config": (lambda d: (d / ADAPTER_CONFIG_NAME).unlink(), FileNotFoundError, "config.json not found"),
    "missing weights": (lambda d: (d / ADAPTER_WEIGHTS_NAME).unlink(), FileNotFoundError, "lacks its weights file"),
    "config not JSON": (_write(ADAPTER_CONFIG_NAME, b'{"r": 4,'), ValueError, "is not valid JSON"),
    "config not an object": (_write(ADAPTER_CONFIG_NAME, b"[4, 8]"), ValueError, "must hold a JSON object, got list"),
    "not LoRA": (_edit_config(peft_type="IA3"), ValueError, "peft_type='IA3'"),
    "r not an int": (_edit_config(r="4"), ValueError, "r must be a positive int, got '4'"),
    "no lora_alpha": (_edit_config(lora_alpha=None), ValueError, "lora_alpha must be a positive number, got None"),
    "use_rslora not bool": (_edit_config(use_rslora="yes"), ValueError, "use_rslora must be true or false"),
    "bad rank_pattern": (_edit_config(rank_pattern={"q": "two"}), ValueError, "rank_pattern must map"),
    "bad alpha_pattern regex": (_edit_config(alpha_pattern={"q(": 8}), ValueError, "alpha_pattern must map"),
    "bias trained": (_edit_config(bias="all"), ValueError, "bias='all'"),
    "PiSSA init": (_edit_config(init_lora_weights="pissa_niter_4"), ValueError, "rewrites the base weights"),
    "DoRA config, plain model": (_edit_config(use_dora=True), ValueError, r"use_dora=True.*has use_dora=False"),
    "layer replication": (_edit_config(layer_replication=[[0, 2]]), ValueError, "layer_replication"),
    "rank differs": (_resave_with(r=8), ValueError, r"r=8, lora_alpha=8.*rank=4, alpha=8.*\(base, rank=8, alpha=8"),
    "alpha differs": (_resave_with(lora_alpha=16), ValueError, r"lora_alpha=16,.*alpha=8,.*alpha=16, use_rslora=False"),
    "rslora differs": (_resave_with(use_rslora=True), ValueError, r"use_rslora=True for blocks\.0\.attn\.q.*=False;"),
    "rank_pattern differs": (_resave_with(rank_pattern={"v": 2}), ValueError, r"r=2, .* for blocks\.0\.attn\.v"),
    "alpha_pattern differs": (_resave_with(alpha_pattern={"1.attn.q": 4}), ValueError, r"=4, .* blocks\.1\.attn\.q"),
    "r edited in config only": (
        _edit_config(r=8), ValueError,
        r"come from different saves \(r=8 in adapter_config\.json but 4 in adapter_model\.safetensors\)",
    ),
    "lora_alpha edited in config only": (_edit_config(lora_alpha=16), ValueError, "lora_alpha=16 in adapter_conf"),
    "settings metadata not JSON": (
        _edit_weights(lambda w: w, metadata={"format": "pt", SETTINGS_KEY: "{"}), ValueError,
        "'lora_lab.adapter_config' metadata is not a JSON object",
    ),
    "truncated weights": (_write(ADAPTER_WEIGHTS_NAME, lambda b: b[:-9]), ValueError, "truncated or corrupt"),
    "garbage weights": (_write(ADAPTER_WEIGHTS_NAME, b"\x00" * 64), ValueError, "truncated or corrupt"),
    "foreign tensor": (
        _edit_weights(lambda w: {**w, f"{Q0}.lora_magnitude_vector": torch.ones(WIDTH)}),
        ValueError, "DoRA magnitudes, but the model's layers are plain LoRA",
    ),
    "layer not adapted in model": (
        _edit_weights(lambda w: {**w, "base_model.model.blocks.0.attn.k.lora_A.weight": torch.ones(4, WIDTH)}),
        ValueError, r"weights for \['blocks\.0\.attn\.k'\], which are not LoRA layers",
    ),
    "missing lora_B": (
        _edit_weights(lambda w: {k: v for k, v in w.items() if k != f"{Q0}.lora_B.weight"}),
        ValueError, r"no weights for \['blocks\.0\.attn\.q\.lora_B'\].*PEFT only warns",
    ),
    "missing layer": (
        _edit_weights(lambda w: {k: v for k, v in w.items() if "blocks.1.attn.v" not in k}),
        ValueError, r"no weights for \['blocks\.1\.attn\.v\.lora_A', 'blocks\.1\.attn\.v\.lora_B'\]",
    ),
    "duplicate with adapter name": (
        _edit_weights(lambda w: {**w, f"{Q0}.lora_A.default.weight": w[f"{Q0}.lora_A.weight"].clone()}),
        ValueError, r"two lora_A tensors for blocks\.0\.attn\.q",
    ),
    "transposed A": (
        _edit_weights(lambda w: {**w, f"{Q0}.lora_A.weight": w[f"{Q0}.lora_A.weight"].t().contiguous()}),
        ValueError, r"lora_A in the adapter has shape \(16, 4\); the model's layer needs \(4, 16\)",
    ),
    "integer dtype": (
        _edit_weights(lambda w: {**w, f"{Q0}.lora_B.weight": torch.ones(WIDTH, 4, dtype=torch.int32)}),
        ValueError, "has dtype torch.int32; LoRA weights are floating point",
    ),
    "NaN in A": (
        _edit_weights(lambda w: {**w, f"{Q0}.lora_A.weight": torch.full((4, WIDTH), float("nan"))}),
        ValueError, "holds NaN or inf",
    ),
}  # fmt: skip


@pytest.fixture
def adapter_and_target(tmp_path: Path) -> tuple[Path, nn.Module]:
    """A saved q/v adapter (r=4, α=8) and a matching lora_lab model, with other adapters, to load it into."""
    base = make_base("tiny")
    save_adapter(_qv_model(base, seed=6), tmp_path)
    return tmp_path, _qv_model(base, seed=7)


def _qv_model(base: nn.Module, seed: int) -> nn.Module:
    model = apply_lora_to_model(base, rank=4, alpha=8, target_modules=["q", "v"])
    randomise_lora(model, seed)
    return model


@pytest.mark.parametrize("error", LOAD_ERRORS)
def test_load_adapter_errors_leave_model_unchanged(error: str, adapter_and_target: tuple[Path, nn.Module]) -> None:
    spoil, error_type, message = LOAD_ERRORS[error]
    directory, model = adapter_and_target
    load_adapter(copy.deepcopy(model), directory)  # the unspoiled adapter loads: the error comes from the spoiling
    spoil(directory)
    before = snapshot(model)
    with pytest.raises(error_type, match=message):
        load_adapter(model, directory)
    assert_unchanged(model, before)


def test_load_adapter_refuses_missing_directory(adapter_and_target: tuple[Path, nn.Module]) -> None:
    directory, model = adapter_and_target
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(model, directory / "nowhere")
    assert_unchanged(model, before)


def test_load_adapter_refuses_model_without_lora(adapter_and_target: tuple[Path, nn.Module]) -> None:
    directory, _ = adapter_and_target
    base = make_base("tiny")
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"no LoRA layers .* apply_lora_to_model\(base, rank=4, alpha=8, use_rslora"):
        load_adapter(base, directory)
    assert_unchanged(base, before)


def test_load_adapter_refuses_merged_layers(adapter_and_target: tuple[Path, nn.Module]) -> None:
    directory, model = adapter_and_target
    lora_modules(model)["blocks.1.attn.q"].merge()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"\['blocks\.1\.attn\.q'\] are merged; call unmerge\(\)"):
        load_adapter(model, directory)
    assert_unchanged(model, before)


def test_hand_edited_description_fields_still_load(adapter_and_target: tuple[Path, nn.Module]) -> None:
    """Only the settings that say what the weights mean are compared with those the weights record."""
    directory, model = adapter_and_target
    targets = json.loads((directory / ADAPTER_CONFIG_NAME).read_text())["target_modules"]
    _edit_config(base_model_name_or_path="my/base-model", revision="v2", target_modules=targets[::-1])(directory)
    load_adapter(model, directory)
    source = _qv_model(make_base("tiny"), seed=6)
    for name, param in source.named_parameters():
        assert torch.equal(param, model.get_parameter(name)), name


# --- an interrupted save ---------------------------------------------------------------------------


@pytest.mark.parametrize("interruption", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_save_failing_while_writing_leaves_old_files(
    interruption: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank-4 save over a rank-2 adapter fails while writing its config: both old files stay byte-identical
    (no temporary file is left either) and the old adapter still loads."""
    base = make_base("tiny")
    old = lora_lab_model(base, "subset-r2-a5")
    save_adapter(old, tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing_config(obj: object) -> str:  # the new weights are already in their temporary file
        raise interruption

    monkeypatch.setattr(lora_lab.lora.adapters, "json_text", failing_config)
    with pytest.raises(type(interruption)):
        save_adapter(lora_lab_model(base, "all-r4-a8"), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files

    target = lora_lab_model(base, "subset-r2-a5", seed=9)
    load_adapter(target, tmp_path)
    for name, param in old.named_parameters():
        assert torch.equal(param, target.get_parameter(name)), name


def _mixed_pair(tmp_path: Path, base: nn.Module) -> Path:
    """Weights from a rank-4 save next to the config of a rank-2 save, copied between two save folders."""
    save_adapter(lora_lab_model(base, "subset-r2-a5"), tmp_path / "r2")
    save_adapter(lora_lab_model(base, "all-r4-a8"), tmp_path / "r4")
    shutil.copyfile(tmp_path / "r4" / ADAPTER_WEIGHTS_NAME, tmp_path / "r2" / ADAPTER_WEIGHTS_NAME)
    return tmp_path / "r2"


DIFFERENT_SAVES = (
    r"adapter_config\.json and adapter_model\.safetensors in .* come from different saves \(.*"
    r"r=2 in adapter_config\.json but 4 in adapter_model\.safetensors.*\), probably because a save_adapter was "
    r"interrupted; save the adapter again"
)


@pytest.mark.parametrize("case", ["subset-r2-a5", "all-r4-a8"])
def test_weights_and_config_from_different_saves_are_refused(case: str, tmp_path: Path) -> None:
    """Whichever save the model was prepared for, the mixed pair is refused as such (not as a shape
    mismatch that blames the model), and the model is left as it was."""
    base = make_base("tiny")
    directory = _mixed_pair(tmp_path, base)
    model = lora_lab_model(base, case, seed=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match=DIFFERENT_SAVES):
        load_adapter(model, directory)
    assert_unchanged(model, before)


def test_save_interrupted_between_the_two_moves_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the weights were moved into place but before the config was: the weights go first, so
    the folder holds new weights (which record their settings) and the old config, and loading refuses it."""
    base = make_base("tiny")
    save_adapter(lora_lab_model(base, "subset-r2-a5"), tmp_path)
    old_config = (tmp_path / ADAPTER_CONFIG_NAME).read_bytes()
    replace = os.replace

    def interrupted_replace(source: str | os.PathLike, destination: str | os.PathLike) -> None:
        if Path(destination).name == ADAPTER_CONFIG_NAME:
            raise KeyboardInterrupt
        replace(source, destination)

    monkeypatch.setattr(lora_lab.files.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(lora_lab_model(base, "all-r4-a8"), tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    assert (tmp_path / ADAPTER_CONFIG_NAME).read_bytes() == old_config
    with safe_open(tmp_path / ADAPTER_WEIGHTS_NAME, framework="pt") as handle:
        assert json.loads(handle.metadata()[SETTINGS_KEY])["r"] == 4

    model = lora_lab_model(base, "all-r4-a8", seed=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match=DIFFERENT_SAVES):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


# --- the model's dtype ------------------------------------------------------------------------------


def test_adapter_overflowing_float16_is_refused_by_a_float16_model(tmp_path: Path) -> None:
    """copy_ would cast 1e6 to inf in float16; the adapter is refused instead, and the model untouched."""
    base = make_base("tiny")
    source = lora_lab_model(base, "qv-r4-a8-rslora")
    with torch.no_grad():
        lora_modules(source)["blocks.1.attn.v"].lora.lora_B[2, 1] = 1e6
    save_adapter(source, tmp_path)

    model = lora_lab_model(base, "qv-r4-a8-rslora", seed=5).half()
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"blocks\.1\.attn\.v\.lora_B in the adapter overflows float16.* 1e\+06.* 65504"
    ):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)

    load_adapter(model.float(), tmp_path)  # the adapter itself is fine: float32 holds it
    assert lora_modules(model)["blocks.1.attn.v"].lora.lora_B[2, 1] == 1e6
