"""lora_lab on Hugging Face transformers models (tiny configs, random weights, no downloads).

Llama and Qwen2 (``nn.Linear`` projections), GPT-2 (transformers' ``Conv1D``, weight stored (in, out)) and
BERT (an encoder): injection with PEFT's ``"all-linear"`` rule, adapters round-tripping through real PEFT in
both directions, exact merges (tied heads included), the refused ``save_pretrained`` trap, PEFT's keyword
names and ``LoraConfig``, the in-place option, and the export of the series' GPT to a transformers folder.
Every adapter gets a B far from zero and its effect on the outputs is asserted first, so a lost adapter
cannot pass; PEFT's only sign of a misplaced adapter, a "missing adapter keys" warning, fails the test.
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import LoHaConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lora_lab import GPT, GPTConfig, apply_lora_to_model, load_adapter, lora_modules, merge_lora, save_adapter  # noqa: E402
from lora_lab.data import CharTokenizer  # noqa: E402
from lora_lab.export import export_adapter, export_to_transformers, transformers_module_name  # noqa: E402
from lora_lab.lora.conv1d import LoRAConv1D, is_conv1d  # noqa: E402
from lora_lab.seeding import seed_everything  # noqa: E402

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
V, T = 64, 12


def _decoder(config_class: type, model_class: type, tie: bool) -> nn.Module:
    """A Llama-style decoder (grouped-query attention, gated MLP) of two tiny layers."""
    config = config_class(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip
    return model_class(config)


def _llama() -> nn.Module:
    return _decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM, tie=False)


def _qwen2() -> nn.Module:  # with its head tied to the token embedding, as small Qwen2 models are
    return _decoder(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, tie=True)


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertForMaskedLM(config)


BUILDERS: dict[str, Callable[[], nn.Module]] = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2, "bert": _bert}


def _build(kind: str) -> nn.Module:
    seed_everything(0)
    return BUILDERS[kind]().eval()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def _tokens() -> torch.Tensor:
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))


def _randomize_b(model: nn.Module) -> None:
    """Give every B (lora_lab's or PEFT's) values far from zero, so the adapter visibly changes the outputs."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@contextlib.contextmanager
def no_key_warnings() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    bad = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not bad, f"PEFT warned about keys: {bad}"


def _peft_targets(model: nn.Module) -> set[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notice that it set fan_in_fan_out for GPT-2's Conv1D itself
        wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules="all-linear"))
    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, m in wrapped.named_modules() if hasattr(m, "lora_A") and
            name.startswith(prefix) and not name.endswith(("lora_A", "lora_B"))}  # fmt: skip


