"""Command line: ``lora-lab run`` (also ``python -m lora_lab run``), ``lora-lab variants``, ``lora-lab rslora``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .data import NAMED_CORPORA
from .experiment.config import PROFILES, parse_overrides

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-lab", description="LoRA, built and measured.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="pretrain a small GPT, fine-tune it with LoRA and fully, compare",
        description="Pretrain the base on the first 80% of the corpus, then from that base train LoRA "
        "(the course's recipe and a tuned one) and full fine-tuning on the last 20%, and compare them. "
        "Writes results.json, report.md and PNG figures into --out. Data-parallel on N processes: "
        "torchrun --nproc_per_node=N -m lora_lab run ...",
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
        help="smoke: seconds; cpu: a few minutes on 2 cores (default); course: the course's ≈8.2M model",
    )
    run.add_argument("--out", default=None, help="output folder (default: runs/<corpus>-<profile>; "
                     "for a text file runs/file-<name>-<profile>)")
    run.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    run.add_argument("--cache", default=None, help="artifact cache folder (default: artifacts/ in $LORA_LAB_CACHE, "
                     "else in $XDG_CACHE_HOME/lora_lab, else in ~/.cache/lora_lab)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a profile field by its dotted name, e.g. --set pretrain.epochs=2, "
        "--set recipes.lora.rank=8 or --set compute.precision=bf16 (repeatable)",
    )
    run.add_argument("--seeds", type=int, default=1, metavar="N",
                     help="train the comparison with N seeds (from the profile's seed on; the corpus is drawn once) "
                     "and report each number as mean ± spread (default: 1)")
    run.add_argument("--select-lr", action="store_true",
                     help="pick each method's learning rate by a sweep on the target validation split (writes "
                     "lr_selection.json); with --set finetune.keep_best=true, the fair setting for real text")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--sweep", action="store_true",
                     help="also run the rank sweep and write sweep.json, rank_sweep.png, spectrum.png")
    variants = commands.add_parser(
        "variants",
        help="compare LoRA's variants (rsLoRA, DoRA, PiSSA, LoRA+, a 4-bit base) with LoRA and full fine-tuning",
        description="From the main job's pretrained base (built-in corpus), fine-tune every variant with the "
        "same step budget over several seeds, each at the learning rate its sweep picks, and write the "
        "table (perplexities, distance to the entropy floor, forgetting, validity, sizes, step times) as JSON.",
    )
    _job_options(variants, "runs/variants.json", "seeds per variant (default: 3)")
    variants.add_argument("--epochs", type=float, default=None, help="fine-tuning epochs (default: the profile's)")
    variants.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    rslora = commands.add_parser(
        "rslora",
        help="rsLoRA against LoRA at several ranks, fully trained, over several seeds",
        description="From each seed's pretrained base (built-in corpus), fine-tune the tuned recipe at each rank "
        "with LoRA's scaling α/r and with rsLoRA's α'/√r (α' chosen so that both take the same step at the tuned "
        "rank), for the profile's budget, and write the table as JSON.",
    )
    _job_options(rslora, "runs/rslora.json", "seeds (default: 3)")
    rslora.add_argument("--ranks", default="4,16,64",
                        help="comma-separated ranks, the tuned one among them (default: 4,16,64)")
    rslora.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a profile field, as for run (repeatable)")
    return parser


def _job_options(parser: argparse.ArgumentParser, out: str, seeds_help: str) -> None:
    """The options of the measuring jobs that write one JSON table (variants, rslora)."""
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES), help="the profile (default: cpu)")
    parser.add_argument("--seeds", type=int, default=3, help=seeds_help)
    parser.add_argument("--out", default=out, help=f"the JSON file (default: {out})")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--cache", default=None, help="artifact cache folder (as for run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _job(work: Callable[[], str], out: str) -> int:
    """Run a measuring job that writes ``out`` and returns its table as text. Its errors (bad arguments
    first, refused before anything trains) end it with one clear line and exit status 2."""
    try:
        table = work()
    except (ValueError, OSError, FloatingPointError, RuntimeError) as error:
        print(f"lora-lab: error: {error}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nWrote {out}")
    return 0


def _rslora(args: argparse.Namespace) -> int:
    from .experiment.rslora_study import format_rslora_study, run_rslora_study, write_rslora_study
    from .experiment.stages import prepare

    def work() -> str:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
        try:
            ranks = [int(r) for r in args.ranks.split(",")]
        except ValueError:
            raise ValueError(f"--ranks takes comma-separated whole numbers (e.g. 4,16,64), got {args.ranks!r}"
                             ) from None  # fmt: skip
        if any(r < 1 for r in ranks):
            raise ValueError(f"every rank must be at least 1, got {ranks}")
        exp = prepare("builtin", args.profile, overrides=parse_overrides(args.overrides), device=args.device,
                      cache=args.cache, progress=not args.no_progress)  # fmt: skip
        study = run_rslora_study(exp, seeds=args.seeds, ranks=ranks)
        write_rslora_study(study, args.out)
        return format_rslora_study(study)

    return _job(work, args.out)


def _variants(args: argparse.Namespace) -> int:
    from .experiment.stages import prepare, pretrained_base
    from .experiment.variants import VARIANTS, run_variants, write_variants
    from .experiment.variants_report import format_variants

    def work() -> str:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
        names = [name.strip() for name in args.only.split(",")] if args.only else None
        unknown = sorted(set(names or []) - {v.name for v in VARIANTS})
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {', '.join(v.name for v in VARIANTS)}")
        exp = prepare("builtin", args.profile, device=args.device, cache=args.cache, progress=not args.no_progress)
        results = run_variants(exp, pretrained_base(exp), names=names, seeds=args.seeds, epochs=args.epochs)
        write_variants(results, args.out)
        return format_variants(results)

    return _job(work, args.out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "variants":
        return _variants(args)
    if args.command == "rslora":
        return _rslora(args)
    import matplotlib

    # Files only, no display: the backend must be chosen before the job's modules import pyplot.
    matplotlib.use("Agg")

    from .experiment.report import OUTPUT_FILES, format_table, seeds_line
    from .experiment.run import run
    from .training import distributed

    try:
        overrides = parse_overrides(args.overrides)
        out = args.out or f"runs/{_run_name(args.corpus)}-{args.profile}"
        with distributed.session(args.device) as world:  # under torchrun: join the other processes
            results = run(
                args.corpus,
                args.profile,
                out,
                overrides=overrides,
                device=args.device,
                cache=args.cache,
                progress=not args.no_progress,
                sweep=args.sweep,
                seeds=args.seeds,
                select_lr=args.select_lr,
            )
    except (ValueError, OSError, FloatingPointError, RuntimeError) as error:  # OSError: missing, unreadable, full
        print(f"lora-lab: error: {error}", file=sys.stderr)
        return 2
    if not world.is_main:  # rank 0 prints for the run
        return 0
    print(format_table(results))
    print()
    print(seeds_line(results))
    print()
    for name, ok in results.claims.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name.replace('_', ' ')}")
    print(f"\nWrote {out}/{', '.join(OUTPUT_FILES)}")
    return 0


def _run_name(corpus: str) -> str:
    """The default output folder's corpus part: a text file's gets a ``file-`` prefix, so that
    ``notes/builtin.txt`` can never write into the built-in corpus's folder."""
    if corpus == "builtin" or corpus in NAMED_CORPORA:
        return corpus
    return f"file-{Path(corpus).stem}"


if __name__ == "__main__":
    sys.exit(main())
