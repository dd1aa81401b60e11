"""The built-in two-domain corpus: English-like sentences from two small probabilistic grammars.

Pretraining sees the *source* domain (farm and forest); LoRA adapts the model to the *target*
domain (harbour and ships). Both share the determiners, adjectives, prepositions, adverbs and the
``DET NOUN VERB DET NOUN`` shape, so pretraining helps; the target has its own nouns and verbs and
three constructions the source never uses: questions (``does the captain see my boat?``),
relative clauses (``the cook that sees my captain sings again``) and lists (``rope, salt and fish``).

Because we wrote the grammars, we know the data exactly:

* **Exact probabilities.** Each grammar is unambiguous (every sentence has exactly one
  derivation), so P(sentence) is the product of the probabilities of the rules it uses.
  :func:`sentence_log_prob` parses a sentence and returns that log-probability.
* **An exact entropy floor.** Sentences are i.i.d. and each ends with ``"\\n"``. By the
  renewal-reward theorem the entropy rate of the character stream is
  ``H(sentence) / E[len(sentence + "\\n")]`` nats per character, the lowest cross-entropy per
  character any model can reach on this text (one whose context reaches back to the start of
  the sentence; positions whose window starts mid-sentence cannot quite reach it). Both numbers
  follow from the grammar by linearity of expectation, recursively over its acyclic symbols:
  a symbol's entropy is the entropy of its rule choice plus the expected entropy of what that
  rule expands to. ``exp`` of it is the floor on perplexity per character.
* **A recognizer.** :func:`is_valid` and :func:`validity_rate` check whether generated text is made
  of sentences of a grammar: a measure of generation quality that needs no human judge.

A grammar is plain data, ``{SYMBOL: ((weight, "right-hand side"), ...)}``. UPPERCASE tokens are
symbols; everything else is a terminal, a lowercase word or one of ``, . ?``. A sentence is its
terminals joined by single spaces, except that punctuation sticks to the word before it.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections.abc import Iterator, Mapping

from .corpus import SOURCE_FRACTION, Corpus

__all__ = [
    "DOMAINS", "SOURCE_GRAMMAR", "TARGET_GRAMMAR", "EVAL_PROMPTS", "DEFAULT_CORPUS_CHARS", "Grammar",
    "grammar", "sample_sentences", "sentence_log_prob", "is_valid", "validity_rate", "entropy_per_char",
    "entropy_per_char_bits", "entropy_floor_ppl", "builtin_corpus", "describe_domains",
]  # fmt: skip

DOMAINS = ("source", "target")

# 400k characters (~11,000 sentences): a few hundred CPU steps of a ~0.3-1M-parameter char GPT
# (batch 32 x 128) pass over the 320k-character source block a few times, enough to learn its ~100
# words and handful of sentence shapes; the 80k-character target block (~2,000 sentences) is too
# little to learn the target from scratch in a few hundred steps, but plenty to adapt a model that
# already spells and parses the shared words. Generating it takes about 0.1 s.
DEFAULT_CORPUS_CHARS = 400_000

# Word weights fall as 1/rank**0.7: Zipf-like, so the frequencies are worth learning, yet flatter
# than 1/rank, which keeps the entropy per character (and so the floor) from being trivially low.
_ZIPF_EXPONENT = 0.7


def _zipf(words: str) -> tuple[tuple[float, str], ...]:
    """Zipf-like weights for a space-separated word list, most frequent first."""
    return tuple((rank**-_ZIPF_EXPONENT, word) for rank, word in enumerate(words.split(), start=1))


_SHARED = {
    "NP": ((1, "DET N"), (1, "DET ADJ N")),
    "PP": ((1, "PREP DET PLACE"),),
    "DET": _zipf("the my his her our this one every"),
    "ADJ": _zipf("old small big young quiet tired red wet brave lazy happy grey"),
    "PREP": _zipf("near by behind in on under beside"),
    "ADV": _zipf("again today slowly quietly now often"),
    "TIME": ((3, "at dawn"), (2, "at night"), (2, "in the morning"), (1, "every day")),
}

SOURCE_GRAMMAR = {  # farm and forest; plain statements only
    "S": ((5, "CLAUSE ."), (1, "TIME , CLAUSE .")),
    "CLAUSE": ((3, "NP VI PP"), (2, "NP VI ADV"), (4, "NP VT NP"), (2, "NP VT NP PP"), (1, "NP VT NP ADV")),
    "N": _zipf("farmer dog hen cow fox horse goat owl girl boy deer rabbit pig cat mole crow lamb duck bear wolf"),
    "VI": _zipf("sleeps runs waits eats rests sings hides plays digs hops jumps barks grazes"),
    "VT": _zipf("sees feeds watches follows finds chases helps hears carries likes calls bites pushes meets"),
    "PLACE": _zipf("barn field tree river fence hill pond forest gate meadow wood nest stable garden"),
    **_SHARED,
}

TARGET_GRAMMAR = {  # harbour and ships; adds questions, relative clauses and lists
    "S": ((4, "CLAUSE ."), (1, "TIME , CLAUSE ."), (2, "QUESTION ?")),
    "CLAUSE": ((2, "SUBJ VI PP"), (1, "SUBJ VI ADV"), (3, "SUBJ VT CARGO"), (1, "SUBJ VT NP PP")),
    "SUBJ": ((3, "NP"), (1, "DET N that VT DET N")),
    "CARGO": ((3, "DET GOODS"), (1, "DET GOODS and DET GOODS"), (1, "GOODS , GOODS and GOODS")),
    "QUESTION": ((3, "does NP VB NP"), (1, "where does NP VBI")),
    "N": _zipf("sailor captain ship crew boat gull fisherman cook pilot whale seal diver mate pirate trader guard"),
    "GOODS": _zipf("rope net fish salt sail anchor barrel oar map crab chest lamp"),
    "VI": _zipf("sails waits sleeps rests sings drifts works swims rows dives"),
    "VBI": _zipf("sail wait sleep rest sing drift work swim row dive"),
    "VT": _zipf("sees loads watches mends pulls steers finds carries ties drops lifts paints"),
    "VB": _zipf("see load watch mend pull steer find carry tie drop lift paint"),
    "PLACE": _zipf("harbour dock pier deck shore bay island lighthouse ship boat quay beach"),
    **_SHARED,
}

_GRAMMARS = {"source": SOURCE_GRAMMAR, "target": TARGET_GRAMMAR}

_DESCRIPTIONS = {
    "source": "farm and forest: farmers and animals; plain statements only.",
    "target": "harbour and ships: sailors, boats and cargo; adds questions (?), relative clauses (that ...) "
    "and lists (x, y and z).",
}

# Beginnings of valid sentences that only their own domain can produce (each ends with a space).
# They are used as they are: training windows start anywhere in the text, so a model has seen plenty
# of sentences with no newline before them, and a sample's first line is then prompt + continuation.
EVAL_PROMPTS = {
    "source": ("the farmer ", "my old dog ", "at dawn, the horse ", "the cow "),
    "target": ("the sailor ", "does the captain ", "the crew loads ", "the cook that "),
}

_TERMINAL = re.compile(r"[a-z]+|[,.?]")
_PUNCTUATION = frozenset(",.?")


def _join(tokens: list[str]) -> str:
    return "".join(t if t in _PUNCTUATION or i == 0 else " " + t for i, t in enumerate(tokens))


def _cost(terminal: str) -> int:
    """Characters a terminal adds: a word brings its letters plus one separator (the space before it,
    or, for the first word, the newline that ends the sentence); punctuation brings itself."""
    return len(terminal) + (terminal not in _PUNCTUATION)


class Grammar:
    """A compiled grammar: sample sentences, parse them exactly, and know its exact statistics.

    ``entropy`` is H(sentence) in nats; ``mean_length``, ``min_length`` and ``max_length`` count
    characters of ``sentence + "\\n"``; ``alphabet`` holds every character the grammar can emit.
    """

    def __init__(self, rules: Mapping[str, tuple[tuple[float, str], ...]], start: str = "S") -> None:
        if start not in rules:
            raise ValueError(f"start symbol {start!r} has no rules")
        self.start = start
        self.rules: dict[str, list[tuple[float, tuple[str, ...]]]] = {}
        for symbol, choices in rules.items():
            if not symbol.isupper():
                raise ValueError(f"symbol names are UPPERCASE (lowercase tokens are words), got {symbol!r}")
            if not choices or any(w <= 0 for w, _ in choices):
                raise ValueError(f"symbol {symbol!r} needs at least one rule, all with positive weights")
            expansions = [tuple(rhs.split()) for _, rhs in choices]
            if not all(expansions):
                raise ValueError(f"symbol {symbol!r} has an empty rule; every rule needs at least one token")
            if len(set(expansions)) != len(expansions):
                raise ValueError(f"symbol {symbol!r} repeats a rule, which would make the grammar ambiguous")
            total = float(sum(w for w, _ in choices))
            self.rules[symbol] = [(w / total, rhs) for (w, _), rhs in zip(choices, expansions, strict=True)]
        for symbol, choices in self.rules.items():
            for tok in (tok for _, rhs in choices for tok in rhs if tok not in self.rules):
                if not _TERMINAL.fullmatch(tok):
                    raise ValueError(f"rule of {symbol!r}: {tok!r} is neither a defined symbol nor a terminal")
        # Symbols whose rules are all single words become dictionaries word -> probability: fast parsing.
        self._lexicon = {
            s: {rhs[0]: p for p, rhs in ch}
            for s, ch in self.rules.items()
            if all(len(rhs) == 1 and rhs[0] not in self.rules for _, rhs in ch)
        }
        self._cumulative = {s: [sum(p for p, _ in ch[: i + 1]) for i in range(len(ch))] for s, ch in self.rules.items()}
        self._memo: dict[str, tuple[float, float, int, int, bool]] = {}
        self.entropy, self.mean_length, self.min_length, self.max_length, first_is_word = self._stats(start, ())
        if not first_is_word:
            raise ValueError("every sentence must begin with a word (the length count relies on it)")
        letters = {c for ch in self.rules.values() for _, rhs in ch for t in rhs if t not in self.rules for c in t}
        self.alphabet = "".join(sorted(letters | {" ", "\n"}))

    def _stats(self, symbol: str, path: tuple[str, ...]) -> tuple[float, float, int, int, bool]:
        """(entropy, mean cost, min cost, max cost, always starts with a word) of ``symbol``."""
        if symbol in path:
            raise ValueError(f"the grammar is recursive ({' -> '.join((*path, symbol))}); it must be acyclic")
        if symbol not in self._memo:
            entropy, mean, lo, hi, first_is_word = 0.0, 0.0, math.inf, 0, True
            for p, rhs in self.rules[symbol]:
                parts = [
                    self._stats(t, (*path, symbol)) if t in self.rules
                    else (0.0, _cost(t), _cost(t), _cost(t), t not in _PUNCTUATION)
                    for t in rhs
                ]  # fmt: skip
                entropy += p * (-math.log(p) + sum(part[0] for part in parts))
                mean += p * sum(part[1] for part in parts)
                lo, hi = min(lo, sum(part[2] for part in parts)), max(hi, sum(part[3] for part in parts))
                first_is_word = first_is_word and parts[0][4]
            self._memo[symbol] = (entropy, mean, int(lo), hi, first_is_word)
        return self._memo[symbol]

    @property
    def nats_per_char(self) -> float:
        """The entropy rate H(sentence) / E[len(sentence + "\\n")] of a stream of sentences."""
        return self.entropy / self.mean_length

    def sample(self, rng: random.Random) -> str:
        """One sentence, without its trailing newline (leftmost derivation, one draw per choice)."""
        tokens: list[str] = []
        stack = [self.start]
        while stack:
            symbol = stack.pop()
            if symbol not in self.rules:
                tokens.append(symbol)
                continue
            choices = self.rules[symbol]
            index = min(bisect.bisect_right(self._cumulative[symbol], rng.random()), len(choices) - 1)
            stack.extend(reversed(choices[index][1]))
        return _join(tokens)

    def parse(self, sentence: str) -> tuple[float, int]:
        """(P(sentence), number of derivations), or (0.0, 0) if ``sentence`` is not in the language.

        ``sentence`` may end with one ``"\\n"``; anything else out of place (another newline, a
        double space, a capital) makes it invalid. The probability sums over derivations, so it is
        right even for an ambiguous grammar; ours have exactly one derivation per sentence.
        """
        sentence = sentence.removesuffix("\n")
        tokens = _TERMINAL.findall(sentence)
        if not tokens or _join(tokens) != sentence:
            return 0.0, 0
        memo: dict[tuple[str, int], dict[int, tuple[float, int]]] = {}

        def spans(symbol: str, i: int) -> dict[int, tuple[float, int]]:
            """{end: (probability, derivations)} for ``symbol`` deriving exactly tokens[i:end]."""
            if symbol in self._lexicon:
                p = self._lexicon[symbol].get(tokens[i]) if i < len(tokens) else None
                return {i + 1: (p, 1)} if p else {}
            if (symbol, i) not in memo:
                out: dict[int, tuple[float, int]] = {}
                for p_rule, rhs in self.rules[symbol]:
                    partial = {i: (p_rule, 1)}  # positions reached after a prefix of rhs
                    for tok in rhs:
                        reached: dict[int, tuple[float, int]] = {}
                        for j, (pj, nj) in partial.items():
                            if tok in self.rules:
                                steps = spans(tok, j).items()
                            else:
                                steps = [(j + 1, (1.0, 1))] if j < len(tokens) and tokens[j] == tok else []
                            for k, (pk, nk) in steps:
                                p_old, n_old = reached.get(k, (0.0, 0))
                                reached[k] = (p_old + pj * pk, n_old + nj * nk)
                        partial = reached
                    for k, (pk, nk) in partial.items():
                        p_old, n_old = out.get(k, (0.0, 0))
                        out[k] = (p_old + pk, n_old + nk)
                memo[symbol, i] = out
            return memo[symbol, i]

        return spans(self.start, 0).get(len(tokens), (0.0, 0))


_COMPILED: dict[str, Grammar] = {}


def grammar(domain: str) -> Grammar:
    """The compiled :class:`Grammar` of ``domain``, one of :data:`DOMAINS`."""
    if domain not in _GRAMMARS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {DOMAINS}")
    if domain not in _COMPILED:
        _COMPILED[domain] = Grammar(_GRAMMARS[domain])
    return _COMPILED[domain]


def _stream(domain: str, seed: int) -> Iterator[str]:
    """Endless i.i.d. sentences of ``domain``; the same in every process for the same seed."""
    g = grammar(domain)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    # random.Random hashes a str seed with SHA-512 (not hash()), so this is reproducible everywhere,
    # and each domain gets its own stream.
    rng = random.Random(f"lora_lab.corpus/{domain}/{seed}")
    while True:
        yield g.sample(rng)


def sample_sentences(domain: str, n: int, seed: int = 0) -> list[str]:
    """``n`` i.i.d. sentences of ``domain``, without trailing newlines, reproducible from ``seed``.

    ``builtin_corpus(seed=s)`` starts each block with the first sentences of
    ``sample_sentences(domain, n, seed=s)``: use other seeds for fresh evaluation sentences.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stream = _stream(domain, seed)
    return [next(stream) for _ in range(n)]