def test_lora_lab_imports_without_transformers_or_peft() -> None:
    """The core package (and the export module, until an export runs) never needs transformers or peft."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('transformers', 'peft', 'tokenizers'):
            raise ImportError(f'{name} is blocked for this test')
sys.meta_path.insert(0, Block())
import lora_lab, lora_lab.lora, lora_lab.export, lora_lab.checks, lora_lab.experiment
from lora_lab import GPT, GPTConfig, apply_lora_to_model, merge_lora
m = apply_lora_to_model(GPT(GPTConfig(13, 8, 1, 2, 16)), r=2, lora_alpha=4, target_modules='all-linear')
merge_lora(m)
try:
    lora_lab.export.export_to_transformers(GPT(GPTConfig(13, 8, 1, 2, 16)), 'unused')
except ImportError as error:
    assert 'pip install' in str(error), error
else:
    raise AssertionError('export without transformers did not fail')
assert not any(n.split('.')[0] in ('transformers', 'peft') for n in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_all_linear_targets_what_peft_targets(kind: str) -> None:
    model = _build(kind)
    adapted = apply_lora_to_model(model, r=2, target_modules="all-linear")
    assert set(lora_modules(adapted)) == _peft_targets(model)
    head = model.get_output_embeddings()
    assert head is not None and all(adapted.get_submodule(n) is not head for n in lora_modules(adapted))
    # The default (the course's rule) still wraps every linear layer, Conv1D and the head included.
    everything = apply_lora_to_model(model, rank=2)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    assert list(lora_modules(everything)) == linear
    if kind == "gpt2":
        assert all(isinstance(everything.get_submodule(n), LoRAConv1D) for n in linear if n != "lm_head")


def test_all_linear_on_lora_labs_gpt_keeps_the_head_as_peft_does() -> None:
    """Without get_output_embeddings (not a transformers model) PEFT's rule excludes nothing."""
    gpt = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16))
    adapted = apply_lora_to_model(gpt, r=2, target_modules="ALL-LINEAR")  # PEFT compares case-insensitively
    assert set(lora_modules(adapted)) == _peft_targets(gpt) and "lm_head" in lora_modules(adapted)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_lora_lab_adapter_loads_in_peft_with_the_same_outputs(kind: str, tmp_path: Path) -> None:
    model, x = _build(kind), _tokens()
    adapted = apply_lora_to_model(model, r=4, lora_alpha=8, target_modules="all-linear")
    _randomize_b(adapted)
    ours = _logits(adapted, x)
    assert (ours - _logits(model, x)).abs().max() > 0.1
    save_adapter(adapted, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (kind == "gpt2")
    with no_key_warnings():
        theirs = _logits(PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval(), x)
    torch.testing.assert_close(theirs, ours, **TOLERANCE)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_peft_adapter_loads_in_lora_lab_with_the_same_outputs(kind: str, tmp_path: Path) -> None:
    model, x = _build(kind), _tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notice that it set fan_in_fan_out for GPT-2's Conv1D itself
        wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _randomize_b(wrapped)
    theirs = _logits(wrapped.eval(), x)
    wrapped.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    adapted = apply_lora_to_model(model, r=saved["r"], lora_alpha=saved["lora_alpha"],
                                  target_modules=saved["target_modules"])  # fmt: skip
    assert sorted(load_adapter(adapted, tmp_path)) == sorted(lora_modules(adapted))
    ours = _logits(adapted, x)
    assert (ours - _logits(model, x)).abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2", "llama"])
def test_merge_is_exact_and_leaves_a_tied_embedding_alone(kind: str, tmp_path: Path) -> None:
    """The default targets include the LM head; with Qwen2 and GPT-2 it is tied to the input embedding."""
    model, x = _build(kind), _tokens()
    embedding = model.get_input_embeddings().weight.detach().clone()
    adapted = apply_lora_to_model(model, rank=4, alpha=8)
    _randomize_b(adapted)
    expected = _logits(adapted, x)
    merged = merge_lora(adapted)
    assert not lora_modules(merged) and type(merged) is type(model)
    torch.testing.assert_close(_logits(merged, x), expected, **TOLERANCE)
    assert torch.equal(merged.get_input_embeddings().weight, embedding)
    assert torch.equal(adapted.get_input_embeddings().weight, embedding)
    # Layer by layer, merge then unmerge gives the original weight back bit for bit, Conv1D included.
    for layer in lora_modules(adapted).values():
        before = layer.weight.detach().clone()
        layer.merge()
        layer.unmerge()
        assert torch.equal(layer.weight, before)
    # The merged model saves and reloads as itself (a tied config would re-tie the head and drop its update).
    merged.save_pretrained(tmp_path)
    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(_logits(reloaded.eval(), x), expected, **TOLERANCE)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_pretrained_of_an_unmerged_model_is_refused(kind: str, tmp_path: Path) -> None:
    model = _build(kind)
    adapted = apply_lora_to_model(model, r=2, target_modules="all-linear")
    target = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError, match=r"save_adapter.*merge_lora\(model\)\.save_pretrained"):
        adapted.save_pretrained(target)
    assert not target.exists()
    assert type(adapted).__name__ == type(model).__name__ and isinstance(adapted, type(model))
    assert type(model).save_pretrained is not type(adapted).save_pretrained  # the base model still saves
    model.save_pretrained(target)
    assert (target / "model.safetensors").is_file()


