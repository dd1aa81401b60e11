"""The series' GPT in Hugging Face transformers' format: a folder ``AutoModelForCausalLM.from_pretrained`` loads.

**Which architecture, and why GPT-2.** Our :class:`~lora_lab.model.gpt.GPT` is GPT-2's design (after nanoGPT):
a pre-LayerNorm decoder with learned absolute position embeddings (added to the token embeddings, then
dropout), attention scaled by ``1/√head_dim``, an MLP ``4d`` wide, ``nn.LayerNorm`` with eps ``1e-5`` and a
final LayerNorm. transformers' ``GPT2LMHeadModel`` computes exactly that when configured with
``activation_function="gelu"`` (ours is the exact erf GELU; GPT-2's default is the tanh approximation),
``n_inner=4d`` and ``tie_word_embeddings=False`` (our ``lm_head`` is untied and bias-free). It even rounds
the same way: its ``Conv1D`` computes ``addmm(b, x, W)`` with ``W`` stored ``(in, out)``, which is what
``F.linear`` computes with our ``(out, in)`` weight transposed, and it calls
``scaled_dot_product_attention`` with the same scale. On the series' trained ``cpu`` base the exported
model's logits equal ours bit for bit (measured: max difference 0.0). OPT, whose separate
``q_proj``/``k_proj``/``v_proj`` would map one to one, multiplies q by the scale *before* attention; that
changes the rounding, and on that base it ended 1.2e-5 away, over the 1e-5 this export promises.

The price is GPT-2's fused attention input: q, k and v are one ``Conv1D`` ``c_attn`` with ``3d`` outputs.
Weights concatenate. A LoRA adapter on q, k and v becomes one adapter on ``c_attn`` of rank ``3r``:
``A' = [A_q; A_k; A_v]`` and a block-diagonal ``B' = diag(B_q, B_k, B_v)``, so that
``B' A' x = [B_q A_q x; B_k A_k x; B_v A_v x]``; a projection left unadapted gets a zero block (q and v
alone: rank ``2r``). PEFT's config keeps one scaling for all layers through ``rank_pattern`` and
``alpha_pattern`` (``α' = 3α`` at rank ``3r``, so ``α'/r' = α/r``). The other names map one to one:
``attn.o`` → ``attn.c_proj``, ``mlp.up`` → ``mlp.c_fc``, ``mlp.down`` → ``mlp.c_proj``.

Our ``bias=False`` models get zero biases (GPT-2 always has them). The tokenizer (one token per character) is
exported as a ``tokenizers`` WordLevel model that splits every character, so ``AutoTokenizer`` gives our
token ids. transformers is imported only when an export runs.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.tokenizer import CharTokenizer
from .files import atomic_path, json_text, safetensors_bytes
from .lora import lora_modules
from .lora.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from .model.gpt import GPT

__all__ = ["export_to_transformers", "export_adapter", "transformers_module_name"]

# Our module name inside a block -> GPT-2's, inside "transformer.h.{i}". q, k and v all land in c_attn.
_BLOCK_NAMES = {
    "ln_1": "ln_1", "attn.q": "attn.c_attn", "attn.k": "attn.c_attn", "attn.v": "attn.c_attn",
    "attn.o": "attn.c_proj", "ln_2": "ln_2", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj",
}  # fmt: skip
_TOP_NAMES = {"wte": "transformer.wte", "wpe": "transformer.wpe", "ln_f": "transformer.ln_f", "lm_head": "lm_head"}
_QKV = ("q", "k", "v")  # c_attn's three blocks of outputs, in this order


def transformers_module_name(name: str) -> str:
    """The exported model's module holding our module ``name`` (``blocks.0.attn.o`` -> ``transformer.h.0.attn.
    c_proj``; ``blocks.0.attn.q``, ``.k`` and ``.v`` -> ``transformer.h.0.attn.c_attn``)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match and match[2] in _BLOCK_NAMES:
        return f"transformer.h.{match[1]}.{_BLOCK_NAMES[match[2]]}"
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    raise ValueError(f"{name!r} is not a module of lora_lab's GPT with a counterpart in the exported model")


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"exporting to the transformers format needs transformers ({error}); pip install 'transformers>=5.0' "
            "(it is in lora_lab's test extra)"
        ) from error


