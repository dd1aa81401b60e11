"""lora_lab on a Hugging Face transformers model: a training step of lora_lab's LoRA, PEFT's LoRA and full
fine-tuning, side by side.

    python benchmarks/bench_transformers.py             # the full run (about a minute at one thread)
    python benchmarks/bench_transformers.py --quick     # a seconds-long smoke run (tests); judges nothing
    python benchmarks/bench_transformers.py --threads 2 --json out.json

The model is a ``LlamaForCausalLM`` built from a config (random weights, nothing downloaded): hidden size 256,
4 layers, MLP 688 wide, vocabulary 1,000, batch 8×128. Both LoRA contenders adapt the same seven projections
per layer (``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``, PEFT's ``"all-linear"``) with r=8,
α=16; every contender takes the same AdamW steps on the same batch. Timing follows ``bench.py``: alternating
rounds after warm-up, the order rotated each round, one ratio per round; the table shows the median ratio
and the middle half of the per-round ratios. No goals: these ratios are reported, not judged.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing lora_lab
sys.path.insert(0, str(HERE))

from bench import machine_description, median_ratio, race, ratio_spread  # noqa: E402

from lora_lab import apply_lora_to_model  # noqa: E402
from lora_lab.seeding import seed_everything  # noqa: E402

RANK, ALPHA, LR = 8, 16, 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RATIOS = (("lora_lab", "full"), ("peft", "full"), ("lora_lab", "peft"))


def llama(quick: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1) if quick else dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4)  # fmt: skip
    config = LlamaConfig(vocab_size=1000, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         **sizes)  # fmt: skip
    seed_everything(0, deterministic=False)
    model = LlamaForCausalLM(config)
    batch = torch.randint(0, 1000, (2, 16) if quick else (8, 128), generator=torch.Generator().manual_seed(1))
    return model, batch


def training_step(model: torch.nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()

    return step


def contenders(base: torch.nn.Module, tokens: torch.Tensor) -> dict[str, Callable[[], None]]:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    return {
        "full": training_step(copy.deepcopy(base), tokens),
        "lora_lab": training_step(apply_lora_to_model(base, r=RANK, lora_alpha=ALPHA, target_modules=TARGETS), tokens),
        "peft": training_step(peft_model, tokens),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run on a tiny model; judges nothing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9; quick 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads < 1 or (args.rounds is not None and args.rounds < 1):
        parser.error("--threads and --rounds must be positive integers")
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 9)
    base, tokens = llama(args.quick)
    result = race(contenders(base, tokens), rounds, warmup=1 if args.quick else 2, round_seconds=0 if args.quick
                  else 0.5)  # fmt: skip
    machine = machine_description(torch.get_num_threads())
    title = "lora_lab vs PEFT vs full fine-tuning on LlamaForCausalLM"
    print(title + ("  (--quick: tiny sizes)" if args.quick else ""))
    print(f"  CPU: {machine['cpu']}, {machine['logical_cores']} logical cores; torch {machine['torch']}, "
          f"{machine['torch_threads']} threads; load average at start {machine['load_average_at_start']}")
    print(f"  model: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters, batch "
          f"{tuple(tokens.shape)}, r={RANK}, alpha={ALPHA}, {len(TARGETS)} projections per layer; "
          f"{rounds} rounds of {result.calls_per_round} steps each\n")
    rows = []
    for numerator, denominator in RATIOS:
        ratio = median_ratio(result.seconds, numerator, denominator)
        low, high = ratio_spread(result.seconds, numerator, denominator)
        rows.append({"id": f"{numerator}_vs_{denominator}", "ratio": ratio, "spread": [low, high]})
        print(f"  {numerator + ' step / ' + denominator + ' step':<28} {ratio:6.3f}   ({low:.2f}–{high:.2f})")
    if args.json is not None:
        payload = {"quick": args.quick, "machine": machine, "rounds": rounds, "rows": rows,
                   "seconds_per_step": result.seconds}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
