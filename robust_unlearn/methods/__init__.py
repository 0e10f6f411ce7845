"""Training objectives: each is a small function ``loss(model, batches) -> scalar``.

``batches`` maps a data stream name (``train`` for fine-tuning; ``forget`` / ``retain`` for
unlearning) to a collated batch. The unlearning methods (``METHOD_NAMES``) are built by
:func:`build_objective` from a method name and its recipe settings (``config.method_settings``).
"""
from __future__ import annotations

from ..errors import UserError
from .losses import ALIASES, METHODS, NEEDS_REFERENCE, gdr, unlearning_objective
from .rmu import rmu_objective, set_trainable

# the base methods: the losses of ``losses.METHODS`` and RMU (``rmu``), objectives with one interface
BASES = tuple(METHODS) + ("RMU",)
# SURE_<base>: train only the salient modules (Zhang et al. 2024); Robust_<base>: SURE + the
# retain-protected sparse mask, null-space step and quantization-bin floor (``robust.update``)
WRAPPERS = ("SURE", "Robust")
METHOD_NAMES = BASES + tuple(f"{w}_{b}" for w in WRAPPERS for b in BASES)


def canonical_method(name: str) -> str:
    """An accepted alias (open-unlearning's ``GradAscent``, ``DPO``, ``CEU``; our former ``NPO_GDR``),
    also inside a wrapper (``SURE_GradAscent``), -> the method's name here; other names unchanged."""
    if not isinstance(name, str):
        return name
    for w in WRAPPERS:
        if name.startswith(w + "_") and name[len(w) + 1:] in ALIASES:
            return f"{w}_{ALIASES[name[len(w) + 1:]]}"
    return ALIASES.get(name, name)


def objective_spec(name: str) -> list:
    """What a method name computes (its forget loss and retain term), for checkpoint keys: a name whose
    meaning changes never reuses a checkpoint of the old meaning."""
    base = split_method(name)[1]
    return ["rmu", None] if base == "RMU" else list(METHODS[base])


def split_method(name: str) -> tuple[str | None, str]:
    """``"SURE_NPO_KLR"`` -> ``("SURE", "NPO_KLR")``; ``"GradDiff"`` -> ``(None, "GradDiff")``."""
    for w in WRAPPERS:
        if name.startswith(w + "_") and name[len(w) + 1:] in BASES:
            return w, name[len(w) + 1:]
    return None, name


def _needs_ref(name: str) -> bool:
    base = split_method(name)[1]
    return base == "RMU" or METHODS[base][0] in NEEDS_REFERENCE or METHODS[base][1] == "klr"


NEEDS_REF = {m for m in METHOD_NAMES if _needs_ref(m)}


def nll(model, batches):
    """Fine-tuning: mean token NLL of the answers of the ``train`` stream (question tokens masked)."""
    return gdr(model, batches["train"])


OBJECTIVES = {"nll": nll}


def get_objective(name: str):
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise UserError(f"unknown method '{name}' (expected one of: {', '.join(sorted(OBJECTIVES))})") from None


def check_method(name: str, where: str = "method") -> str:
    if name not in METHOD_NAMES:
        raise UserError(f"{where}: unknown method '{name}' (expected one of: {', '.join(METHOD_NAMES)})")
    return name


def build_objective(method: str, settings: dict, model, ref=None, seed: int = 0):
    """The objective of ``method`` with recipe settings ``settings`` (see ``config.method_settings``).
    Sets which parameters of ``model`` train: plain RMU the ``rmu_params`` regex, the others all
    (SURE / Robust choose theirs later, by saliency: ``robust.update.plan_update``)."""
    check_method(method)
    if method in NEEDS_REF and ref is None:
        raise ValueError(f"{method} needs the frozen reference model")
    wrapper, method = split_method(method)
    if method == "RMU" and wrapper is None:
        set_trainable(model, settings["rmu_params"])
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if method == "RMU":
        return rmu_objective(model, ref, layer=settings["rmu_layer"], steering=settings["rmu_steering"],
                             gamma=settings["gamma"], alpha=settings["alpha"], seed=seed)
    f_name = METHODS[method][0]
    hp = {"npo": {"beta": settings["npo_beta"]},
          "simnpo": {"beta": settings["simnpo_beta"], "delta": settings["simnpo_delta"]},
          "dpo": {"beta": settings["dpo_beta"]}, "undial": {"beta": settings["undial_beta"]},
          "wga": {"beta": settings["wga_beta"]},
          "satimp": {"beta1": settings["satimp_beta1"], "beta2": settings["satimp_beta2"]},
          "ceu": {"ignore_first": settings["ceu_ignore_first"]}}.get(f_name, {})
    return unlearning_objective(method, gamma=settings["gamma"], alpha=settings["alpha"], ref=ref,
                                kl_positions=settings["kl_positions"], **hp)