def sentence_log_prob(sentence: str, domain: str) -> float:
    """Exact natural-log probability of ``sentence`` (with or without its trailing ``"\\n"``) under
    ``domain``'s grammar, ``-inf`` if it is not a valid sentence. The newline adds nothing: every
    sentence ends with one."""
    p, _ = grammar(domain).parse(sentence)
    return math.log(p) if p > 0 else -math.inf


def is_valid(sentence: str, domain: str) -> bool:
    """Whether ``sentence`` (with or without one trailing ``"\\n"``) is exactly a sentence of ``domain``."""
    return grammar(domain).parse(sentence)[1] > 0


def validity_rate(text: str, domain: str, *, starts_mid_sentence: bool = False) -> float | None:
    """Fraction of the complete lines of ``text`` that are valid sentences of ``domain``.

    A last line without ``"\\n"`` is unfinished and ignored; with ``starts_mid_sentence=True`` the
    first line is ignored too (the text began inside a sentence, e.g. after a prompt). Empty lines
    count as invalid. Returns ``None`` if no complete line is left to score.
    """
    grammar(domain)  # check the domain name even when there is nothing to score
    lines = text.split("\n")[:-1]
    if starts_mid_sentence:
        lines = lines[1:]
    if not lines:
        return None
    return sum(is_valid(line, domain) for line in lines) / len(lines)


