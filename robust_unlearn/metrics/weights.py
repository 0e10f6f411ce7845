"""The weight audit: where an unlearning update went, per module type, measured against the NF4
grid (``weight_stats``: the NF4 bins and codes, ``update_stats``, ``kth_quantile``).
"""
from __future__ import annotations

import torch

from ..compress import compressible_linears
from ..weight_stats import kth_quantile, nf4_bin_width, nf4_codes

MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj`` (the last name component)."""
    return name.rsplit(".", 1)[-1]


@torch.no_grad()
def audit(before: dict[str, torch.Tensor], model, top_dw: float = 0.01, bottom_w: float = 0.10,
          saved_dtype: torch.dtype | None = None) -> dict[str, dict]:
    """Per module type (q/k/v/o, gate/up/down; others by their own name) of ``model``'s linear
    weights against ``before`` (the target's, name -> tensor, rounded to ``saved_dtype``, the dtype the
    checkpoint was saved in, default the model's):

    - ``mean_abs_dw``: mean |w - w_target| over all weights of the type;
    - ``dw_over_nf4_bin``: mean |dw| / NF4 bin width of the target weight (Zhang et al. 2024 report
      1/47..1/828 for published 8B unlearning runs);
    - ``frac_changed``: fraction of weights that differ at all;
    - ``flip_rate``: among the changed weights, the fraction whose NF4 code index differs (each
      checkpoint quantized with its own block scales) — 1.0 means every update survives NF4;
    - ``enrichment``: share of the top-``top_dw`` |dw| weights that lie in the bottom-``bottom_w``
      |w_target| of the type, divided by ``bottom_w`` (1 = no preference; > 1: the update sits on
      small weights, the ones magnitude pruning removes).
    """
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
        d = acc.setdefault(module_type(name), {"w0": [], "dw": [], "ratio": [], "flip": []})
        d["w0"].append(w0.abs().reshape(-1))
        d["dw"].append(dw.reshape(-1))
        d["ratio"].append((dw / nf4_bin_width(w0)).reshape(-1))
        d["flip"].append((nf4_codes(w0) != nf4_codes(w1)).reshape(-1))
    out = {}
    order = [t for t in MODULE_TYPES if t in acc] + sorted(t for t in acc if t not in MODULE_TYPES)
    for t in order:
        w0, dw, ratio, flip = (torch.cat(acc[t][k]) for k in ("w0", "dw", "ratio", "flip"))
        changed = dw > 0
        n_changed = int(changed.sum())
        row = {"params": dw.numel(), "mean_abs_dw": float(dw.mean()), "dw_over_nf4_bin": float(ratio.mean()),
               "frac_changed": n_changed / dw.numel(),
               "flip_rate": float(flip[changed].float().mean()) if n_changed else float("nan"),
               "enrichment": float("nan")}
        if n_changed:
            top = dw >= max(kth_quantile(dw, 1 - top_dw), 1e-30)
            small = w0 <= kth_quantile(w0, bottom_w)
            row["enrichment"] = float((top & small).sum()) / max(int(top.sum()), 1) / bottom_w
        out[t] = row
    return out


def audit_table(rows: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per (checkpoint, module type). ``rows``: checkpoint label -> ``audit(...)``."""
    lines = ["| checkpoint | module | params | mean abs dw | dw / NF4 bin | changed | NF4 flip rate (changed) | "
             "top-1% dw in bottom-10% w (enrichment) |", "|---|---|---|---|---|---|---|---|"]
    for label, per in rows.items():
        if not per:
            lines.append(f"| {label} | (no linear weight changed) | | | | | | |")
        for t, r in per.items():
            flip = "–" if r["frac_changed"] == 0 else f"{r['flip_rate']:.3f}"
            enr = "–" if r["frac_changed"] == 0 else f"{r['enrichment']:.2f}x"
            lines.append(f"| {label} | {t} | {r['params']:,} | {r['mean_abs_dw']:.2e} | {r['dw_over_nf4_bin']:.4f} | "
                         f"{r['frac_changed']:.4f} | {flip} | {enr} |")
    return "\n".join(lines)
