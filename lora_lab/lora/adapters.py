"""Saving and loading LoRA adapters in Hugging Face PEFT's on-disk format.

A PEFT LoRA adapter (as checked with peft 0.21) is a directory holding two files:

- ``adapter_model.safetensors``: for each adapted ``nn.Linear`` (or transformers' ``Conv1D``) at module
  path ``<path>``, ``base_model.model.<path>.lora_A.weight`` of shape ``(r, in)`` and ``...lora_B.weight``
  of shape ``(out, r)``: lora_lab's own layout, so nothing is transposed (PEFT's ``fan_in_fan_out``, true
  for ``Conv1D`` layers, says how the *base* weight is stored, not the adapter);
- ``adapter_config.json``: ``r``, ``lora_alpha`` and ``use_rslora`` (which fix the scaling ``α/r``
  or ``α/√r``), ``target_modules`` and PEFT's bookkeeping.

Two of PEFT's variants load and save both ways: DoRA (``use_dora: true``; each layer also holds
``base_model.model.<path>.lora_magnitude_vector`` of shape ``(out,)``) and PiSSA saved unconverted
(``init_lora_weights: "pissa"``; its A and B fit the residual base, which a loader rebuilds from the
plain base's SVD, so the model must be prepared with ``init="pissa"``).

:func:`save_adapter` also records those settings in the weights file's safetensors metadata (key
``lora_lab.adapter_config``, beside the ``format: pt`` entry PEFT expects; PEFT ignores other keys), so
that :func:`load_adapter` can tell a weights file and a config that were not written by the same save.

``load_adapter`` is stricter than PEFT. PEFT only *warns* about adapter weights it cannot place
and leaves those layers' B at zero, so a misnamed adapter silently does nothing. Here every
mismatch is an error, and the model is written only after everything has been checked.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..files import atomic_path, json_text, safetensors_bytes
from ..validation import check_positive_int, check_positive_real, passes
from .conv1d import LoRAConv1D
from .dora import MAGNITUDE_NAME, DoRALinear
from .inject import lora_modules
from .layers import LoRALinear

__all__ = ["save_adapter", "load_adapter", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

# PEFT names a tensor after the wrapped model's path (PeftModel.base_model.model); the key it gets from
# PeftModel.state_dict() also holds the adapter name ("default"), which save_pretrained strips. Accept both.
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.default)?\.weight")
_KEY_WITHOUT_PREFIX = re.compile(r".+\.lora_[AB](?:\.default)?\.weight")
# DoRA's magnitude: PEFT saves it without ".weight" (its state dict has "lora_magnitude_vector.default.weight").
_MAGNITUDE_KEY = re.compile(rf"base_model\.model\.(?P<module>.+)\.{MAGNITUDE_NAME}(?:\.default)?(?:\.weight)?")

# Config fields read and checked below. Every other field must be "off" (null, false, {} or []) unless it
# is listed as inert: inert fields name things, matter only while training or initialising, or choose
# which layers PEFT wraps (the tensor names, checked one by one, say that exactly).
_CHECKED_FIELDS = {
    "peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias", "use_dora",
}  # fmt: skip
_INERT_FIELDS = {
    "init_lora_weights",  # how A and B started; the exceptions below are refused
    "peft_version", "base_model_name_or_path", "revision", "task_type", "auto_mapping", "inference_mode",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout",
    "megatron_config", "megatron_core", "qalora_group_size", "eva_config", "ensure_weight_tying",
    "fan_in_fan_out",  # only says how PEFT stores a Conv1D *base* weight; lora_A/B keep the layout above
}  # fmt: skip
# These initialisations rewrite the base weights (e.g. PiSSA stores W - B0 A0), so their A and B only fit
# that modified base. PEFT can convert them to plain LoRA when saving (path_initial_model_for_weight_conversion).
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# ...except PiSSA with its exact SVD, which lora_lab implements (init="pissa"); "pissa_niter_K" is randomised.
_PISSA = "pissa"
# Safetensors metadata key under which save_adapter records _saved_settings(config) as compact JSON.
_SETTINGS_KEY = "lora_lab.adapter_config"


def _settings(layer: LoRALinear) -> tuple[int, float, bool, float, bool, bool]:
    """``(rank, alpha, use_rslora, dropout, use_dora, pissa)``."""
    dropout = layer.lora.dropout.p if isinstance(layer.lora.dropout, nn.Dropout) else 0.0
    dora, pissa = isinstance(layer, DoRALinear), layer.lora.init == _PISSA
    return layer.lora.rank, layer.lora.alpha, layer.lora.use_rslora, dropout, dora, pissa


def _trained(layer: LoRALinear) -> dict[str, torch.Tensor]:
    """What an adapter file holds for ``layer``, by PEFT's names: A and B, and DoRA's magnitude."""
    tensors = {"lora_A": layer.lora.lora_A, "lora_B": layer.lora.lora_B}
    if isinstance(layer, DoRALinear):
        tensors[MAGNITUDE_NAME] = layer.lora_magnitude_vector
    return tensors


def _variant(config: dict[str, Any]) -> tuple[bool, bool]:
    """``(use_dora, pissa)`` as the config says."""
    return bool(config.get("use_dora", False)), config.get("init_lora_weights", True) == _PISSA


def _saved_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The config fields that say what the weights mean (their rank, scaling and layers). Fields that only
    name or describe the adapter, such as base_model_name_or_path, are left out so hand edits keep working."""
    targets = config.get("target_modules")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = sorted(set(targets))  # PEFT reads the list as a set: order and repeats mean nothing
    settings = {
        "r": config.get("r"), "lora_alpha": config.get("lora_alpha"), "use_rslora": config.get("use_rslora", False),
        "target_modules": targets,
        "rank_pattern": config.get("rank_pattern") or {}, "alpha_pattern": config.get("alpha_pattern") or {},
    }  # fmt: skip
    # Only when on, so that a plain LoRA adapter's bytes stay what they always were.
    dora, pissa = _variant(config)
    if dora:
        settings["use_dora"] = True
    if pissa:
        settings["init_lora_weights"] = _PISSA
    return settings


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA adapters to ``directory`` as a PEFT adapter, readable by
    ``peft.PeftModel.from_pretrained(base_model, directory)`` and by :func:`load_adapter`.

    Merged layers are saved too (merging changes only the base weight, never A and B). All layers
    must share one rank, alpha, use_rslora and dropout: PEFT's config can express per-layer values
    only through ``rank_pattern`` / ``alpha_pattern`` regexes, which this writer does not produce.

    What an error or interruption (Ctrl-C) leaves behind:

    - before the files are written (the model is refused) or while they are written (say, a full
      disk): ``directory``'s earlier adapter files, byte-identical. Both files are written in full to
      temporary files in ``directory`` first, and neither is moved into place unless both were written;
    - in the short window between moving the weights into place and then the config: new weights
      beside the old config. The weights record the settings they were saved with, so
      :func:`load_adapter` refuses that pair ("come from different saves") rather than loading it.

    Returns the directory.
    """
    directory = Path(directory)
    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save; adapt it first with lora_lab.apply_lora_to_model")
    if "" in layers:
        raise ValueError("the model itself is a LoRALinear; PEFT names layers by submodule path: wrap it in a module")
    settings = {name: _settings(layer) for name, layer in layers.items()}
    if len(set(settings.values())) > 1:
        raise ValueError(
            "the model's LoRA layers differ in (rank, alpha, use_rslora, dropout, use_dora, pissa), but PEFT's "
            "adapter_config.json "
            f"holds one value of each (lora_lab does not write rank_pattern/alpha_pattern): {settings}. "
            "Adapt all layers with one apply_lora_to_model call; nothing was saved"
        )
    for name, layer in layers.items():
        for factor, tensor in _trained(layer).items():
            if not torch.isfinite(tensor).all():
                where = f"{name}.{factor}" if factor == MAGNITUDE_NAME else f"{name}.lora.{factor}"
                raise ValueError(f"{where} holds NaN or inf; the adapter is broken and was not saved")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {type(base_model_name_or_path).__name__}")
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory; an adapter is saved as a directory")

    rank, alpha, use_rslora, dropout, dora, pissa = next(iter(settings.values()))
    tensors = {
        f"base_model.model.{name}.{factor}" + ("" if factor == MAGNITUDE_NAME else ".weight"): tensor.detach()
        for name, layer in layers.items()
        for factor, tensor in _trained(layer).items()
    }
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True, "r": rank, "use_rslora": use_rslora, "lora_dropout": dropout,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,  # 8, not 8.0, as PEFT writes what users type
        # Full module names: PEFT matches a list entry exactly or as a dotted suffix, so a full name picks that
        # layer, where a short name such as "q" could also pick same-named layers lora_lab did not adapt.
        "target_modules": sorted(layers), "rank_pattern": {}, "alpha_pattern": {},
        # PEFT sets it per layer anyway (and warns when it corrects it): true when the adapted layers are Conv1D
        "fan_in_fan_out": any(isinstance(layer, LoRAConv1D) for layer in layers.values()),
        "bias": "none", "modules_to_save": None, "use_dora": dora, "lora_bias": False,
        "layers_to_transform": None, "layers_pattern": None,
        # How A started does not matter once trained weights are loaded, except for PiSSA: its A and B fit the
        # residual base, which a loader must rebuild from the plain one.
        "init_lora_weights": _PISSA if pissa else True,
    }  # fmt: skip
    config = dict(sorted(config.items()))  # sorted, as PEFT writes it
    settings_json = json.dumps(_saved_settings(config), sort_keys=True, separators=(",", ":"))
    metadata = {"format": "pt", _SETTINGS_KEY: settings_json}  # PEFT expects "format": "pt"
    # Two atomic_paths, nested: an error inside the block discards both temporary files. On the way out the
    # inner one (the weights) is moved into place first, so a crash between the two moves can only leave new
    # weights, which always carry their settings, beside an old config, and load_adapter detects that.
    # The other order could leave old weights written by PEFT, with nothing to compare, beside a new config.
    with (
        atomic_path(directory / ADAPTER_CONFIG_NAME) as config_tmp,
        atomic_path(directory / ADAPTER_WEIGHTS_NAME) as weights_tmp,
    ):
        weights_tmp.write_bytes(safetensors_bytes(tensors, metadata))
        config_tmp.write_text(json_text(config), encoding="utf-8")
    return directory


def _is_positive_int(value: object) -> bool:
    return passes(check_positive_int, value)


def _is_positive_number(value: object) -> bool:
    return passes(check_positive_real, value)


def _is_regex(value: object) -> bool:
    try:
        return isinstance(value, str) and re.compile(value) is not None
    except re.error:
        return False


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist (or is not a directory)")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: an adapter directory holds {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}, "
            "as written by lora_lab.save_adapter or PEFT's save_pretrained"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the adapter is corrupt, save it again") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path} has peft_type={config.get('peft_type')!r}; only LoRA adapters ('LORA') load here")
    if not _is_positive_int(config.get("r")):
        raise ValueError(f"{path}: r must be a positive int, got {config.get('r')!r}")
    if not _is_positive_number(config.get("lora_alpha")):
        raise ValueError(f"{path}: lora_alpha must be a positive number, got {config.get('lora_alpha')!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{path}: use_rslora must be true or false, got {config['use_rslora']!r}")
    for field, valid in (("rank_pattern", _is_positive_int), ("alpha_pattern", _is_positive_number)):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict) or not all(valid(v) and _is_regex(k) for k, v in patterns.items()):
            raise ValueError(f"{path}: {field} must map module-name regexes to positive numbers, got {patterns!r}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path} has bias={config['bias']!r}: it also trained base biases, which lora_lab cannot load")
    if not isinstance(config.get("use_dora", False), bool):
        raise ValueError(f"{path}: use_dora must be true or false, got {config['use_dora']!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init != _PISSA and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(
            f"{path} has init_lora_weights={init!r}, which rewrites the base weights, so its A and B do not fit the "
            "original base model; convert it to plain LoRA with PEFT (path_initial_model_for_weight_conversion). "
            "Only init_lora_weights='pissa' (the exact SVD) loads here"
        )
    unsupported = [f"{k}={v!r}" for k, v in config.items() if v and k not in _CHECKED_FIELDS | _INERT_FIELDS]
    if unsupported:
        raise ValueError(
            f"{path} uses PEFT features lora_lab does not implement ({', '.join(unsupported)}); only plain LoRA on "
            "nn.Linear loads here, since anything else would not compute what PEFT computes"
        )
    return config


def _expected(config: dict[str, Any], name: str) -> tuple[int, float, bool]:
    """The rank, alpha and use_rslora PEFT would give module ``name``: the first rank_pattern /
    alpha_pattern key that regex-matches the name's end (PEFT's ``get_pattern_key``), else r / lora_alpha."""

    def lookup(patterns: dict[str, Any] | None, default: Any) -> Any:
        for pattern, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", name):
                return value
        return default

    r = lookup(config.get("rank_pattern"), config["r"])
    alpha = lookup(config.get("alpha_pattern"), config["lora_alpha"])
    return r, float(alpha), config.get("use_rslora", False)


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the safetensors metadata (``{}`` when the file has none)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the adapter directory lacks its weights file")
    try:  # safetensors holds a JSON header and raw bytes: nothing is unpickled, so nothing is executed
        with safe_open(path, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
            return tensors, handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"could not read {path} ({error}): the file is truncated or corrupt; save it again") from error


def _check_same_save(config: dict[str, Any], metadata: dict[str, str], directory: Path) -> None:
    """Refuse weights whose recorded settings disagree with the config: the two files were written by
    different saves, and loading them would either fail on shapes, blaming the model, or silently
    apply the wrong scaling."""
    recorded = metadata.get(_SETTINGS_KEY)
    if recorded is None:
        return  # written by PEFT (or by hand): there is nothing to compare with
    try:
        saved = json.loads(recorded)
    except json.JSONDecodeError:
        saved = None
    if not isinstance(saved, dict):
        raise ValueError(
            f"{directory / ADAPTER_WEIGHTS_NAME}: its {_SETTINGS_KEY!r} metadata is not a JSON object; the file is "
            "corrupt, save the adapter again"
        )
    current = _saved_settings(config)
    differences = [
        f"{key}={current[key]!r} in {ADAPTER_CONFIG_NAME} but {saved[key]!r} in {ADAPTER_WEIGHTS_NAME}"
        for key in sorted(current.keys() & saved.keys())  # a setting only one side knows cannot be compared
        if current[key] != saved[key]
    ]
    if differences:
        raise ValueError(
            f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} in {directory} come from different saves "
            f"({'; '.join(differences)}), probably because a save_adapter was interrupted; save the adapter again"
        )


def _match_tensors(tensors: dict[str, torch.Tensor], layers: dict[str, LoRALinear]) -> dict[str, dict]:
    """``{layer name: {"lora_A": tensor, "lora_B": tensor[, "lora_magnitude_vector": tensor]}}``, checking
    names, coverage, shapes and values."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match, magnitude = _KEY.fullmatch(key), _MAGNITUDE_KEY.fullmatch(key)
        if match is None and magnitude is None:
            bare = _KEY_WITHOUT_PREFIX.fullmatch(key)
            hint = " It lacks the 'base_model.model.' prefix, so PEFT would skip it too." if bare else ""
            raise ValueError(f"adapter tensor {key!r} is not named 'base_model.model.<module>.lora_A/B.weight'.{hint}")
        name, factor = (match["module"], f"lora_{match['factor']}") if match else (magnitude["module"], MAGNITUDE_NAME)
        if factor in factors.setdefault(name, {}):
            raise ValueError(f"the adapter holds two {factor} tensors for {name} (with and without '.default')")
        factors[name][factor] = tensor
    unknown = sorted(set(factors) - set(layers))
    if unknown:
        raise ValueError(
            f"the adapter has weights for {unknown}, which are not LoRA layers of the model (those are "
            f"{sorted(layers)}); prepare the model with target_modules={sorted(factors)}"
        )
    extra = [f"{name}.{f}" for name, layer in layers.items() for f in factors.get(name, {}) if f not in _trained(layer)]
    if extra:
        raise ValueError(
            f"the adapter holds {extra}, DoRA magnitudes, but the model's layers are plain LoRA; prepare the model "
            "with apply_lora_to_model(..., use_dora=True)"
        )
    missing = [
        f"{name}.{f}" for name, layer in layers.items() for f in _trained(layer) if f not in factors.get(name, {})
    ]
    if missing:
        raise ValueError(
            f"the adapter has no weights for {missing}; those layers would keep their fresh adapters (PEFT only warns "
            f"and leaves B at zero). Prepare the model with target_modules={sorted(factors)}"
        )
    for name, layer in layers.items():
        for factor, param in _trained(layer).items():
            tensor, where = factors[name][factor], f"{name}.{factor} in the adapter"
            if tensor.shape != param.shape:
                raise ValueError(
                    f"{where} has shape {tuple(tensor.shape)}; the model's layer needs {tuple(param.shape)}"
                )
            if not tensor.is_floating_point():
                raise ValueError(f"{where} has dtype {tensor.dtype}; LoRA weights are floating point")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{where} holds NaN or inf; the adapter is broken, retrain or re-save it")
            # copy_ casts to the parameter's dtype, where a finite value can round to inf (float16 stops at 65504)
            if not torch.isfinite(tensor.to(param.dtype)).all():
                dtype = str(param.dtype).removeprefix("torch.")
                raise ValueError(
                    f"{where} overflows {dtype}, the dtype of the model's {name}.{factor}: it holds "
                    f"{tensor.abs().max().item():g}, beyond {dtype}'s largest value {torch.finfo(param.dtype).max:g}. "
                    "Load it into a model in float32 (or bfloat16), then convert"
                )
    return factors


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Load a PEFT LoRA adapter (saved by :func:`save_adapter` or PEFT's ``save_pretrained``)
    into a model prepared with ``apply_lora_to_model`` using the adapter's rank, alpha,
    use_rslora and target modules. Returns the names of the loaded layers.

    Everything is checked before the model is touched (config, that config and weights come from
    the same save, scaling, tensor names, shapes, dtypes, finiteness, also after casting to the
    model's dtype); on any error the model is left exactly as it was. Every LoRA layer of the model
    must receive both A and B. Merged layers are refused: unmerge them first.
    """
    directory = Path(directory)
    config = _read_config(directory)
    # Checked before the model is compared with the config: if the files do not belong together, the config
    # cannot say how the model should have been prepared.
    tensors, metadata = _read_weights(directory / ADAPTER_WEIGHTS_NAME)
    _check_same_save(config, metadata, directory)
    layers = lora_modules(model)
    dora, pissa = _variant(config)
    how = (
        f"apply_lora_to_model(base, rank={config['r']}, alpha={config['lora_alpha']}, "
        f"use_rslora={config.get('use_rslora', False)}, target_modules={config.get('target_modules')!r}"
        + (", use_dora=True" if dora else "") + (", init='pissa'" if pissa else "") + ")"
    )
    if not layers:
        raise ValueError(f"the model has no LoRA layers to load the adapter into; prepare it with {how}")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"LoRA layers {merged} are merged; call unmerge() on them before loading an adapter")
    for name, layer in layers.items():
        (r, alpha, rslora), (rank, model_alpha, model_rslora) = _expected(config, name), _settings(layer)[:3]
        if (r, alpha, rslora) != (rank, model_alpha, model_rslora):
            raise ValueError(
                f"the adapter has r={r}, lora_alpha={alpha:g}, use_rslora={rslora} for {name}, but the model's layer "
                f"has rank={rank}, alpha={model_alpha:g}, use_rslora={model_rslora}; a different scaling would change "
                f"the outputs. Prepare the model with {how}"
            )
        if _settings(layer)[4:] != (dora, pissa):
            raise ValueError(
                f"the adapter has use_dora={dora}, init_lora_weights={'pissa' if pissa else 'not pissa'} but the "
                f"model's layer {name} has use_dora={_settings(layer)[4]}, pissa={_settings(layer)[5]}: it would "
                f"compute something else. Prepare the model with {how}"
            )
    factors = _match_tensors(tensors, layers)
    with torch.no_grad():  # copy_ casts to the model's dtype and device
        for name, layer in layers.items():
            for factor, param in _trained(layer).items():
                param.copy_(factors[name][factor])
    return list(layers)
