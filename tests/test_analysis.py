"""Tests for lora_lab.analysis: subspace similarity, ΔW and its spectrum, the cost model and the
comparison table, the sweeps (smoke profile) and the files written for the companion PDF."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from matplotlib import pyplot as plt
from torch import nn

from lora_lab import analysis
from lora_lab.analysis import figures
from lora_lab.experiment import stages
from lora_lab.experiment.config import TUNED_RECIPE
from lora_lab.experiment.results import ModelResult
from lora_lab.files import format_bytes
from lora_lab.lora import apply_lora_to_model, count_parameters, lora_modules, merge_lora
from lora_lab.model import GPT, GPTConfig
from lora_lab.seeding import make_generator, seed_everything

REPO = Path(__file__).resolve().parents[1]


def _paper_build():
    spec = importlib.util.spec_from_file_location("paper_build_for_analysis", REPO / "paper" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=make_generator(seed), dtype=torch.float64)


def _tiny_gpt(seed: int = 0) -> GPT:
    seed_everything(seed, deterministic=False)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)).eval()


# --- subspace similarity ---------------------------------------------------------------------------


def test_phi_of_a_matrix_with_itself_is_one_on_the_diagonal():
    A = _randn(8, 32)
    for i in range(1, 9):
        assert analysis.subspace_similarity(A, A, i, i) == pytest.approx(1.0, abs=1e-12)
    phi = analysis.subspace_similarity_matrix(A, A)
    assert torch.allclose(phi.diagonal(), torch.ones(8, dtype=torch.float64), atol=1e-12)


def test_phi_is_in_unit_interval_matches_the_matrix_and_is_symmetric_with_swapped_indices():
    A8, A64 = _randn(8, 96, seed=1), _randn(64, 96, seed=2)
    phi = analysis.subspace_similarity_matrix(A8, A64)
    assert phi.shape == (8, 64)
    assert ((phi >= 0) & (phi <= 1)).all()
    for i, j in [(1, 1), (3, 5), (8, 64), (8, 2), (5, 40)]:
        value = analysis.subspace_similarity(A8, A64, i, j)
        assert value == pytest.approx(float(phi[i - 1, j - 1]), abs=1e-12)
        assert value == pytest.approx(analysis.subspace_similarity(A64, A8, j, i), abs=1e-12)


def test_phi_of_orthogonal_subspaces_is_zero_and_of_nested_ones_is_one():
    k = 24
    basis = torch.linalg.qr(_randn(k, k, seed=3)).Q  # an orthonormal basis of R^k
    A1 = _randn(4, 4, seed=4) @ basis[:, :4].T  # rows span the first 4 basis vectors
    A2 = _randn(6, 6, seed=5) @ basis[:, 4:10].T  # rows span the next 6: orthogonal to A1's
    assert torch.allclose(
        analysis.subspace_similarity_matrix(A1, A2), torch.zeros(4, 6, dtype=torch.float64), atol=1e-12
    )
    A3 = torch.cat([A1, _randn(5, k, seed=6)])  # row space contains A1's
    assert analysis.subspace_similarity(A1, A3, 4, 9) == pytest.approx(1.0, abs=1e-12)
    # φ only sees the row space: an invertible mix of A's rows spans the same subspace.
    assert analysis.subspace_similarity(A1, _randn(4, 4, seed=7) @ A1, 4, 4) == pytest.approx(1.0, abs=1e-12)


def test_phi_of_independent_random_subspaces_averages_max_i_j_over_k():
    k, i, j = 64, 2, 8
    values = [analysis.subspace_similarity(_randn(i, k, seed=s), _randn(j, k, seed=1000 + s), i, j) for s in range(200)]
    expected = analysis.random_subspace_similarity(k, i, j)
    assert expected == max(i, j) / k
    # Each value has standard deviation ≈ 0.06 here, so the mean of 200 is within 0.015 of 0.125.
    assert sum(values) / len(values) == pytest.approx(expected, abs=0.015)


def test_phi_rejects_bad_inputs():
    A = _randn(4, 10)
    with pytest.raises(ValueError, match="different size"):
        analysis.subspace_similarity(A, _randn(4, 11), 1, 1)
    with pytest.raises(ValueError, match=r"i must be an int in \[1, 4\]"):
        analysis.subspace_similarity(A, A, 5, 1)
    with pytest.raises(ValueError, match="j must be"):
        analysis.subspace_similarity(A, A, 1, 0)
    with pytest.raises(ValueError, match="2-D"):
        analysis.subspace_similarity(torch.ones(4), A, 1, 1)
    with pytest.raises(ValueError, match="NaN"):
        analysis.subspace_similarity(torch.full((2, 10), math.nan), A, 1, 1)
    with pytest.raises(ValueError, match="at most"):
        analysis.random_subspace_similarity(4, 5, 1)


# --- ΔW ----------------------------------------------------------------------------------------------


def _trained_lora(base: GPT, rank: int = 3, alpha: float = 6.0) -> nn.Module:
    """A LoRA copy of base whose B are non-zero (as after training)."""
    seed_everything(1, deterministic=False)
    model = apply_lora_to_model(base, rank=rank, alpha=alpha)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora.lora_B.normal_(0, 0.1)
    return model


def test_lora_delta_weights_equal_merged_minus_base():
    base = _tiny_gpt()
    model = _trained_lora(base)
    deltas = analysis.delta_weights(base, model)
    assert list(deltas) == list(lora_modules(model))  # every adapted layer, in module order
    merged = merge_lora(model)
    for name, delta in deltas.items():
        expected = merged.get_submodule(name).weight - base.get_submodule(name).weight
        assert delta.shape == base.get_submodule(name).weight.shape
        assert torch.allclose(delta, expected.detach(), atol=1e-6)
        assert int(torch.linalg.matrix_rank(delta, rtol=1e-4)) <= 3  # beyond r: float32 rounding only
    # A model merged in place gives the same ΔW.
    for module in lora_modules(model).values():
        module.merge()
    again = analysis.delta_weights(base, model)
    assert all(torch.allclose(again[n], deltas[n]) for n in deltas)


def test_lora_delta_weights_refuse_a_foreign_base():
    model = _trained_lora(_tiny_gpt(seed=0))
    with pytest.raises(ValueError, match="not made from this base"):
        analysis.delta_weights(_tiny_gpt(seed=1), model)
    with pytest.raises(ValueError, match="base holds LoRA layers"):
        analysis.delta_weights(model, model)


def test_full_finetuning_delta_is_the_weight_difference_of_every_linear():
    base = _tiny_gpt()
    tuned = copy.deepcopy(base)
    bump = _randn(16, 16, seed=9).float()
    with torch.no_grad():
        tuned.blocks[1].attn.v.weight += bump
        tuned.wte.weight += 1.0  # not a linear layer: not part of the result
    deltas = analysis.delta_weights(base, tuned)
    linears = [name for name, m in base.named_modules() if isinstance(m, nn.Linear)]
    assert list(deltas) == linears
    assert torch.allclose(deltas["blocks.1.attn.v"], bump, atol=1e-6)
    assert all(not deltas[name].any() for name in linears if name != "blocks.1.attn.v")
    with pytest.raises(ValueError, match="no nn.Linear named"):
        analysis.delta_weights(base, nn.Sequential(nn.Linear(16, 16)))


def test_layer_type_drops_the_block_index():
    assert analysis.layer_type("blocks.3.attn.q") == "attn.q"
    assert analysis.layer_type("blocks.10.mlp.down") == "mlp.down"
    assert analysis.layer_type("lm_head") == "lm_head"


def test_effective_rank_and_energy_on_a_known_spectrum():
    s = torch.tensor([1.0, 3.0, 0.0, 2.0])  # any order; σ² = 9, 4, 1, 0 of 14
    assert analysis.effective_rank(s, 0.5) == 1  # 9/14 = 0.64
    assert analysis.effective_rank(s, 0.9) == 2  # 13/14 = 0.93
    assert analysis.effective_rank(s, 0.95) == 3
    assert analysis.effective_rank(s, 1.0) == 3  # the zero value adds nothing
    assert analysis.effective_rank(torch.zeros(5)) == 0
    assert analysis.energy_captured(s, 2) == pytest.approx(13 / 14)
    assert analysis.energy_captured(s, 0) == 0.0 and analysis.energy_captured(s, 9) == 1.0
    curve = analysis.energy_curve(s)
    assert curve.dtype == torch.float64
    assert torch.allclose(curve, torch.tensor([9 / 14, 13 / 14, 1.0, 1.0], dtype=torch.float64))
    assert [analysis.energy_captured(s, k) for k in (1, 2, 3)] == pytest.approx(curve[:3].tolist())
    assert torch.equal(analysis.energy_curve(torch.zeros(3)), torch.ones(3, dtype=torch.float64))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="energy"):
            analysis.effective_rank(s, bad)
    with pytest.raises(ValueError, match="non-negative"):
        analysis.effective_rank(torch.tensor([1.0, -1.0]))


def test_singular_values_of_a_built_matrix():
    U = torch.linalg.qr(_randn(20, 20, seed=1)).Q[:, :3]
    V = torch.linalg.qr(_randn(12, 12, seed=2)).Q[:, :3]
    matrix = U @ torch.diag(torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)) @ V.T  # rank 3, known σ
    s = analysis.singular_values(matrix.float())
    assert s.dtype == torch.float64 and s.shape == (12,)
    assert torch.allclose(s[:3], torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64), atol=1e-5)
    assert analysis.effective_rank(s, 1.0) == 3 and analysis.effective_rank(s, 0.8) == 1  # 25/30 = 0.83
    with pytest.raises(ValueError, match="2-D"):
        analysis.singular_values(torch.ones(3))


# --- cost ---------------------------------------------------------------------------------------------


def test_optimizer_memory_is_16_bytes_per_trainable_and_4_per_frozen_parameter():
    base = _tiny_gpt()
    for param in base.parameters():
        param.requires_grad = True
    total = base.num_parameters()
    assert analysis.optimizer_memory_bytes(base) == 16 * total
    model = apply_lora_to_model(base, rank=2, alpha=2.0)
    trainable, with_adapters = count_parameters(model)
    assert analysis.optimizer_memory_bytes(model) == 16 * trainable + 4 * (with_adapters - trainable)
    assert analysis.optimizer_memory_bytes(model.double()) == 32 * trainable + 8 * (with_adapters - trainable)


def _result(target: float, source: float, trainable: int, artifact: int | None) -> ModelResult:
    return ModelResult(target, source, trainable, 10_000, 2.5, artifact, None, [])


def test_comparison_table_reads_model_results_and_their_json_alike():
    results = {
        "base": _result(40.0, 1.7, 10_000, 308_400),
        "lora": _result(1.62, 2.45, 250, 79_600),
        "full": _result(1.61, 6.0, 10_000, None),
    }
    memory = {"lora": 163_000, "full": 160_000}
    table = analysis.comparison_table(results, memory, {"target": 1.577, "source": 1.679})
    as_json = {name: json.loads(json.dumps(entry.to_dict())) for name, entry in results.items()}
    assert analysis.comparison_table(as_json, memory, {"target": 1.577, "source": 1.679}) == table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert list(rows) == ["*entropy floor*", "base", "lora", "full"]
    assert "| 1.577 | 1.679 |" in rows["*entropy floor*"]
    # base: no forgetting, share or training state of its own; its artifact size is formatted.
    assert rows["base"].count("—") == 4 and rows["base"].endswith(f"| {format_bytes(308_400)} |")
    assert "| +0.750 | 250 | 2.50% |" in rows["lora"]
    assert rows["lora"].endswith(f"| {format_bytes(163_000)} | {format_bytes(79_600)} |")
    assert "| +4.300 |" in rows["full"] and rows["full"].endswith("| 160.0 KB | — |")


# --- sweeps on the smoke profile ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    exp = stages.prepare("builtin", "smoke", cache=tmp_path_factory.mktemp("cache"), progress=False)
    return exp, stages.pretrained_base(exp)


def _adapted_in_plus_out(model: nn.Module) -> int:
    return sum(m.in_features + m.out_features for m in lora_modules(model).values())


def test_rank_sweep_gives_one_entry_per_rank_with_the_lora_parameter_count(smoke):
    exp, base = smoke
    runs = analysis.rank_sweep(exp, base, ranks=(1, 2, 4))
    floors = stages.entropy_floors(exp)
    assert [run["rank"] for run in runs] == [1, 2, 4]
    tuned = exp.profile.recipe(TUNED_RECIPE)
    in_plus_out = _adapted_in_plus_out(apply_lora_to_model(base.model, rank=1))  # every nn.Linear
    for run in runs:
        assert math.isfinite(run["target_ppl"]) and run["target_ppl"] >= floors["target"]
        assert math.isfinite(run["source_ppl"]) and run["source_ppl"] >= floors["source"]
        assert run["trainable_params"] == run["rank"] * in_plus_out
        assert run["total_params"] == base.model.num_parameters() + run["trainable_params"]
        assert run["alpha"] == tuned.alpha and run["scaling"] == tuned.alpha / run["rank"]  # α fixed
        assert run["epochs"] == min(analysis.SWEEP_EPOCHS, exp.profile.finetune.epochs)
        assert run["steps"] > 0
    assert runs[0]["target_ppl"] != runs[1]["target_ppl"]  # the runs really differ
    rs = analysis.rank_sweep(exp, base, ranks=(2,), use_rslora=True, source=False)
    assert rs[0]["scaling"] == pytest.approx(tuned.alpha / math.sqrt(2)) and "source_ppl" not in rs[0]
    table = analysis.sweep_table(runs)
    assert table.count("\n") == 1 + len(runs) and "| 4 |" in table


def test_alpha_and_target_sweeps_reuse_equal_settings_from_the_cache(smoke, monkeypatch, forbid_training):
    exp, base = smoke
    tuned = exp.profile.recipe(TUNED_RECIPE)
    analysis.rank_sweep(exp, base, ranks=(tuned.rank,), source=False)  # trains the tuned settings once

    forbid_training("these settings were trained already; the cached artifact should be reused")
    again = analysis.alpha_sweep(exp, base, alphas=(tuned.alpha,), source=False)
    assert again[0]["rank"] == tuned.rank and again[0]["name"] == f"sweep_alpha{tuned.alpha:g}"
    monkeypatch.undo()

    alphas = analysis.alpha_sweep(exp, base, alphas=(1.0, 64.0), source=False)
    assert [run["scaling"] for run in alphas] == [1.0 / tuned.rank, 64.0 / tuned.rank]
    assert alphas[0]["trainable_params"] == alphas[1]["trainable_params"]  # α changes no parameter count

    groups = analysis.target_sweep(exp, base, {"attention": ["q", "k", "v", "o"], "mlp": ["up", "down"]}, source=False)
    d, layers, r = exp.profile.model.n_embd, exp.profile.model.n_layer, tuned.rank
    assert [run["group"] for run in groups] == ["attention", "mlp"]
    assert groups[0]["trainable_params"] == r * layers * 4 * (d + d)
    assert groups[1]["trainable_params"] == r * layers * ((d + 4 * d) + (4 * d + d))
    assert groups[0]["target_modules"] == ["q", "k", "v", "o"]


def test_sweeps_reject_bad_settings_before_training(smoke, forbid_training):
    exp, base = smoke

    # Ranks and alphas no other test trains, so no cached run can hide a training call.
    forbid_training("a sweep with a bad setting must fail before training anything")
    with pytest.raises(ValueError, match="only once"):
        analysis.rank_sweep(exp, base, ranks=(7, 7))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        analysis.rank_sweep(exp, base, ranks=(7, 0))
    with pytest.raises(ValueError, match="alpha must be"):
        analysis.alpha_sweep(exp, base, alphas=(5.0, -1.0))
    with pytest.raises(ValueError, match="matched no module"):
        analysis.target_sweep(exp, base, {"new": ["q"], "nothing": ["no_such_layer"]}, rank=3)


# --- outputs for the PDF ---------------------------------------------------------------------------------


def _runs() -> list[dict]:
    return [
        {
            "rank": r,
            "alpha": 16.0,
            "scaling": 16.0 / r,
            "target_ppl": 3.0 - 0.1 * n,
            "source_ppl": 2.5 + 0.01 * n,
            "trainable_params": 100 * r,
            "name": f"sweep_r{r}",
            "train_seconds": 1.0,
        }
        for n, r in enumerate((4, 1, 2))
    ]


def test_write_sweep_outputs_writes_valid_json_and_pngs(tmp_path):
    base = _tiny_gpt()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for module in tuned.modules():
            if isinstance(module, nn.Linear):
                module.weight += 0.01 * torch.randn_like(module.weight)
    reference = {"base": {"target_ppl": 4.0, "source_ppl": 2.4}, "full": {"target_ppl": 2.5, "source_ppl": 2.8}}
    written = analysis.write_sweep_outputs(
        tmp_path / "run",
        _runs(),
        full_deltas=analysis.delta_weights(base, tuned),
        lora_deltas=analysis.delta_weights(base, _trained_lora(base)),
        reference=reference,
        floors={"target": 1.5, "source": 1.6},
    )
    assert sorted(written) == ["rank_sweep.png", "spectrum.png", "sweep.json"]
    sweep = json.loads((tmp_path / "run" / "sweep.json").read_text())
    _paper_build().validate_sweep(sweep)  # the PDF builder's own check
    assert [run["rank"] for run in sweep["runs"]] == [1, 2, 4]
    assert "name" not in sweep["runs"][0]
    for name in ("rank_sweep.png", "spectrum.png"):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written[name].stat().st_size > 5000
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(written)  # no temporary files left


def test_write_sweep_outputs_refuses_bad_runs_and_leaves_the_folder_alone(tmp_path):
    (tmp_path / "sweep.json").write_text('{"runs": "old"}')
    good = _runs()[0]
    bad_runs = [[dict(good, rank=0)], [dict(good, target_ppl=math.nan)], [dict(good, source_ppl=0.5)], [good, good], []]
    for bad in bad_runs:
        with pytest.raises(ValueError):
            analysis.write_sweep_outputs(tmp_path, bad)
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.json"]
    assert (tmp_path / "sweep.json").read_text() == '{"runs": "old"}'


def test_analyse_run_writes_what_the_pdf_needs(smoke, tmp_path):
    exp, base = smoke
    full, lora = stages.full_finetuned(exp, base), stages.lora_finetuned(exp, base, TUNED_RECIPE)
    reference = {trained.name: stages.evaluate(exp, trained) for trained in (base, lora, full)}
    written = analysis.analyse_run(exp, base, full, lora, tmp_path, reference=reference, ranks=(1, 2))
    assert sorted(written) == ["rank_sweep.png", "spectrum.png", "sweep.json"]
    sweep = json.loads(written["sweep.json"].read_text())
    _paper_build().validate_sweep(sweep)
    assert [run["rank"] for run in sweep["runs"]] == [1, 2]
    assert all(run["alpha"] == exp.profile.recipe(TUNED_RECIPE).alpha for run in sweep["runs"])


def test_figures_have_fixed_layouts():
    A8, A64 = _randn(8, 64, seed=1), _randn(64, 64, seed=2)
    fig = analysis.plot_subspace_similarity({"attn.q": (A8, A64), "attn.v": (A8, A64)})
    assert len(fig.axes) == 5 and tuple(fig.get_size_inches()) == (12.0, 3.4)  # 4 heatmaps + colour bar
    plt.close(fig)
    fig = analysis.plot_rank_sweep([{k: v for k, v in run.items() if k != "source_ppl"} for run in _runs()])
    assert len(fig.axes) == 2  # target ppl and trainable parameters
    plt.close(fig)
    fig = analysis.plot_sweep_bars(_runs(), "alpha")
    assert len(fig.axes) == 2
    plt.close(fig)


def _reference_drawn(fig) -> list[tuple[str, list[tuple[str, float]]]]:
    """Per panel: its title and the (label, height) of its horizontal lines for reference models."""
    names = set(figures.LABELS.values())
    return [(ax.get_title(), [(ln.get_label(), ln.get_ydata()[0]) for ln in ax.lines if ln.get_label() in names])
            for ax in fig.axes]  # fmt: skip


def _bars_by_rank(runs, reference, floors):
    return analysis.plot_sweep_bars(runs, "rank", reference, floors)


@pytest.mark.parametrize("plot", [analysis.plot_rank_sweep, _bars_by_rank], ids=["rank_sweep", "sweep_bars"])
def test_sweep_figures_draw_model_results_as_references(plot):
    results = {"base": _result(47.238, 2.4, 10_000, None), "full": _result(2.5, 2.8, 10_000, None)}
    as_json = {name: entry.to_dict() for name, entry in results.items()}
    drawn = []
    for reference in (results, as_json):
        fig = plot(_runs(), reference, {"target": 1.5, "source": 1.6})
        drawn.append(_reference_drawn(fig))
        plt.close(fig)
    assert drawn[0] == drawn[1]
    (target_title, target_lines), (_, source_lines) = drawn[0]
    assert target_lines == [(figures.LABELS["full"], 2.5)]  # base, far above the runs, is a note instead
    assert "base\u00a047.238" in target_title
    assert sorted(source_lines) == sorted([(figures.LABELS["base"], 2.4), (figures.LABELS["full"], 2.8)])