def entropy_per_char(domain: str) -> float:
    """Exact entropy rate of ``domain``'s sentence stream, in nats per character (newlines included)."""
    return grammar(domain).nats_per_char


def entropy_per_char_bits(domain: str) -> float:
    """:func:`entropy_per_char` in bits per character."""
    return entropy_per_char(domain) / math.log(2)


def entropy_floor_ppl(domain: str) -> float:
    """``exp(entropy_per_char)``: the lowest perplexity per character a model can reach on ``domain``."""
    return math.exp(entropy_per_char(domain))


def _block(domain: str, seed: int, budget: float) -> str:
    """Sentences of ``domain``, one per line, up to the line boundary nearest to ``budget`` characters."""
    lines, size = [], 0
    for sentence in _stream(domain, seed):
        line = sentence + "\n"
        if size + len(line) / 2 > budget:  # stopping before this line lands nearer to the budget
            break
        lines.append(line)
        size += len(line)
    return "".join(lines)


def builtin_corpus(
    n_chars: int = DEFAULT_CORPUS_CHARS, seed: int = 0, source_fraction: float = SOURCE_FRACTION
) -> Corpus:
    """About ``n_chars`` characters: source sentences up to the line boundary nearest to
    ``source_fraction * n_chars``, then target sentences up to the boundary nearest to ``n_chars``.
    The same arguments give the same text in every process and on every platform."""
    if not 0.0 < source_fraction < 1.0:
        raise ValueError(f"source_fraction must be strictly between 0 and 1, got {source_fraction}")
    longest = max(grammar(d).max_length for d in DOMAINS)
    # With this many characters each block has room for a sentence of any length, so neither is empty
    # (rounded first so that float noise such as 1 - 0.8 = 0.19999999999999996 does not add a character).
    needed = math.ceil(round(longest / min(source_fraction, 1.0 - source_fraction), 9))
    if n_chars < needed:
        raise ValueError(
            f"n_chars={n_chars} is too small for one sentence per domain (sentences have up to {longest} "
            f"characters); use n_chars >= {needed} with source_fraction={source_fraction}"
        )
    source = _block("source", seed, source_fraction * n_chars)
    target = _block("target", seed, n_chars - len(source))
    return Corpus("builtin", source + target, len(source), builtin=True)


def describe_domains(seed: int = 0) -> str:
    """A short human description of both domains: topic, exact statistics and three example sentences."""
    parts = []
    for domain in DOMAINS:
        g = grammar(domain)
        examples = "".join(f"\n    {s}" for s in sample_sentences(domain, 3, seed))
        parts.append(
            f"{domain}: {_DESCRIPTIONS[domain]}\n"
            f"  {len(g.alphabet)} characters incl. space and newline; sentences of {g.min_length - 1}-"
            f"{g.max_length - 1} characters, mean {g.mean_length - 1:.1f}\n"
            f"  entropy floor {g.nats_per_char:.3f} nats/char = {g.nats_per_char / math.log(2):.3f} bits/char "
            f"= perplexity {math.exp(g.nats_per_char):.3f} per char\n"
            f"  examples:{examples}"
        )
    return "\n".join(parts)
