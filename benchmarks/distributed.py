"""Data-parallel training on CPU cores: how much do 2 gloo processes buy over 1 process?

    python benchmarks/distributed.py            # the cpu profile's model, ~3 minutes on 2 cores
    python benchmarks/distributed.py --quick    # the smoke profile, seconds; judges nothing

The contenders train the same model on the same global batches for the same steps (pretraining
the "cpu" profile's GPT on the built-in corpus's source part, batch 64×64), each in a fresh process:

* ``1 proc × 1 thread`` and ``1 proc × 2 threads``: a plain run;
* ``2 procs × 1 thread``: ``torchrun --standalone --nproc_per_node=2``, gloo, each rank on half of
  every batch (torchrun's default of one thread per process).

They run in alternating rounds (the order rotated each round) and the time compared is the training
loop's own (``TrainHistory.seconds``: no start-up, no validation). The ratios printed are medians of
the per-round ratios; "speed-up" is (1 process's time) / (2 processes' time), so above 1 is faster.
It also prints the largest per-step loss difference between 1 and 2 processes (float rounding only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing lora_lab

CONTENDERS = {"1x1": "1 proc × 1 thread", "1x2": "1 proc × 2 threads", "2x1": "2 procs × 1 thread (gloo)"}


def worker(profile: str, steps: int) -> None:
    """One contender's training (a plain process, or one rank under torchrun); rank 0 prints JSON."""
    import torch

    from lora_lab.data.batches import steps_per_epoch
    from lora_lab.experiment.stages import prepare
    from lora_lab.model import GPT
    from lora_lab.seeding import seed_everything
    from lora_lab.training import distributed, train

    with distributed.session("cpu") as world:
        exp = prepare("builtin", profile, device="cpu", progress=False)
        data, block = exp.splits.source_train, exp.profile.model.block_size
        config = exp.profile.pretrain_config()
        epochs = steps / steps_per_epoch(len(data), block, config.batch_size)
        config = dataclasses.replace(config, epochs=epochs)
        seed_everything(config.seed)
        history = train(GPT(exp.model_config()), data, None, config, block_size=block, device="cpu", progress=False)
        if world.is_main:
            print(json.dumps({"seconds": history.seconds, "steps": history.steps, "losses": history.train_loss,
                              "threads": torch.get_num_threads(), "world_size": world.world_size}))


def _launch(kind: str, profile: str, steps: int) -> dict:
    this = str(Path(__file__).resolve())
    args = [this, "--_worker", profile, str(steps)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": kind[-1]}
    if kind == "2x1":
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
        if torchrun is None:
            raise SystemExit("torchrun not found next to this Python nor on PATH; install torch's launcher")
        command = [torchrun, "--standalone", "--nproc_per_node=2", *args]
    else:
        command = [sys.executable, *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {CONTENDERS[kind]} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smoke profile, one round: seconds; judges nothing")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 120; quick 10)")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    parser.add_argument("--_worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker is not None:
        worker(args._worker[0], int(args._worker[1]))
        return 0
    profile = "smoke" if args.quick else "cpu"
    rounds, steps = args.rounds or (1 if args.quick else 3), args.steps or (10 if args.quick else 120)
    if rounds < 1 or steps < 1:
        parser.error("--rounds and --steps must be positive")
    kinds = list(CONTENDERS)
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    load_start = os.getloadavg()
    for r in range(rounds):
        for kind in kinds[r % 3:] + kinds[: r % 3]:
            runs[kind].append(_launch(kind, profile, steps))
            print(f"round {r + 1}/{rounds}: {CONTENDERS[kind]:<26} {runs[kind][-1]['seconds']:7.2f} s", file=sys.stderr)
    load_end = os.getloadavg()
    seconds = {kind: [run["seconds"] for run in runs[kind]] for kind in kinds}
    speedup = {base: statistics.median(a / b for a, b in zip(seconds[base], seconds["2x1"])) for base in ("1x1", "1x2")}
    spread = {base: (min(a / b for a, b in zip(seconds[base], seconds["2x1"])),
                     max(a / b for a, b in zip(seconds[base], seconds["2x1"]))) for base in ("1x1", "1x2")}  # fmt: skip
    gap = max(abs(a - b) for a, b in zip(runs["1x1"][0]["losses"], runs["2x1"][0]["losses"]))
    cores = os.cpu_count()
    print(f"data-parallel training on CPU: {profile} profile's model, {steps} steps of its pretraining batch, "
          f"{rounds} alternating rounds; {cores} logical cores; load average {load_start[0]:.2f} at the start, "
          f"{load_end[0]:.2f} at the end" + ("  (--quick: nothing judged)" if args.quick else ""))
    for kind in kinds:
        print(f"  {CONTENDERS[kind]:<26} median {statistics.median(seconds[kind]):7.2f} s  "
              f"({statistics.median(seconds[kind]) / steps * 1000:.0f} ms/step)")
    for base in ("1x1", "1x2"):
        low, high = spread[base]
        print(f"speed-up of 2 procs × 1 thread over {CONTENDERS[base]}: {speedup[base]:.2f}× "
              f"(rounds from {low:.2f}× to {high:.2f}×)")
    print(f"largest per-step loss difference, 1 process vs 2: {gap:.2e}")
    if args.json:
        args.json.write_text(json.dumps({"profile": profile, "steps": steps, "rounds": rounds, "seconds": seconds,
                                         "speedup": speedup, "max_loss_difference": gap,
                                         "load_average": [load_start, load_end]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
