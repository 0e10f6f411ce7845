"""Ledger -> ``report.md`` (Markdown tables)."""
from __future__ import annotations

import json
from pathlib import Path

from .ledger import Ledger

MAIN = ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio", "forget_quality", "model_utility",
        "retain_Q_A_Prob", "retain_Q_A_ROUGE", "holdout_Q_A_Prob")
MODEL_ORDER = {"target": 0, "oracle": 1}


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and (v != 0 and (abs(v) < 1e-3)):
        return f"{v:.2e}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(run_dir: str | Path, info: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    rows = Ledger(run_dir / "results.jsonl").latest()
    info = info or {}
    info_file = run_dir / "run.json"
    if not info and info_file.is_file():
        info = json.loads(info_file.read_text())
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
    lines += ["", "Metrics follow TOFU (Maini et al. 2024) as open-unlearning computes them; "
              "see `robust_unlearn/metrics/tofu.py` for the exact definitions.", ""]
    out = run_dir / "report.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    return out
