"""rsLoRA against LoRA, fully trained, over seeds (``lora-lab rslora``, smoke profile), and its file."""

from __future__ import annotations

import dataclasses
import json
import math

import matplotlib

matplotlib.use("Agg")

import pytest
from matplotlib import pyplot as plt

from lora_lab import cli
from lora_lab.experiment import stages
from lora_lab.experiment.rslora_study import (
    RsLoRAStudy,
    ScalingRun,
    format_rslora_study,
    plot_rslora_study,
    run_rslora_study,
    write_rslora_study,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    exp = stages.prepare("builtin", "smoke", cache=tmp_path_factory.mktemp("cache"), progress=False)
    return exp, run_rslora_study(exp, seeds=2, ranks=(2, 8))


def test_both_scalings_are_one_model_at_the_matched_rank_and_differ_by_sqrt_r_elsewhere(study):
    exp, result = study
    tuned = exp.profile.recipe("lora")
    assert result.matched_rank == tuned.rank == 8 and result.ranks == [2, 8] and result.seeds == [0, 1]
    assert len(result.runs) == 2 * 2 * 2 and result.epochs == exp.profile.finetune.epochs
    for seed in result.seeds:  # at r0 rsLoRA's α' = α/√r0 gives the same scaling (to the last bit of a double,
        # which float32 weights do not see): the same training, bit for bit
        lora = next(r for r in result.runs if (r.method, r.rank, r.seed) == ("lora", 8, seed))
        rs = next(r for r in result.runs if (r.method, r.rank, r.seed) == ("rslora", 8, seed))
        assert lora.scaling == pytest.approx(rs.scaling, rel=1e-12)
        assert lora.target_ppl == rs.target_ppl and lora.source_ppl == rs.source_ppl
    lora2, rs2 = result.run("lora", 2), result.run("rslora", 2)
    assert lora2.effective_step == pytest.approx(tuned.alpha * tuned.lr)  # LoRA: α·lr at every rank
    assert rs2.effective_step == pytest.approx(tuned.alpha * tuned.lr * math.sqrt(2 / 8))  # rsLoRA: ∝ √r
    assert rs2.alpha == pytest.approx(tuned.alpha / math.sqrt(8)) and rs2.scaling == pytest.approx(rs2.alpha / 2**0.5)
    # seed 0 fine-tunes the main job's base with the main job's settings: the tuned run is the main job's own
    main = stages.evaluate(exp, stages.lora_finetuned(exp, stages.pretrained_base(exp), "lora"))
    assert result.run("lora", 8).target_ppl == main.target_ppl


def test_the_file_round_trips_and_is_checked(study, tmp_path):
    _, result = study
    path = write_rslora_study(result, tmp_path / "rslora.json")
    assert RsLoRAStudy.from_json(path.read_text(encoding="utf-8")) == result
    data = json.loads(path.read_text(encoding="utf-8"))
    broken = {**data, "runs": data["runs"][1:]}
    with pytest.raises(ValueError, match="one run per method, rank and seed .*rerun `lora-lab rslora`"):
        RsLoRAStudy.from_json(json.dumps(broken))
    bad_ppl = {**data, "runs": [{**data["runs"][0], "target_ppl": 0.5}, *data["runs"][1:]]}
    with pytest.raises(ValueError, match="perplexities must be ≥ 1"):
        RsLoRAStudy.from_json(json.dumps(bad_ppl))
    with pytest.raises(ValueError, match="is not a study written by lora-lab rslora"):
        RsLoRAStudy.from_json(json.dumps({**data, "runs": [{"rank": 2}]}))
    with pytest.raises(ValueError, match="is not a study written by lora-lab rslora"):
        RsLoRAStudy.from_json("not json")


def _synthetic(lora: dict[int, list[float]], rslora: dict[int, list[float]]) -> RsLoRAStudy:
    runs = [
        ScalingRun(method, rank, seed, 1.0, 1.0, 1.0, 10, ppl, 2.0)
        for method, table in (("lora", lora), ("rslora", rslora))
        for rank, values in table.items()
        for seed, ppl in enumerate(values)
    ]
    return RsLoRAStudy("smoke", 1.0, 1e-3, [0, 1, 2], sorted(lora), 16, None, "test", runs)


def test_a_difference_is_stated_only_outside_the_seeds_ranges():
    same = [1.62, 1.61, 1.63]
    result = _synthetic({16: same, 64: [1.70, 1.69, 1.71]}, {16: same, 64: [1.60, 1.61, 1.62]})
    assert result.verdict(16) is None and result.verdict(64) == "rslora"
    touching = _synthetic({64: [1.60, 1.65, 1.70], 16: [1.6] * 3}, {64: [1.55, 1.58, 1.60], 16: [1.6] * 3})
    assert touching.verdict(64) is None  # the ranges share 1.60: the seeds cannot tell
    worse = _synthetic({64: [1.60, 1.61, 1.62], 16: [1.6] * 3}, {64: [1.70, 1.71, 1.72], 16: [1.6] * 3})
    assert worse.verdict(64) == "lora"
    table = format_rslora_study(result)
    assert "| 64 |" in table and table.rstrip().endswith("| rsLoRA |") and "inside the seeds' spread" in table


def test_the_figure_shows_every_seed_of_both_scalings():
    result = _synthetic({4: [1.9, 1.8, 1.85], 16: [1.62, 1.61, 1.63]}, {4: [2.0, 2.1, 2.05], 16: [1.62, 1.61, 1.63]})
    fig = plot_rslora_study(dataclasses.replace(result, ranks=[4, 16]))
    (ax,) = fig.axes
    assert sum(len(c.get_offsets()) for c in ax.collections) == 2 * 2 * 3  # every seed a dot
    assert [line.get_label() for line in ax.get_lines()][:2] == ["LoRA, α/r (mean)", "rsLoRA, α'/√r (mean)"]
    plt.close(fig)


def test_the_command_refuses_bad_ranks_before_training(forbid_training, capsys, tmp_path):
    forbid_training("bad arguments are refused before anything trains")
    out = tmp_path / "rslora.json"
    assert cli.main(["rslora", "--profile", "smoke", "--ranks", "4,x", "--out", str(out)]) == 2
    assert "--ranks takes comma-separated whole numbers" in capsys.readouterr().err
    assert cli.main(["rslora", "--profile", "smoke", "--ranks", "2,4", "--cache", str(tmp_path / "c"),
                     "--out", str(out)]) == 2  # fmt: skip
    assert "must include the tuned rank 8" in capsys.readouterr().err
    assert not out.exists()
