"""Real text: each method's learning rate from the target validation split, and training that keeps
its best-validation checkpoint (smoke profile, a small text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_lab.analysis.ablations import LR_GRID, best_lr
from lora_lab.experiment import stages
from lora_lab.experiment.run import LR_SELECTION_FILE, run
from lora_lab.model import GPT, GPTConfig
from lora_lab.training import TrainConfig, mean_loss, train

# A small "play": two kinds of lines, so that a model can over-fit the few it trains on.
PLAY = "".join(
    f"{'the king' if i % 3 else 'a fool'} speaks line {i % 23} of act {i % 5}, {'softly' if i % 2 else 'aloud'}.\n"
    for i in range(700)
)


def test_keep_best_ends_at_the_lowest_validation_point():
    torch.manual_seed(0)
    data = torch.randint(0, 12, (3000,))
    config = TrainConfig(epochs=3.0, lr=0.3, batch_size=8, eval_points=6, seed=0)  # far too high: it gets worse
    model = GPT(GPTConfig(vocab_size=12, block_size=16, n_layer=1, n_head=2, n_embd=16))
    start = [p.detach().clone() for p in model.parameters()]
    history = train(model, data[:2400], data[2400:], config, block_size=16, progress=False, keep_best=True)
    losses = [loss for _, loss in history.val_loss]
    assert min(losses) < losses[-1]  # the last point is not the best, so keeping the best changes the model
    after = mean_loss(model, data[2400:], 16, max_windows=config.eval_max_windows)
    assert after == min(losses)
    if losses.index(min(losses)) == 0:  # the start was best: keep_best gave the model back as it was
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    with pytest.raises(ValueError, match="keep_best .* needs val_data"):
        train(model, data, None, config, block_size=16, progress=False, keep_best=True)


def test_keep_best_is_part_of_the_cache_key(tmp_path: Path):
    exp = stages.prepare("builtin", "smoke", cache=tmp_path, progress=False, overrides={"finetune.keep_best": True})
    plain = stages.prepare("builtin", "smoke", cache=tmp_path, progress=False)
    base = stages.pretrained_base(exp)
    assert stages.pretrained_base(plain).artifact == base.artifact  # pretraining does not early-stop
    best, last = stages.full_finetuned(exp, base), stages.full_finetuned(plain, base)
    assert best.artifact != last.artifact
    val = [loss for _, loss in best.history.val_loss]
    assert mean_loss(best.model, exp.splits.target_val, 32, max_windows=64) == min(val)


def test_real_text_run_selects_each_methods_lr_on_validation(tmp_path: Path):
    path = tmp_path / "play.txt"
    path.write_text(PLAY)
    overrides = {"pretrain.epochs": 0.5, "finetune.epochs": 1.0, "finetune.keep_best": True, "sample_tokens": 20}
    out = tmp_path / "out"
    results = run(str(path), "smoke", out, cache=tmp_path / "cache", progress=False, overrides=overrides,
                  select_lr=True)  # fmt: skip
    selection = json.loads((out / LR_SELECTION_FILE).read_text())
    by_method: dict[str, list] = {}
    for entry in selection["runs"]:
        by_method.setdefault(entry["method"], []).append(entry)
    assert set(by_method) == {"lora_course", "lora", "full"}
    for method, runs in by_method.items():
        assert [r["lr"] for r in runs] == list(LR_GRID)
        chosen = results.profile_settings["full"]["lr"] if method == "full" else results.recipes[method]["lr"]
        assert chosen == best_lr(runs), method
    assert results.profile_settings["finetune"]["keep_best"] is True
    assert "←" in selection["table"]
    # a later run without the selection removes the file: it would not describe those results
    run(str(path), "smoke", out, cache=tmp_path / "cache", progress=False, overrides=overrides)
    assert not (out / LR_SELECTION_FILE).exists()
