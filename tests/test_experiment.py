"""The main job end to end (smoke profile): outputs, determinism, caching, typed results, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lora_lab import cli
from lora_lab.experiment import stages
from lora_lab.experiment.config import get_profile
from lora_lab.experiment.results import ModelResult, ResultsError, RunResults
from lora_lab.experiment.run import claims, run
from lora_lab.training.loop import TrainConfig, train

MODEL_KEYS = {
    "target_ppl",
    "source_ppl",
    "trainable_params",
    "total_params",
    "train_seconds",
    "artifact_bytes",
    "valid_target_rate",
    "samples",
}


def _numbers(results: RunResults) -> dict:
    """Everything in results.json that training determines (not wall-clock time)."""
    return {name: {k: v for k, v in m.to_dict().items() if k != "train_seconds"} for name, m in results.models.items()}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    results = run("builtin", "smoke", root / "out", cache=root / "cache", progress=False)
    return root, results


def test_results_json_follows_the_contract(smoke_run):
    root, results = smoke_run
    text = (root / "out" / "results.json").read_text()
    on_disk = json.loads(text)
    assert text == results.to_json() and RunResults.from_json(text) == results  # the typed round trip
    assert on_disk["corpus"] == "builtin" and on_disk["profile"] == "smoke"
    floors = on_disk["entropy_floor_ppl"]
    assert set(floors) == {"source", "target"} and all(1 < v < 10 for v in floors.values())
    assert list(on_disk["models"]) == ["base", "lora_course", "lora", "full"]
    assert list(on_disk["histories"]) == list(on_disk["models"]) and on_disk["profile_settings"]["name"] == "smoke"
    for name, entry in on_disk["models"].items():
        assert set(entry) >= MODEL_KEYS, name
        assert entry["target_ppl"] >= floors["target"] and entry["source_ppl"] >= floors["source"]
        assert 0 <= entry["valid_target_rate"] <= 1 and entry["samples"] and entry["artifact_bytes"] > 0
    models = on_disk["models"]
    # LoRA trains only A and B: r·(in + out) per adapted linear layer.
    assert models["lora"]["trainable_params"] < models["full"]["trainable_params"] == models["full"]["total_params"]
    assert models["lora"]["artifact_bytes"] < models["full"]["artifact_bytes"]
    for name in ("report.md", "loss_curves.png", "perplexities.png"):
        assert (root / "out" / name).stat().st_size > 1000
    assert (root / "out" / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_trainable_count_is_rank_times_in_plus_out(smoke_run):
    _, results = smoke_run
    p = get_profile("smoke")
    d, layers = p.model.n_embd, p.model.n_layer
    per_block = 4 * (d + d) + (d + 4 * d) + (4 * d + d)  # q, k, v, o; mlp up; mlp down
    lm_head = d + stages.prepare("builtin", "smoke", progress=False).tokenizer.vocab_size
    for name in ("lora_course", "lora"):
        assert results.models[name].trainable_params == p.recipe(name).rank * (layers * per_block + lm_head)


def test_same_seed_gives_identical_results_and_the_cache_is_reused(smoke_run, tmp_path: Path, forbid_training):
    root, results = smoke_run
    again = run("builtin", "smoke", tmp_path / "fresh", cache=tmp_path / "cache", progress=False)
    assert _numbers(again) == _numbers(results)  # retrained from scratch in a new cache: bit-identical

    forbid_training("a cached artifact should have been reused")
    cached = run("builtin", "smoke", tmp_path / "cached", cache=root / "cache", progress=False)
    assert _numbers(cached) == _numbers(results)
    assert cached.models["base"].train_seconds == results.models["base"].train_seconds


@pytest.mark.parametrize(
    "stage, damaged",
    [("base", "model.safetensors"), ("lora", "adapter/adapter_model.safetensors"), ("full", "history.json")],
)
def test_a_damaged_cache_artifact_says_to_delete_its_folder(smoke_run, tmp_path: Path, forbid_training, stage, damaged):
    root, _ = smoke_run
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache)
    paths = sorted(cache.glob(f"{stage}-*/{damaged}"))  # LoRA: one folder per cached recipe
    assert paths
    for path in paths:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    damaged_bytes = {path: path.read_bytes() for path in paths}

    exp = stages.prepare("builtin", "smoke", cache=cache, progress=False)
    forbid_training("a damaged artifact is reported, not silently retrained")
    with pytest.raises(RuntimeError, match=rf"cached artifact .*{stage}-\w+ cannot be read .*delete that folder"):
        base = stages.pretrained_base(exp)
        stages.lora_finetuned(exp, base, "lora") if stage == "lora" else stages.full_finetuned(exp, base)
    assert {path: path.read_bytes() for path in paths} == damaged_bytes  # reported, not deleted


def test_a_changed_setting_never_reuses_a_stale_artifact(smoke_run, monkeypatch):
    root, _ = smoke_run
    calls = []
    real_train = stages.train

    def counting(model, *args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(stages, "train", counting)
    exp = stages.prepare("builtin", "smoke", cache=root / "cache", progress=False, overrides={"recipes.lora.lr": 1e-2})
    base = stages.pretrained_base(exp)
    stages.lora_finetuned(exp, base, "lora")  # the tuned recipe's lr changed: retrain LoRA, not the base
    stages.lora_finetuned(exp, base, exp.profile.recipe("lora_course"))  # unchanged: from the cache
    assert calls == ["lora"]


def _result(**values) -> ModelResult:
    entry = {"target_ppl": 2.0, "source_ppl": 2.0, "trainable_params": 1, "total_params": 2, "train_seconds": 0.0,
             "artifact_bytes": None, "valid_target_rate": 0.5, "samples": []}  # fmt: skip
    return ModelResult(**{**entry, **values})


def test_claims_can_fail():
    models = {"base": _result(target_ppl=3.0), "lora": _result(), "full": _result(target_ppl=1.6)}
    results = RunResults("builtin", "smoke", {"source": 2.5, "target": 1.5}, models)
    checked = claims(results)
    assert checked["lora_beats_base_on_target"] and not checked["lora_within_10pct_of_full"]
    assert not checked["lora_samples_80pct_valid"] and not checked["no_model_below_floor"]
    # base→full closes 1.4; LoRA closes 1.0 of it (71%); neither forgets anything.
    assert checked["lora_closes_70pct_of_gap"] and not checked["lora_forgets_less_than_full"]

    models["lora"].target_ppl = 2.1  # closes 0.9 of 1.4: 64%
    models["full"].source_ppl = 2.2  # full forgets 0.2, LoRA nothing
    checked = claims(results)
    assert not checked["lora_closes_70pct_of_gap"] and checked["lora_forgets_less_than_full"]
    models["base"].target_ppl = 1.5  # full fine-tuning made the target worse: there is no gap to close
    assert not claims(results)["lora_closes_70pct_of_gap"]


def test_results_from_json_names_every_problem(smoke_run):
    _, results = smoke_run
    data = json.loads(results.to_json())
    data["models"]["lora"]["target_ppl"] = 0.5
    data["models"]["full"]["samples"] = "one string"
    del data["models"]["base"]
    data["claims"]["lora_beats_base_on_target"] = "yes"
    data["histories"]["lora"] = {"seconds": 1.0}
    with pytest.raises(ResultsError) as raised:
        RunResults.from_json(json.dumps(data), where="x.json")
    message = str(raised.value)
    for problem in ("x.json does not match", "models.lora.target_ppl must be a finite perplexity >= 1",
                    "models.full.samples must be a list of strings", "models.base is missing",
                    "claims must map claim names to true/false", "histories.lora must have"):  # fmt: skip
        assert problem in message, problem
    with pytest.raises(ResultsError, match="not valid JSON.*NaN"):
        RunResults.from_json('{"corpus": NaN}')


def test_non_finite_loss_names_the_step_and_restores_the_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)

    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, y):
            out = self.inner(torch.nn.functional.one_hot(x % 4, 4).float())
            loss = out.pow(2).mean() * (math.inf if self.calls_ >= 3 else 1.0)
            self.calls_ += 1
            return out, loss

    wrapper = Exploding()
    wrapper.calls_ = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(epochs=1, lr=0.1, batch_size=2, eval_points=0)
    with pytest.raises(
        FloatingPointError, match=r"loss became inf at step 4 of .*learning rate is most likely too high"
    ):
        train(wrapper, torch.arange(200), None, config, block_size=4, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class FailsAtStep4(torch.nn.Module):
    """A model around ``inner`` whose fourth call raises ``error``: after three optimiser steps
    have changed the weights."""

    def __init__(self, inner: torch.nn.Module, error: type[BaseException]):
        super().__init__()
        self.inner, self.error, self.calls = inner, error, 0

    def forward(self, x, y):
        self.calls += 1
        if self.calls == 4:
            raise self.error()
        return None, self.inner(torch.nn.functional.one_hot(x % 4, 4).float()).pow(2).mean()


def _train_until_it_fails(wrapper: torch.nn.Module, **options) -> None:
    config = TrainConfig(epochs=1, lr=0.1, batch_size=2, eval_points=0)
    with pytest.raises(wrapper.error):
        train(wrapper, torch.arange(200), None, config, block_size=4, progress=False, **options)


@pytest.mark.parametrize("error", [KeyboardInterrupt, MemoryError])
@pytest.mark.parametrize("given_mode", [True, False])
def test_any_failure_mid_training_restores_the_model(error, given_mode):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    wrapper = FailsAtStep4(model, error).train(given_mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_until_it_fails(wrapper)
    assert wrapper.calls == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert wrapper.training is given_mode and model.training is given_mode


def test_cli_reports_bad_input_with_exit_code_2(tmp_path: Path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert cli.main(["run", "--corpus", str(empty), "--profile", "smoke", "--out", str(tmp_path / "o")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert cli.main(["run", "--profile", "smoke", "--set", "lr", "--out", str(tmp_path / "o")]) == 2
    assert "--set expects FIELD=VALUE" in capsys.readouterr().err
    assert cli.main(["run", "--profile", "smoke", "--set", "lr=1", "--out", str(tmp_path / "o")]) == 2
    assert "unknown profile field 'lr'; fields are: " in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unusable_out_or_cache_is_refused_before_training(tmp_path: Path, capsys, forbid_training):
    forbid_training("a run with an unusable folder must fail before training")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for flag in ("--out", "--cache"):
        args = ["run", "--profile", "smoke", "--out", str(tmp_path / "o"), flag, str(a_file), "--no-progress"]
        assert cli.main(args) == 2
        assert f"{a_file} is a file" in capsys.readouterr().err
    assert a_file.read_text() == "keep me" and not (tmp_path / "o").exists()


def test_profile_object_overrides_are_validated_like_names():
    with pytest.raises(ValueError, match="unknown profile field 'bogus'; fields are: "):
        stages.prepare("builtin", get_profile("smoke"), progress=False, overrides={"bogus": 1})


def test_cli_help_shows_percent_signs_once(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    shown = capsys.readouterr().out
    assert "80% of the corpus" in " ".join(shown.split()) and "%%" not in shown


def test_a_text_file_named_builtin_is_not_the_builtin_corpus(tmp_path: Path, monkeypatch, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "builtin.txt").write_text("".join(f"line {i % 13} of my own notes.\n" for i in range(400)))
    monkeypatch.chdir(tmp_path)
    args = ["run", "--corpus", "notes/builtin.txt", "--profile", "smoke", "--no-progress", "--cache", "cache",
            "--set", "pretrain.epochs=0.2", "--set", "finetune.epochs=0.2", "--set", "sample_tokens=20"]  # fmt: skip
    assert cli.main(args) == 0
    assert "Wrote runs/file-builtin-smoke/" in capsys.readouterr().out
    results = RunResults.from_json((tmp_path / "runs" / "file-builtin-smoke" / "results.json").read_text())
    assert results.corpus == "builtin.txt" and results.entropy_floor_ppl is None  # not scored against the grammar
    assert not (tmp_path / "runs" / "builtin-smoke").exists()


def test_a_run_without_sweep_removes_an_earlier_runs_sweep_files(smoke_run, tmp_path: Path):
    root, _ = smoke_run
    out = tmp_path / "out"
    out.mkdir()
    stale = {name: out / name for name in ("sweep.json", "rank_sweep.png", "spectrum.png")}
    for path in stale.values():
        path.write_text("from an earlier run with other settings")
    (out / "notes.txt").write_text("the user's own file")
    run("builtin", "smoke", out, cache=root / "cache", progress=False)
    assert not any(path.exists() for path in stale.values())
    assert (out / "notes.txt").read_text() == "the user's own file" and (out / "results.json").is_file()


def test_real_text_run_has_no_floor_and_no_validity(tmp_path: Path):
    text = "".join(f"line {i % 17} of a small play, spoken twice.\n" for i in range(600))
    path = tmp_path / "play.txt"
    path.write_text(text)
    results = run(
        str(path),
        "smoke",
        tmp_path / "out",
        cache=tmp_path / "cache",
        progress=False,
        overrides={"pretrain.epochs": 0.2, "finetune.epochs": 0.2, "sample_tokens": 20},
    )
    assert results.corpus == "play.txt" and results.entropy_floor_ppl is None
    assert all(m.valid_target_rate is None for m in results.models.values())
    assert "no_model_below_floor" not in results.claims


def test_cli_run_with_sweep_writes_the_papers_sweep_outputs(smoke_run, tmp_path: Path, capsys):
    root, _ = smoke_run
    out = tmp_path / "out"
    args = ["run", "--profile", "smoke", "--sweep", "--out", str(out), "--cache", str(root / "cache"), "--no-progress"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    checked = json.loads((out / "results.json").read_text())["claims"]
    assert "lora_closes_70pct_of_gap" in checked
    for name, ok in checked.items():  # each claim printed once, with its own verdict
        verdict = f"{'PASS' if ok else 'FAIL'}  {name.replace('_', ' ')}"
        assert printed.count(name.replace("_", " ")) == 1 and verdict in printed, (name, printed)
    sweep = json.loads((out / "sweep.json").read_text())
    ranks = [entry["rank"] for entry in sweep["runs"]]
    assert ranks == sorted(ranks) and len(ranks) >= 5
    for name in ("rank_sweep.png", "spectrum.png", "results.json"):
        assert (out / name).stat().st_size > 0


def test_training_a_throwaway_copy_skips_the_restore_snapshot(smoke_run, monkeypatch, tmp_path: Path):
    """Restoring a failed run needs a copy of every trained parameter: for full fine-tuning a second
    copy of the model. The stages train private copies, so they ask train() for no snapshot; the
    LoRA stage (whose adapters are small) keeps the default."""
    root, _ = smoke_run
    options = {}
    real_train = stages.train

    def recording(model, *args, **kwargs):
        options[kwargs["desc"]] = kwargs.get("restore_on_error", True)
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(stages, "train", recording)
    exp = stages.prepare("builtin", "smoke", cache=tmp_path / "cache", progress=False)
    base = stages.pretrained_base(exp)
    stages.lora_finetuned(exp, base, "lora")
    stages.full_finetuned(exp, base)
    assert options == {"pretraining": False, "lora": True, "full fine-tuning": False}

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    before = model.weight.detach().clone()
    _train_until_it_fails(FailsAtStep4(model, KeyboardInterrupt), restore_on_error=False)
    assert not torch.equal(model.weight, before)  # no snapshot, so nothing to restore: the caller discards it
