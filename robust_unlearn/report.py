"""Ledger -> ``report.md`` (Markdown tables), and for compression sweeps per-metric pivot tables
(model x compression) with two PNG plots next to it: ``forget_heatmap.png`` and
``utility_vs_forget.png``."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .data.benchmarks import METRIC_SETS
from .ledger import Ledger

log = logging.getLogger(__name__)

# every benchmark's report columns, pivots and notes, from its declaration (data.benchmarks); a ledger
# holds one benchmark's metrics, absent ones are not shown
MAIN = tuple(dict.fromkeys(m for ms in METRIC_SETS for m in ms.main))
MODEL_ORDER = {"target": 0, "oracle": 1}
PIVOT = tuple(dict.fromkeys(m for ms in METRIC_SETS for m in ms.pivot))
# per benchmark: (heatmap metric, scatter x, scatter y); the first whose heatmap metric is in the ledger
PLOTS = tuple((f, f, ms.utility) for ms in METRIC_SETS for f in ms.forget)
NOTES = {ms.note_metric: ms.note for ms in METRIC_SETS}
HEATMAP, SCATTER = "forget_heatmap.png", "utility_vs_forget.png"
# the verdict's tolerance around the retain oracle when the run does not give one (recipe key
# sweep.holds_margin, recorded in run.json)
HOLDS_MARGIN = 0.05


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and (v != 0 and (abs(v) < 1e-3)):
        return f"{v:.2e}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(run_dir: str | Path, info: dict | None = None, ledger: Ledger | None = None) -> Path:
    run_dir = Path(run_dir)
    rows = (ledger or Ledger(run_dir / "results.jsonl")).latest()
    info = info or {}
    info_file = run_dir / "run.json"
    if not info and info_file.is_file():
        try:
            info = json.loads(info_file.read_text())
        except ValueError:  # cut short or edited: the report goes on without the run's details
            info = None
        if not isinstance(info, dict):
            log.warning("%s is not a JSON object (expected the run's details), left out of the report", info_file)
            info = {}
    cells: dict[tuple, dict] = {}
    precision: dict[str, str] = {}
    for r in rows:
        cells.setdefault((r["model"], r["method"], r["compression"]), {})[r["metric"]] = r["value"]
        if r.get("precision"):
            precision[r["model"]] = r["precision"]
    order = sorted(cells, key=lambda k: (MODEL_ORDER.get(k[0], 2), k[0], k[2] != "none", k[2]))
    lines = [f"# robust_unlearn report: {info.get('name', run_dir.name)}", ""]
    if info:
        for key in ("benchmark", "forget_split", "base_model", "wall_time_s", "command"):
            if key in info:
                lines.append(f"- **{key}**: {info[key]}")
        lines.append("")
    margin = info.get("holds_margin", HOLDS_MARGIN) if isinstance(info.get("holds_margin"), (int, float)) else HOLDS_MARGIN
    lines += verdict_section(rows, margin)
    for what, items in (("Collapsed, nothing saved", info.get("collapsed")),
                        ("Collapsed, last good state saved", info.get("last_good")),
                        ("Backed off from a collapse", info.get("backed_off"))):
        if isinstance(items, dict) and items:
            lines += [f"**{what}** (collapse guard, `unlearn.collapse_floor`):", "",
                      *(f"- {m}: {text}" for m, text in items.items()), ""]
    metrics = [m for m in MAIN if any(m in c for c in cells.values())]
    lines += ["## Forgetting and utility", "",
              "| model | method | compression | precision | " + " | ".join(metrics) + " |",
              "|---|---|---|---|" + "---|" * len(metrics)]
    for key in order:
        c = cells[key]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {precision.get(key[0], '–')} | "
                     + " | ".join(_fmt(c.get(m)) for m in metrics) + " |")
    others = sorted({m for c in cells.values() for m in c} - set(metrics))
    if others:
        lines += ["", "## All metrics", "", "| model | compression | " + " | ".join(others) + " |",
                  "|---|---|" + "---|" * len(others)]
        for key in order:
            c = cells[key]
            lines.append(f"| {key[0]} | {key[2]} | " + " | ".join(_fmt(c.get(m)) for m in others) + " |")
    lines += sweep_section(run_dir, rows)
    present = {m for c in cells.values() for m in c}
    notes = [text for metric, text in NOTES.items() if metric in present and metric != "forget_Q_A_Prob"]
    lines += ["", *(notes or [NOTES["forget_Q_A_Prob"]]), ""]
    out = run_dir / "report.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    return out


def verdict(rows: list[dict], margin: float = HOLDS_MARGIN) -> list[dict]:
    """One entry per model but the oracle: its primary forget metric uncompressed, the worst compressed
    column (the most knowledge back: the highest value where lower means more forgotten) and its
    name, utility uncompressed, and whether the forgetting holds: the uncompressed value and every
    column within ``margin`` of the retain oracle's value in the same column (its uncompressed value
    where the oracle was not swept in that column; None without an oracle). Relearning lifts even a
    model that never knew the answers, so each column is judged against what it does to the oracle."""
    rows = [r for r in rows if isinstance(r.get("value"), (int, float))]
    names = {r["metric"] for r in rows}
    ms = next((ms for ms in METRIC_SETS if any(f in names for f in ms.forget)), None)
    if ms is None:
        return []
    f = next(f for f in ms.forget if f in names)
    sign = 1.0 if ms.forget_lower_is_better else -1.0
    value = {(r["model"], r["method"], r["compression"], r["metric"]): r["value"] for r in rows}
    models, comps = sweep_order(rows)
    oracle = next((value[k] for k in value if k[0] == "oracle" and k[2] == "none" and k[3] == f), None)
    oracle_col = {k[2]: v for k, v in value.items() if k[0] == "oracle" and k[3] == f}  # the oracle per column
    a = ms.answers
    oracle_answers = next((value[k] for k in value if k[0] == "oracle" and k[2] == "none" and k[3] == a), None)
    out = []
    for m in models:
        if m[0] == "oracle" or (*m, "none", f) not in value:
            continue
        base = value[(*m, "none", f)]
        cols = [(c, value[(*m, c, f)]) for c in comps if c != "none" and (*m, c, f) in value]
        worst = max(cols, key=lambda cv: sign * cv[1]) if cols else None
        ref = {c: oracle_col.get(c, oracle) for c, _ in cols}
        holds = None if oracle is None else bool(sign * (base - oracle) <= margin and
                                                 all(sign * (v - ref[c]) <= margin for c, v in cols))
        out.append({"model": m[0], "method": m[1], "metric": f, "none": base,
                    "worst": worst[0] if worst else None, "worst_value": worst[1] if worst else None,
                    "utility_metric": ms.utility, "utility": value.get((*m, "none", ms.utility)),
                    "oracle": oracle, "holds": holds, "margin": margin,
                    "answers_metric": a, "answers": value.get((*m, "none", a)), "oracle_answers": oracle_answers})
    return out


def verdict_section(rows: list[dict], margin: float = HOLDS_MARGIN) -> list[str]:
    """The verdict table (Markdown lines), or nothing when the ledger has no forget metric."""
    v = verdict(rows, margin)
    if not v:
        return []
    f, u, oracle = v[0]["metric"], v[0]["utility_metric"], v[0]["oracle"]
    answers = any(e["answers"] is not None for e in v)
    bar = (f"within {margin:g} of the retain oracle's {_fmt(oracle)} uncompressed, and under every column within "
           f"{margin:g} of the oracle's value in that column where the oracle was swept"
           if oracle is not None else "no retain oracle in this ledger: not judged")
    lines = ["## Verdict", "",
             f"Does the forgetting hold? `{f}` uncompressed, its worst compressed column, `{u}` uncompressed; "
             f"holds = {bar}.", "",
             f"| model | {f} | worst column | worst {f} | {u} | holds |" + (" answers |" if answers else ""),
             "|---|---|---|---|---|---|" + ("---|" if answers else "")]
    for e in v:
        label = _label((e["model"], e["method"]))
        holds = "–" if e["holds"] is None else ("**yes**" if e["holds"] else "no")
        lines.append(f"| {label} | {_fmt(e['none'])} | {e['worst'] or '–'} | {_fmt(e['worst_value'])} | "
                     f"{_fmt(e['utility'])} | {holds} |" + (f" {_fmt(e['answers'])} |" if answers else ""))
    if answers:
        lines += ["", f"answers: `{v[0]['answers_metric']}` uncompressed (1.0: no forget answer repeats a word pair; "
                  f"the retain oracle's: {_fmt(v[0]['oracle_answers'])}). Well under the oracle's, the forget "
                  "answers loop: the low forget metric is not the oracle's kind of forgetting."]
    return lines + [""]


def sweep_order(rows: list[dict]) -> tuple[list[tuple[str, str]], list[str]]:
    """-> (models as (label, method): target, oracle, then the rest in ledger order;
    compressions: none, then in ledger order (the sweep's column order))."""
    models: dict[tuple[str, str], int] = {}
    comps: dict[str, int] = {}
    for r in rows:
        models.setdefault((r["model"], r["method"]), len(models))
        comps.setdefault(r["compression"], len(comps))
    model_list = sorted(models, key=lambda k: (MODEL_ORDER.get(k[0], 2), models[k]))
    comp_list = sorted(comps, key=lambda c: (c != "none", comps[c]))
    return model_list, comp_list


def _label(model: tuple[str, str]) -> str:
    return model[0] if model[1] in ("none", model[0]) else f"{model[0]} ({model[1]})"


def sweep_section(run_dir: Path, rows: list[dict]) -> list[str]:
    """Pivot tables (one per metric of PIVOT) and the plots, when the ledger holds a compression
    other than ``none``."""
    rows = [r for r in rows if isinstance(r.get("value"), (int, float))]
    if not any(r["compression"] != "none" for r in rows):
        return []
    models, comps = sweep_order(rows)
    value = {(r["model"], r["method"], r["compression"], r["metric"]): r["value"] for r in rows}
    precision: dict[tuple[str, str], str] = {}
    checkpoint: dict[tuple[str, str], str] = {}
    for r in rows:
        precision[(r["model"], r["method"])] = r.get("precision") or "–"
        checkpoint[(r["model"], r["method"])] = r.get("checkpoint") or "–"
    names = {r["metric"] for r in rows}
    ref_note = next((ms.reference_note for ms in METRIC_SETS if names & set(ms.reference_metrics)),
                    METRIC_SETS[0].reference_note)
    lines = ["", "## Compression sweep", "",
             "Rows: models (target and retain oracle first); columns: compressions in sweep order. " + ref_note, "",
             "| model | method | precision | checkpoint |", "|---|---|---|---|"]
    lines += [f"| {m} | {meth} | {precision[(m, meth)]} | `{checkpoint[(m, meth)]}` |" for m, meth in models]
    for metric in PIVOT:
        if not any(k[3] == metric for k in value):
            continue
        lines += ["", f"### {metric}", "", "| model | " + " | ".join(comps) + " |", "|---|" + "---|" * len(comps)]
        for m in models:
            lines.append(f"| {_label(m)} | " + " | ".join(_fmt(value.get((*m, c, metric))) for c in comps) + " |")
    metrics = {r["metric"] for r in rows}
    heat, x, y = next((p for p in PLOTS if p[0] in metrics), PLOTS[0])
    for name, title in ((HEATMAP, "Forget answer probability" if heat == PLOTS[0][0] else heat),
                        (SCATTER, "Utility vs forgetting")):
        path = run_dir / name
        try:
            drawn = (plot_forget_heatmap(path, rows, heat) if name == HEATMAP
                     else plot_utility_vs_forget(path, rows, x, y))
        except ImportError:  # matplotlib is optional for the tables
            drawn = False
        if drawn:
            lines += ["", f"![{title}]({name})"]
    return lines


def _save_png(fig, path: Path) -> None:
    """Write a figure atomically (temporary sibling, then rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_forget_heatmap(path: Path, rows: list[dict], metric: str = "forget_Q_A_Prob") -> bool:
    """Model x compression heatmap of ``metric`` with the values written in the cells; the target
    and the oracle are the top rows, set off by a line, as references. -> False when no data."""
    import numpy as np
    from matplotlib.figure import Figure

    models, comps = sweep_order([r for r in rows if r["metric"] == metric])
    if not models:
        return False
    value = {(r["model"], r["method"], r["compression"]): r["value"] for r in rows if r["metric"] == metric}
    grid = np.array([[value.get((*m, c), np.nan) for c in comps] for m in models], dtype=float)
    fig = Figure(figsize=(1.2 * len(comps) + 2.5, 0.55 * len(models) + 1.6))
    ax = fig.add_subplot()
    img = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=0.0,
                    vmax=max(float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0, 1e-12))
    fig.colorbar(img, ax=ax, label=metric)
    mid = np.nanmean(grid) if np.isfinite(grid).any() else 0.0
    for i in range(len(models)):
        for j in range(len(comps)):
            v = grid[i, j]
            ax.text(j, i, "–" if np.isnan(v) else _fmt(float(v)), ha="center", va="center", fontsize=8,
                    color="black" if not np.isnan(v) and v > mid else "white")
    refs = sum(1 for m in models if m[0] in MODEL_ORDER)
    if 0 < refs < len(models):
        ax.axhline(refs - 0.5, color="white", linewidth=2.5)
    ax.set_xticks(range(len(comps)), comps, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), [_label(m) + (" (ref)" if m[0] in MODEL_ORDER else "") for m in models])
    ax.set_xlabel("compression")
    ax.set_title(f"{metric}: model x compression (lower = more forgotten)")
    _save_png(fig, path)
    return True


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*")


def plot_utility_vs_forget(path: Path, rows: list[dict], x: str = "forget_Q_A_Prob", y: str = "model_utility") -> bool:
    """One point per (model, compression): ``y`` against ``x``; color = model, marker = compression;
    the uncompressed target and oracle are ringed in black and named. -> False when no cell has both."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    value = {(r["model"], r["method"], r["compression"], r["metric"]): r["value"] for r in rows}
    models, comps = sweep_order([r for r in rows if r["metric"] in (x, y)])
    points = [(m, c, value[(*m, c, x)], value[(*m, c, y)]) for m in models for c in comps
              if (*m, c, x) in value and (*m, c, y) in value]
    if not points:
        return False
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    markers = {c: MARKERS[i % len(MARKERS)] for i, c in enumerate(comps)}
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.add_subplot()
    for m, c, px, py in points:
        ax.scatter(px, py, color=colors[m], marker=markers[c], s=55, edgecolors="black", linewidths=0.4, zorder=3)
        if c == "none" and m[0] in MODEL_ORDER:
            ax.scatter(px, py, facecolors="none", edgecolors="black", s=260, linewidths=1.8, zorder=4)
            ax.annotate(f"{m[0]}, uncompressed", (px, py), textcoords="offset points", xytext=(9, -14) if px < 0.5 else (-9, -14),
                        ha="left" if px < 0.5 else "right", fontsize=9)
    used_m = [m for m in models if any(p[0] == m for p in points)]
    used_c = [c for c in comps if any(p[1] == c for p in points)]
    model_handles = [Line2D([], [], color=colors[m], marker="o", linestyle="", label=_label(m)) for m in used_m]
    comp_handles = [Line2D([], [], color="gray", marker=markers[c], linestyle="", label=c) for c in used_c]
    leg = ax.legend(handles=model_handles, title="model", loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    ax.add_artist(leg)
    ax.legend(handles=comp_handles, title="compression", loc="lower left", bbox_to_anchor=(1.02, 0.0), fontsize=8)
    ax.set_xlabel(f"{x} (lower = more forgotten)")
    ax.set_ylabel(f"{y} (higher = better)")
    ax.set_title("Utility vs forgetting, per model and compression")
    ax.grid(True, alpha=0.3)
    _save_png(fig, path)
    return True


# --- studies: several runs (seeds x forget sets) of one recipe --------------------------------------

STUDY_FILE = "study.json"


def study_runs(study_dir: str | Path) -> list[dict]:
    """Every finished run under ``study_dir/<forget set>/seed<k>/`` -> one entry per model of its
    verdict (forget set, seed, model, none, worst column and value, utility, the oracle's value), with
    the target's utility and the per-column values of the forget metric."""
    out = []
    for info_file in sorted(Path(study_dir).glob("*/seed*/run.json"), key=lambda p: (p.parent.parent.name, _seed_of(p))):
        try:
            info = json.loads(info_file.read_text())
        except ValueError:
            log.warning("%s is not valid JSON: that run is left out of the study", info_file)
            continue
        rows = Ledger(info_file.parent / "results.jsonl").latest()
        v = verdict(rows, info.get("holds_margin", HOLDS_MARGIN))
        if not v:
            continue
        target_u = next((e["utility"] for e in v if e["model"] == "target"), None)
        f = v[0]["metric"]
        cols = {(r["model"], r["compression"]): r["value"] for r in rows
                if r["metric"] == f and isinstance(r.get("value"), (int, float))}
        where = dict(forget_set=info.get("forget_split", info_file.parent.parent.name),
                     seed=info.get("seed", _seed_of(info_file)), target_utility=target_u, run=str(info_file.parent))
        last_good = info.get("last_good") if isinstance(info.get("last_good"), dict) else {}
        for e in v:
            e.update(where, columns={c: val for (m, c), val in cols.items() if m == e["model"]},
                     state=last_good.get(e["model"]))
            out.append(e)
        collapsed = info.get("collapsed") if isinstance(info.get("collapsed"), dict) else {}
        for m, line in collapsed.items():  # the guard stopped it with nothing to save: a run without values
            out.append(dict(where, model=m, method=m, metric=f, utility_metric=v[0]["utility_metric"], none=None,
                            worst=None, worst_value=None, utility=None, oracle=v[0]["oracle"], holds=None,
                            columns={}, state="collapsed, nothing saved", collapsed=line))
    return out


def _seed_of(info_file: Path) -> int:
    name = info_file.parent.name
    return int(name[4:]) if name[4:].lstrip("-").isdigit() else 0


def run_checks(e: dict, margin: float = HOLDS_MARGIN, utility_kept: float = 0.9, recovery: float = 2.0) -> dict:
    """Per run of one model: ``holds`` (worst column <= its uncompressed value + margin and <= the
    oracle's + margin), ``utility_kept`` (utility / the target's), ``recovers`` (the highest column /
    the uncompressed value >= ``recovery``: the published failure). A run the collapse guard stopped
    with nothing saved holds nothing."""
    if e.get("collapsed"):
        return {"holds": False, "utility_kept": None, "utility_ok": False, "recovery": None, "recovers": None}
    worst = e["worst_value"] if e["worst_value"] is not None else e["none"]
    holds = None if e["oracle"] is None else (worst <= e["none"] + margin and worst <= e["oracle"] + margin)
    kept = (e["utility"] / e["target_utility"]) if e.get("utility") is not None and e.get("target_utility") else None
    ratio = worst / e["none"] if e["none"] else None
    return {"holds": holds, "utility_kept": kept, "utility_ok": None if kept is None else kept >= utility_kept,
            "recovery": ratio, "recovers": None if ratio is None else ratio >= recovery}


def interval(values: list[float]) -> tuple[float, float, float, float, float]:
    """-> (mean, 95% t-interval low, high, min, max); one value: its own interval."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return m, m, m, m, m
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return m, m - half, m + half, float(x.min()), float(x.max())


def _ci(values: list[float]) -> str:
    if not values:
        return "–"
    m, lo, hi, mn, mx = interval(values)
    return f"{m:.3f}" if len(values) == 1 else f"{m:.3f} [{lo:.3f}, {hi:.3f}] ({mn:.3f}–{mx:.3f})"


def write_study_report(study_dir: str | Path, info: dict | None = None) -> Path:
    """``study_dir/report.md``: per forget set, every run's values and, over seeds, each model's mean
    with its 95% t-interval and range; the checks of :func:`run_checks` counted over the runs."""
    study_dir = Path(study_dir)
    if info is None and (study_dir / STUDY_FILE).is_file():
        try:
            info = json.loads((study_dir / STUDY_FILE).read_text())
        except ValueError:
            info = None
    info = info if isinstance(info, dict) else {}
    margin = info.get("holds_margin", HOLDS_MARGIN)
    entries = study_runs(study_dir)
    lines = [f"# robust_unlearn study: {info.get('name', study_dir.name)}", ""]
    for key in ("benchmark", "base_model", "seeds", "forget_splits", "methods", "compressions", "wall_time_s", "command"):
        if key in info:
            lines.append(f"- **{key}**: {info[key]}")
    lines += ["", "Per run: the forget metric uncompressed and under each column, the worst column, utility and "
              "its share of the target's. **holds**: worst column <= uncompressed + "
              f"{margin:g} and <= the retain oracle's + {margin:g}; **x back**: worst column / uncompressed "
              "(>= 2: the published failure); **answers** (where the ledger has it): how the forget answers read "
              "uncompressed, 1.0 when none loops (the oracle's in brackets); *last good state*: the collapse guard "
              "stopped it and saved its last state above the floor; *collapsed, nothing saved*: it stopped before "
              "any such state. Over seeds: "
              "mean [95% t-interval] (min–max) of the runs that saved a model; holds and x back count every run.", ""]
    sets = list(dict.fromkeys(e["forget_set"] for e in entries))
    for fs in sets:
        es = [e for e in entries if e["forget_set"] == fs]
        f, u = es[0]["metric"], es[0]["utility_metric"]
        comps = list(dict.fromkeys(c for e in es for c in e["columns"] if c != "none"))
        seeds = sorted({e["seed"] for e in es})
        answers = any(e.get("answers") is not None for e in es)  # the forget answers' fluency (verdict)
        lines += [f"## {fs}: {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})", "",
                  f"| model | seed | {f} | " + " | ".join(comps) + f" | worst | {u} | kept | oracle | holds | x back |"
                  + (" answers (oracle) |" if answers else ""),
                  "|---|---|---|" + "---|" * len(comps) + "---|---|---|---|---|---|" + ("---|" if answers else "")]
        models = list(dict.fromkeys(e["model"] for e in es))
        for m in models:
            for e in (e for e in es if e["model"] == m):
                c = run_checks(e, margin)
                if e.get("collapsed"):
                    lines.append(f"| {m} | {e['seed']} | collapsed, nothing saved | " + " | ".join("–" for _ in comps)
                                 + f" | – | – | – | {_fmt(e['oracle'])} | **no** | – |" + (" – |" if answers else ""))
                    continue
                label = f"{m} (last good state)" if e.get("state") else m
                lines.append(f"| {label} | {e['seed']} | {_fmt(e['none'])} | " + " | ".join(_fmt(e['columns'].get(x)) for x in comps)
                             + f" | {e['worst'] or '–'} {_fmt(e['worst_value'])} | {_fmt(e['utility'])} | "
                             f"{_fmt(c['utility_kept'])} | {_fmt(e['oracle'])} | "
                             f"{'–' if c['holds'] is None else ('yes' if c['holds'] else '**no**')} | {_fmt(c['recovery'])} |"
                             + (f" {_fmt(e.get('answers'))} ({_fmt(e.get('oracle_answers'))}) |" if answers else ""))
        lines += ["", f"Over seeds ({fs}):", "",
                  f"| model | runs | {f} | worst column | {u} | kept | holds | x back >= 2 |", "|---|---|---|---|---|---|---|---|"]
        for m in models:
            runs = [e for e in es if e["model"] == m]
            me = [e for e in runs if not e.get("collapsed")]  # the values come from the runs that saved one
            cs = [run_checks(e, margin) for e in me]
            worst = [e["worst_value"] for e in me if e["worst_value"] is not None]
            kept = [c["utility_kept"] for c in cs if c["utility_kept"] is not None]
            n_holds = sum(1 for c in cs if c["holds"])
            n_back = sum(1 for c in cs if c["recovers"])
            n_coll = len(runs) - len(me)
            lines.append(f"| {m} | {len(runs)}{f' ({n_coll} collapsed)' if n_coll else ''} | {_ci([e['none'] for e in me])} | "
                         f"{_ci(worst)} | {_ci([e['utility'] for e in me if e['utility'] is not None])} | {_ci(kept)} | "
                         f"{n_holds}/{len(runs)} | {n_back}/{len(runs)} |")
        lines.append("")
    if not entries:
        lines += ["No finished run under this directory yet (expected <forget set>/seed<k>/run.json).", ""]
    out = study_dir / "report.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    return out
