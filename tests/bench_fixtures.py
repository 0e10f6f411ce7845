"""Small MUSE-News and WMDP fixtures written in the hub datasets' own layout and schema (parquet files
``<config>/<split>-00000-of-00001.parquet``), so the loaders read them exactly as they would read a
download. The text is synthetic (made up here), only the file format is the benchmarks'."""
from __future__ import annotations

import random
from pathlib import Path

TOWNS = ["Arlow", "Brenmoor", "Castlewick", "Dunmere", "Elford", "Farrowby", "Glenhurst", "Hollin"]
THINGS = ["a tram line", "a flood barrier", "a library", "a solar farm", "a harbour wall", "a school"]
PEOPLE = ["Mara Quill", "Tobias Fenn", "Ilse Varga", "Owen Hale", "Rhea Colter", "Dev Anand"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def article(rng: random.Random) -> tuple[str, dict]:
    town, thing, person, day = rng.choice(TOWNS), rng.choice(THINGS), rng.choice(PEOPLE), rng.choice(DAYS)
    cost = rng.randint(2, 90)
    text = (f"The council of {town} approved {thing} costing {cost} million pounds on {day}. "
            f"The plan was led by {person}, who said the work would start next spring. "
            f"Residents of {town} had asked for {thing} for many years, and {person} thanked them.")
    return text, {"town": town, "thing": thing, "person": person, "day": day, "cost": cost}


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def split_file(root: Path, config: str, split: str) -> Path:
    return root / config / f"{split}-00000-of-00001.parquet"


def write_muse(root: Path, seed: int = 0, n: int = 6) -> Path:
    """muse-bench/MUSE-News's configs and splits: raw (forget, retain1, retain2, holdout), verbmem
    (forget: prompt, gt), knowmem (forget_qa, retain_qa, *_icl: question, answer), privleak (forget,
    retain, holdout: text)."""
    rng = random.Random(seed)
    docs = {s: [article(rng) for _ in range(n)] for s in ("forget", "retain1", "retain2", "holdout")}
    for s, items in docs.items():
        write_parquet(split_file(root, "raw", s), [{"text": t} for t, _ in items])

    def qa(items):
        return [{"question": f"Who led the plan for {f['thing']} in {f['town']}?", "answer": f["person"]}
                for _, f in items]

    write_parquet(split_file(root, "knowmem", "forget_qa"), qa(docs["forget"][:4]))
    write_parquet(split_file(root, "knowmem", "forget_qa_icl"), qa(docs["forget"][4:]))
    write_parquet(split_file(root, "knowmem", "retain_qa"), qa(docs["retain1"][:4]))
    write_parquet(split_file(root, "knowmem", "retain_qa_icl"), qa(docs["retain1"][4:]))
    verb = []
    for t, _ in docs["forget"][:3]:
        words = t.split()
        verb.append({"prompt": " ".join(words[:8]), "gt": " ".join(words[8:])})
    write_parquet(split_file(root, "verbmem", "forget"), verb)
    for s, src in (("forget", "forget"), ("retain", "retain1"), ("holdout", "holdout")):
        write_parquet(split_file(root, "privleak", s), [{"text": t} for t, _ in docs[src][:4]])
    return root


def write_wmdp(root: Path, seed: int = 0, n: int = 5) -> tuple[Path, Path]:
    """-> (questions dir in cais/wmdp's layout: wmdp-bio / wmdp-cyber, split test, fields answer,
    question, choices; corpora dir in cais/wmdp-corpora's layout: cyber-forget-corpus,
    cyber-retain-corpus (split train, text), plus wikitext-2-raw-v1/test as the hub's wikitext)."""
    rng = random.Random(seed)
    questions, corpora = root / "wmdp", root / "corpora"
    for subset in ("wmdp-bio", "wmdp-cyber"):
        rows = []
        for i in range(n):
            _, f = article(rng)
            wrong = [p for p in PEOPLE if p != f["person"]][:3]
            choices = wrong[:]
            ans = i % 4
            choices.insert(ans, f["person"])
            rows.append({"answer": ans, "question": f"Who led the plan for {f['thing']} in {f['town']}?",
                         "choices": choices})
        write_parquet(split_file(questions, subset, "test"), rows)
    write_parquet(split_file(corpora, "cyber-forget-corpus", "train"),
                  [{"text": article(rng)[0]} for _ in range(n)] + [{"text": "too short"}])
    write_parquet(split_file(corpora, "cyber-retain-corpus", "train"), [{"text": article(rng)[0]} for _ in range(n)])
    wiki = [{"text": ""}, {"text": " = Valkyrie = \n"}] + [{"text": " " + article(rng)[0] + "\n"} for _ in range(n)]
    write_parquet(split_file(corpora, "wikitext-2-raw-v1", "test"), wiki)
    return questions, corpora
