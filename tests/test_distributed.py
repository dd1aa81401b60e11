"""Data-parallel runs (torchrun, gloo on CPU) and the GPU-path options of the training step.

Two gloo processes must train what one process trains: the same global batches, so the same loss
at every step up to the order of floating-point sums. Measured on the project's 2-core machine, the
smoke profile's per-step losses differed by at most 2.4e-7 (one float32 ulp at a loss of ~3) and
its perplexities by under 1e-7 relative; the tests allow LOSS_TOLERANCE, 40 times that.

This file is also the worker of the uneven-batch and dropout test: ``torchrun ... tests/test_distributed.py OUT``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_bench import _load_bench_module  # tests/ is on the path: pytest's and a script's

from lora_lab import cli
from lora_lab.experiment import stages
from lora_lab.experiment.report import OUTPUT_FILES
from lora_lab.experiment.results import ResultsError, RunResults
from lora_lab.experiment.run import run
from lora_lab.model import GPT, GPTConfig
from lora_lab.training import ComputeSettings, TrainConfig, distributed, train
from lora_lab.training.compute import make_adamw, to_device

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
LOSS_TOLERANCE = 1e-5  # absolute, per step (nats); perplexities: relative
needs_torchrun = pytest.mark.skipif(
    TORCHRUN is None or not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torchrun and torch.distributed's gloo backend",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs a CUDA GPU (none here)")

# The worker's two trainings: rows that leave the last batch one row (so one rank gets no row), and dropout.
WORKER_DATA = dict(vocab=11, tokens=16 * 9 + 1, block=16, batch=4, epochs=1.0)


def _torchrun(args: list[str], tmp_path: Path, timeout: float = 180) -> subprocess.Popen:
    scratch = tmp_path / "scratch"  # the processes' temporary folders: rank 1 must leave nothing there
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", *args]
    return subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-4000:]
    return stdout


@needs_torchrun
def test_two_gloo_processes_train_what_one_process_trains(tmp_path: Path) -> None:
    out2, cache2 = tmp_path / "two" / "out", tmp_path / "two" / "cache"
    two = _torchrun(["-m", "lora_lab", "run", "--profile", "smoke", "--out", str(out2), "--cache", str(cache2),
                     "--device", "cpu", "--no-progress", "--seeds", "2"], tmp_path)  # fmt: skip
    try:  # the single-process reference trains meanwhile, in this process
        one = run("builtin", "smoke", tmp_path / "one" / "out", cache=tmp_path / "one" / "cache", device="cpu",
                  progress=False, seeds=2)
    finally:
        stdout = _finish(two)
    assert stdout.count("| base |") == 1  # rank 0 alone printed the table
    assert sorted(p.name for p in out2.iterdir()) == sorted(OUTPUT_FILES)  # one results.json, nothing else
    both = RunResults.from_json((out2 / "results.json").read_text(encoding="utf-8"))
    assert (one.world_size, both.world_size) == (1, 2)
    # The cache: one folder per stage, no leftover work folder; rank 1's scratch folders are gone.
    stages_two = sorted(p.name.split("-")[0] for p in cache2.iterdir())  # two seeds: each stage twice
    assert stages_two == ["base"] * 2 + ["full"] * 2 + ["lora"] * 4, sorted(p.name for p in cache2.iterdir())
    leftovers = [p.name for p in (tmp_path / "scratch").iterdir() if p.name.startswith((".base-", ".lora-", ".full-"))]
    assert leftovers == []
    # Two processes get their own cache keys (their last bits differ), so nothing was shared by mistake.
    assert {p.name for p in cache2.iterdir()}.isdisjoint(p.name for p in (tmp_path / "one" / "cache").iterdir())
    for name, model in one.models.items():
        losses_one, losses_two = one.histories[name].train_loss, both.histories[name].train_loss
        assert len(losses_one) == len(losses_two)
        assert max(abs(a - b) for a, b in zip(losses_one, losses_two)) <= LOSS_TOLERANCE, name
        for key in ("target_ppl", "source_ppl"):
            assert math.isclose(getattr(model, key), getattr(both.models[name], key), rel_tol=LOSS_TOLERANCE), name
        assert model.trainable_params == both.models[name].trainable_params
    # Both seeds measured by rank 0: the same spread as one process trains.
    assert both.seeds == one.seeds == [0, 1]
    for name, metrics in one.across_seeds.items():
        for metric in ("target_ppl", "source_ppl"):
            pairs = zip(metrics[metric].values, both.across_seeds[name][metric].values)
            assert all(math.isclose(a, b, rel_tol=LOSS_TOLERANCE) for a, b in pairs), (name, metric)


def _worker_train(dropout: float) -> tuple[GPT, list[float], list[torch.Tensor]]:
    """Train the worker's tiny GPT; returns the model, its losses and the first dropout masks it drew."""
    d = WORKER_DATA
    torch.manual_seed(0)
    data = torch.randint(0, d["vocab"], (d["tokens"],))
    model = GPT(GPTConfig(d["vocab"], d["block"], 1, 2, 16, dropout=dropout))
    masks: list[torch.Tensor] = []

    def keep_first_mask(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if module.training and not masks:
            masks.append(output == 0)

    model.drop.register_forward_hook(keep_first_mask)
    config = TrainConfig(d["epochs"], 3e-3, d["batch"], eval_points=1)
    history = train(model, data, None, config, block_size=d["block"], progress=False)
    return model, history.train_loss, masks


def _worker(out: Path) -> None:
    """Run by each rank under torchrun: both trainings, written to ``out/rank{r}.json``."""
    torch.set_num_threads(1)
    with distributed.session("cpu") as world:
        model, losses, _ = _worker_train(0.0)
        dropped, _, masks = _worker_train(0.2)
        result = {
            "world_size": world.world_size,
            "losses": losses,
            "params": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
            "dropout_params": torch.cat([p.detach().flatten() for p in dropped.parameters()]).tolist(),
            "first_mask": masks[0].flatten().tolist(),
        }
        (out / f"rank{world.rank}.json").write_text(json.dumps(result))


@needs_torchrun
def test_uneven_shards_and_dropout_across_ranks(tmp_path: Path) -> None:
    """Batches of 4 rows over 9 windows: the last batch has 1 row, so one rank gets none. The losses
    and the final weights must still be one process's. With dropout, the two ranks must draw different
    masks (one seed on both would mask their rows alike) and still end with identical weights."""
    process = _torchrun([str(Path(__file__).resolve()), str(tmp_path)], tmp_path)
    try:
        model, losses, _ = _worker_train(0.0)  # the single-process reference, meanwhile
    finally:
        _finish(process)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(losses) == 3 and all(len(r["losses"]) == 3 for r in ranks)  # ceil(9 / 4) steps, the last of 1 row
    for rank in ranks:
        assert max(abs(a - b) for a, b in zip(losses, rank["losses"])) <= LOSS_TOLERANCE
        reference = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert torch.allclose(torch.tensor(rank["params"]), reference, atol=LOSS_TOLERANCE, rtol=0)
    assert ranks[0]["dropout_params"] == ranks[1]["dropout_params"]  # DDP kept the replicas equal, bit for bit
    assert ranks[0]["first_mask"] != ranks[1]["first_mask"]  # each rank its own dropout stream


def test_shard_weights_recover_the_global_mean() -> None:
    """The shares' weights make DDP's average of the ranks' mean losses the global batch's mean."""
    x = torch.arange(5 * 3).reshape(5, 3)
    for world_size in (2, 3, 6):
        shares = [distributed.Distributed(r, world_size, r, True).shard(x, x) for r in range(world_size)]
        real = [(xs, w) for xs, _, w in shares if w > 0]
        assert torch.equal(torch.cat([xs for xs, _ in real]), x)  # contiguous, in order, every row once
        per_row = x.float().mean(dim=1)
        rank_means = [per_row[xs[:, 0] // 3].mean() for xs, _ in real]
        averaged = sum(m * w for m, (_, w) in zip(rank_means, real)) / world_size
        assert math.isclose(averaged.item(), per_row.mean().item(), rel_tol=1e-6), world_size
    assert distributed.Distributed().shard(x, x)[2] == 1.0 and not distributed.current().active


def test_compute_options_are_validated_with_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="compute.precision must be one of auto, fp32, bf16, got 'fp16'.*scaler"):
        ComputeSettings("fp16")
    with pytest.raises(TypeError, match="compute.compile must be True or False, got 'yes'"):
        ComputeSettings(compile="yes")
    with pytest.raises(ValueError, match="bf16 runs on cuda or cpu, not on meta"):
        ComputeSettings("bf16").resolve("meta")
    assert ComputeSettings().resolve("cpu").key() == {}  # the CPU default: plain fp32, cache keys unchanged
    code = cli.main(["run", "--profile", "smoke", "--set", "compute.precision=half", "--no-progress"])
    assert code == 2 and "compute.precision must be one of auto, fp32, bf16, got 'half'" in capsys.readouterr().err
    code = cli.main(["run", "--profile", "smoke", "--set", "compute.compile=maybe", "--no-progress"])
    assert code == 2 and "--set compute.compile: 'maybe' is not true or false" in capsys.readouterr().err


def test_options_that_change_the_weights_change_the_cache_key(tmp_path: Path, monkeypatch) -> None:
    def key(**overrides: str) -> str:
        return stages._base_key(stages.prepare("builtin", "smoke", overrides=overrides, device="cpu", cache=tmp_path,
                                               progress=False))  # fmt: skip

    exp = stages.prepare("builtin", "smoke", device="cpu", cache=tmp_path, progress=False)
    default = stages._base_key(exp)
    bf16, fp32 = key(**{"compute.precision": "bf16"}), key(**{"compute.precision": "fp32"})
    assert bf16 != default == fp32  # "auto" is fp32 on a CPU: the same artifact
    assert key(**{"compute.compile": "true"}) != default
    monkeypatch.setattr(distributed, "current", lambda: distributed.Distributed(0, 2, 0, False))
    assert stages._base_key(exp) != default


@pytest.mark.parametrize("option", ["--sweep", "--select-lr"])
def test_one_process_options_are_refused_under_torchrun_before_training(
    option: str, tmp_path: Path, monkeypatch, forbid_training
) -> None:
    forbid_training(f"{option} under several processes must fail before training")
    monkeypatch.setattr(distributed, "current", lambda: distributed.Distributed(0, 2, 0, False))
    flag = {"sweep": option == "--sweep", "select_lr": option == "--select-lr"}
    with pytest.raises(ValueError, match=f"{option} runs in one process; run it without torchrun"):
        run("builtin", "smoke", tmp_path / "out", cache=tmp_path / "cache", device="cpu", progress=False, **flag)


def test_keep_best_is_refused_under_torchrun_and_the_model_is_untouched(monkeypatch) -> None:
    monkeypatch.setattr(distributed, "current", lambda: distributed.Distributed(0, 2, 0, True))
    torch.manual_seed(0)
    model = GPT(GPTConfig(11, 16, 1, 2, 16))
    before = [p.detach().clone() for p in model.parameters()]
    data = torch.randint(0, 11, (200,))
    with pytest.raises(ValueError, match="keep_best needs the validation loss on every process"):
        train(model, data, data, TrainConfig(1.0, 1e-3, 4), block_size=16, progress=False, keep_best=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_world_size_in_results_json(tmp_path: Path) -> None:
    committed = json.loads((ROOT / "paper" / "data" / "results.json").read_text(encoding="utf-8"))
    assert committed["world_size"] == 1  # the committed run is one process
    older = {key: value for key, value in committed.items() if key != "world_size"}
    assert RunResults.from_json(older).world_size == 1  # files written before world_size existed load as 1
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ResultsError, match="'world_size' must be a positive integer"):
            RunResults.from_json({**committed, "world_size": bad})
    assert json.loads(RunResults.from_json({**committed, "world_size": 3}).to_json())["world_size"] == 3


def _tiny_training(compute: ComputeSettings, device: str = "cpu") -> tuple[GPT, list[float]]:
    torch.manual_seed(0)
    data = torch.randint(0, 11, (16 * 8 + 1,))
    model = GPT(GPTConfig(11, 16, 1, 2, 16))
    history = train(model, data, None, TrainConfig(1.0, 3e-3, 4, eval_points=1), block_size=16, device=device,
                    progress=False, compute=compute)  # fmt: skip
    return model, history.train_loss


def test_bf16_autocast_trains_on_cpu() -> None:
    """bf16 autocast runs the step's matrix products in bf16 (on a CPU too, which is how this path is
    tested without a GPU): the losses are close to fp32's but not equal, the weights stay fp32."""
    fp32_model, fp32 = _tiny_training(ComputeSettings("fp32"))
    bf16_model, bf16 = _tiny_training(ComputeSettings("bf16"))
    assert fp32 != bf16 and max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())
    assert not torch.equal(fp32_model.lm_head.weight, bf16_model.lm_head.weight)


def test_compiled_step_trains_the_model_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """compute.compile=true trains through ``torch.compile(model)``, whose parameters are the model's. The
    test compiles with dynamo's ``eager`` backend (the graph capture without inductor's code generation,
    which took minutes per model on the project's CPU), so the steps must match the uncompiled ones exactly."""
    real_compile, calls = torch.compile, []

    def compile_eagerly(model: torch.nn.Module) -> torch.nn.Module:
        calls.append(model)
        return real_compile(model, backend="eager")

    plain_model, plain = _tiny_training(ComputeSettings(compile=False))
    monkeypatch.setattr(torch, "compile", compile_eagerly)
    compiled_model, compiled = _tiny_training(ComputeSettings(compile=True))
    assert len(calls) == 1 and isinstance(calls[0], GPT)
    assert compiled == plain
    assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), compiled_model.parameters()))
    assert not isinstance(compiled_model, torch._dynamo.eval_frame.OptimizedModule)  # the model given, trained


