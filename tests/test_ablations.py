"""Fair comparisons (lr sweeps for both methods, the recipe ablation, rsLoRA at a matched step,
budget-matched targets), the measured update growth, and the window's reach (smoke profile)."""

from __future__ import annotations

import pytest

from lora_lab.analysis import ablations
from lora_lab.analysis.context import window_reach
from lora_lab.analysis.update_speed import GrowthSetting, growth_table, update_growth
from lora_lab.data import grammar
from lora_lab.experiment import stages


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    exp = stages.prepare("builtin", "smoke", cache=tmp_path_factory.mktemp("cache"), progress=False)
    return exp, stages.pretrained_base(exp)


def test_lr_sweep_uses_one_grid_for_both_methods_and_reuses_the_main_runs(smoke, monkeypatch):
    exp, base = smoke
    main_full = stages.full_finetuned(exp, base)
    main_lora = stages.lora_finetuned(exp, base, "lora")
    tuned_lr, full_lr = exp.profile.recipe("lora").lr, exp.profile.full.lr
    calls = []
    real_train = stages.train

    def counting(model, *args, **kwargs):
        calls.append((kwargs["desc"], args[2].lr))
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(stages, "train", counting)
    lrs = (full_lr, tuned_lr, 10.0)
    runs = ablations.lr_sweep(exp, base, "full", lrs) + ablations.lr_sweep(exp, base, "lora", lrs)
    # the main job's own runs (full at its lr, the tuned recipe at its lr) come from the cache
    assert ("full fine-tuning", full_lr) not in calls and (f"lr_lora_{tuned_lr:g}", tuned_lr) not in calls
    by = {(run["method"], run["lr"]): run for run in runs}
    block = exp.profile.model.block_size
    assert by[("full", full_lr)]["target_ppl"] == stages.perplexity(main_full.model, exp.splits.target_val, block)
    assert by[("lora", tuned_lr)]["target_ppl"] == stages.perplexity(main_lora.model, exp.splits.target_val, block)
    assert by[("full", 10.0)]["diverged"] and by[("full", 10.0)]["target_ppl"] is None  # lr 10 blows up
    for method in ("full", "lora"):
        finished = [r for r in runs if r["method"] == method and not r["diverged"]]
        assert ablations.best_lr(finished) == min(finished, key=lambda r: r["target_ppl"])["lr"]
    table = ablations.lr_table(runs)
    assert "diverged" in table and table.count("←") == 2
    with pytest.raises(ValueError, match="every run of the learning-rate sweep diverged"):
        ablations.best_lr([by[("full", 10.0)]])
    with pytest.raises(ValueError, match="profile 'smoke' has no recipe 'bitfit'"):
        ablations.lr_sweep(exp, base, "bitfit")


def test_recipe_ablation_changes_one_setting_at_a_time(smoke):
    exp, base = smoke
    runs = ablations.recipe_ablation(exp, base, epochs=0.5)
    course, tuned = exp.profile.recipe("lora_course"), exp.profile.recipe("lora")
    got = {run["changed"]: (run["rank"], run["alpha"], run["lr"]) for run in runs}
    assert got == {
        "none": (course.rank, course.alpha, course.lr),
        "lr": (course.rank, course.alpha, tuned.lr),
        "alpha": (course.rank, tuned.alpha, course.lr),
        "rank": (tuned.rank, course.alpha, course.lr),
        "all": (tuned.rank, tuned.alpha, tuned.lr),
    }
    assert all(run["epochs"] == 0.5 and run["target_ppl"] >= 1 for run in runs)
    ppl = {run["changed"]: run["target_ppl"] for run in runs}
    assert ppl["lr"] < ppl["none"] and ppl["alpha"] < ppl["none"]  # a larger step moves further in the same steps


def test_rslora_matches_lora_at_the_tuned_rank(smoke):
    exp, base = smoke
    tuned = exp.profile.recipe("lora")
    runs = ablations.rslora_comparison(exp, base, (2, tuned.rank), epochs=0.5)
    by = {(run["rank"], run["use_rslora"]): run for run in runs}
    assert by[(tuned.rank, False)]["scaling"] == pytest.approx(by[(tuned.rank, True)]["scaling"])
    # same step, same init, same batches: the same model at the tuned rank
    assert by[(tuned.rank, False)]["target_ppl"] == pytest.approx(by[(tuned.rank, True)]["target_ppl"], rel=1e-6)
    # below the tuned rank α/√r falls more slowly than α/r grows: rsLoRA takes the smaller step there
    assert by[(2, True)]["effective_step"] < by[(2, False)]["effective_step"]


def test_budget_matched_targets_train_about_the_same_parameters(smoke):
    exp, base = smoke
    groups = {"q": ("q",), "q,k,v,o": ("q", "k", "v", "o"), "mlp": ("up", "down")}
    runs = ablations.budget_matched_targets(exp, base, groups, epochs=0.5)
    budget = runs[0]["budget"]
    assert [run["group"] for run in runs] == list(groups)
    assert [run["rank"] for run in runs] == [8, 2, 2]  # smoke: width 32, one block, tuned rank 8
    for run in runs:  # within half a rank's worth of parameters of the budget
        assert abs(run["trainable_params"] - budget) <= run["trainable_params"] / run["rank"] / 2 + 1, run
    with pytest.raises(ValueError, match="at least one group"):
        ablations.budget_matched_targets(exp, base, {})


