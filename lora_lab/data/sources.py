"""Where a corpus comes from: the built-in grammars, a named download, or a text file."""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_path
from . import grammar
from .corpus import SOURCE_FRACTION, VAL_FRACTION, Corpus

__all__ = ["NAMED_CORPORA", "NamedCorpus", "cache_dir", "download_corpus", "load_corpus"]


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


def load_corpus(
    spec: str = "builtin", *, block_size: int = 1, builtin_chars: int | None = None, seed: int = 0
) -> Corpus:
    """``"builtin"`` (the generated two-domain corpus), a name from :data:`NAMED_CORPORA`
    (downloaded once), or the path of any UTF-8 text file (split at 80% of its characters).

    ``block_size`` is the training window: every split must hold at least one window plus
    its next-token target, so a text too short for that is refused here, not mid-training.
    """
    if spec == "builtin":
        kwargs = {"seed": seed} if builtin_chars is None else {"n_chars": builtin_chars, "seed": seed}
        corpus = grammar.builtin_corpus(**kwargs)
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
