"""The project's small GPT: a decoder-only transformer in one readable file (after nanoGPT).

Every projection is an explicit ``nn.Linear`` with a short name, so LoRA can target it:
``blocks.{i}.attn.q``, ``.k``, ``.v``, ``.o``, ``blocks.{i}.mlp.up``, ``.down`` and ``lm_head``.
Checkpoints are safetensors files that carry their :class:`GPTConfig` as JSON metadata, so a
file is enough to rebuild the model, and loading never unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.nn import functional as F

from .io import atomic_save_safetensors
from .layers import LoRALinear
from .seeding import make_generator

__all__ = [
    "GPTConfig", "GPT", "KVCache", "causal_mask", "parameter_shapes", "parameter_count",
    "save_checkpoint", "load_checkpoint", "read_checkpoint_metadata", "select_device",
]

CONFIG_METADATA_KEY = "lora_lab_config"


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`GPT`. Frozen: use ``dataclasses.replace(cfg, n_layer=8)`` for a variant."""

    vocab_size: int
    block_size: int  # context length: the most positions the model ever sees at once
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True  # biases in every Linear (except lm_head) and LayerNorm

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not (_is_int(value) and value > 0):
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy ints -> int, so the config stays JSON-able
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): each head "
                f"works on n_embd // n_head dimensions"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, Real) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be True or False, got {self.bias!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        """The inverse of :meth:`to_dict`; every field must be present and no other key."""
        if not isinstance(data, dict):
            raise ValueError(f"a GPTConfig is read from a dict, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data))
        if unknown or missing:
            raise ValueError(
                f"GPTConfig.from_dict: unknown keys {unknown}, missing keys {missing}; expected exactly {sorted(names)}"
            )
        return cls(**data)


def parameter_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor in ``GPT(config).state_dict()``, without building it
    (checkpoints are checked against this; a test keeps it in step with the model)."""
    d, V, shapes = config.n_embd, config.vocab_size, {}

    def add(name: str, weight: tuple[int, ...], bias: bool = config.bias) -> None:
        shapes[f"{name}.weight"] = weight  # nn.Linear stores W as (out, in): y = x Wᵀ + b
        if bias:
            shapes[f"{name}.bias"] = weight[:1]

    add("wte", (V, d), bias=False)
    add("wpe", (config.block_size, d), bias=False)
    for i in range(config.n_layer):
        add(f"blocks.{i}.ln_1", (d,))
        for proj in "qkvo":
            add(f"blocks.{i}.attn.{proj}", (d, d))
        add(f"blocks.{i}.ln_2", (d,))
        add(f"blocks.{i}.mlp.up", (4 * d, d))
        add(f"blocks.{i}.mlp.down", (d, 4 * d))
    add("ln_f", (d,))
    add("lm_head", (V, d), bias=False)
    return shapes


def parameter_count(config: GPTConfig) -> int:
    """Number of parameters of ``GPT(config)``. In closed form (d = n_embd, V = vocab_size, with
    bias): ``(V + block_size)·d`` embeddings, ``12d² + 13d`` per block (attention 4d², MLP 8d²;
    9d biases, 4d LayerNorm) and ``2d + V·d`` for ln_f and lm_head. Without bias a block has
    ``12d² + 2d`` and ln_f ``d``."""
    return sum(math.prod(shape) for shape in parameter_shapes(config).values())


def causal_mask(T: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(T, T)`` bool mask, True where query i may attend to key j, i.e. j <= i (the past).

    This is SDPA's convention for a bool ``attn_mask`` (True = take part); the manual
    equivalent is ``scores.masked_fill(~mask, -inf)`` before the softmax.
    """
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.n_embd
        self.n_head, self.head_dim, self.dropout = config.n_head, config.head_dim, config.dropout
        self.q = nn.Linear(d, d, bias=config.bias)
        self.k = nn.Linear(d, d, bias=config.bias)
        self.v = nn.Linear(d, d, bias=config.bias)
        self.o = nn.Linear(d, d, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        mask, is_causal = None, True
        if kv is not None:  # write this chunk's keys/values at positions start.., attend over 0..start+T-1
            kv[0][:, :, start : start + T] = k
            kv[1][:, :, start : start + T] = v
            k, v = kv[0][:, :, : start + T], kv[1][:, :, : start + T]
            if start > 0:
                # SDPA's is_causal aligns its mask to the top-left corner: with T queries and start+T keys
                # it would show query 0 only key 0. Our queries sit at the END, so slice the full mask's
                # last T rows; a single new token may see every cached position (no mask at all).
                is_causal = False
                mask = causal_mask(start + T, x.device)[start:] if T > 1 else None
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        return self.resid_dropout(self.o(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)  # 4x: GPT-2's width
        self.act = nn.GELU()
        self.down = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.act(self.up(x))))


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv=None, start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv, start)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Every layer's keys and values for the positions processed so far.

    Preallocated to ``block_size`` positions, so a decoding step writes one position in place
    rather than concatenating (which would copy the whole cache at every token).
    """

    def __init__(self, config: GPTConfig, batch_size: int, device=None, dtype: torch.dtype | None = None) -> None:
        shape = (batch_size, config.n_head, config.block_size, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.batch_size, self.length = batch_size, 0

    def reset(self) -> None:
        self.length = 0


class GPT(nn.Module):
    """Decoder-only transformer with learned token and position embeddings."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        # Deliberately NOT tied to wte (GPT-2 and nanoGPT tie them). With a shared weight, merging a
        # LoRA adapter into lm_head would silently change the input embeddings too, and an adapter
        # meant for the output layer would also move the token embeddings. Untied costs V*d params.
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's residual scaling: each block adds two branches (attn.o, mlp.down) to the residual
        # stream, so with 2*n_layer independent additions its variance grows ~2*n_layer-fold at init.
        # Scaling those projections' std by 1/sqrt(2*n_layer) keeps the stream's scale depth-independent.
        for name, param in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # std 0.02 is GPT-2's choice, kept by nanoGPT at every width. It makes the initial logits
        # nearly uniform, so the loss starts at about ln(vocab_size). LayerNorms keep (1, 0).
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """All parameters, trainable or not (LoRA adapters included when present)."""
        return sum(p.numel() for p in self.parameters())

    def _check_tokens(self, name: str, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"{name} must be a torch.long tensor of shape (B, T), got {got}")
        if ((tokens < 0) | (tokens >= self.config.vocab_size)).any():  # one device sync, not two
            raise ValueError(
                f"{name} holds token ids in [{int(tokens.min())}, {int(tokens.max())}], outside [0, "
                f"{self.config.vocab_size - 1}]; was the data encoded with this model's vocabulary?"
            )

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, kv_cache: KVCache | None = None):
        """Logits ``(B, T, vocab_size)`` and, with ``targets`` ``(B, T)``, the mean cross-entropy
        over all positions (else ``None``). With ``kv_cache``, ``idx`` continues the cached
        sequence: its tokens sit at positions ``kv_cache.length ...``, and the cache grows by T."""
        self._check_tokens("idx", idx)
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.block_size:
            raise ValueError(
                f"{start + T} positions exceed block_size={self.config.block_size} (the position embedding has "
                f"no row beyond it); crop the context, e.g. idx[:, -block_size:]"
            )
        if kv_cache is not None and kv_cache.batch_size != B:
            raise ValueError(f"kv_cache was built for batch size {kv_cache.batch_size}, idx has {B}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            kv = None if kv_cache is None else (kv_cache.keys[i], kv_cache.values[i])
            x = block(x, kv, start)
        if kv_cache is not None:
            kv_cache.length += T
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        self._check_tokens("targets", targets)
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        return logits, F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to each row of ``idx`` ``(B, T)``.

        The model always conditions on the last ``block_size`` tokens (nanoGPT's rule).
        ``use_cache=False`` recomputes that whole context for every token. ``use_cache=True``
        prefills it once and then feeds one token per step. Once the context is full, the
        window slides; with absolute position embeddings every cached key/value then belongs
        to a different position, so the cache is rebuilt from the last ``block_size`` tokens
        at each further step (a full-window cost). Both paths compute the same logits, so the
        same ``seed`` gives the same tokens. ``temperature=0`` is greedy; ``top_k`` keeps the k
        most likely tokens (k above vocab_size keeps all). ``seed`` draws from a private
        generator (the global RNG is untouched); ``None`` uses the global one.
        """
        self._check_tokens("idx", idx)
        if idx.shape[1] == 0:
            raise ValueError("idx must hold at least one token per row to condition on")
        if not (_is_int(max_new_tokens) and max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not (isinstance(temperature, Real) and not isinstance(temperature, bool) and 0 <= temperature < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and not (_is_int(top_k) and top_k >= 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if seed is not None and not _is_int(seed):
            raise ValueError(f"seed must be None or an int, got {seed!r}")
        generator = None if seed is None else make_generator(int(seed), device=idx.device)
        block_size, was_training = self.config.block_size, self.training
        self.eval()
        try:
            with torch.no_grad():
                cache = KVCache(self.config, idx.shape[0], idx.device, self.wte.weight.dtype) if use_cache else None
                for _ in range(max_new_tokens):
                    if cache is None:
                        logits, _ = self(idx[:, -block_size:])
                    elif cache.length in (0, block_size):  # first step, or the window must slide: (re)prefill
                        cache.reset()
                        logits, _ = self(idx[:, -block_size:], kv_cache=cache)
                    else:  # only the newest token is new; everything before it is cached
                        logits, _ = self(idx[:, -1:], kv_cache=cache)
                    next_token = _sample(logits[:, -1, :], float(temperature), top_k, generator)
                    idx = torch.cat([idx, next_token], dim=1)
        finally:
            self.train(was_training)
        return idx


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


# ----------------------------------------------------------------------------- checkpoints


def _check_shapes(config: GPTConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    expected = parameter_shapes(config)

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
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    if adapted:
        raise ValueError(
            f"the model holds LoRA layers ({', '.join(adapted[:4])}...), whose weights a GPT checkpoint has no "
            "place for; save lora_lab.merge_lora(model) instead, or the adapters alone (lora_state_dict)"
        )
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(model.config.to_dict(), sort_keys=True)}
    extra = dict(extra_metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError("extra_metadata must map str to str (safetensors metadata is text); use json.dumps for others")
    clash = sorted(extra.keys() & metadata.keys())
    if clash:
        raise ValueError(f"extra_metadata may not set the reserved keys {clash}")
    tensors = model.state_dict()
    _check_shapes(model.config, {k: tuple(t.shape) for k, t in tensors.items()}, "the model")
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
        _check_shapes(config, {k: tuple(f.get_slice(k).get_shape()) for k in names}, f"checkpoint {path}")
        tensors = {k: f.get_tensor(k) for k in names}
    not_float = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if not_float:
        raise ValueError(f"checkpoint {path} holds non-floating-point weights: {', '.join(not_float)}")
    with torch.random.fork_rng(devices=[]):  # GPT() draws a random init: keep the global RNG where it was
        model = GPT(config)
    model.load_state_dict(tensors, strict=True)
    return model.to(device)


def select_device(preference: str | None = None) -> torch.device:
    """``"cuda"`` if available, else ``"mps"`` (Apple GPU), else ``"cpu"``; or the named device
    (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), with an error if it is unavailable."""
    mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if preference is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available else "cpu")
    try:
        device = torch.device(preference)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {preference!r}; use 'cuda', 'cuda:N', 'mps', 'cpu' or None (auto)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but PyTorch sees no CUDA GPU; use 'cpu' or None (auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {preference!r} requested but there are {torch.cuda.device_count()} CUDA GPUs")
    elif device.type == "mps" and not mps_available:
        raise RuntimeError("device 'mps' requested but this PyTorch has no usable Apple MPS backend; use 'cpu'")
    elif device.type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device type {device.type!r} is not supported here; use 'cuda', 'mps' or 'cpu'")
    return device
