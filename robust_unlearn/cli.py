"""``robust-unlearn``: run | evaluate | report. User mistakes print one line and exit with code 2."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import warnings

from .errors import UserError

EPILOG = "Recipe values can be overridden as dotted key=value pairs, e.g. data.name=tofu data.path=DIR finetune.lr=1e-5"


class _OneLine(logging.Formatter):
    def format(self, record):
        return f"robust-unlearn: {record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    root = logging.getLogger("robust_unlearn")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    root.propagate = False
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _split_recipe_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    recipe = None
    overrides = []
    for it in items:
        if "=" in it:
            overrides.append(it)
        elif recipe is None:
            recipe = it
        else:
            raise UserError(f"unexpected argument '{it}' (expected one recipe file and key=value overrides)")
    return recipe, overrides


def cmd_run(args) -> int:
    from .config import load_recipe
    from .pipeline import run

    recipe, overrides = _split_recipe_and_overrides(args.items)
    cfg = load_recipe(recipe, overrides)
    run_dir = run(cfg, args.out, command="robust-unlearn " + shlex.join(sys.argv[1:]))
    print((run_dir / "report.md").read_text())
    print(f"results: {run_dir / 'results.jsonl'}\nreport:  {run_dir / 'report.md'}")
    return 0


def cmd_evaluate(args) -> int:
    from .config import load_recipe
    from .pipeline import evaluate

    cfg_over = list(args.overrides)
    if args.benchmark:
        cfg_over.append(f"data.name={args.benchmark}")
    if args.data_path:
        cfg_over.append(f"data.path={args.data_path}")
    if args.forget_split:
        cfg_over.append(f"data.forget_split={args.forget_split}")
    cfg = load_recipe(args.recipe, cfg_over)
    out = args.out or os.path.join("runs", "evaluate")
    metrics = evaluate(cfg, args.model_dir, out, label=args.label, oracle=args.oracle)
    for k, v in metrics.items():
        print(f"{k}\t{v:.4f}")
    print(f"results: {os.path.join(out, 'results.jsonl')}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    if not os.path.isfile(os.path.join(args.run_dir, "results.jsonl")):
        raise UserError(f"run directory '{args.run_dir}' has no results.jsonl (expected the --out of a run)")
    path = write_report(args.run_dir)
    print(path.read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robust-unlearn", description="LLM unlearning that survives compression.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe (default: recipes/default.yaml)", epilog=EPILOG,
                       description="Benchmark -> target + retain oracle -> metrics -> report, in one run directory.")
    r.add_argument("items", nargs="*", metavar="RECIPE_OR_KEY=VALUE",
                   help="a recipe YAML file (optional) followed by dotted key=value overrides")
    r.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint with the TOFU metrics", epilog=EPILOG,
                       description="Evaluate any Hugging Face checkpoint on a benchmark; rows go to OUT/results.jsonl.")
    e.add_argument("model_dir", help="checkpoint directory (or hub id)")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    e.add_argument("--benchmark", choices=["fictitious", "tofu"], help="benchmark (default: the recipe's)")
    e.add_argument("--data-path", help="TOFU directory or hub id (with --benchmark tofu)")
    e.add_argument("--forget-split", help="forget split, e.g. forget10")
    e.add_argument("--recipe", help="recipe YAML whose data/model/eval settings to use (default: recipes/default.yaml)")
    e.add_argument("--oracle", help="retain-oracle checkpoint, for forget_quality")
    e.add_argument("--label", help="model name in the ledger (default: the directory name)")
    e.add_argument("--out", help="run directory (default: runs/evaluate)")
    e.set_defaults(func=cmd_evaluate)

    rp = sub.add_parser("report", help="write report.md from a run directory's ledger",
                        description="Rebuild report.md from RUN_DIR/results.jsonl.")
    rp.add_argument("run_dir")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"robust-unlearn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robust-unlearn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
