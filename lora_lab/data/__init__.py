"""The data: a corpus (the built-in grammars, a download or a file), its character tokenizer,
the 80/20 source/target split with held-out validation parts, and training batches.

* :mod:`~lora_lab.data.grammar` — the built-in two-domain corpus, its exact entropy floor and
  its validity judge;
* :mod:`~lora_lab.data.sources` — :func:`load_corpus`: built-in, named (downloaded) or a file;
* :mod:`~lora_lab.data.corpus` — the :class:`Corpus` type and its four :class:`Splits`;
* :mod:`~lora_lab.data.tokenizer`, :mod:`~lora_lab.data.batches`.
"""

from .batches import iterate_batches, steps_per_epoch, total_steps
from .corpus import SOURCE_FRACTION, VAL_FRACTION, Corpus, Splits, make_splits
from .sources import NAMED_CORPORA, cache_dir, download_corpus, load_corpus
from .tokenizer import CharTokenizer

__all__ = [
    "CharTokenizer",
    "Corpus",
    "NAMED_CORPORA",
    "SOURCE_FRACTION",
    "Splits",
    "VAL_FRACTION",
    "cache_dir",
    "download_corpus",
    "iterate_batches",
    "load_corpus",
    "make_splits",
    "steps_per_epoch",
    "total_steps",
]