def test_peft_keyword_names_and_lora_config_build_the_same_layers() -> None:
    model = _build("llama")
    by_alias = apply_lora_to_model(model, r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    by_name = apply_lora_to_model(model, rank=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    by_config = apply_lora_to_model(model, config)
    layers = [lora_modules(m) for m in (by_alias, by_name, by_config)]
    assert list(layers[0]) == list(layers[1]) == list(layers[2]) and len(layers[0]) == 4
    for layer in (ls["model.layers.0.self_attn.q_proj"] for ls in layers):
        assert (layer.lora.rank, layer.lora.alpha, layer.lora.dropout.p) == (8, 16, 0.05)
    gaussian = apply_lora_to_model(model, LoraConfig(r=2, init_lora_weights="gaussian", use_rslora=True,
                                                     target_modules="all-linear", bias="lora_only"))  # fmt: skip
    layer = lora_modules(gaussian)["model.layers.1.mlp.up_proj"]
    assert layer.lora.init == "gaussian" and layer.lora.use_rslora
    biases = [n for n, p in gaussian.named_parameters() if p.requires_grad and not n.endswith(("lora_A", "lora_B"))]
    assert biases == []  # Llama's projections have no bias: bias="lora_only" trains nothing more


BAD_OPTIONS = {
    "both spellings": ({"rank": 8, "r": 8}, ValueError, "both rank= and PEFT's r="),
    "dropout twice": ({"dropout": 0.1, "lora_dropout": 0.1}, ValueError, "both dropout="),
    "init False": ({"init_lora_weights": False}, ValueError, "init_lora_weights=False is not implemented"),
    "pissa rank": ({"init_lora_weights": "pissa", "r": 10_000}, ValueError, "PiSSA takes the top-r singular"),
    "bias": ({"bias": "some"}, ValueError, "bias must be one of"),
    "fan_in_fan_out": ({"fan_in_fan_out": "yes"}, ValueError, "fan_in_fan_out must be True or False"),
    "unknown": ({"lora_rank": 8}, TypeError, "lora_rank"),
    "dora flag": ({"use_dora": "yes"}, TypeError, "use_dora must be True or False"),
    "patterns": ({"rank": LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 2})}, ValueError,
                 "rank_pattern"),
    "no targets": ({"rank": LoraConfig()}, ValueError, "name the layers"),
    "config and keywords": ({"rank": LoraConfig(target_modules=["q_proj"]), "alpha": 4}, ValueError, "not both"),
    "LoHa": ({"rank": LoHaConfig(target_modules=["q_proj"])}, TypeError, "LoHaConfig"),
    "in-place flag": ({"inplace": "yes"}, TypeError, "inplace must be True or False"),
    "nothing matched": ({"target_modules": ["c_attn"]}, ValueError, "matched no module"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_are_clear_errors_that_change_nothing(case: str) -> None:
    options, error, message = BAD_OPTIONS[case]
    model = _build("llama")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    with pytest.raises(error, match=message):
        apply_lora_to_model(model, **{"inplace": True, **options})
    assert not lora_modules(model) and type(model) is transformers.LlamaForCausalLM
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert flags == {name: param.requires_grad for name, param in model.named_parameters()}


def test_peft_names_of_the_variants_build_them() -> None:
    from lora_lab.lora import DoRALinear

    model = _build("llama")
    dora = apply_lora_to_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True))
    assert {type(m) for m in lora_modules(dora).values()} == {DoRALinear}
    pissa = apply_lora_to_model(model, r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="pissa")
    assert {m.lora.init for m in lora_modules(pissa).values()} == {"pissa"}
    x = _tokens()
    torch.testing.assert_close(_logits(pissa, x), _logits(model, x), rtol=0, atol=1e-4)  # PiSSA starts at the base


@pytest.mark.parametrize("options", [{"use_dora": True}, {"init": "pissa"}], ids=["dora", "pissa"])
def test_dora_and_pissa_refuse_conv1d_layers_and_change_nothing(options: dict) -> None:
    model = _build("gpt2")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="built here for nn.Linear layers.*Conv1D"):
        apply_lora_to_model(model, r=2, target_modules="all-linear", inplace=True, **options)
    assert not lora_modules(model)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_inplace_adapts_the_model_itself_without_a_copy() -> None:
    model, x = _build("gpt2"), _tokens()
    weight = model.transformer.h[0].attn.c_attn.weight
    expected = _logits(model, x)
    adapted = apply_lora_to_model(model, r=2, target_modules="all-linear", inplace=True)
    assert adapted is model and model.transformer.h[0].attn.c_attn.original_layer.weight is weight
    torch.testing.assert_close(_logits(model, x), expected, rtol=0, atol=0)  # B = 0: nothing changed yet
    copied = apply_lora_to_model(_build("gpt2"), r=2, target_modules="all-linear")
    assert copied.transformer.h[0].attn.c_attn.original_layer.weight is not weight


def test_lora_conv1d_refuses_other_layers() -> None:
    with pytest.raises(TypeError, match="LoRAConv1D wraps transformers' Conv1D, got Linear"):
        LoRAConv1D(nn.Linear(4, 4))


# ---------------------------------------------------------------------------------------------------------------
# The series' GPT exported to transformers (OPT)

VOCAB = "\n !,.?abcdefghijklmnopqrstuvwxyz"


