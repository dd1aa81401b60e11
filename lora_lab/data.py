"""Text in, token batches out: corpora, the character tokenizer, the 80/20 split, batching.

The seed's recipe: pretrain on the first 80% of the text, fine-tune on the last 20%. Each part
keeps its last 10% as a held-out validation split, so there are four splits:
``source_train``, ``source_val`` (the first 80%) and ``target_train``, ``target_val`` (the rest).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .io import atomic_path
from .seeding import make_generator

__all__ = [
    "CharTokenizer",
    "Corpus",
    "Splits",
    "NAMED_CORPORA",
    "cache_dir",
    "download_corpus",
    "load_corpus",
    "make_splits",
    "iterate_batches",
    "steps_per_epoch",
]

SOURCE_FRACTION = 0.8  # the seed's split: 80% pretraining, 20% fine-tuning
VAL_FRACTION = 0.1  # of each part, held out for validation


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


@dataclass(frozen=True)
class NamedCorpus:
    url: str
    sha256: str
    size: int
    filename: str


NAMED_CORPORA: dict[str, NamedCorpus] = {
    # karpathy/char-rnn's data/tinyshakespeare/input.txt
    "tinyshakespeare": NamedCorpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1_115_394,
        filename="tinyshakespeare.txt",
    ),
}


def cache_dir() -> Path:
    """The user's cache folder for lora_lab: ``$LORA_LAB_CACHE``, else
    ``$XDG_CACHE_HOME/lora_lab``, else ``~/.cache/lora_lab``."""
    if os.environ.get("LORA_LAB_CACHE"):
        return Path(os.environ["LORA_LAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora_lab"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_corpus(name: str, *, directory: Path | None = None, url: str | None = None, timeout: float = 60) -> Path:
    """Download a named corpus once into the cache, verified by SHA-256, written atomically.

    ``url`` overrides the corpus's address (a mirror, or a local server in tests). A cached
    file whose checksum does not match is downloaded again; a download whose checksum does not
    match is discarded and reported, leaving no file behind.
    """
    if name not in NAMED_CORPORA:
        raise ValueError(f"unknown corpus {name!r}; named corpora are: {', '.join(NAMED_CORPORA)}")
    spec = NAMED_CORPORA[name]
    destination = (directory or cache_dir() / "corpora") / spec.filename
    if destination.exists() and _sha256(destination) == spec.sha256:
        return destination
    source = url or spec.url
    try:
        with atomic_path(destination) as tmp:
            with urllib.request.urlopen(source, timeout=timeout) as response, open(tmp, "wb") as out:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
            digest = _sha256(tmp)
            if digest != spec.sha256:
                raise ValueError(
                    f"the download of {name!r} from {source} has SHA-256 {digest}, expected {spec.sha256} "
                    f"({tmp.stat().st_size} bytes, expected {spec.size}); it was discarded. The server sent "
                    "something else (a proxy's error page?): try again or pass --corpus with a local copy"
                )
    # HTTPException: the connection broke mid-body (e.g. IncompleteRead of a chunked reply).
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
        raise ConnectionError(
            f"could not download {name!r} from {source}: {error}. Check the network, or download the file "
            f"yourself and pass its path with --corpus PATH"
        ) from error
    return destination


@dataclass(frozen=True)
class Corpus:
    """A text and where its target part (the last ~20%) begins."""

    name: str
    text: str
    target_start: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def source_text(self) -> str:
        return self.text[: self.target_start]

    @property
    def target_text(self) -> str:
        return self.text[self.target_start :]

    @property
    def is_builtin(self) -> bool:
        return self.name == "builtin"


def load_corpus(
    spec: str = "builtin", *, block_size: int = 1, builtin_chars: int | None = None, seed: int = 0
) -> Corpus:
    """``"builtin"`` (the generated two-domain corpus), a name from :data:`NAMED_CORPORA`
    (downloaded once), or the path of any UTF-8 text file (split at 80% of its characters).

    ``block_size`` is the training window: every split must hold at least one window plus
    its next-token target, so a text too short for that is refused here, not mid-training.
    """
    if spec == "builtin":
        from . import corpus as builtin

        kwargs = {"seed": seed} if builtin_chars is None else {"n_chars": builtin_chars, "seed": seed}
        built = builtin.builtin_corpus(**kwargs)
        corpus = Corpus("builtin", built.text, built.target_start)
    else:
        if spec in NAMED_CORPORA:
            path, name = download_corpus(spec), spec
        else:
            path, name = Path(spec), Path(spec).name
            if not path.is_file():
                known = ", ".join(["builtin", *NAMED_CORPORA])
                raise FileNotFoundError(f"corpus {spec!r} is neither a file nor a known corpus ({known})")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); convert it, e.g. "
                f"`iconv -f latin1 -t utf-8 {path} > corpus.txt`"
            ) from None
        if not text.strip():
            raise ValueError(f"{path} is empty; a corpus needs text to train on")
        corpus = Corpus(name, text, int(len(text) * SOURCE_FRACTION))
    # The smallest split is the target's validation part (10% of 20%): it must hold one window.
    needed = math.ceil((block_size + 1) / (VAL_FRACTION * (1 - SOURCE_FRACTION)))
    if len(corpus.text) < needed:
        raise ValueError(
            f"corpus {spec!r} has {len(corpus.text):,} characters; with block_size={block_size} every split needs "
            f"at least one window of {block_size + 1} characters, so the text must have at least {needed:,}"
        )
    return corpus


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


def steps_per_epoch(n_tokens: int, block_size: int, batch_size: int) -> int:
    """Batches needed to show every window of ``block_size`` tokens once."""
    windows = (n_tokens - 1) // block_size
    if windows < 1:
        raise ValueError(f"{n_tokens} tokens hold no training window of {block_size + 1}")
    return math.ceil(windows / batch_size)


def iterate_batches(
    data: torch.Tensor, block_size: int, batch_size: int, epochs: float, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic epochs of ``(x, y)`` batches, ``y`` being ``x`` shifted by one token.

    Each epoch cuts the data into non-overlapping windows from a random offset and visits
    them in a random order, so one epoch shows (almost) every token once, as the seed's
    "epochs" mean. A fractional ``epochs`` stops part-way through the last one. All
    randomness comes from ``seed``.
    """
    per_epoch = steps_per_epoch(len(data), block_size, batch_size)
    total = max(1, round(epochs * per_epoch))
    generator = make_generator(seed)
    step = 0
    while step < total:
        offset = int(torch.randint(0, block_size, (1,), generator=generator))
        starts = torch.arange(offset, len(data) - block_size, block_size)
        if len(starts) == 0:  # the data holds exactly one window: the offset must be 0
            starts = torch.zeros(1, dtype=torch.long)
        starts = starts[torch.randperm(len(starts), generator=generator)]
        for i in range(0, len(starts), batch_size):
            if step == total:
                return
            batch = starts[i : i + batch_size]
            index = batch[:, None] + torch.arange(block_size + 1)
            windows = data[index]
            yield windows[:, :-1], windows[:, 1:]
            step += 1


def total_steps(n_tokens: int, block_size: int, batch_size: int, epochs: float) -> int:
    """How many batches :func:`iterate_batches` yields."""
    return max(1, round(epochs * steps_per_epoch(n_tokens, block_size, batch_size)))
