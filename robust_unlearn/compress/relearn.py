"""The relearning attack as sweep columns: k optimizer steps of fine-tuning (the project's one training
loop, the NLL objective) from the checkpoint, then the evaluation (Hu et al. 2024, "Jogging the
memory of unlearned LLMs through targeted relearning attacks"; Lynch et al. 2024).

- ``relearn-retain``: fine-tune on the retain training rows only. Forget probability that comes back
  was hidden, not removed: these rows say nothing about the forget set.
- ``relearn-forget``: fine-tune on one half of the forget set (its even rows) and evaluate the forget
  metrics on the other half (the odd rows; ``eval_bench``), so what is measured is knowledge the
  attack did not show the model. Its full-precision comparison is the same half
  (``forget_half``).

Every model goes through both, the retain oracle included: the oracle's value is what relearning
achieves on a model that never knew the answers. Settings: ``sweep.relearn`` (steps, lr,
batch_size, precision), recorded in each ledger row's column name (the cell's settings) by the sweep.
"""
from __future__ import annotations

from dataclasses import dataclass

RELEARN = ("relearn-retain", "relearn-forget")


@dataclass
class RelearnData:
    """What the relearning columns train on: the recipe (``cfg``), the benchmark and the tokenizer."""
    cfg: dict
    bench: object
    tok: object


def forget_half(rows, part: int):
    """Rows ``part``::2 of a split (0: the attack's half, 1: the evaluated half)."""
    return rows.select(range(part, len(rows), 2))


def eval_bench(name: str, bench):
    """The benchmark a column is evaluated on: for ``relearn-forget`` the forget split is its second
    half; every other column sees the whole benchmark."""
    if name != "relearn-forget" or "forget" not in bench:
        return bench
    import datasets

    return datasets.DatasetDict({**bench, "forget": forget_half(bench["forget"], 1)})


def train_settings(cfg: dict) -> dict:
    """The training loop's settings for the attack (``sweep.relearn``): a constant lr, no warm-up."""
    r = cfg["sweep"]["relearn"]
    return {"lr": r["lr"], "batch_size": r["batch_size"], "steps": r["steps"], "epochs": 1.0,
            "weight_decay": 0.0, "warmup_ratio": 0.0, "schedule": "constant", "precision": r["precision"],
            "grad_clip": 1.0}


def relearn(model, name: str, data: RelearnData | None):
    """``sweep.relearn.steps`` optimizer steps of NLL fine-tuning of ``model`` (in place) on the
    column's rows -> the model, in eval mode and fp32."""
    from ..errors import UserError

    if data is None:
        raise UserError(f"column '{name}' needs the benchmark's rows (the sweep provides them)")
    import torch

    from ..data import dataset_for, retain_rows
    from ..methods import get_objective
    from ..train import train

    bench = data.bench
    rows = retain_rows(bench) if name == "relearn-retain" else forget_half(bench["forget"], 0)
    if len(rows) == 0:
        raise UserError(f"column '{name}': the benchmark has no rows to relearn on")
    for p in model.parameters():
        p.requires_grad_(True)
    emb = model.get_input_embeddings()
    if emb is not None:  # as the target's fine-tune: the (tied) token embeddings stay fixed
        emb.weight.requires_grad_(False)
    ds = dataset_for(data.cfg, rows, data.tok)
    model, _ = train(model, get_objective("nll"), {"train": ds}, train_settings(data.cfg),
                     seed=data.cfg["seed"], desc=name)
    model.to(torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
