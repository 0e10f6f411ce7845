"""How many generated answers are degenerate: per model, column and split of a run (or every run of a
study), the share of greedy answers in which one word repeats three or more times in a row ("French
French French ..."), read from the generations the evaluation stored in RUN_DIR/stats/*.json (nothing
is run again), and the mean distinct-bigram share of those answers (1 - seq-rep-2,
``robust_unlearn.scoring.distinct_bigram_share``: the quantity the collapse guard's answer check reads).
Gradient-ascent-style forgetting can reach a low forget probability this way: the model
stops answering rather than answering like a model that never saw the forget set. The forget-probability
metrics, and the retain probability, do not see it.

    python evals/degenerate_answers.py RUN_OR_STUDY_DIR [--examples N]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robust_unlearn.scoring import distinct_bigram_share  # noqa: E402

REPEAT = re.compile(r"\b(\w+)(?:\W+\1\b){2,}", re.IGNORECASE)


def degenerate(text: str) -> bool:
    """One word three or more times in a row (case-insensitive, any separators between)."""
    return REPEAT.search(text) is not None


def answers(split: dict) -> dict[str, str]:
    g = split.get("generations") or {}
    return g if isinstance(g, dict) else {str(i): v for i, v in enumerate(g)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory")
    ap.add_argument("--examples", type=int, default=0, help="also print up to N degenerate answers per file")
    a = ap.parse_args()
    files = sorted(Path(a.directory).rglob("stats/*.json"))
    if not files:
        print(f"degenerate_answers: {a.directory}: no stats/*.json below it (expected a run or study directory)",
              file=sys.stderr)
        sys.exit(2)
    splits: list[str] = []
    rows = []
    for f in files:
        d = json.loads(f.read_text())
        cells = {}
        for name, s in d.items():
            texts = [str(t) for t in answers(s).values()] if isinstance(s, dict) else []
            if texts:
                bad = [t for t in texts if degenerate(t)]
                share = sum(map(distinct_bigram_share, texts)) / len(texts)
                cells[name] = (len(bad), len(texts), bad, share)
                if name not in splits:
                    splits.append(name)
        rows.append((f.parent.parent.relative_to(a.directory), f.stem, cells))
    print("Per split: degenerate answers / answers (their mean distinct-bigram share)\n")
    print("| run | model-checkpoint-eval[-column] | " + " | ".join(splits) + " |")
    print("|---|---|" + "---|" * len(splits))
    for run, stem, cells in rows:
        vals = [f"{cells[s][0]}/{cells[s][1]} ({cells[s][3]:.3f})" if s in cells else "" for s in splits]
        print(f"| {run} | {stem} | " + " | ".join(vals) + " |")
        for s in splits if a.examples else []:
            for t in cells.get(s, (0, 0, []))[2][: a.examples]:
                print(f"    {s}: {t[:100]!r}")


if __name__ == "__main__":
    main()
