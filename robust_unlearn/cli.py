"""``robust-unlearn``: run | check | plan | evaluate | unlearn | sweep | audit | report. User mistakes print one line and
exit with code 2 (``check`` lists every problem of a recipe and exits 1)."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import warnings

from .errors import UserError

EPILOG = "Recipe values can be overridden as dotted key=value pairs, e.g. data.name=tofu data.path=DIR finetune.lr=1e-5"


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as one line (the rule for every bad input), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _check_out_dir(path, what: str = "--out", subdirs: tuple[str, ...] = (),
                   expected: str = "a new or existing run directory") -> None:
    """An output directory (and the ``subdirs`` it will hold) can be created or is one, before any work."""
    from pathlib import Path

    if path is None or not str(path).strip():
        raise UserError(f"{what} is empty (expected a directory path)")
    for q in [Path(path)] + [Path(path) / d for d in subdirs]:
        if q.exists() and not q.is_dir():
            raise UserError(f"{what} '{path}'{f': {q}' if q != Path(path) else ''} is a file, not a directory "
                            f"(expected {expected})")
        if q.is_symlink() and not q.exists():
            raise UserError(f"{what} '{path}': '{q}' is a broken link (expected {expected})")
    parent = Path(path)
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{what} '{path}': '{parent}' is a file, not a directory (expected a directory path)")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} '{path}': '{parent}' is not writable (expected a directory you can write to)")


def _names(value: str, flag: str, example: str) -> list[str]:
    """A comma-separated option: the names, stripped; empty items dropped; none at all is an error."""
    names = [x.strip() for x in value.split(",") if x.strip()]
    if not names:
        raise UserError(f"{flag} is empty (expected comma-separated names such as {example})")
    return names


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
    from .quant.bnb import quiet_bnb

    quiet_bnb()  # before transformers / peft import bitsandbytes


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


def _one_process(command: str) -> None:
    """``run`` / ``study`` fine-tune, unlearn and evaluate in one process: under a launch each process
    would do all of it."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n > 1:
        raise UserError(f"'{command}' runs as one process, not under a {n}-process launch: launch "
                        "'robust-unlearn unlearn' with accelerate, then 'robust-unlearn sweep' or 'evaluate' the "
                        "checkpoints (as one process or under accelerate launch, sharded)")


def cmd_run(args) -> int:
    from .config import load_recipe
    from .pipeline import run

    _one_process("run")
    recipe, overrides = _split_recipe_and_overrides(args.items)
    cfg = load_recipe(recipe, overrides)
    _check_out_dir(args.out if args.out is not None else os.path.join("runs", cfg["name"]), subdirs=("checkpoints",))
    run_dir = run(cfg, args.out, command="robust-unlearn " + shlex.join(sys.argv[1:]))
    _print_verdict(run_dir)
    return 0


def cmd_study(args) -> int:
    from .config import load_recipe
    from .pipeline import study, study_cells

    _one_process("study")
    recipe, overrides = _split_recipe_and_overrides(args.items)
    cfg = load_recipe(recipe, overrides)
    seeds = [_int(x, "--seeds") for x in _names(args.seeds, "--seeds", "0,1,2")]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds '{args.seeds}' names a seed twice (expected distinct whole numbers, e.g. 0,1,2)")
    splits = _names(args.forget_splits, "--forget-splits", "forget10,forget30") if args.forget_splits else \
        [cfg["data"]["forget_split"]]
    from .data.benchmarks import benchmark_of

    for split, seed, sub in study_cells(cfg, seeds[:1], splits):  # each cell's data is valid, before any work
        bench = benchmark_of(sub)
        if bench.check is not None:
            problems, _ = bench.check(dict(sub["data"], seed=seed), sub)
            if problems:
                raise UserError(f"--forget-splits {split}: {problems[0]}")
    out = args.out if args.out is not None else os.path.join("runs", f"{cfg['name']}-study")
    _check_out_dir(out, "--out", expected="a new or existing study directory")
    study_dir = study(cfg, seeds, splits, out, command="robust-unlearn " + shlex.join(sys.argv[1:]))
    print((study_dir / "report.md").read_text())
    return 0


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{what}: '{text}' is not a whole number (expected e.g. 0,1,2)") from None