def test_update_growth_follows_alpha_over_r_times_lr_at_fixed_rank(smoke):
    exp, base = smoke
    settings = [GrowthSetting("fixed r", 8, 16.0, 2e-3), GrowthSetting("fixed r", 8, 64.0, 5e-4),
                GrowthSetting("fixed r", 8, 16.0, 5e-4)]  # fmt: skip
    runs = update_growth(exp, base, settings, steps=3)
    equal_step, quarter = runs[1]["delta_norm"] / runs[0]["delta_norm"], runs[2]["delta_norm"] / runs[0]["delta_norm"]
    assert 0.7 < equal_step < 1.3  # α×4, lr÷4: about the same update
    assert quarter < 0.4  # lr÷4 alone: a much smaller one
    assert [run["scaled_lr"] for run in runs] == pytest.approx([4e-3, 4e-3, 1e-3])
    assert "× group's first" in growth_table(runs) and all(run["relative"] > 0 for run in runs)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        update_growth(exp, base, settings, steps=0)


def test_window_reach_counts_sentences_the_window_cannot_see_whole():
    text = "ab\n" + "x" * 9 + "\n" + "yy\n"  # sentences of 3, 10 and 3 characters (newline included)
    reach = window_reach(text, 4)
    # the text may start mid-sentence, so its first line is not counted as a sentence
    assert (reach.sentences, reach.longest, reach.longer_than_window) == (2, 10, 0.5)
    # positions needing more than 4 characters: x5..x9 and the newline after them (6 of 15 predicted)
    assert reach.reach_full_window == pytest.approx(9 / 15)
    assert reach.reach_evaluation <= reach.reach_full_window
    assert window_reach(text, 64).reach_full_window == 1.0
    target = "".join(line + "\n" for line in grammar.sample_sentences("target", 300, seed=0))
    short, long = window_reach(target, 32), window_reach(target, 256)
    assert short.longer_than_window > 0.2 and long.longer_than_window == 0.0 and long.reach_full_window == 1.0
    assert short.reach_evaluation < short.reach_full_window < 1.0
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        window_reach(target, 0)


def test_the_cpu_profile_learning_rates_are_the_committed_sweeps_choice():
    """Both fine-tunings of the cpu profile run at the learning rate one sweep picked for them (the
    same grid, the whole budget, the target validation split): paper/lr_selection.json, written by
    `lora-lab run --select-lr`, is the evidence, and the profile must follow it."""
    from pathlib import Path

    from lora_lab.experiment.config import get_profile

    path = Path(__file__).resolve().parents[1] / "paper" / "lr_selection.json"
    selection = ablations.read_lr_selection(path.read_text(encoding="utf-8"), where=str(path))
    profile = get_profile("cpu")
    assert (selection["corpus"], selection["profile"], selection["seed"]) == ("builtin", "cpu", profile.seed)
    by_method = {m: [r for r in selection["runs"] if r["method"] == m] for m in ("lora", "full")}
    assert all(sorted(r["lr"] for r in runs) == sorted(ablations.LR_GRID) for runs in by_method.values())
    steps = {r["steps"] for runs in by_method.values() for r in runs}
    assert len(steps) == 1  # both methods swept at one budget
    assert ablations.best_lr(by_method["lora"]) == profile.recipe("lora").lr
    assert ablations.best_lr(by_method["full"]) == profile.full.lr


def test_a_learning_rate_selection_file_is_checked():
    import json

    good = {"corpus": "builtin", "profile": "smoke", "seed": 0, "runs": [
        {"method": "full", "lr": 1e-3, "steps": 5, "target_ppl": 3.0, "source_ppl": 2.0, "diverged": False},
        {"method": "full", "lr": 1e-1, "steps": None, "target_ppl": None, "source_ppl": None, "diverged": True},
    ]}  # fmt: skip
    assert ablations.read_lr_selection(json.dumps(good))["runs"] == good["runs"]
    with pytest.raises(ValueError, match=r"lacks \['profile'\].*--select-lr"):
        ablations.read_lr_selection(json.dumps({k: v for k, v in good.items() if k != "profile"}))
    bad = {**good, "runs": [{**good["runs"][0], "target_ppl": 0.5}]}
    with pytest.raises(ValueError, match="perplexities must be finite and ≥ 1"):
        ablations.read_lr_selection(json.dumps(bad))
    with pytest.raises(ValueError, match="is not JSON"):
        ablations.read_lr_selection("{")
    with pytest.raises(ValueError, match="no runs"):
        ablations.read_lr_selection(json.dumps({**good, "runs": []}))


def test_the_frontier_draws_each_method_through_its_learning_rates():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = [{"method": m, "lr": lr, "steps": 5, "target_ppl": t, "source_ppl": s, "diverged": False}
            for m, points in (("lora", ((1e-3, 1.7, 4.0), (1e-2, 1.6, 7.0))), ("full", ((1e-3, 1.62, 6.0),)))
            for lr, t, s in points]  # fmt: skip
    runs.append({"method": "full", "lr": 1e-1, "steps": None, "target_ppl": None, "source_ppl": None, "diverged": True})
    fig = ablations.plot_lr_frontier(runs, {"target": 1.5, "source": 1.6})
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    lora = next(line for label, line in lines.items() if label.startswith("LoRA, tuned recipe"))
    assert list(lora.get_xdata()) == [4.0, 7.0] and list(lora.get_ydata()) == [1.7, 1.6]
    assert [t.get_text() for t in ax.texts] == ["0.001", "0.01", "0.001"]  # the diverged run is left out
    assert len(ax.collections) == 2  # one ring per method, on its chosen lr
    plt.close(fig)
