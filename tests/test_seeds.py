"""Several seeds (lora-lab run --seeds N): results.json's format 2, spreads, claims judged beyond the spread."""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path

import pytest
import torch

from lora_lab import cli
from lora_lab.data import CharTokenizer
from lora_lab.experiment import stages
from lora_lab.experiment.config import get_profile
from lora_lab.experiment.report import _report
from lora_lab.experiment.results import RESULTS_FORMAT, ModelResult, ResultsError, RunResults
from lora_lab.experiment.run import claims, run
from lora_lab.experiment.seeds import Spread, seed_experiment, seed_list, spreads
from lora_lab.model import GPT, GPTConfig
from lora_lab.seeding import derived_seed
from lora_lab.training import TrainHistory, generate_samples


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    one = run("builtin", "smoke", root / "one", cache=root / "cache", progress=False)
    two = run("builtin", "smoke", root / "two", cache=root / "cache", progress=False, seeds=2)
    return root, one, two


def test_a_two_seed_run_keeps_the_first_seeds_run_and_every_seeds_values(two_seeds):
    root, one, two = two_seeds
    data = json.loads((root / "two" / "results.json").read_text())
    assert data["format"] == RESULTS_FORMAT and data["seeds"] == [0, 1]
    assert RunResults.from_json(json.dumps(data)) == two  # the typed round trip
    # models are the first seed's: the same numbers as the one-seed run, bit for bit
    for name, entry in one.models.items():
        assert dataclasses.replace(two.models[name], train_seconds=0) == dataclasses.replace(entry, train_seconds=0)
    for name, metrics in data["across_seeds"].items():
        assert set(metrics) == {"target_ppl", "source_ppl", "valid_target_rate"}, name
        for metric, spread in metrics.items():
            first, second = spread["values"]
            assert first == data["models"][name][metric]
            assert spread["min"] == min(first, second) and spread["max"] == max(first, second)
            assert spread["mean"] == pytest.approx((first + second) / 2, abs=1e-15)
    # the second seed trained its own models (other init, other batches): other perplexities
    assert all(m["target_ppl"]["values"][0] != m["target_ppl"]["values"][1] for m in data["across_seeds"].values())
    # one seed: one-value spreads that follow the models, written the same way
    single = json.loads((root / "one" / "results.json").read_text())
    assert single["seeds"] == [0]
    assert single["across_seeds"]["lora"]["target_ppl"]["values"] == [single["models"]["lora"]["target_ppl"]]


def test_the_second_seed_shares_the_corpus_and_is_cached(two_seeds, tmp_path: Path, forbid_training):
    root, _, two = two_seeds
    exp = stages.prepare("builtin", "smoke", cache=root / "cache", progress=False)
    other = seed_experiment(exp, 1)
    assert other.corpus is exp.corpus and other.splits is exp.splits and other.profile.seed == 1
    assert seed_experiment(exp, 0) is exp
    forbid_training("every seed's stages are cached like a one-seed run's")
    base = stages.pretrained_base(other)
    lora = stages.evaluate(other, stages.lora_finetuned(other, base, "lora"))
    assert lora.target_ppl == two.across_seeds["lora"]["target_ppl"].values[1]
    again = run("builtin", "smoke", tmp_path / "again", cache=root / "cache", progress=False, seeds=2)
    assert again.across_seeds == two.across_seeds