def _print_verdict(run_dir) -> None:
    """The end of ``run``: the verdict table, the run's wall time and where everything is."""
    import json

    from .ledger import Ledger
    from .report import HOLDS_MARGIN, verdict_section

    info = json.loads((run_dir / "run.json").read_text())
    lines = verdict_section(Ledger(run_dir / "results.jsonl").latest(), info.get("holds_margin", HOLDS_MARGIN))
    print("\n".join(lines) if lines else "(no forget metric in the ledger: no verdict)")
    print(f"wall time: {info.get('wall_time_s')} s")
    print(f"results: {run_dir / 'results.jsonl'}\nreport:  {run_dir / 'report.md'} (every metric, the sweep tables, plots)")


def cmd_check(args) -> int:
    from .check import check_recipe
    from .config import DEFAULT_RECIPE
    from .data.benchmarks import BENCHMARKS

    recipe, overrides = _split_recipe_and_overrides(args.items)
    label = recipe or os.path.relpath(DEFAULT_RECIPE)
    res = check_recipe(recipe, overrides)
    for problem in res.problems:
        print(f"{label}: {problem}")
    if res.problems:
        for note in res.notes:
            print(f"{label}: note: {note}")
        n = len(res.problems)
        print(f"{label}: {n} problem{'s' if n > 1 else ''}")
        return 1
    cfg = res.cfg
    d = cfg["data"]
    data = f"{d['name']} {d['forget_split']}" + (f" from {d['path']}" if BENCHMARKS[d["name"]].requires_path else "")
    print(f"{label}: ok")
    print(f"  methods:      {', '.join(cfg['unlearn']['methods']) or '(none)'}")
    print(f"  compressions: {', '.join(cfg['sweep']['compressions'])}")
    print(f"  data:         {data}")
    for role, desc in res.models.items():
        print(f"  {'model.' + role + ':':<14}{desc}")
    for note in res.notes:
        print(f"  note: {note}")
    return 0


def cmd_plan(args) -> int:
    from .check import model_config
    from .config import load_recipe, method_settings
    from .models import model_on_meta
    from .plan import Setup, render, shape_of

    recipe, overrides = _split_recipe_and_overrides(args.items)
    cfg = load_recipe(recipe, overrides)
    if args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: expected a whole number of GPUs >= 1")
    if not args.gpu_gb > 0:
        raise UserError(f"--gpu-gb {args.gpu_gb}: expected the memory of one GPU in GB (> 0)")
    conf, name = model_config(cfg, args.model_config)
    shape = shape_of(model_on_meta(conf, cfg["model"]["trust_remote_code"]), name)
    methods = cfg["unlearn"]["methods"]
    if not methods:
        raise UserError("unlearn.methods is empty (expected the methods to plan, e.g. unlearn.methods=[GradDiff])")

    def setup_of(m):
        st = method_settings(cfg, m)
        return Setup(gpus=1, zero=0, precision=st["precision"], batch_size=st["batch_size"], grad_accum=st["grad_accum"],
                     seq_len=args.seq_len or cfg["model"]["max_length"], checkpointing=st["gradient_checkpointing"],
                     reference="shared" if cfg["runtime"]["shared_reference"] else "full", lora_r=int(st["lora"]["r"]))

    if not 0 <= args.reserve_gb < args.gpu_gb:
        raise UserError(f"--reserve-gb {args.reserve_gb}: expected 0 or more and less than --gpu-gb {args.gpu_gb}")
    print(render(shape, methods, lambda m: method_settings(cfg, m), setup_of, args.gpus, args.gpu_gb, args.reserve_gb),
          end="")
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
    if not any(o.startswith("eval.catalogue=") for o in cfg_over):
        cfg_over.append("eval.catalogue=true")  # evaluate: the whole metric catalogue by default
    out = args.out if args.out is not None else os.path.join("runs", "evaluate")
    _check_out_dir(out)
    if args.label is not None and not args.label.strip():
        raise UserError("--label is empty (expected the model's name in the ledger)")
    from .models import check_model_dir, is_local

    cfg = load_recipe(args.recipe, cfg_over)
    for path in [args.model_dir] + ([args.oracle] if args.oracle else []):  # before the benchmark is loaded
        if is_local(path):
            check_model_dir(path)
    metrics = evaluate(cfg, args.model_dir, out, label=args.label, oracle=args.oracle)
    from accelerate.state import PartialState

    if not PartialState().is_main_process:  # under accelerate launch the main process wrote the ledger
        return 0
    for k, v in metrics.items():
        print(f"{k}\t{v:.4f}")
    print(f"results: {os.path.join(out, 'results.jsonl')}")
    return 0


