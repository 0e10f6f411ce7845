"""Is GPTQ (or AWQ) worse than round-to-nearest here? Held-out NLL of one checkpoint under RTN and GPTQ / AWQ
at the same group size, with RTN on the calibrated method's own grid and more calibration (issue 13's open line).

    python evals/gptq_vs_rtn.py TARGET_DIR --tofu ../shared/data/tofu [--method gptq|awq] [--group 64] \
        [--samples 64] [--length 256] [--calibrations builtin,tofu] [recipe overrides, e.g.
        sweep.calibration.awq_n_grid=20 sweep.calibration.awq_duo_scaling=false sweep.calibration.weight_observer=mse]

Columns (all W4, group ``--group``, lm_head kept, the model evaluated in fp32):
- ``rtn4-gG``: this project's RTN, Zhang et al.'s 17-level grid [-8, 8] x absmax / 8 (``quant/rtn.py``);
- ``rtn-ct``: round-to-nearest on GPTQ's grid, llm-compressor's ``QuantizationModifier`` with the same
  symmetric int4 group scheme as the GPTQ column ([-8, 7]; scales from the recipe's
  ``sweep.calibration.weight_observer``, as GPTQ's), no calibration: the like-for-like baseline of GPTQ's
  error feedback;
- with ``--method awq`` the same columns for AWQ: ``rtn-ct`` on AWQ's grid (asymmetric int4 groups with a
  zero point, [0, 15]) and AWQ (``n_grid`` of the recipe) in place of GPTQ;
- ``gptq (built-in)``: GPTQ calibrated as a sweep of the built-in benchmark calibrates it, on the
  ``train_target`` split (all of its text: 14 x 256 tokens);
- ``gptq (TOFU retain)``: GPTQ on ``--samples`` x ``--length`` tokens of TOFU's retain90 QA pairs in the
  model's prompt format (the issue's 64 x 256).
``--calibrations`` picks which of the last two run; the quantizers' settings (AWQ's ``n_grid`` and duo
scaling, GPTQ's dampening, the weight observer) are the recipe's ``sweep.calibration``, overridable on the
command line. Evaluated on the built-in holdout split (18 questions no model trained on) and on the first
200 pairs of TOFU's forget10 (text this model never saw, disjoint from retain90), per question: the mean
answer NLL, and the mean KL(fp32 || quantized) of the next-token distributions over the answer's tokens
(how far quantization moved the predictions; the NLL of a target fine-tuned for epochs can improve under
quantization noise, the KL cannot). Further tables give each column's per-question difference from RTN on
the calibrated method's grid, and each calibrated column's from ``rtn4-gG``, in NLL and in KL, with its 95%
t-interval over questions (paired).
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robust_unlearn.compress import get_compression  # noqa: E402
from robust_unlearn.config import load_recipe  # noqa: E402
from robust_unlearn.data import calibration_samples, load_benchmark  # noqa: E402
from robust_unlearn.data.collate import formatter_for  # noqa: E402
from robust_unlearn.models import load_model  # noqa: E402
from robust_unlearn.quant import parse_format  # noqa: E402
from robust_unlearn.quant.calibrated import Calibration, _args, _cpu_safe, _quiet, load_dequantized, quantizer_settings  # noqa: E402
from robust_unlearn.report import interval  # noqa: E402
from robust_unlearn.data.collate import IGNORE  # noqa: E402
from robust_unlearn.scoring import answer_logits, qa_pass  # noqa: E402


def nll(model, fmt, pairs, batch) -> np.ndarray:
    """Mean answer NLL of each (question, answer)."""
    return np.asarray(qa_pass(model, fmt, pairs, [], batch)[0], dtype=np.float64)


@torch.no_grad()
def kl_to(model, ref, fmt, pairs, batch) -> np.ndarray:
    """Per (question, answer): the mean over its answer tokens of KL(p_ref || p_model), the next-token
    distributions of ``ref`` (fp32) and ``model`` (quantized) teacher-forced on the same answer. How far
    quantization moved the model's predictions, whatever the answer's likelihood: unlike the NLL, it
    cannot improve when a quantizer's noise happens to help on held-out text."""
    out = []
    for i in range(0, len(pairs), batch):
        b = fmt.collate([fmt.encode(q, a) for q, a in pairs[i: i + batch]])
        lq, target = answer_logits(model, b)
        lr, _ = answer_logits(ref, b)
        lr, lq = F.log_softmax(lr, -1), F.log_softmax(lq, -1)
        kl = (lr.exp() * (lr - lq)).sum(-1)
        mask = target != IGNORE
        out += ((kl * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    return np.asarray(out, dtype=np.float64)


def rtn_on_grid(model, fmt_name: str, observer: str = "minmax"):
    """llm-compressor's data-free W4A16 on ``fmt_name``'s grid (gptq: symmetric int4 groups; awq:
    asymmetric with a zero point; scales from the recipe's weight observer), saved compressed and loaded
    back dequantized, as the calibrated columns are."""
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    _quiet()
    fmt = parse_format(fmt_name)
    scheme = {"group_0": QuantizationScheme(targets=["Linear"], weights=_args(fmt, observer))}
    with _cpu_safe():
        oneshot(model=model, recipe=[QuantizationModifier(config_groups=scheme, ignore=["lm_head"])])
    tmp = tempfile.mkdtemp(prefix="rtn-ct-")
    try:
        model.save_pretrained(tmp, save_compressed=True)
        return load_dequantized(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target")
    ap.add_argument("--tofu", required=True, help="a TOFU directory (retain90.json, forget10.json)")
    ap.add_argument("--method", choices=["gptq", "awq"], default="gptq")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--calibrations", default="builtin,tofu", help="which calibrated columns: builtin, tofu")
    ap.add_argument("overrides", nargs="*", help="recipe overrides (sweep.calibration.*)")
    a = ap.parse_intermixed_args()
    cfg = load_recipe(None, a.overrides)
    bench = load_benchmark(cfg)
    model, tok = load_model(a.target)
    fmt = formatter_for(tok, cfg)
    bs = cfg["eval"]["batch_size"]
    read = lambda f: [json.loads(x) for x in (Path(a.tofu) / f).read_text().splitlines() if x.strip()]  # noqa: E731
    tofu_eval = [(r["question"], r["answer"]) for r in read("forget10.json")[:200]]
    holdout = [(r["question"], r["answer"]) for r in bench["holdout"]]
    # calibration 1: the built-in benchmark's train_target split, as the sweep would take it
    c1 = load_recipe(None, a.overrides + ["sweep.calibration.split=train_target", f"sweep.calibration.samples={a.samples}",
                                          f"sweep.calibration.length={a.length}"])
    s1, src1 = calibration_samples(c1, bench, tok)
    # calibration 2: TOFU retain90 pairs in the model's prompt format, concatenated and cut
    stream = [t for r in read("retain90.json") for t in fmt.encode(r["question"], r["answer"])[0]]
    s2 = [stream[i * a.length:(i + 1) * a.length] for i in range(a.samples)]
    cal = cfg["sweep"]["calibration"]
    which = set(a.calibrations.split(","))
    g = a.group
    fname = f"{a.method}4-g{g}"
    grid = "GPTQ's grid, symmetric" if a.method == "gptq" else "AWQ's grid, asymmetric"
    cols = [("fp32", lambda m: m),
            (f"rtn4-g{g} (17 levels)", lambda m: get_compression(f"rtn4-g{g}")(m)),
            (f"rtn-ct int4-g{g} ({grid})", lambda m: rtn_on_grid(m, fname, cal["weight_observer"])),
            (f"{fname}, {src1}", lambda m: get_compression(fname, Calibration.of(cal, s1, src1))(m)),
            (f"{fname}, TOFU retain90 {len(s2)}x{a.length} tokens",
             lambda m: get_compression(fname, Calibration.of(cal, s2, "tofu retain90"))(m))]
    cols = cols[:3] + [c for c, k in zip(cols[3:], ("builtin", "tofu")) if k in which]
    quantizer = quantizer_settings(cal)
    print(f"{a.target}; NLL per question: built-in holdout ({len(holdout)}), TOFU forget10 ({len(tofu_eval)}); "
          f"{quantizer}\n")
    print("| column | holdout NLL | vs fp32 | TOFU forget10 NLL | vs fp32 | KL to fp32, holdout | KL, TOFU | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    per = {}  # column -> (holdout NLLs, TOFU NLLs), per question
    kls = {}  # column -> (holdout KLs, TOFU KLs) to the fp32 model, per question
    for name, fn in cols:
        start = time.time()
        m = fn(copy.deepcopy(model))
        per[name] = (nll(m, fmt, holdout, bs), nll(m, fmt, tofu_eval, bs))
        kls[name] = (kl_to(m, model, fmt, holdout, bs), kl_to(m, model, fmt, tofu_eval, bs))
        h, t = (x.mean() for x in per[name])
        h_fp, t_fp = (x.mean() for x in per[cols[0][0]])  # the first column is fp32
        kh, kt = (x.mean() for x in kls[name])
        print(f"| {name} | {h:.4f} | {h - h_fp:+.4f} | {t:.4f} | {t - t_fp:+.4f} | {kh:.4f} | {kt:.4f} | "
              f"{time.time() - start:.0f} |", flush=True)
        del m
    # the calibrated columns against RTN on their own grid (and against this project's rtn4), question by
    # question: is the difference more than the spread over questions? (paired; mean [95% t-interval];
    # negative: the calibrated column better / closer to fp32)
    grid_rtn, rtn4 = cols[2][0], cols[1][0]
    for what, values, better in (("NLL", per, "better"), ("KL to fp32", kls, "closer to fp32")):
        for ref, others in ((grid_rtn, [c for c, _ in cols[1:] if c != grid_rtn]), (rtn4, [c for c, _ in cols[3:]])):
            if not others:
                continue
            print(f"\n{what} per question, minus `{ref}`'s (paired; mean [95% t-interval]; negative: {better}):\n")
            print("| column | holdout | TOFU forget10 |")
            print("|---|---|---|")
            for name in others:
                cells = []
                for k in (0, 1):
                    m_, lo, hi, _, _ = interval(list(values[name][k] - values[ref][k]))
                    cells.append(f"{m_:+.4f} [{lo:+.4f}, {hi:+.4f}]")
                print(f"| {name} | {cells[0]} | {cells[1]} |")

if __name__ == "__main__":
    main()
