"""Fine-tune one reference model (target or oracle) under a recipe + overrides and print its
forget / retain answer probability and ROUGE, with the training time. Used to calibrate the
built-in default's fine-tuning regime (see evals/README.md). Nothing is cached or written.

    python evals/finetune_regime.py target finetune.lr=3e-4 finetune.epochs=8
"""
import sys
import time

from robust_unlearn.config import cache_dir, load_recipe
from robust_unlearn.data import load_benchmark, target_texts
from robust_unlearn.data.collate import QADataset, formatter_for
from robust_unlearn.methods import get_objective
from robust_unlearn.metrics.tofu import Evaluator
from robust_unlearn.models import load_model, resolve_base
from robust_unlearn.train import train


def main(role: str, overrides: list[str]) -> None:
    cfg = load_recipe(None, overrides)
    bench = load_benchmark(cfg)
    base = resolve_base(cfg["model"]["base"], cache_dir(cfg), target_texts(bench), cfg["seed"])
    model, tok = load_model(str(base))
    if cfg["finetune"]["freeze_embeddings"]:
        model.get_input_embeddings().weight.requires_grad_(False)
    fmt = formatter_for(tok, cfg)
    t0 = time.time()
    model, losses = train(model, get_objective("nll"), {"train": QADataset(bench[f"train_{role}"], fmt)},
                          cfg["finetune"], seed=cfg["seed"], desc=role)
    train_s = time.time() - t0
    metrics, _ = Evaluator(fmt, cfg["eval"]["batch_size"], cfg["eval"]["max_new_tokens"]).evaluate(
        model, bench, splits=("forget", "retain"))
    print(f"{role} {' '.join(overrides) or '(default)'}: train {train_s:.0f}s, final loss {losses[-1]:.3f}, "
          f"forget_Q_A_Prob {metrics['forget_Q_A_Prob']:.3f}, forget_Q_A_ROUGE {metrics['forget_Q_A_ROUGE']:.3f}, "
          f"retain_Q_A_Prob {metrics['retain_Q_A_Prob']:.3f}, retain_Q_A_ROUGE {metrics['retain_Q_A_ROUGE']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("target", "oracle"):
        sys.exit("usage: python evals/finetune_regime.py target|oracle [key=value ...]")
    main(sys.argv[1], sys.argv[2:])
