"""Answer probability of one checkpoint under each compression (a quick look before the sweep of
issue 3 exists): loads the checkpoint once per column, compresses it in memory, scores forget and
retain answer probability on the recipe's benchmark.

    python evals/compress_checkpoint.py CKPT_DIR none,nf4,rtn4-g128,prune20,prune30 [key=value ...]
"""
import copy
import sys
import time

from robust_unlearn.compress import get_compression
from robust_unlearn.config import load_recipe
from robust_unlearn.data import load_benchmark
from robust_unlearn.data.collate import formatter_for
from robust_unlearn.metrics.tofu import Evaluator
from robust_unlearn.models import load_model


def main(ckpt: str, columns: list[str], overrides: list[str]) -> None:
    cfg = load_recipe(None, overrides)
    bench = load_benchmark(cfg)
    model, tok = load_model(ckpt)
    ev = Evaluator(formatter_for(tok, cfg), cfg["eval"]["batch_size"])
    fns = {c: get_compression(c) for c in columns}  # unknown names fail before any work
    for col, fn in fns.items():
        t0 = time.time()
        m = fn(copy.deepcopy(model))
        out = {s: ev.split_stats(m, bench[s], s, with_rouge=False).prob.mean() for s in ("forget", "retain")}
        print(f"{col:>10}: forget_Q_A_Prob {out['forget']:.3f}  retain_Q_A_Prob {out['retain']:.3f}  ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python evals/compress_checkpoint.py CKPT_DIR col1,col2,... [key=value ...]")
    main(sys.argv[1], sys.argv[2].split(","), sys.argv[3:])
