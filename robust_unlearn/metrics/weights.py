"""The weight audit: where an unlearning update went, per module type, measured against the NF4
grid, with the code-flip rate under every requested format (``quant``: the codes and bins the floor
itself uses, so a floored checkpoint's flip rates are its guarantee).
"""
from __future__ import annotations

import torch

from ..compress import compressible_linears
from ..quant import bin_width, codes, parse_format
from ..weight_stats import kth_quantile

MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj`` (the last name component)."""
    return name.rsplit(".", 1)[-1]


@torch.no_grad()
def audit(before: dict[str, torch.Tensor], model, top_dw: float = 0.01, bottom_w: float = 0.10,
          saved_dtype: torch.dtype | None = None, formats=("nf4",)) -> dict[str, dict]:
    """Per module type (q/k/v/o, gate/up/down; others by their own name) of ``model``'s linear
    weights against ``before`` (the target's, name -> tensor, rounded to ``saved_dtype``, the dtype the
    checkpoint was saved in, default the model's):

    - ``mean_abs_dw``: mean |w - w_target| over all weights of the type;
    - ``dw_over_nf4_bin``: mean |dw| / NF4 bin width of the target weight (Zhang et al. 2024 report
      1/47..1/828 for published 8B unlearning runs);
    - ``frac_changed``: fraction of weights that differ at all;
    - ``flip_rate``: among the changed weights, the fraction whose NF4 code index differs (each
      checkpoint quantized with its own block scales) — 1.0 means every update survives NF4;
    - ``flip_rates``: the same per format of ``formats`` (names of ``quant``; nf4 always);
    - ``enrichment``: share of the top-``top_dw`` |dw| weights that lie in the bottom-``bottom_w``
      |w_target| of the type, divided by ``bottom_w`` (1 = no preference; > 1: the update sits on
      small weights, the ones magnitude pruning removes).
    """
    names = list(dict.fromkeys(["nf4"] + [parse_format(f).name for f in formats]))
    acc: dict[str, dict[str, list]] = {}
    for name, mod in compressible_linears(model):
        key = f"{name}.weight"
        if key not in before:
            continue
        # the target as the checkpoint's dtype holds it: a bf16 checkpoint is compared with the target
        # rounded to bf16 (that rounding alone moves nearly every weight by up to half an ulp)
        w0 = before[key].detach().to(saved_dtype or mod.weight.dtype).float().cpu()
        w1 = mod.weight.detach().float().cpu()
        dw = (w1 - w0).abs()
        d = acc.setdefault(module_type(name), {"w0": [], "dw": [], "ratio": [], **{f: [] for f in names}})
        d["w0"].append(w0.abs().reshape(-1))
        d["dw"].append(dw.reshape(-1))
        d["ratio"].append((dw / bin_width(w0, "nf4")).reshape(-1))
        for f in names:
            d[f].append((codes(w0, f) != codes(w1, f)).reshape(-1))
    out = {}
    order = [t for t in MODULE_TYPES if t in acc] + sorted(t for t in acc if t not in MODULE_TYPES)
    for t in order:
        w0, dw, ratio = (torch.cat(acc[t][k]) for k in ("w0", "dw", "ratio"))
        changed = dw > 0
        n_changed = int(changed.sum())
        rates = {f: float(torch.cat(acc[t][f])[changed].float().mean()) if n_changed else float("nan") for f in names}
        row = {"params": dw.numel(), "mean_abs_dw": float(dw.mean()), "dw_over_nf4_bin": float(ratio.mean()),
               "frac_changed": n_changed / dw.numel(), "flip_rate": rates["nf4"], "flip_rates": rates,
               "enrichment": float("nan")}
        if n_changed:
            top = dw >= max(kth_quantile(dw, 1 - top_dw), 1e-30)
            small = w0 <= kth_quantile(w0, bottom_w)
            row["enrichment"] = float((top & small).sum()) / max(int(top.sum()), 1) / bottom_w
        out[t] = row
    return out


def audit_table(rows: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per (checkpoint, module type). ``rows``: checkpoint label -> ``audit(...)``."""
    names = list(dict.fromkeys(f for per in rows.values() for r in per.values() for f in r.get("flip_rates", {"nf4": 0})))
    names = names or ["nf4"]
    heads = " | ".join(f"{'NF4' if f == 'nf4' else f} flip rate (changed)" for f in names)
    lines = [f"| checkpoint | module | params | mean abs dw | dw / NF4 bin | changed | {heads} | "
             "top-1% dw in bottom-10% w (enrichment) |", "|---|---|---|---|---|---|" + "---|" * len(names) + "---|"]
    for label, per in rows.items():
        if not per:
            lines.append(f"| {label} | (no linear weight changed) | | | | | " + "| " * len(names) + "|")
        for t, r in per.items():
            rates = r.get("flip_rates", {"nf4": r["flip_rate"]})
            flips = " | ".join("–" if r["frac_changed"] == 0 or f not in rates else f"{rates[f]:.3f}" for f in names)
            enr = "–" if r["frac_changed"] == 0 else f"{r['enrichment']:.2f}x"
            lines.append(f"| {label} | {t} | {r['params']:,} | {r['mean_abs_dw']:.2e} | {r['dw_over_nf4_bin']:.4f} | "
                         f"{r['frac_changed']:.4f} | {flips} | {enr} |")
    return "\n".join(lines)
