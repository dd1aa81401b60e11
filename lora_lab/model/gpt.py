"""The project's small GPT: a decoder-only transformer in one readable file (after nanoGPT).

Every projection is an explicit ``nn.Linear`` with a short name, so LoRA can target it:
``blocks.{i}.attn.q``, ``.k``, ``.v``, ``.o``, ``blocks.{i}.mlp.up``, ``.down`` and ``lm_head``.
Checkpoints are safetensors files that carry their :class:`GPTConfig` as JSON metadata, so a
file is enough to rebuild the model, and loading never unpickles anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real

import torch
from torch import nn
from torch.nn import functional as F

from ..seeding import make_generator
from ..validation import check_fraction, check_positive_int

__all__ = ["GPTConfig", "GPT", "KVCache", "causal_mask", "parameter_shapes", "parameter_count"]


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
            # numpy ints -> int, so the config stays JSON-able
            object.__setattr__(self, name, check_positive_int(f"GPTConfig.{name}", getattr(self, name)))
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): each head "
                f"works on n_embd // n_head dimensions"
            )
        object.__setattr__(self, "dropout", check_fraction("GPTConfig.dropout", self.dropout))
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
    """Name and shape of every tensor in ``GPT(config).state_dict()``, read from a model built on
    the ``meta`` device: no memory, no arithmetic, and no random number drawn (checkpoints are
    checked against this before any real model is built)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = GPT(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


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