def _our_gpt(bias: bool = True) -> GPT:
    """A GPT with weights far from their initial scale, so that a wrong mapping changes the logits visibly."""
    seed_everything(3)
    model = GPT(GPTConfig(vocab_size=len(VOCAB), block_size=32, n_layer=2, n_head=4, n_embd=32, bias=bias))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


@pytest.mark.parametrize("bias", [True, False])
def test_export_gives_our_logits_tokens_and_generations(bias: bool, tmp_path: Path) -> None:
    model, tokenizer = _our_gpt(bias), CharTokenizer(VOCAB)
    state = torch.random.get_rng_state()
    export_to_transformers(model, tmp_path / "exported", tokenizer)
    assert torch.equal(torch.random.get_rng_state(), state)
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", output_loading_info=True)
    assert not any(info.values()), info
    exported.eval()
    x = torch.randint(0, len(VOCAB), (3, 32), generator=torch.Generator().manual_seed(4))
    ours = model(x)[0]
    with torch.no_grad():
        assert (_logits(exported, x) - ours).abs().max() <= 1e-5
    assert ours.std() > 0.5  # logits of a meaningful size
    prompt = x[:, :6]
    generated = exported.generate(prompt, max_new_tokens=26, do_sample=False)
    assert torch.equal(generated, model.generate(prompt, 26, temperature=0))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    text = "does the ship sail?\nthe cat, the dog."
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text).tolist()
    assert hf_tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize(
    ("targets", "use_rslora"), [(["q", "v", "up", "lm_head"], False), (None, True), (["k", "down"], False)]
)
def test_an_adapter_trained_on_our_gpt_gives_the_same_logits_in_peft_on_the_export(
    targets: list[str] | None, use_rslora: bool, tmp_path: Path
) -> None:
    """q, k and v adapters stack into one c_attn adapter (rank 2r, 3r or r, block-diagonal B)."""
    model, x = _our_gpt(), torch.randint(0, len(VOCAB), (2, 20), generator=torch.Generator().manual_seed(5))
    adapted = apply_lora_to_model(model, rank=4, alpha=8, target_modules=targets, use_rslora=use_rslora)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=0.05)
    adapted.train()
    for _ in range(5):
        loss = adapted(x, x)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    adapted.eval()
    export_to_transformers(model, tmp_path / "base")
    export_adapter(adapted, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with no_key_warnings():
        wrapped = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = adapted(x)[0]
        assert (ours - model(x)[0]).abs().max() > 0.1
        assert (wrapped(input_ids=x).logits - ours).abs().max() <= 1e-5


def test_export_refuses_bad_inputs_and_writes_nothing(tmp_path: Path) -> None:
    model = _our_gpt()
    with pytest.raises(TypeError, match="exports a lora_lab GPT"):
        export_to_transformers(nn.Linear(2, 2), tmp_path / "a")
    with pytest.raises(ValueError, match="holds LoRA layers"):
        export_to_transformers(apply_lora_to_model(model), tmp_path / "a")
    with pytest.raises(ValueError, match="the model's CharTokenizer"):
        export_to_transformers(model, tmp_path / "a", CharTokenizer("ab"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an exported model"):
        export_to_transformers(model, tmp_path / "mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="no LoRA layers"):
        export_adapter(model, tmp_path / "adapter")
    with pytest.raises(TypeError, match="adapters of a lora_lab GPT"):
        export_adapter(apply_lora_to_model(_build("llama"), rank=2), tmp_path / "adapter")
    with pytest.raises(ValueError, match="with a counterpart"):
        transformers_module_name("blocks.0.attn.dropout")
    # Exporting again into an earlier export replaces it.
    export_to_transformers(model, tmp_path / "again")
    export_to_transformers(_our_gpt(bias=False), tmp_path / "again")
    assert not load_file(tmp_path / "again" / "model.safetensors")["transformer.h.0.attn.c_attn.bias"].any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "mine"]


def test_the_llama_benchmark_runs_quick(tmp_path: Path) -> None:
    """benchmarks/bench_transformers.py --quick end to end (tiny sizes: no timing is judged)."""
    import importlib.util

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("bench_transformers", bench_dir / "bench_transformers.py")
    module = importlib.util.module_from_spec(spec)
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        assert module.main(["--quick", "--json", str(tmp_path / "out.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [row["id"] for row in rows] == ["lora_lab_vs_full", "peft_vs_full", "lora_lab_vs_peft"]
    assert all(row["ratio"] > 0 and row["spread"][0] <= row["ratio"] <= row["spread"][1] for row in rows)