def test_table_and_report_quote_mean_and_spread(two_seeds, capsys):
    root, _, two = two_seeds
    report = (root / "two" / "report.md").read_text()
    spread = two.across_seeds["lora"]["target_ppl"]
    assert f"| lora | {spread.format()} |" in report
    assert "Seeds 0, 1" in report and "largest distance of a seed" in report
    one_report = (root / "one" / "report.md").read_text()
    assert "One seed (0)" in one_report and " ± " not in one_report.split("## Reading")[0]
    # samples: a few lines per prompt, not the whole 60-token continuations
    lines = [line for line in report.split("## Samples")[1].split("### base")[1].split("###")[0].splitlines()]
    assert 0 < sum(1 for line in lines if line and line != "```") <= 4 * len(two.models["base"].samples)
    args = ["run", "--profile", "smoke", "--seeds", "2", "--out", str(root / "cli"), "--cache", str(root / "cache"),
            "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    assert spread.format() in capsys.readouterr().out
    assert cli.main([*args[:3], "--seeds", "0", *args[5:]]) == 2
    assert "number of seeds must be a positive int" in capsys.readouterr().err


def _results(values: dict[str, dict[str, list[float]]]) -> RunResults:
    """A two-seed RunResults whose models take the first seed's values."""
    per_seed = []
    for seed in range(2):
        per_seed.append({
            name: ModelResult(v["target_ppl"][seed], v["source_ppl"][seed], 1, 2, 0.0, None,
                              v["valid_target_rate"][seed], [])
            for name, v in values.items()
        })  # fmt: skip
    return RunResults("builtin", "smoke", {"source": 1.5, "target": 1.5}, per_seed[0], seeds=[0, 1],
                      across_seeds=spreads(per_seed))  # fmt: skip


def test_claims_need_the_difference_beyond_the_spread():
    good = {
        "base": {"target_ppl": [40.0, 44.0], "source_ppl": [1.70, 1.71], "valid_target_rate": [0.0, 0.0]},
        "lora": {"target_ppl": [1.61, 1.62], "source_ppl": [7.0, 7.5], "valid_target_rate": [0.85, 0.82]},
        "full": {"target_ppl": [1.63, 1.64], "source_ppl": [9.0, 10.0], "valid_target_rate": [0.9, 0.9]},
    }
    assert all(claims(_results(good)).values())
    # LoRA forgets less at each seed on average, but its worst seed forgets more than full's best
    overlap = {**good, "lora": {**good["lora"], "source_ppl": [7.0, 9.5]}}
    assert not claims(_results(overlap))["lora_forgets_less_than_full"]
    # the validity bar is met on average (81%) but not by every seed
    shaky = {**good, "lora": {**good["lora"], "valid_target_rate": [0.84, 0.78]}}
    assert not claims(_results(shaky))["lora_samples_80pct_valid"]
    # within 10% of full only if LoRA's worst seed is within 10% of full's best
    far = {**good, "lora": {**good["lora"], "target_ppl": [1.61, 1.81]}}
    assert not claims(_results(far))["lora_within_10pct_of_full"]
    # one seed: the plain single-run comparison
    assert claims(_results(overlap)) != claims(dataclasses.replace(_results(overlap), seeds=[0], across_seeds={}))


def test_results_json_checks_its_format_and_seeds(two_seeds):
    _, one, two = two_seeds
    data = json.loads(two.to_json())
    old = {key: value for key, value in json.loads(one.to_json()).items() if key not in ("format", "seeds",
                                                                                          "across_seeds")}
    with pytest.raises(ResultsError, match="'format' is missing: this file was written by an older lora_lab"):
        RunResults.from_json(old)
    with pytest.raises(ResultsError, match="'format' is 3, this lora_lab reads format 2"):
        RunResults.from_json({**data, "format": 3})
    broken = json.loads(json.dumps(data))
    broken["across_seeds"]["lora"]["target_ppl"]["mean"] = 1.0
    broken["across_seeds"]["full"]["source_ppl"]["values"] = [2.0]
    broken["across_seeds"]["base"]["target_ppl"]["values"][0] = 99.0
    broken["across_seeds"]["base"]["target_ppl"].update(Spread.of(broken["across_seeds"]["base"]["target_ppl"]
                                                                  ["values"]).to_dict())  # fmt: skip
    del broken["across_seeds"]["lora_course"]
    with pytest.raises(ResultsError) as raised:
        RunResults.from_json(broken)
    for problem in ("across_seeds.lora.target_ppl: mean do not follow from its values",
                    "across_seeds.full.source_ppl.values must list one number per seed (2)",
                    "across_seeds.base.target_ppl.values[0] must be the first seed's value",
                    "across_seeds.lora_course is missing"):  # fmt: skip
        assert problem in str(raised.value), problem
    with pytest.raises(ResultsError, match="'seeds' must be a non-empty list of distinct"):
        RunResults.from_json({**data, "seeds": [0, 0]})
    with pytest.raises(ValueError, match=r"a run over seeds \[0, 1\] needs across_seeds"):
        RunResults("builtin", "smoke", None, one.models, seeds=[0, 1])


def test_spread_and_seed_list():
    spread = Spread.of([1.0, 2.0, 4.0])
    assert (spread.mean, spread.low, spread.high) == (7 / 3, 1.0, 4.0)
    assert spread.deviation == pytest.approx(5 / 3) and spread.format(2) == "2.33 ± 1.67"
    assert Spread.of([1.5]).format() == "1.500"
    # ± is rounded up from the printed mean, so that every seed lies inside the interval as printed:
    validity = Spread.of([0.8554, 0.8289, 0.8108])  # mean 83.2%: ± 2.4 would print as "± 2", leaving 85.5% out
    assert validity.format(0, scale=100, unit="%") == "83% ± 3"
    assert Spread.of([1.6131, 1.612, 1.6203]).format() == "1.615 ± 0.006"  # 1.6203 - 1.615 = 0.0053: up to 0.006
    with pytest.raises(ValueError, match="at least one finite value"):
        Spread.of([])
    assert seed_list(0, 3) == [0, 1, 2] and seed_list(5, 2) == [5, 6]
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="number of seeds must be a positive int"):
            seed_list(0, bad)