def cmd_unlearn(args) -> int:
    from .config import load_recipe
    from .data import load_benchmark
    from .pipeline import needs_oracle, oracle_checkpoint, target_checkpoint
    from .unlearn import unlearn_all

    recipe, overrides = _split_recipe_and_overrides(args.items)
    cfg = load_recipe(recipe, overrides)
    methods = _names(args.methods, "--methods", "GA,RMU") if args.methods is not None else None
    from .methods import check_method

    for m in methods or []:  # before any data or model work
        check_method(m, "--methods")
    out = args.out if args.out is not None else os.path.join("runs", cfg["name"])
    _check_out_dir(out, subdirs=("checkpoints",))
    if args.target is not None:
        from .models import check_model_dir, is_local

        if is_local(args.target):
            check_model_dir(args.target)
    bench = load_benchmark(cfg)
    target, target_id = target_checkpoint(cfg, bench, args.target)
    oracle = oracle_checkpoint(cfg, bench) if needs_oracle(cfg, methods) else None  # stop_forget_prob: oracle
    collapsed: dict[str, str] = {}
    done = unlearn_all(cfg, bench, target, target_id, out, methods, oracle=oracle[0] if oracle else None,
                       collapsed=collapsed)
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch: once, from the main process
        for method, path in done.items():
            print(f"{method}\t{path}")
    return 2 if collapsed else 0  # each collapse was said in one line (unlearn_all's warning)


def _sweep_checkpoints(items: list[str], labels: str | None, oracle: str | None) -> tuple[list[tuple], list[str]]:
    """CKPT arguments (``LABEL=PATH`` or ``PATH``) and ``KEY=VALUE`` overrides (dotted keys) ->
    ([(label, path, method)], overrides); the method comes from the checkpoint's robust_unlearn.json."""
    from .models import check_model_dir, is_local, read_metadata

    ckpts, overrides = [], []
    for it in items:
        left, eq, right = it.partition("=")
        if eq and "." in left:
            overrides.append(it)
        elif eq:
            if not left or not right:
                raise UserError(f"checkpoint '{it}' must be LABEL=PATH or PATH")
            ckpts.append([left, right])
        else:
            ckpts.append([os.path.basename(os.path.normpath(it)), it])
    if not ckpts:
        raise UserError("no checkpoint given (expected CKPT [CKPT...] as PATH or LABEL=PATH)")
    if labels:
        names = [x.strip() for x in labels.split(",")]
        if not all(names):
            raise UserError(f"--label '{labels}' has an empty label (expected one name per checkpoint, comma-separated)")
        if len(names) != len(ckpts):
            raise UserError(f"--label has {len(names)} labels for {len(ckpts)} checkpoints (expected one each, comma-separated)")
        for c, name in zip(ckpts, names):
            c[0] = name
    if oracle is not None:
        if any(c[0] == "oracle" for c in ckpts):
            raise UserError("label 'oracle' is reserved for the --oracle checkpoint")
        ckpts.insert(0, ["oracle", oracle])
    seen = set()
    for label, path in ckpts:
        if label in seen:
            raise UserError(f"two checkpoints are labelled '{label}' (give each a distinct LABEL=PATH)")
        seen.add(label)
        if is_local(path):
            check_model_dir(path)
    return [(label, path, read_metadata(path).get("method", "none") if os.path.isdir(path) else "none")
            for label, path in ckpts], overrides


def cmd_sweep(args) -> int:
    from pathlib import Path

    from .compress import check_compression
    from .config import load_recipe

    compressions = None
    _check_out_dir(args.out)
    if args.compressions is not None:
        compressions = _names(args.compressions, "--compressions", "none,int8,nf4")
        for c in compressions:
            check_compression(c, "--compressions")
    ckpts, overrides = _sweep_checkpoints(args.items, args.label, args.oracle)
    cfg = load_recipe(args.recipe, overrides)
    compressions = compressions or cfg["sweep"]["compressions"]

    from .data import load_benchmark
    from .report import write_report
    from .sweep import check_vocab, sweep

    for _, path, _ in ckpts:  # every checkpoint's tokenizer against its config, before any weights
        check_vocab(path, cfg["model"]["trust_remote_code"])
    bench = load_benchmark(cfg)
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    sweep(cfg, bench, run_dir, ckpts, compressions)
    from accelerate.state import PartialState

    if not PartialState().is_main_process:  # under accelerate launch the main process wrote the ledger
        return 0
    report = write_report(run_dir)
    print(report.read_text())
    print(f"results: {run_dir / 'results.jsonl'}\nreport:  {report}")
    return 0