def _gpt2_config(model: GPT):
    from transformers import GPT2Config

    c = model.config
    return GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=4 * c.n_embd, activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=False,
        # Our vocabulary has no special tokens: with GPT-2's (50256) generate() would stop or pad with garbage.
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip


def _gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    ours = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    state = {}
    for name, tensor in ours.items():
        module, _, kind = name.rpartition(".")
        target = f"{transformers_module_name(module)}.{kind}"
        if module.endswith(".attn.k") or module.endswith(".attn.v"):
            continue  # written with q, into c_attn
        if module.endswith(".attn.q"):
            parts = [ours[f"{module[:-1]}{p}.{kind}"] for p in _QKV]
            tensor = torch.cat(parts)
        # Conv1D (every block Linear) stores its weight (in, out); lm_head stays an nn.Linear.
        if kind == "weight" and module.startswith("blocks.") and ".ln_" not in module:
            tensor = tensor.t()
        state[target] = tensor.contiguous()
    for name in list(state):  # GPT-2 always has biases; ours may not (bias=False): zero ones compute the same
        if name.endswith(".weight") and not name.startswith(("lm_head", "transformer.wte", "transformer.wpe")):
            # the output width: a LayerNorm's d, a Conv1D's out (its weight is (in, out) by now)
            state.setdefault(name.removesuffix("weight") + "bias", torch.zeros(state[name].shape[-1]))
    return state


def _tokenizer(tokenizer: CharTokenizer):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({ch: i for i, ch in enumerate(tokenizer.vocab)}, unk_token=None))
    # One piece per character; "(?m)" is Oniguruma's "dot matches newline" (the corpus has newlines).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join the characters back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _replace_folder(build: Path, directory: Path) -> None:
    """Move the finished folder ``build`` to ``directory``: a reader sees the old folder or the new one, never a
    half-written one (a crash between the two renames leaves the old one under a hidden name beside it)."""
    if not directory.exists():
        os.replace(build, directory)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    os.replace(directory, old / directory.name)
    os.replace(build, directory)
    shutil.rmtree(old)


def export_to_transformers(model: GPT, directory: str | os.PathLike, tokenizer: CharTokenizer | None = None) -> Path:
    """Write ``model`` as a transformers ``GPT2LMHeadModel`` checkpoint folder (config, safetensors weights,
    generation config and, given ``tokenizer``, its tokenizer files), readable by
    ``AutoModelForCausalLM.from_pretrained(directory)`` (and ``AutoTokenizer``).

    The folder is built beside ``directory`` and moved into place when complete; an existing ``directory``
    must be empty or an earlier export (it holds ``config.json``), and is replaced. Needs transformers. The
    global random state is left as it was (building the transformers model draws its initial weights).
    """
    if not isinstance(model, GPT):
        raise TypeError(f"export_to_transformers exports a lora_lab GPT, got {type(model).__name__}")
    adapted = list(lora_modules(model))
    if adapted:
        raise ValueError(
            f"the model holds LoRA layers ({', '.join(adapted[:3])}, ...); export the base model and convert the "
            "adapter with export_adapter, or export lora_lab.merge_lora(model)"
        )
    if tokenizer is not None and not (
        isinstance(tokenizer, CharTokenizer) and tokenizer.vocab_size == model.config.vocab_size
    ):
        raise ValueError(
            f"tokenizer must be the model's CharTokenizer ({model.config.vocab_size} tokens), got {tokenizer!r}"
        )
    directory = Path(directory)
    if directory.exists() and not (directory / "config.json").is_file() and any(directory.iterdir()):
        raise FileExistsError(
            f"{directory} exists and is not an exported model (no config.json); choose a new folder, nothing was "
            "written"
        )
    _require_transformers()
    from transformers import GPT2LMHeadModel

    directory.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        exported = GPT2LMHeadModel(_gpt2_config(model))
    exported.load_state_dict(_gpt2_state_dict(model), strict=True)
    build = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        exported.save_pretrained(build)
        if tokenizer is not None:
            _tokenizer(tokenizer).save_pretrained(build)
        _replace_folder(build, directory)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return directory


