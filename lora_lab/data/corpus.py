"""A corpus and its four splits.

The course's recipe: pretrain on the first 80% of the text, fine-tune on the last 20%. Each part
keeps its last 10% as a held-out validation split, so there are four splits:
``source_train``, ``source_val`` (the first 80%) and ``target_train``, ``target_val`` (the rest).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .tokenizer import CharTokenizer

__all__ = ["Corpus", "Splits", "make_splits", "SOURCE_FRACTION", "VAL_FRACTION"]

SOURCE_FRACTION = 0.8  # the course's split: 80% pretraining, 20% fine-tuning
VAL_FRACTION = 0.1  # of each part, held out for validation


@dataclass(frozen=True)
class Corpus:
    """A text and where its target part (the last ~20%) begins.

    ``builtin`` is True only for the generated two-domain corpus (:mod:`lora_lab.data.grammar`),
    whose exact entropy floor and validity judge apply; it is a property of where the text came
    from, never of its display ``name`` (a user's file may well be called ``builtin``).
    """

    name: str
    text: str
    target_start: int
    builtin: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def source_text(self) -> str:
        return self.text[: self.target_start]

    @property
    def target_text(self) -> str:
        return self.text[self.target_start :]


@dataclass
class Splits:
    """The four token splits and the tokenizer that made them."""

    tokenizer: CharTokenizer
    source_train: torch.Tensor
    source_val: torch.Tensor
    target_train: torch.Tensor
    target_val: torch.Tensor

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in ("source_train", "source_val", "target_train", "target_val")}


def make_splits(corpus: Corpus, tokenizer: CharTokenizer | None = None) -> Splits:
    """Tokenize and split: each part keeps its last :data:`VAL_FRACTION` for validation."""
    tokenizer = tokenizer or CharTokenizer.from_text(corpus.text)

    def train_val(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenizer.encode(text)
        cut = int(len(ids) * (1 - VAL_FRACTION))
        return ids[:cut], ids[cut:]

    source_train, source_val = train_val(corpus.source_text)
    target_train, target_val = train_val(corpus.target_text)
    return Splits(tokenizer, source_train, source_val, target_train, target_val)