def _check_json_out(path: str) -> None:
    """``--json FILE``: a file that can be written (a new one, or one to replace), checked before any work."""
    if not path.strip():
        raise UserError("--json is empty (expected a file path)")
    if os.path.isdir(path):
        raise UserError(f"--json '{path}' is a directory (expected a file path, e.g. audit.json)")
    _check_out_dir(os.path.dirname(path) or ".", f"--json '{path}': folder", expected="a folder for the file")


def cmd_audit(args) -> int:
    import json

    import torch

    from .metrics.weights import audit, audit_table
    from .models import check_model_dir, is_local, load_model, read_metadata

    from .quant import parse_format

    if args.json is not None:
        _check_json_out(args.json)
    formats = [parse_format(f).name for f in _names(args.formats, "--formats", "nf4,int8,gptq4-g64")] if args.formats else []
    if is_local(args.target):  # the target first: it is the first argument
        check_model_dir(args.target)
    ckpts, overrides = _sweep_checkpoints(args.checkpoints, args.label, None)
    if overrides:
        raise UserError(f"audit takes no recipe overrides, got '{overrides[0]}' (expected TARGET CKPT [CKPT...])")
    target, _ = load_model(args.target)
    before = {k: v.detach().clone() for k, v in target.state_dict().items() if k.endswith(".weight")}
    shapes = {k: tuple(v.shape) for k, v in before.items()}
    del target
    rows = {}
    for label, path, _method in ckpts:
        model, _ = load_model(path)
        other = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith(".weight")}
        if other != shapes:
            raise UserError(f"checkpoint '{path}' has different weights than the target '{args.target}' "
                            "(expected the same architecture: an unlearned copy of the target)")
        meta = read_metadata(path) if os.path.isdir(path) else {}
        saved = meta.get("saved_dtype")
        # nf4, --formats, and every format the checkpoint's floor guaranteed
        floor = (meta.get("spec", {}).get("settings") or {}).get("robust_floor") or [] if "Robust_" in meta.get("method", "") else []
        with torch.no_grad():
            rows[label] = audit(before, model, saved_dtype=getattr(torch, saved) if saved else None,
                                formats=list(formats) + list(floor))
        del model
    print(audit_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"json: {args.json}")
    return 0


