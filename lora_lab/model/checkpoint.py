"""GPT checkpoints: one safetensors file holding the weights and, as JSON metadata, the
:class:`~lora_lab.model.gpt.GPTConfig`, so a file is enough to rebuild the model. Loading
never unpickles anything, and every name and shape is checked before a model is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..files import atomic_save_safetensors
from .gpt import GPT, GPTConfig, parameter_shapes

__all__ = ["CONFIG_METADATA_KEY", "save_checkpoint", "load_checkpoint", "read_checkpoint_metadata"]

CONFIG_METADATA_KEY = "lora_lab_config"


def _check_shapes(
    config: GPTConfig, expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], source: str
) -> None:
    """Refuse ``shapes`` unless they are exactly ``expected`` (``parameter_shapes(config)``)."""

    def listed(names: list[str]) -> str:
        return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    missing, extra = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    wrong = [f"{k} {shapes[k]} != {expected[k]}" for k in expected if k in shapes and shapes[k] != expected[k]]
    problems = [f"{what}: {listed(names)}" for what, names in
                (("missing tensors", missing), ("unexpected tensors", extra), ("wrong shapes", wrong)) if names]
    if problems:
        raise ValueError(f"{source} does not match its config {config}: " + "; ".join(problems))


def save_checkpoint(model: GPT, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> None:
    """Write ``model``'s weights and config to a safetensors file, atomically.

    ``extra_metadata`` (str -> str, e.g. the tokenizer's alphabet or the training step) is
    stored alongside; read it back with :func:`read_checkpoint_metadata`.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"save_checkpoint saves a lora_lab GPT, got {type(model).__name__}")
    tensors, expected = model.state_dict(), parameter_shapes(model.config)
    # A model changed in place (LoRA layers wrap nn.Linear) has state-dict entries a GPT of its
    # config lacks; say what to save instead rather than only listing them.
    foreign = sorted(tensors.keys() - expected.keys())
    if foreign:
        raise ValueError(
            f"the model holds tensors that a GPT checkpoint has no place for ({', '.join(foreign[:4])}, ...); "
            "for LoRA layers save lora_lab.merge_lora(model) instead, or the adapters alone (lora_lab.save_adapter)"
        )
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(model.config.to_dict(), sort_keys=True)}
    extra = dict(extra_metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError("extra_metadata must map str to str (safetensors metadata is text); use json.dumps for others")
    clash = sorted(extra.keys() & metadata.keys())
    if clash:
        raise ValueError(f"extra_metadata may not set the reserved keys {clash}")
    _check_shapes(model.config, expected, {k: tuple(t.shape) for k, t in tensors.items()}, "the model")
    atomic_save_safetensors(path, tensors, {**extra, **metadata})


def _open(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}; check the path (save one with save_checkpoint)")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        raise ValueError(
            f"{path} is not a valid safetensors file ({err}); it may be truncated or corrupt, or another format "
            "(e.g. a torch.save pickle, which lora_lab never loads) — save it again with save_checkpoint"
        ) from err


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text metadata of a checkpoint: ``format``, the config JSON and any extra entries."""
    with _open(path) as f:
        return dict(f.metadata() or {})


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    """Rebuild the :class:`GPT` saved by :func:`save_checkpoint` (weights bit-exact).

    Names and shapes are checked against the stored config before any model is built.
    """
    with _open(path) as f:
        raw = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path} has no {CONFIG_METADATA_KEY!r} metadata, so save_checkpoint did not write it")
        try:
            config = GPTConfig.from_dict(json.loads(raw))
        except ValueError as err:  # json.JSONDecodeError is a ValueError too
            raise ValueError(f"{path}: the stored model config is invalid: {err}") from err
        names = f.keys()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
        _check_shapes(config, parameter_shapes(config), shapes, f"checkpoint {path}")
        tensors = {k: f.get_tensor(k) for k in names}
    not_float = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if not_float:
        raise ValueError(f"checkpoint {path} holds non-floating-point weights: {', '.join(not_float)}")
    with torch.random.fork_rng(devices=[]):  # GPT() draws a random init: keep the global RNG where it was
        model = GPT(config)
    model.load_state_dict(tensors, strict=True)
    return model.to(device)
