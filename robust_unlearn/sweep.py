"""The compression sweep: checkpoints x compressions -> ledger cells.

A cell is one (model label, checkpoint, evaluation setup, compression); its rows (one per metric,
the fields of ``pipeline.evaluate_checkpoint``'s, no timestamps) reach ``results.jsonl`` in one
append, after its per-example stats are saved. A checkpoint whose cells are all in the ledger is not
even loaded; otherwise it is loaded once and each missing column is a deep copy of it, compressed.
Re-running an interrupted sweep evaluates only the missing cells, so it ends with the ledger an
uninterrupted sweep writes.

forget_quality (KS test on forget truth ratios) always compares with the retain oracle's
*uncompressed* truth ratios: a compressed model is judged against the model it should behave like,
not against an equally compressed oracle; the oracle's own compressed cells too. The same holds for
MUSE's privleak (the oracle's uncompressed Min-K% AUC). Which metrics a cell holds is the
benchmark's (``metrics.suite_for``).
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np

from . import ids
from .compress import check_compression, get_compression, needs_calibration
from .compress.relearn import RELEARN, RelearnData, eval_bench
from .ledger import Ledger
from .metrics import split_of, suite_for
from .metrics.stats import save_stats
from .metrics.tofu import Evaluator
from .models import load_model, load_tokenizer, process_device, read_metadata  # load_model runs check_compatible
from .quant import parse_format

log = logging.getLogger(__name__)

ORACLE = "oracle"


def stats_path(run_dir: Path, label: str, ckpt_id: str, eval_id: str, compression: str) -> Path:
    """Per-example stats of one cell (the ``none`` name is the one evaluate_checkpoint always used)."""
    suffix = "" if compression == "none" else f"-{compression}"
    return Path(run_dir) / "stats" / f"{label}-{ckpt_id}-{eval_id}{suffix}.json"


def check_vocab(path: str, trust_remote_code: bool = False) -> None:
    """Before any weights are read: a tokenizer with more tokens than the checkpoint's vocabulary
    (its config's ``vocab_size``, the embedding rows) belongs to another model. UserError if so."""
    from transformers import AutoConfig

    from .errors import UserError
    from .models import quiet_transformers

    quiet_transformers()
    try:
        conf = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load model '{path}': {str(exc).splitlines()[0]}") from None
    tok = load_tokenizer(path, trust_remote_code)
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    n_embed = getattr(text, "vocab_size", None)
    if n_embed is not None and len(tok) > n_embed:
        raise UserError(f"tokenizer of '{path}' has {len(tok)} tokens but the model's embedding has {n_embed} rows "
                        "(expected the tokenizer saved with this checkpoint)")


def sweep(cfg: dict, bench, run_dir: str | Path, checkpoints: list[tuple], compressions: list[str],
          oracle: str | Path | None = None, evaluator: Evaluator | None = None) -> dict[tuple[str, str], tuple[dict, Path]]:
    """Evaluate every checkpoint under every compression into ``run_dir/results.jsonl``.

    ``checkpoints``: ``(label, path, method)`` or ``(label, path, method, ckpt_id)`` tuples (ckpt_id
    defaults to ``ids.ckpt_id(path)``). ``compressions``: column names (``compress``), in
    order. ``oracle``: the stats JSON of the retain oracle's uncompressed evaluation; when None and a
    checkpoint is labelled ``oracle``, that checkpoint is swept first and its ``none`` cell (evaluated
    even if ``none`` is not a column) is the reference. ``evaluator``: reused for every checkpoint
    (default: one per checkpoint, the benchmark's (``metrics.suite_for``), built on its tokenizer,
    shared by its columns).

    -> {(label, compression): (metrics, stats path)} for every requested cell.
    """
    run_dir = Path(run_dir)
    for name in compressions:
        check_compression(name)
    eval_id = ids.eval_id(cfg, bench)
    ledger = Ledger(run_dir / "results.jsonl")
    items = [(c[0], str(c[1]), c[2], c[3] if len(c) > 3 and c[3] else ids.ckpt_id(str(c[1]))) for c in checkpoints]
    items.sort(key=lambda it: it[0] != ORACLE)  # stable: the oracle first, the rest as given
    suite = suite_for(cfg)
    oracle_ref = suite.load_reference(Path(oracle)) if oracle else None
    out: dict[tuple[str, str], tuple[dict, Path]] = {}
    calibration = None  # GPTQ / AWQ calibration, built at the first calibrated column that runs
    from accelerate.state import PartialState

    state = PartialState()  # under accelerate launch: every process evaluates its share, the main one writes
    main = state.is_main_process
    _check_groups(items, compressions, cfg["model"]["trust_remote_code"])
    for label, path, method, ckpt_id in items:
        is_oracle = label == ORACLE
        cols = list(dict.fromkeys(compressions))
        own_none = stats_path(run_dir, label, ckpt_id, eval_id, "none")
        if is_oracle and oracle is None:
            cols = ["none"] + [c for c in cols if c != "none"]  # its reference first
        model = ev = None  # loaded at the first missing cell
        meta = read_metadata(path) if Path(path).is_dir() else {}
        precision = meta.get("precision", "fp32" if Path(path).is_dir() else "n/a")
        for comp in cols:
            if is_oracle and oracle is None:
                ref = "self" if comp == "none" else suite.load_reference(own_none)
            else:
                ref = oracle_ref
            key = (label, ckpt_id, eval_id, comp)
            sp = stats_path(run_dir, label, ckpt_id, eval_id, comp)
            context, settings = None, None  # a GPTQ / AWQ / relearn column's settings: part of what a cell is
            if needs_calibration(comp):
                if calibration is None:
                    calibration = _calibration(cfg, bench, load_tokenizer(path, cfg["model"]["trust_remote_code"]), run_dir)
                calibration.ckpt = f"{label}-{ckpt_id}"
                context, settings = calibration, {"calibration": calibration.describe(), **calibration.quantizer}
            elif comp in RELEARN:
                settings = {"relearn": dict(cfg["sweep"]["relearn"])}
            rows_here = [r for r in ledger.rows() if (r["model"], r["ckpt"], r["eval"], r["compression"]) == key]
            done = [r for r in rows_here if _same_settings(r.get("settings"), settings)]
            if rows_here and not done:
                log.info("%s / %s: the ledger's rows were made with other settings than %s; evaluated again",
                         label, comp, settings)
            has_ref = any(r["metric"] == suite.reference_metric for r in done)
            # every row a cell wrote (an append cut short by a kill leaves the first rows only)
            whole = len({r["metric"] for r in done}) >= max((r.get("cell_rows", 0) for r in done), default=0)
            if done and whole and sp.is_file() and (ref is None or has_ref or _no_reference(suite, sp)):
                log.info("%s / %s: already in the ledger (%d rows), skipped", label, comp, len(done))
                if comp in compressions:
                    out[(label, comp)] = ({r["metric"]: r["value"] for r in done}, sp)
                continue
            if model is None:
                model, tok = load_model(path, "float32", cfg["model"]["trust_remote_code"])
                model.to(process_device())  # evaluated on this process's accelerator (the CPU where there is none)
                ev = evaluator or suite.evaluator(tok)
            t0 = time.time()
            if comp in RELEARN:
                context = RelearnData(cfg, bench, tok)
            m = model if comp == "none" else get_compression(comp, context)(copy.deepcopy(model))
            m.to(process_device()).eval()  # a GPTQ / AWQ column's checkpoint loads back on the CPU
            metrics, per = ev.evaluate(m, eval_bench(comp, bench), ref, splits=suite.splits(comp))
            del m
            if not main:  # under accelerate launch only the main process writes; the others wait for it
                state.wait_for_everyone()
                if comp in compressions:
                    out[(label, comp)] = (metrics, sp)
                continue
            save_stats(sp, per)
            rows = [{"model": label, "method": method, "compression": comp, "split": split_of(name),
                     "metric": name, "value": value, "ckpt": ckpt_id, "eval": eval_id, "precision": precision,
                     "checkpoint": path, "cell_rows": len(metrics), **({"settings": settings} if settings else {})}
                    for name, value in metrics.items()]
            written = ledger.append(rows)
            state.wait_for_everyone()
            log.info("%s / %s: evaluated in %.1fs (%d rows)", label, comp, time.time() - t0, written)
            if comp in compressions:
                out[(label, comp)] = (metrics, sp)
        del model
        if is_oracle and oracle is None and own_none.is_file():
            oracle_ref = suite.load_reference(own_none)  # the reference for every later checkpoint
    return out


def _check_groups(items, compressions, trust_remote_code: bool) -> None:
    """Before any weights are read: every gptq / awq group divides each checkpoint architecture's layer
    widths (the model built from its config on the meta device). UserError naming the layer if not."""
    cal = [parse_format(c) for c in compressions if needs_calibration(c)]
    if not cal:
        return
    from .compress import compressible_linears
    from .models import meta_model

    seen = set()
    for _, path, _, _ in items:
        model = meta_model(path, trust_remote_code)
        widths = {n: lin.in_features for n, lin in compressible_linears(model)}
        key = tuple(sorted(widths.items()))
        if key in seen:
            continue
        seen.add(key)
        for fmt in cal:
            fmt.check_widths(widths)


def _calibration(cfg: dict, bench, tok, run_dir: Path):
    """The GPTQ / AWQ calibration of this sweep (``sweep.calibration``); compressed checkpoints are
    cached in ``run_dir/compressed``."""
    from .data import calibration_samples
    from .quant.calibrated import Calibration

    c = cfg["sweep"]["calibration"]
    samples, source = calibration_samples(cfg, bench, tok)
    return Calibration.of(c, samples, source, cache_dir=Path(run_dir) / "compressed")


def _same_settings(have: dict | None, want: dict | None) -> bool:
    """Whether a ledger row's column settings are this sweep's. Rows written before
    ``awq_duo_scaling`` existed ran with it on, and those before ``weight_observer`` with minmax
    (llm-compressor's defaults)."""
    if want is None:
        return True
    if have is not None and "calibration" in want:
        have = {"awq_duo_scaling": True, "weight_observer": "minmax", **have}
    return have == want


def _no_reference(suite, stats: Path) -> bool:
    """True when a cell's stats hold nothing to compare with the oracle (e.g. no forget truth ratios:
    forget_quality cannot exist)."""
    ref = suite.load_reference(stats)
    return ref is None or (isinstance(ref, np.ndarray) and ref.size == 0)
