"""`robust-unlearn plan` against measured peaks: each configuration runs three unlearning steps in a
fresh process and its peak memory is compared with the plan's.

    python evals/plan_check.py                                  # the tiny Llama (hidden 256, 4 layers)
    python evals/plan_check.py --model ~/.cache/robust_unlearn/models/target-...   # SmolLM2-135M
    python evals/plan_check.py --model-config cfg.json          # random weights of any Llama config (GPU)

Measured: the rise from before the model is built to the high-water mark over the steps, which is
reset after the setup (model, cast, saliency pass, adapters, reference copies) so that its transients
do not count: on the CPU the process's resident set (Linux VmHWM; glibc maps every allocation over 64 KiB
so that freed tensors leave the resident set), on a GPU ``torch.cuda.max_memory_allocated``. The steps are the
training loop's (``build_objective``, the shared reference, AdamW with the recipe's settings, gradient
clipping, gradients set to None after the step); the batches are random token ids, ``--rows`` rows of
``--length`` tokens per stream with the answer labels on the second half and one row half padding (so
attention takes the padding-mask path, as with real batches). SURE_ trains the modules its saliency
chooses on the forget batch; the plan assumes the largest (an upper bound). Robust_ runs the training
loop's own step protocol (``robust.update.SparseUpdate``: masks on those modules, the null-space split,
``robust_qat``'s parametrizations and ``robust_prune_view``'s pruned view) with its shipped settings and
with both options off. Prints one row per configuration and the largest |plan / measured - 1|.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robust_unlearn.plan import Setup, plan_method, shape_of  # noqa: E402

GiB = 1024 ** 3
CONFIGS = [  # method, precision, lora r, gradient checkpointing[, Robust_ options over the method's settings]
    ("GradDiff", "fp32", 0, False), ("GradDiff", "bf16", 0, False), ("GradDiff", "fp32", 0, True),
    ("NPO", "fp32", 0, False), ("NPO_KLR", "bf16", 0, False), ("SimNPO", "bf16", 0, False),
    ("SURE_GradDiff", "fp32", 0, False), ("GradDiff", "fp32", 16, False), ("NPO", "bf16", 16, False),
    # Robust_GradDiff's step (the null-space split, the masks' hooks): its shipped settings (robust_qat and
    # robust_prune_view on), then with both off (the real-model recipes' setting)
    ("Robust_GradDiff", "fp32", 0, False, {}),
    ("Robust_GradDiff", "fp32", 0, False, {"robust_qat": False, "robust_prune_view": 0.0}),
]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _settings(method: str, lora: int, options: dict | None = None) -> dict:
    """The method's shipped settings (``unlearn.per_method`` applied), then ``options``."""
    from robust_unlearn.config import DEFAULTS, method_settings

    s = {**method_settings(DEFAULTS, method), **(options or {})}
    s["lora"] = {**s["lora"], "r": lora, "alpha": 2.0 * lora if lora else s["lora"]["alpha"]}
    return s


