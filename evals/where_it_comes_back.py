"""Where does a compression bring the forgotten answers back from? The forget answer probability of an
unlearned checkpoint with a compression applied to all of it, and to parts of it only: the modules the
update changed, the other modules, and inside the changed modules only the updated weights or only the
others (the part comes from the compressed copy of the whole model, so block scales are the real ones).

    python evals/where_it_comes_back.py CKPT TARGET [--columns nf4,prune30] [key=value ...]

The overrides pick the benchmark the checkpoint was unlearned on (e.g. ``seed=1 data.forget_split=forget30``).
"""
from __future__ import annotations

import argparse
import copy

import torch

from robust_unlearn.compress import compressible_linears, get_compression
from robust_unlearn.config import load_recipe
from robust_unlearn.data import load_benchmark
from robust_unlearn.models import load_model
from robust_unlearn.unlearn import answer_prob_probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("target")
    ap.add_argument("--columns", default="nf4,prune30")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()  # the documented order: CKPT TARGET --columns ... key=value ...
    cfg = load_recipe(None, a.overrides)
    bench = load_benchmark(cfg)
    model, tok = load_model(a.ckpt)
    target, _ = load_model(a.target)
    model.eval()
    probe = answer_prob_probe(cfg, bench, tok, "forget")
    tw = {n: lin.weight.detach().float() for n, lin in compressible_linears(target)}
    mw = {n: lin.weight.detach().float() for n, lin in compressible_linears(model)}
    updated = {n: mw[n] != tw[n] for n in mw}
    changed = {n for n, u in updated.items() if u.any()}
    print(f"{a.ckpt}: {len(changed)} changed modules, {sum(int(u.sum()) for u in updated.values())} updated weights; "
          f"forget probability uncompressed {probe(model):.3f}\n")
    print("| column | whole model | changed modules only | other modules only | updated weights only | "
          "changed modules' other weights only |")
    print("|---|---|---|---|---|---|")
    for col in a.columns.split(","):
        q = get_compression(col)(copy.deepcopy(model))
        qw = {n: lin.weight.detach().clone() for n, lin in compressible_linears(q)}

        def part(take) -> float:
            """The checkpoint with the compressed value wherever ``take(name)`` (a bool or a bool mask) is True."""
            m = copy.deepcopy(model)
            for n, lin in compressible_linears(m):
                sel = torch.as_tensor(take(n))
                lin.weight.data = torch.where(sel, qw[n].float(), mw[n]).to(lin.weight.dtype)
            return probe(m)

        cells = [probe(q),
                 part(lambda n: n in changed),
                 part(lambda n: n not in changed),
                 part(lambda n: updated[n]),
                 part(lambda n: ~updated[n] if n in changed else False)]
        print(f"| {col} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
