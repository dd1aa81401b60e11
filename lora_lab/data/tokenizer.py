"""The character tokenizer: one token per character of the corpus."""

from __future__ import annotations

import json

import torch

__all__ = ["CharTokenizer"]


class CharTokenizer:
    """One token per character. The vocabulary is ``sorted(set(text))``: sorting makes it
    identical in every process (a set's iteration order is not)."""

    def __init__(self, vocab: str) -> None:
        if not vocab or len(set(vocab)) != len(vocab):
            raise ValueError("a tokenizer vocabulary must be a non-empty string of distinct characters")
        self.vocab = vocab
        self._index = {ch: i for i, ch in enumerate(vocab)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids as a 1-D ``torch.long`` tensor; an unknown character is an error naming it."""
        try:
            return torch.tensor([self._index[ch] for ch in text], dtype=torch.long)
        except KeyError as error:
            ch = error.args[0]
            raise ValueError(
                f"character {ch!r} (at position {text.index(ch)}) is not in the model's vocabulary of "
                f"{self.vocab_size} characters {self.vocab!r}; remove or replace it"
            ) from None

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.vocab[i] for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))

    def to_json(self) -> str:
        return json.dumps({"type": "char", "vocab": self.vocab})

    @classmethod
    def from_json(cls, payload: str) -> CharTokenizer:
        data = json.loads(payload)
        if data.get("type") != "char" or not isinstance(data.get("vocab"), str):
            raise ValueError("not a lora_lab character-tokenizer description")
        return cls(data["vocab"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.vocab == self.vocab

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