def _batch(vocab: int, rows: int, length: int, seed: int, device) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, : length // 2] = 0  # one left-padded row
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def _model(args, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.model:  # built, then filled: weights in anonymous memory (not pages of the mmapped file)
        from safetensors.torch import load_file

        conf = AutoConfig.from_pretrained(args.model)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
        state = load_file(str(Path(args.model) / "model.safetensors"), device=str(device))
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        del state
        return model
    if args.model_config:
        conf = AutoConfig.from_pretrained(args.model_config)
    else:
        from robust_unlearn.models import tiny_config

        conf = tiny_config(args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                           num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                           num_key_value_heads=max(1, args.hidden // 128), tie_word_embeddings=True)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(conf, dtype=torch.float32)


def measure(job: dict, args) -> dict:
    from robust_unlearn.methods import build_objective, split_method
    from robust_unlearn.methods.losses import gdr
    from robust_unlearn.robust.saliency import forget_scores, linear_weights, salient_modules
    from robust_unlearn.unlearn import SharedReference

    method, precision, lora, ckpt = job["method"], job["precision"], job["lora"], job["ckpt"]
    options = job.get("options") or {}
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status("VmRSS")
    model = _model(args, device)
    if precision == "bf16":
        model.to(torch.bfloat16)
    model.train()
    vocab = model.config.vocab_size
    batches = {"forget": _batch(vocab, args.rows, args.length, 0, device),
               "retain": _batch(vocab, args.rows, args.length, 1, device)}
    st = _settings(method, lora, options)
    wrapper, base_method = split_method(method)
    salient = None
    if wrapper in ("SURE", "Robust"):
        obj0 = build_objective(base_method, st, model, ref=model)
        sal, _ = forget_scores(model, obj0.forget_loss, [batches["forget"]], attribution=False)
        salient = salient_modules(sal, st["sure_percentile"])
        model.zero_grad(set_to_none=True)
    ref = None
    if lora:
        from robust_unlearn.lora import AdapterOff, add_adapters, target_modules

        model = add_adapters(model, st, target_modules(model, st))
        ref = AdapterOff(model)
        objective = build_objective(method, st, model, ref=ref)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        from robust_unlearn.methods import NEEDS_REF

        ref = SharedReference(model, None) if method in NEEDS_REF else None
        objective = build_objective(method, st, model, ref=ref)
        if salient is not None:
            for p in model.parameters():
                p.requires_grad_(False)
            lin = linear_weights(model)
            for n in salient:
                lin[n].requires_grad_(True)
        if ref is not None:
            ref.freeze()
    proto = None
    if wrapper == "Robust":  # the training loop's step protocol, as plan_update builds it (the masks: the
        # robust_topk share of the salient weights at random, which does not change the bytes held)
        from robust_unlearn.robust.update import SparseUpdate

        g = torch.Generator().manual_seed(0)
        lin = linear_weights(model)
        masks = {n: torch.rand(lin[n].shape, generator=g).to(device) < float(st["robust_topk"]) for n in salient}
        proto = SparseUpdate.robust(model, masks, st)
        proto.start()
    if ckpt:
        from robust_unlearn.train import set_checkpointing

        set_checkpointing(model, True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=st["weight_decay"], eps=st["adam_eps"])
    if proto is not None:
        from accelerate import Accelerator

        from robust_unlearn.engine import Engine

        proto.attach(Engine(Accelerator(cpu=not cuda), model, opt))
    del gdr
    if cuda:  # the peak := now (setup's transients out: the fp32 -> bf16 cast, the saliency pass)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # high-water mark := now (setup's transients out)
    for i in range(3):
        if os.environ.get("PLAN_CHECK_TRACE") and not cuda:
            print(f"step {i}: rss {(_status('VmRSS') - base) / GiB:.3f} hwm {(_status('VmHWM') - base) / GiB:.3f}",
                  file=sys.stderr)
        if proto is not None:  # forward (its views, the forget gradients), backward, step, mask, as in train
            proto.forward(objective, model, batches)
            proto.update(params, 1.0)
            continue
        loss = objective(model, batches)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status("VmHWM") - base
    return {"peak": peak, "trained": sum(p.numel() for p in params)}


def planned(job: dict, args) -> dict:
    from robust_unlearn.models import model_on_meta

    with torch.device("meta"):
        if args.model or args.model_config:
            from transformers import AutoConfig

            conf = AutoConfig.from_pretrained(args.model or args.model_config)
            model = model_on_meta(conf)
        else:
            model = _model(args, "meta")
    shape = shape_of(model, "")
    setup = Setup(gpus=1, precision=job["precision"], batch_size=args.rows, seq_len=args.length,
                  scored_len=args.length // 2 + 1, checkpointing=job["ckpt"], reference="shared", lora_r=job["lora"])
    return plan_method(shape, job["method"], _settings(job["method"], job["lora"], job.get("options")), setup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a checkpoint directory (its weights are loaded)")
    ap.add_argument("--model-config", help="a config.json or directory: random weights of that architecture")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--only", help="comma-separated indices of CONFIGS to run")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(json.loads(args.child), args)))
        return
    rows = []
    todo = [CONFIGS[int(i)] for i in args.only.split(",")] if args.only else CONFIGS
    for method, precision, lora, ckpt, *options in todo:
        job = {"method": method, "precision": precision, "lora": lora, "ckpt": ckpt, "options": options[0] if options else {}}
        cmd = [sys.executable, __file__, "--child", json.dumps(job)] + \
              [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "only", "json") and v is not None]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:  # e.g. out of memory on a GPU: reported, the others still run
            print(f"{job} failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}",
                  flush=True)
            continue
        got = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])
        plan = planned(job, args)
        rows.append({**job, "measured": got["peak"], "planned": plan["peak"], "trained": got["trained"],
                     "planned_trained": plan["trained_params"]})
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (resident-set rise)"
    name = args.model or args.model_config or f"tiny Llama hidden {args.hidden} x {args.layers}, vocab {args.vocab}"
    print(f"\n{name}; {args.rows} rows x {args.length} tokens per stream; {dev}\n")
    print("| method | precision | LoRA r | checkpointing | options | trained (measured / planned) | measured GiB | planned GiB | planned / measured |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        opts = ", ".join(f"{k} {v}" for k, v in r["options"].items()) or "-"
        print(f"| {r['method']} | {r['precision']} | {r['lora'] or '-'} | {'on' if r['ckpt'] else 'off'} | {opts} | "
              f"{r['trained'] / 1e6:.2f}M / {r['planned_trained'] / 1e6:.2f}M | {r['measured'] / GiB:.3f} | "
              f"{r['planned'] / GiB:.3f} | {r['planned'] / r['measured']:.3f} |")
    worst = max(abs(r["planned"] / r["measured"] - 1) for r in rows) if rows else float("nan")
    print(f"\nlargest |planned / measured - 1|: {worst:.3f}")


if __name__ == "__main__":
    main()