def _adapter_tensors(layers: dict[str, Any], n_embd: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """PEFT's tensors for the exported model, and how many of q/k/v each c_attn adapter stacks."""
    tensors, stacked = {}, {}
    groups: dict[str, list[tuple[int, Any]]] = {}
    for name, layer in layers.items():
        target = transformers_module_name(name)
        if target.endswith(".attn.c_attn"):
            groups.setdefault(target, []).append((_QKV.index(name.rsplit(".", 1)[1]), layer))
            continue
        tensors[f"base_model.model.{target}.lora_A.weight"] = layer.lora.lora_A.detach()
        tensors[f"base_model.model.{target}.lora_B.weight"] = layer.lora.lora_B.detach()
    for target, parts in groups.items():
        parts.sort(key=lambda part: part[0])
        rank = parts[0][1].lora.rank
        lora_B = torch.zeros(3 * n_embd, rank * len(parts), dtype=parts[0][1].lora.lora_B.dtype)
        for column, (block, layer) in enumerate(parts):  # B' is block-diagonal: q's rows see only q's A, ...
            rows, cols = slice(block * n_embd, (block + 1) * n_embd), slice(column * rank, (column + 1) * rank)
            lora_B[rows, cols] = layer.lora.lora_B.detach()
        lora_A = torch.cat([layer.lora.lora_A.detach() for _, layer in parts])
        tensors[f"base_model.model.{target}.lora_A.weight"] = lora_A
        tensors[f"base_model.model.{target}.lora_B.weight"] = lora_B
        stacked[target] = len(parts)
    return tensors, stacked


def export_adapter(
    lora_model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None
) -> Path:
    """Save the LoRA adapters of an adapted lora_lab GPT as a PEFT adapter for the model written by
    :func:`export_to_transformers`, so that ``PeftModel.from_pretrained(exported, directory)`` computes what
    ``lora_model`` computes (q/k/v adapters stacked into ``c_attn``'s, see the module's docstring).

    The two files are written to temporary files first and moved into place together, as ``save_adapter``
    does. Returns the directory."""
    if not isinstance(lora_model, GPT):
        raise TypeError(f"export_adapter exports the adapters of a lora_lab GPT, got {type(lora_model).__name__}")
    layers = lora_modules(lora_model)
    if not layers:
        raise ValueError("the model has no LoRA layers to export; adapt it first with lora_lab.apply_lora_to_model")
    settings = {(layer.lora.rank, layer.lora.alpha, layer.lora.use_rslora) for layer in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"the LoRA layers differ in (rank, alpha, use_rslora): {sorted(settings)}; adapt all layers "
                         "with one apply_lora_to_model call")  # fmt: skip
    for name in layers:
        transformers_module_name(name)  # every name is checked before anything is written
    rank, alpha, use_rslora = settings.pop()
    tensors, stacked = _adapter_tensors(layers, lora_model.config.n_embd)
    # A c_attn adapter stacking k projections has rank k·r; its alpha keeps the scaling α/r (α/√r with rsLoRA).
    factor = (lambda k: math.sqrt(k)) if use_rslora else (lambda k: k)  # noqa: E731
    dropout = next(iter(layers.values())).lora.dropout
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True, "r": rank, "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "use_rslora": use_rslora, "lora_dropout": getattr(dropout, "p", 0.0),
        "target_modules": sorted({transformers_module_name(name) for name in layers}),
        "rank_pattern": {target: k * rank for target, k in sorted(stacked.items()) if k > 1},
        "alpha_pattern": {target: alpha * factor(k) for target, k in sorted(stacked.items()) if k > 1},
        "fan_in_fan_out": True,  # GPT-2's Conv1D layers (PEFT sets it back to False for lm_head itself)
        "bias": "none", "modules_to_save": None, "use_dora": False, "lora_bias": False,
        "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True,
    }  # fmt: skip
    directory = Path(directory)
    with (
        atomic_path(directory / ADAPTER_CONFIG_NAME) as config_tmp,
        atomic_path(directory / ADAPTER_WEIGHTS_NAME) as weights_tmp,
    ):
        weights_tmp.write_bytes(safetensors_bytes(tensors, {"format": "pt"}))
        config_tmp.write_text(json_text(dict(sorted(config.items()))), encoding="utf-8")
    return directory