def cmd_report(args) -> int:
    from .ledger import Ledger
    from .report import write_report

    run_dir = args.run_dir
    if not os.path.exists(run_dir):
        raise UserError(f"run directory '{run_dir}' not found (expected the --out of a run)")
    if not os.path.isdir(run_dir):
        raise UserError(f"'{run_dir}' is a file, not a run directory (expected the --out of a run, "
                        "which holds results.jsonl)")
    ledger_path = os.path.join(run_dir, "results.jsonl")
    from .report import STUDY_FILE, write_study_report

    if not os.path.isfile(ledger_path) and os.path.isfile(os.path.join(run_dir, STUDY_FILE)):
        _check_out_dir(run_dir, "study directory")
        print(write_study_report(run_dir).read_text())
        return 0
    if not os.path.isfile(ledger_path):
        raise UserError(f"run directory '{run_dir}' has no results.jsonl (expected the --out of a run)")
    ledger = Ledger(ledger_path)
    if not ledger.rows():  # each torn / unparseable line was warned about, with its line number
        n = len(ledger.problems)
        why = f"{n} torn or unparseable line{'s' if n > 1 else ''} skipped" if n else "the file is empty"
        raise UserError(f"ledger '{ledger_path}' has no valid rows ({why}; expected one JSON row a line, "
                        "as a run writes)")
    _check_out_dir(run_dir, "run directory")
    path = write_report(run_dir, ledger=ledger)
    print(path.read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data.benchmarks import BENCHMARKS  # light: no datasets, no torch

    p = _Parser(prog="robust-unlearn", description="LLM unlearning that survives compression.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe (default: recipes/default.yaml)", epilog=EPILOG,
                       description="Benchmark -> target + retain oracle -> metrics -> report, in one run directory.")
    r.add_argument("items", nargs="*", metavar="RECIPE_OR_KEY=VALUE",
                   help="a recipe YAML file (optional) followed by dotted key=value overrides")
    r.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    r.set_defaults(func=cmd_run)

    st = sub.add_parser("study", help="run a recipe over seeds x forget splits; report means with 95%% intervals",
                        epilog=EPILOG, description="Each (forget split, seed) is a whole run (target, oracle, "
                        "unlearning, sweep) into OUT/<split>/seed<k>; OUT/report.md lists every run's values and, "
                        "over seeds, each model's mean with its 95%% t-interval and range. A seed changes the built-in "
                        "benchmark's authors. Finished cells are reused, so an interrupted study resumes.")
    st.add_argument("items", nargs="*", metavar="RECIPE_OR_KEY=VALUE",
                    help="a recipe YAML file (optional) followed by dotted key=value overrides")
    st.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    st.add_argument("--forget-splits", help="comma-separated forget splits, e.g. forget10,forget30 "
                    "(default: the recipe's data.forget_split)")
    st.add_argument("--out", help="study directory (default: runs/<recipe name>-study)")
    st.set_defaults(func=cmd_study)

    c = sub.add_parser("check", help="validate a recipe offline and list every problem", epilog=EPILOG,
                       description="Check a recipe without training or downloading anything: unknown keys, value "
                       "types and ranges, method / compression / precision / floor-format names, the data split and "
                       "a local TOFU directory's files, and each local model directory's config.json (read without "
                       "weights) against the RMU settings. Prints every problem, one line each, and exits 1; prints "
                       "a short summary and exits 0 when there is none. Hub ids are noted as not checked.")
    c.add_argument("items", nargs="*", metavar="RECIPE_OR_KEY=VALUE",
                   help="a recipe YAML file (default: recipes/default.yaml) followed by dotted key=value overrides")
    c.set_defaults(func=cmd_check)

    pl = sub.add_parser("plan", help="the memory of each method per GPU, from the model's config alone, and the "
                        "cheapest configuration that fits", epilog=EPILOG,
                        description="Bytes per parameter and GiB per process of weights, gradients, optimizer state, the "
                        "reference, Robust_ state, activations and logits for each of the recipe's methods, at its "
                        "batch_size / grad_accum / precision / unlearn.lora / unlearn.gradient_checkpointing and "
                        "model.max_length tokens per row; then the cheapest configuration that fits --gpu-gb (grad_accum, "
                        "gradient checkpointing, DDP / ZeRO-2 / ZeRO-3 over --gpus, LoRA). Nothing is loaded or run: "
                        "the model is built from its config on the meta device.")
    pl.add_argument("items", nargs="*", metavar="RECIPE_OR_KEY=VALUE",
                    help="a recipe YAML file (default: recipes/default.yaml) followed by dotted key=value overrides")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs available (default: 1)")
    pl.add_argument("--gpu-gb", type=float, default=40.0, help="memory of one GPU in GiB (default: 40)")
    pl.add_argument("--reserve-gb", type=float, default=2.0, help="GiB of each GPU kept for the CUDA context and "
                    "allocator fragmentation (default: 2)")
    pl.add_argument("--model-config", help="a config.json (or a directory holding one) instead of the recipe's model: "
                    "for hub ids offline")
    pl.add_argument("--seq-len", type=int, help="tokens per row (default: the recipe's model.max_length)")
    pl.set_defaults(func=cmd_plan)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint with its benchmark's metrics (TOFU, MUSE-News, WMDP)",
                       epilog=EPILOG,
                       description="Evaluate any Hugging Face checkpoint on a benchmark; rows go to OUT/results.jsonl.")
    e.add_argument("model_dir", help="checkpoint directory (or hub id)")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    e.add_argument("--benchmark", choices=list(BENCHMARKS), help="benchmark (default: the recipe's)")
    e.add_argument("--data-path", help="the benchmark's directory or hub id "
                   f"({', '.join(n for n, b in BENCHMARKS.items() if b.reads_path)})")
    e.add_argument("--forget-split", help="forget split, e.g. forget10")
    e.add_argument("--recipe", help="recipe YAML whose data/model/eval settings to use (default: recipes/default.yaml)")
    e.add_argument("--oracle", help="retain-oracle checkpoint, for forget_quality (TOFU) / privleak (MUSE)")
    e.add_argument("--label", help="model name in the ledger (default: the directory name)")
    e.add_argument("--out", help="run directory (default: runs/evaluate)")
    e.set_defaults(func=cmd_evaluate)

    u = sub.add_parser("unlearn", help="unlearn the forget split from a target with one or more methods",
                       epilog=EPILOG, description="Target checkpoint -> unlearned Hugging Face checkpoints in "
                       "OUT/checkpoints/<method>-<key>; the frozen reference is loaded once for all methods.")
    u.add_argument("items", nargs="*", metavar="RECIPE_OR_KEY=VALUE",
                   help="a recipe YAML file (optional) followed by dotted key=value overrides")
    u.add_argument("--target", help="target checkpoint (default: the recipe's model.target, else the cached "
                   "fine-tuned target, trained first if needed)")
    u.add_argument("--methods", help="comma-separated methods (default: the recipe's unlearn.methods)")
    u.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    u.set_defaults(func=cmd_unlearn)

    sw = sub.add_parser("sweep", help="evaluate checkpoints under each compression (one ledger cell each)",
                        epilog=EPILOG + ". A checkpoint is PATH (labelled by its directory name) or LABEL=PATH "
                        "(a label without dots).",
                        description="Checkpoints x compressions -> RUN_DIR/results.jsonl and report.md. Each checkpoint "
                        "is loaded once; cells already in the ledger are skipped, so an interrupted sweep resumes. "
                        "forget_quality compares with the --oracle's uncompressed forget truth ratios.")
    sw.add_argument("items", nargs="+", metavar="CKPT_OR_KEY=VALUE",
                    help="checkpoints (PATH or LABEL=PATH) followed by dotted key=value recipe overrides")
    sw.add_argument("--compressions", help="comma-separated compressions, e.g. none,int8,nf4 "
                    "(default: the recipe's sweep.compressions)")
    sw.add_argument("--out", required=True, help="run directory (its ledger and report)")
    sw.add_argument("--recipe", help="recipe YAML whose data/model/eval settings to use (default: recipes/default.yaml)")
    sw.add_argument("--oracle", help="retain-oracle checkpoint: swept too (label 'oracle'); its uncompressed "
                    "forget truth ratios give every cell's forget_quality")
    sw.add_argument("--label", help="comma-separated labels, one per CKPT (instead of LABEL=PATH)")
    sw.set_defaults(func=cmd_sweep)

    au = sub.add_parser("audit", help="where did the update go? per module type: |dw|, |dw| / NF4 bin, NF4 code flips, "
                        "small-weight enrichment", description="Compare unlearned checkpoints with their target weight "
                        "by weight, per module type (q/k/v/o, gate/up/down): mean |dw|, mean |dw| / NF4 bin width, "
                        "fraction changed, NF4 code-flip rate of the changed weights (each checkpoint quantized with its "
                        "own block scales) and the enrichment of the top-1%% |dw| in the bottom-10%% |w|.")
    au.add_argument("target", help="the target checkpoint the others were unlearned from")
    au.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints (PATH or LABEL=PATH)")
    au.add_argument("--label", help="comma-separated labels, one per CKPT (instead of LABEL=PATH)")
    au.add_argument("--json", help="also write the numbers to this JSON file")
    au.add_argument("--formats", help="comma-separated quantization formats whose code-flip rates to report besides "
                    "nf4 and the checkpoint's own floor formats, e.g. int8,rtn4-g64,gptq4-g64 (the grid of the "
                    "weights under their own min-max scales)")
    au.set_defaults(func=cmd_audit)

    rp = sub.add_parser("report", help="write report.md from a run directory's ledger",
                        description="Rebuild report.md from RUN_DIR/results.jsonl.")
    rp.add_argument("run_dir")
    rp.set_defaults(func=cmd_report)
    return p


# the list that positionals after an option (``run --out DIR key=value``) join; argparse alone rejects them
_REST = {"run": "items", "study": "items", "check": "items", "plan": "items", "unlearn": "items", "sweep": "items", "evaluate": "overrides",
         "audit": "checkpoints"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    rest = _REST.get(args.command)
    if extra and (rest is None or any(x.startswith("-") for x in extra)):
        bad = [x for x in extra if x.startswith("-")] or extra
        sub = parser._subparsers._group_actions[0].choices[args.command]
        sub.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        setattr(args, rest, list(getattr(args, rest)) + extra)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
