"""Write a CPU-sized subset of TOFU (locuslab/TOFU) with TOFU's own file names and schema, for the
study of issue 12 on real TOFU text:

    python evals/tofu_subset.py --src ../shared/data/tofu --out /tmp/tofu_subset

- ``forget01.json``, ``forget01_perturbed.json``: TOFU's forget01 unchanged (2 authors, 40 QA pairs);
- ``retain99.json``: the first ``--retain-rows`` rows of retain99 (whole authors: 20 QA pairs each);
- ``full.json``: those retain rows followed by forget01, in TOFU's order (what the target trains on);
- ``retain_perturbed.json``: the rows of TOFU's retain_perturbed whose question is in the retain subset
  (so the retain metrics are on questions the target trained on, as in TOFU), at most ``--eval-rows``;
- ``real_authors_perturbed.json``, ``world_facts_perturbed.json``: their first ``--eval-rows`` rows.

Rows are copied byte for byte (JSON lines); nothing is written into the project.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--retain-rows", type=int, default=80, help="retain99 rows kept (multiple of 20: whole authors)")
    ap.add_argument("--eval-rows", type=int, default=40, help="rows of each evaluation-only file")
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    retain = read(src / "retain99.json")[: args.retain_rows]
    forget = read(src / "forget01.json")
    questions = {json.loads(r)["question"] for r in retain}
    files = {
        "forget01.json": forget,
        "forget01_perturbed.json": read(src / "forget01_perturbed.json"),
        "retain99.json": retain,
        "full.json": retain + forget,
        "retain_perturbed.json": [r for r in read(src / "retain_perturbed.json")
                                  if json.loads(r)["question"] in questions][: args.eval_rows],
        "real_authors_perturbed.json": read(src / "real_authors_perturbed.json")[: args.eval_rows],
        "world_facts_perturbed.json": read(src / "world_facts_perturbed.json")[: args.eval_rows],
    }
    for name, rows in files.items():
        (out / name).write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        print(f"{out / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
