"""Tests for lora_lab.data.grammar: exact entropy, recognizer, corpus text and error paths."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_lab.data import Corpus
from lora_lab.data import grammar as C

N_MC = 4000  # sentences per domain for the Monte-Carlo checks: standard error ~0.001 nats/char


@pytest.fixture(scope="module", params=C.DOMAINS)
def mc(request):
    """(domain, sentences, -log p per sentence, length incl. newline per sentence)."""
    domain = request.param
    sentences = C.sample_sentences(domain, N_MC, seed=2024)
    neg_log_p = [-C.sentence_log_prob(s, domain) for s in sentences]
    lengths = [len(s) + 1 for s in sentences]
    return domain, sentences, neg_log_p, lengths


def _ratio_and_se(xs: list[float], ls: list[int]) -> tuple[float, float]:
    """Ratio estimator sum(x)/sum(l) and its delta-method standard error."""
    n = len(xs)
    ratio = sum(xs) / sum(ls)
    residual_var = sum((x - ratio * ell) ** 2 for x, ell in zip(xs, ls, strict=True)) / (n - 1)
    return ratio, math.sqrt(residual_var / n) / (sum(ls) / n)


# --- exact entropy ----------------------------------------------------------------------------


def test_monte_carlo_entropy_rate_agrees_with_exact_value(mc):
    domain, _, neg_log_p, lengths = mc
    estimate, se = _ratio_and_se(neg_log_p, lengths)
    exact = C.entropy_per_char(domain)
    assert abs(estimate - exact) < 5 * se, (estimate, exact, se)
    assert abs(estimate - exact) < 0.01
    assert se < 0.003  # the check above is tight enough to mean something
    # E[length] too, against its own standard error.
    n, mean_len = len(lengths), sum(lengths) / len(lengths)
    se_len = math.sqrt(sum((ell - mean_len) ** 2 for ell in lengths) / (n - 1) / n)
    assert abs(mean_len - C.grammar(domain).mean_length) < 5 * se_len


def test_monte_carlo_entropy_rate_rejects_wrong_values(mc):
    """The agreement above is not automatic: plausible mistakes land many standard errors away."""
    domain, _, neg_log_p, lengths = mc
    estimate, se = _ratio_and_se(neg_log_p, lengths)
    g = C.grammar(domain)
    uniform = C.Grammar({s: tuple((1.0, rhs) for _, rhs in rules) for s, rules in C._GRAMMARS[domain].items()})
    forgot_newline = g.entropy / (g.mean_length - 1)
    for wrong in (uniform.nats_per_char, forgot_newline):
        assert abs(wrong - g.nats_per_char) > 0.01
        assert abs(estimate - wrong) > 8 * se, (domain, estimate, wrong, se)


def test_entropy_units_are_consistent():
    for domain in C.DOMAINS:
        nats = C.entropy_per_char(domain)
        assert C.entropy_per_char_bits(domain) == pytest.approx(nats / math.log(2))
        assert C.entropy_floor_ppl(domain) == pytest.approx(math.exp(nats))
        assert 0 < nats < math.log(len(C.grammar(domain).alphabet))


def _enumerate(rules, symbol="S"):
    """Every derivation of a small finite grammar as (probability, terminals), by brute force."""
    total = sum(w for w, _ in rules[symbol])
    for w, rhs in rules[symbol]:
        parts = [list(_enumerate(rules, t)) if t in rules else [(1.0, [t])] for t in rhs.split()]
        for combo in itertools.product(*parts):
            yield w / total * math.prod(p for p, _ in combo), [t for _, ts in combo for t in ts]


def test_exact_statistics_match_brute_force_enumeration():
    rules = {
        "S": ((2, "NP VP ."), (1, "does NP VP ?")),
        "NP": ((3, "the N"), (1, "N , N and N")),
        "N": ((5, "cat"), (2, "ox"), (1, "bird")),
        "VP": ((1, "runs"), (4, "eats N")),
    }
    g = C.Grammar(rules)
    derivations = list(_enumerate(rules))
    strings = [C._join(tokens) for _, tokens in derivations]
    assert len(set(strings)) == len(strings)  # unambiguous, so string entropy = derivation entropy
    assert sum(p for p, _ in derivations) == pytest.approx(1.0)
    assert g.entropy == pytest.approx(-sum(p * math.log(p) for p, _ in derivations))
    assert g.mean_length == pytest.approx(sum(p * (len(s) + 1) for (p, _), s in zip(derivations, strings, strict=True)))
    assert (g.min_length, g.max_length) == (min(map(len, strings)) + 1, max(map(len, strings)) + 1)
    for (p, _), s in zip(derivations, strings, strict=True):
        assert g.parse(s) == (pytest.approx(p), 1)
    assert g.alphabet == "".join(sorted(set("".join(strings)) | {"\n"}))


def test_parser_counts_derivations_of_an_ambiguous_grammar():
    g = C.Grammar({"S": ((1, "A B"), (3, "x y")), "A": ((1, "x"),), "B": ((1, "y"),)})
    assert g.parse("x y") == (pytest.approx(1.0), 2)
    assert g.parse("x") == (0.0, 0)


def test_log_prob_is_the_product_of_rule_probabilities():
    g = C.grammar("source")
    rule = {(s, " ".join(rhs)): p for s, rules in g.rules.items() for p, rhs in rules}
    expected = (
        rule["S", "CLAUSE ."] * rule["CLAUSE", "NP VT NP"] * rule["NP", "DET N"] * rule["NP", "DET ADJ N"]
        * rule["DET", "the"] * rule["DET", "my"] * rule["N", "farmer"] * rule["ADJ", "old"] * rule["N", "dog"]
        * rule["VT", "sees"]
    )  # fmt: skip
    assert C.sentence_log_prob("the farmer sees my old dog.", "source") == pytest.approx(math.log(expected))
    assert C.sentence_log_prob("the farmer sees my old dog.\n", "source") == pytest.approx(math.log(expected))


@pytest.mark.parametrize(
    "rules, message",
    [
        ({"S": ((1, "a S"), (1, "a"))}, "recursive"),
        ({"S": ((1, "a B"),)}, "neither a defined symbol"),
        ({"S": ((1, "a b"), (2, "a b"))}, "repeats a rule"),
        ({"S": ((1, ", a"),)}, "begin with a word"),
        ({"S": ((0, "a"),)}, "positive weights"),
        ({"T": ((1, "a"),)}, "start symbol"),
        ({"S": ((1, "a np"),), "np": ((1, "b"),)}, "UPPERCASE"),
        ({"S": ((1, ""),)}, "'S' has an empty rule"),
        ({"S": ((1, "a"), (1, "  "))}, "'S' has an empty rule"),
    ],
)
def test_malformed_grammars_are_refused(rules, message):
    with pytest.raises(ValueError, match=message):
        C.Grammar(rules)


# --- recognizer -------------------------------------------------------------------------------


def test_every_sampled_sentence_is_valid_with_exactly_one_derivation(mc):
    domain, sentences, neg_log_p, _ = mc
    g = C.grammar(domain)
    for sentence, nlp in zip(sentences[:1000], neg_log_p, strict=False):
        prob, derivations = g.parse(sentence)
        assert derivations == 1, sentence
        assert math.isfinite(nlp) and prob == pytest.approx(math.exp(-nlp))
        assert C.is_valid(sentence, domain) and C.is_valid(sentence + "\n", domain)
        assert g.min_length <= len(sentence) + 1 <= g.max_length
        assert set(sentence) <= set(g.alphabet)


@pytest.mark.parametrize(
    "domain, good, bad",
    [
        ("source", "the farmer sees my old dog.", [
            "the farmer seess my old dog.",        # typo
            "the farmer sees my old sailor.",      # a target word
            "the farmer sees my old",              # truncated
            "the farmer sees my old dog",          # missing full stop
            "the farmer sees my old dog dog.",     # extra word
            "the farmer sees my old dog?",         # wrong punctuation
            "the farmer sees my old dog .",        # space before punctuation
            "the farmer  sees my old dog.",        # double space
            "The farmer sees my old dog.",         # capital letter
            "the farmer sees my old dog.\n\n",     # two newlines
            "the farmer that sees my dog sleeps.", # a target-only construction
            "",
        ]),
        ("target", "does the captain see my boat?", [
            "does the captain sees my boat?",      # wrong verb form
            "does the captain see my boat.",       # wrong punctuation
            "does the farmer see my boat?",        # a source word
            "does the captain see",                # truncated
            "does the captain see my boat boat?",  # extra word
        ]),
        ("target", "his crew loads rope, salt and fish.", [
            "his crew loads rope salt and fish.",  # missing comma
            "his crew loads rope, salt, and fish.",
            "his crew loads rope, salt and hay.",  # not a target word
        ]),
    ],
)  # fmt: skip
def test_invalid_sentences_are_rejected(domain, good, bad):
    assert C.is_valid(good, domain)
    for sentence in bad:
        assert not C.is_valid(sentence, domain), sentence
        assert C.sentence_log_prob(sentence, domain) == -math.inf


def test_domains_reject_each_other(mc):
    domain, sentences, _, _ = mc
    other = next(d for d in C.DOMAINS if d != domain)
    text = "".join(s + "\n" for s in sentences[:2000])
    assert C.validity_rate(text, domain) == 1.0
    assert C.validity_rate(text, other) <= 0.05


def test_validity_rate_scores_only_complete_lines():
    good, bad = "the farmer sees my old dog.", "the farmer sees the sailor."
    assert C.validity_rate(f"{good}\n{bad}\n{good}\n", "source") == pytest.approx(2 / 3)
    assert C.validity_rate(f"{good}\n{bad}\nthe farm", "source") == pytest.approx(1 / 2)
    assert C.validity_rate(f"er sees it\n{good}\nthe", "source", starts_mid_sentence=True) == 1.0
    assert C.validity_rate(f"er sees it\n{good}\nthe", "source") == 0.5
    assert C.validity_rate(f"{good}\n\n", "source") == 0.5  # an empty line is an invalid sentence
    assert C.validity_rate("the farmer sees", "source") is None
    assert C.validity_rate(f"{good}\n", "source", starts_mid_sentence=True) is None
    assert C.validity_rate("", "target") is None


_COMPLETIONS = {
    "the farmer ": "sleeps in the barn.",
    "my old dog ": "chases the hen.",
    "at dawn, the horse ": "runs again.",
    "the cow ": "eats near my pond.",
    "the sailor ": "sings on the deck.",
    "does the captain ": "see my boat?",
    "the crew loads ": "rope, net and salt.",
    "the cook that ": "mends the boat works again.",
}


def test_eval_prompts_begin_sentences_of_their_own_domain_only():
    assert set(C.EVAL_PROMPTS) == set(C.DOMAINS)
    for domain, prompts in C.EVAL_PROMPTS.items():
        other = next(d for d in C.DOMAINS if d != domain)
        assert prompts
        for prompt in prompts:
            sentence = prompt + _COMPLETIONS[prompt]
            assert prompt.endswith(" ") and C.is_valid(sentence, domain), sentence
            assert not C.is_valid(sentence, other)


# --- corpus text ------------------------------------------------------------------------------


def test_builtin_corpus_layout_and_split():
    n_chars = 30_000
    corpus = C.builtin_corpus(n_chars, seed=5)
    longest = max(C.grammar(d).max_length for d in C.DOMAINS)
    assert corpus.text.endswith("\n") and corpus.text[corpus.target_start - 1] == "\n"
    assert corpus.source_text + corpus.target_text == corpus.text
    assert abs(corpus.target_start - 0.8 * n_chars) <= longest / 2
    assert abs(len(corpus.text) - n_chars) <= longest / 2
    source_lines = corpus.source_text.splitlines()
    target_lines = corpus.target_text.splitlines()
    assert all(C.is_valid(line, "source") for line in source_lines)
    assert all(C.is_valid(line, "target") for line in target_lines)
    # The blocks are the first sentences of each domain's stream, cut at the nearest boundary:
    # one more source sentence would have moved the split further from 80%.
    stream = C.sample_sentences("source", len(source_lines) + 1, seed=5)
    assert stream[:-1] == source_lines
    assert abs(corpus.target_start + len(stream[-1]) + 1 - 0.8 * n_chars) >= abs(corpus.target_start - 0.8 * n_chars)
    assert C.sample_sentences("target", len(target_lines), seed=5) == target_lines


def test_default_corpus_is_deterministic_and_uses_a_small_alphabet():
    corpus = C.builtin_corpus()
    assert isinstance(corpus, Corpus) and corpus.builtin is True and corpus.name == "builtin"
    assert corpus == C.builtin_corpus()
    assert abs(len(corpus.text) - C.DEFAULT_CORPUS_CHARS) < 100
    assert corpus.target_start / len(corpus.text) == pytest.approx(0.8, abs=0.001)
    assert set(corpus.text) == set(C.grammar("source").alphabet) | set(C.grammar("target").alphabet)
    assert len(set(corpus.text)) <= 32
    assert "?" not in corpus.source_text and "?" in corpus.target_text  # questions are new in the target
    assert C.builtin_corpus(20_000, seed=1).text != C.builtin_corpus(20_000, seed=2).text


def test_corpus_is_identical_in_another_process():
    # grammar.py builds a Corpus (lora_lab.data.corpus), so the child imports it through the package:
    # the very copy under test, put first on the child's path.
    code = (
        "import hashlib\n"
        "from lora_lab.data import grammar\n"
        f"assert grammar.__file__ == {C.__file__!r}, grammar.__file__\n"
        "print(hashlib.sha256(grammar.builtin_corpus(20_000, seed=3).text.encode()).hexdigest())\n"
    )
    package_root = str(Path(C.__file__).resolve().parents[2])
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    # another hash() seed: set and dict-of-str order change
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == hashlib.sha256(C.builtin_corpus(20_000, seed=3).text.encode()).hexdigest()


def test_describe_domains_reports_the_exact_floors():
    text = C.describe_domains()
    for domain in C.DOMAINS:
        assert f"{domain}: " in text
        assert f"perplexity {C.entropy_floor_ppl(domain):.3f}" in text
    assert C.sample_sentences("target", 1)[0] in text


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: C.grammar("harbour"),
        lambda: C.sample_sentences("Source", 3),
        lambda: C.sentence_log_prob("the dog runs again.", "src"),
        lambda: C.is_valid("the dog runs again.", "tgt"),
        lambda: C.validity_rate("", "both"),
        lambda: C.entropy_per_char("english"),
        lambda: C.entropy_floor_ppl(""),
    ],
)
def test_unknown_domain_names_the_valid_ones(call):
    with pytest.raises(ValueError, match=r"unknown domain .*'source', 'target'"):
        call()


def test_too_small_corpus_is_refused_with_the_minimum():
    longest = max(C.grammar(d).max_length for d in C.DOMAINS)
    minimum = math.ceil(longest / 0.2)
    with pytest.raises(ValueError, match=f"n_chars >= {minimum}"):
        C.builtin_corpus(minimum - 1)
    corpus = C.builtin_corpus(minimum)
    assert corpus.source_text and corpus.target_text
    with pytest.raises(ValueError, match="too small"):
        C.builtin_corpus(100, source_fraction=0.5)


def test_other_bad_arguments_are_refused():
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="source_fraction"):
            C.builtin_corpus(10_000, source_fraction=fraction)
    with pytest.raises(TypeError, match="seed must be an int"):
        C.sample_sentences("source", 2, seed=1.5)
    with pytest.raises(ValueError, match="n must be >= 0"):
        C.sample_sentences("source", -1)
