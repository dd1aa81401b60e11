"""Command line: ``lora-lab run`` (also ``python -m lora_lab run``)."""

from __future__ import annotations

import argparse
import sys

from .profiles import PROFILES, parse_overrides

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-lab", description="LoRA, built and measured.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="pretrain a small GPT, fine-tune it with LoRA and fully, compare",
        description="Pretrain the base on the first 80%% of the corpus, then from that base train LoRA "
        "(the seed's recipe and a tuned one) and full fine-tuning on the last 20%%, and compare them. "
        "Writes results.json, report.md and PNG figures into --out.",
    )
    run.add_argument(
        "--corpus",
        default="builtin",
        help="'builtin' (generated, with an exact entropy floor; default), 'tinyshakespeare' "
        "(downloaded once, checksum-verified), or the path of a UTF-8 text file",
    )
    run.add_argument(
        "--profile",
        default="cpu",
        choices=sorted(PROFILES),
        help="smoke: seconds; cpu: a few minutes on 2 cores (default); seed: the course's ≈8.2M model",
    )
    run.add_argument("--out", default=None, help="output folder (default: runs/<corpus>-<profile>)")
    run.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    run.add_argument("--cache", default=None, help="artifact cache folder (default: artifacts/ in $LORA_LAB_CACHE, "
                     "else in $XDG_CACHE_HOME/lora_lab, else in ~/.cache/lora_lab)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a profile field, e.g. --set pretrain_epochs=2 (repeatable)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--sweep", action="store_true",
                     help="also run the rank sweep and write sweep.json, rank_sweep.png, spectrum.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    from pathlib import Path

    from .main_job import format_table, run

    try:
        overrides = parse_overrides(args.overrides)
        corpus_name = Path(args.corpus).stem if args.corpus not in ("builtin",) else "builtin"
        out = args.out or f"runs/{corpus_name}-{args.profile}"
        results = run(
            args.corpus,
            args.profile,
            out,
            device=args.device,
            cache=args.cache,
            progress=not args.no_progress,
            sweep=args.sweep,
            **overrides,
        )
    except (ValueError, OSError, FloatingPointError, RuntimeError) as error:  # OSError: missing, unreadable, full
        print(f"lora-lab: error: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    print()
    for name, ok in results["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name.replace('_', ' ')}")
    print(f"\nWrote {out}/results.json, report.md, loss_curves.png, perplexities.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