def test_gpu_benchmark_runs_its_code_on_a_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/gpu.py's races (bf16 autocast and fp32, every variant) and its generation row, on tiny
    models on the CPU; the memory and compile rows need CUDA and say so. Without CUDA and without
    --device cpu it skips with a message."""
    gpu = _load_bench_module("gpu")
    if not torch.cuda.is_available():
        assert gpu.main(["--json", str(tmp_path / "none.json")]) == 0
        assert "skipped, PyTorch sees no CUDA GPU here" in capsys.readouterr().out
        assert not (tmp_path / "none.json").exists()
    assert gpu.main(["--quick", "--device", "cpu", "--rounds", "1", "--json", str(tmp_path / "gpu.json")]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8"))
    rows = {row["id"]: row for row in result["rows"]}
    peft = ("lora_lab_vs_peft", "peft_vs_full") if gpu.HAVE_PEFT else ()
    expected = {f"gpu.{m}.{p}.{r}" for m in ("course", "100m") for p in ("bf16", "fp32")
                for r in ("lora_lab_vs_full", "frozen_vs_full", *peft)}  # fmt: skip
    expected |= {f"gpu.{m}.bf16_vs_fp32.{v}" for m in ("course", "100m") for v in ("full", "lora_lab")}
    assert rows.keys() == expected | {"gpu.course.generate.no_cache_vs_cache"}
    assert all(math.isfinite(row["ratio"]) and row["ratio"] > 0 and row["passed"] is None for row in rows.values())
    assert rows["gpu.course.generate.no_cache_vs_cache"]["details"]["same_tokens_with_and_without_cache"] is True
    err = capsys.readouterr().err
    assert "memory rows of course: skipped, they read CUDA's allocator" in err and "torch.compile rows: skipped" in err


@needs_cuda
def test_cuda_step_uses_fused_adamw_pinned_batches_and_bf16() -> None:
    device = torch.device("cuda")
    optimizer = make_adamw([{"params": [torch.nn.Parameter(torch.zeros(2, device=device))]}], 1e-3, device)
    assert optimizer.defaults["fused"] is True
    assert to_device(torch.zeros(3), device).device.type == "cuda"
    assert ComputeSettings().resolve(device).precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    model, losses = _tiny_training(ComputeSettings(), "cuda")
    assert all(math.isfinite(v) for v in losses) and next(model.parameters()).device.type == "cuda"


if __name__ == "__main__":  # a rank of test_uneven_shards_and_dropout_across_ranks
    _worker(Path(sys.argv[1]))