def test_samples_are_seeded_per_domain_and_prompt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=31, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    tokenizer = CharTokenizer.from_text(string.ascii_lowercase + " .,?\n")
    prompts = ["the cow", "the cow"]
    plain = generate_samples(model, tokenizer, prompts, max_new_tokens=30, seed=3)
    # the default keeps seed + i per prompt, so the committed samples do not move
    alone = generate_samples(model, tokenizer, prompts[1:], max_new_tokens=30, seed=4)
    assert plain[1] == alone[0] and plain[0] != plain[1]
    source = generate_samples(model, tokenizer, prompts, max_new_tokens=30, seed=3, domain="source")
    target = generate_samples(model, tokenizer, prompts, max_new_tokens=30, seed=3, domain="target")
    # the same prompt in two domains, sampled with one seed, draws other random numbers
    assert source[0] != target[0] and source[1] != target[1]
    assert source == generate_samples(model, tokenizer, prompts, max_new_tokens=30, seed=3, domain="source")
    assert derived_seed(3, "source", 0) == derived_seed(3, "source", 0) != derived_seed(3, "target", 0)
    assert 0 <= derived_seed(2**40, "x") < 2**63
    with pytest.raises(TypeError, match="one or more str or int labels"):
        derived_seed(3)


def test_the_report_reads_the_course_recipe_at_the_courses_budget():
    profile = get_profile("cpu")
    ppl = {"base": 40.0, "lora_course": 2.6, "lora_course_5ep": 8.0, "lora": 1.61, "full": 1.63}
    models = {name: ModelResult(value, 2.0, 1, 2, 0.0, None, 0.5, ["a\nb\nc\nd\ne\nf"]) for name, value in ppl.items()}
    histories = {"lora_course_5ep": TrainHistory(steps=90)}
    text = _report(profile, RunResults("builtin", "cpu", None, models, histories=histories))
    closed = (40.0 - 8.0) / (40.0 - 1.63)
    assert f"At the course's own budget (5 epochs, 90 steps) its recipe closes {closed:.0%} of the gap" in text
    assert "```\na\nb\nc\nd\n```" in text and "\ne\n" not in text.split("## Samples")[1]  # four lines per sample


def test_the_report_reads_the_means_over_seeds_not_the_first_seed():
    """Over several seeds "Reading the numbers" quotes the means (and spreads), never seed 0 alone;
    a model that ends below full fine-tuning is said to go past it, not to close over 100% of the gap."""
    runs = {"base": ([40.0, 44.0], [2.0, 2.2]), "lora_course": ([10.0, 12.0], [2.1, 2.1]),
            "lora": ([1.60, 1.70], [3.0, 3.4]), "full": ([1.70, 1.66], [2.5, 2.7])}  # fmt: skip
    values = {name: {"target_ppl": t, "source_ppl": s, "valid_target_rate": [0.5] * 2} for name, (t, s) in runs.items()}
    results = dataclasses.replace(_results(values), corpus="builtin", profile="cpu")
    text = _report(get_profile("cpu"), results).split("## Reading the numbers")[1].split("## Claims")[0]
    course = (42.0 - 11.0) / (42.0 - 1.68)
    assert f"from the means over the seeds. The tuned LoRA recipe goes past full fine-tuning's target perplexity " \
           f"({(42.0 - 1.65) / (42.0 - 1.68):.0%} of the gap)" in text
    assert f"lr 0.001) closes {course:.0%} of the gap." in text
    assert "source perplexity goes 2.100 ± 0.100 → 3.200 ± 0.200 with LoRA and → 2.600 ± 0.100 with full" in text
    first_seed = (40.0 - 10.0) / (40.0 - 1.70)
    assert f"{first_seed:.0%}" not in text and "2.000 →" not in text


def test_spreads_are_apart_only_when_every_seed_is():
    a, b, touching = Spread.of([1.0, 1.2]), Spread.of([1.3, 1.5]), Spread.of([1.2, 1.4])
    assert a.below(b) and not b.below(a) and not a.overlaps(b) and not b.overlaps(a)
    assert not a.below(touching) and a.overlaps(touching) and touching.overlaps(a)  # a shared value: no verdict
