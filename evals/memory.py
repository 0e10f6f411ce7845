"""Peak memory of one unlearning step: full GradDiff, SURE(GradDiff), NPO_KLR and SURE(NPO_KLR) with the
reference as a second full model vs the shared reference (``unlearn.SharedReference``), and the
same accounting for Llama-3.1-8B.

    python evals/memory.py                  # a tiny Llama (hidden 256, 4 layers), batch 8 x 64 tokens
    python evals/memory.py --hidden 512 --layers 8

What is measured, each configuration in a fresh process: the bytes of the tensors alive before the
step (the model; the reference: a second full model, or the frozen copies of the trained tensors)
plus the step's own peak (activations, gradients, AdamW state created at the first step). On the CPU
the step's peak is the rise of the process's resident memory over the step (Linux: VmHWM after
resetting it through /proc/self/clear_refs, minus VmRSS before; glibc is told to map every allocation
over 64 KiB so that a freed tensor leaves the resident set); on a GPU, ``torch.cuda.max_memory_allocated``.
(The torch profiler's CPU memory events miss frees made by the autograd engine, so they are not used.) SURE trains the modules at or above the 90th percentile of forget-gradient norm, chosen by
``robust.saliency`` on the same batch. The saliency pass itself (one backward through the whole
model, no optimizer state) is a separate, earlier peak and is not in the step.

The 8B rows are arithmetic, not measured: Llama-3.1-8B's published shape (hidden 4096, MLP 14336,
32 layers, 8 KV heads, vocab 128256, untied head), bf16 weights and reference, fp32 AdamW state
(2 tensors) and fp32 gradients for the trained tensors (DeepSpeed's bf16 mode also keeps an fp32
master copy: +4 bytes per trained weight). Activations are left out of the estimate (they depend on
batch x length, not on the method); SURE's trained share is taken as the measured fraction of linear
weights from the tiny model's saliency, which for a real model depends on its gradients.
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

from robust_unlearn.methods import build_objective  # noqa: E402
from robust_unlearn.models import tiny_config  # noqa: E402
from robust_unlearn.robust.saliency import forget_scores, linear_weights, salient_modules  # noqa: E402
from robust_unlearn.unlearn import SharedReference  # noqa: E402

GiB = 1024 ** 3


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _batch(vocab: int, n: int, length: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # question half masked, as the QA collation does
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _settings(**kw) -> dict:
    from robust_unlearn.config import DEFAULTS

    s = {k: v for k, v in DEFAULTS["unlearn"].items() if k not in ("methods", "per_method")}
    s.update(kw)
    return s


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


class _Peak:
    """The rise of memory over the block: CUDA allocator peak, or the resident set's high-water mark."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.start = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _status("VmHWM") - self.start
        return False


def measure(method: str, shared: bool, args, salient: list[str] | None = None) -> dict:
    torch.manual_seed(0)
    cfg = tiny_config(args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 128), tie_word_embeddings=False)
    from transformers import LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(cfg).to(dev)
    model.train()
    batches = {k: {n: t.to(dev) for n, t in _batch(args.vocab, args.batch, args.length, i).items()}
               for i, k in enumerate(("forget", "retain"))}
    base = method.split("_", 1)[1] if method.startswith(("SURE_", "LoRA_")) else method
    needs_ref = "NPO" in base
    ref = None
    if method.startswith("LoRA_"):  # adapters (r 16) on every linear; the reference: adapters off, no copy
        from robust_unlearn.lora import AdapterOff, add_adapters, freeze_all_but_adapters, target_modules

        st = {**_settings(), "lora": {"r": 16, "alpha": 32.0, "dropout": 0.0,
                                      "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}
        model = add_adapters(model, st, target_modules(model, st))
        ref = AdapterOff(model) if needs_ref else None
        objective = build_objective(base, _settings(), model, ref=ref)
        freeze_all_but_adapters(model)
    elif needs_ref:
        ref = SharedReference(model, None) if shared else LlamaForCausalLM(cfg).to(dev).requires_grad_(False)
        if not shared:
            ref.load_state_dict(model.state_dict())
    if not method.startswith("LoRA_"):
        objective = build_objective(method, _settings(), model, ref=ref)
    trained_frac = 1.0
    if method.startswith("SURE_"):
        keep = set(salient)
        for p in model.parameters():
            p.requires_grad_(False)
        lin = linear_weights(model)
        for n in keep:
            lin[n].requires_grad_(True)
        trained_frac = sum(lin[n].numel() for n in keep) / sum(p.numel() for p in lin.values())
    if shared and ref is not None:
        ref.freeze()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    live = _nbytes(model.parameters())
    if ref is None or method.startswith("LoRA_"):
        ref_bytes = 0  # LoRA: the reference is the same weights with the adapters off
    else:
        ref_bytes = _nbytes(ref._orig.values()) if shared else _nbytes(ref.parameters())
    with _Peak() as pk:
        loss = objective(model, batches)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    kind = "adapters off" if method.startswith("LoRA_") else ("shared" if shared else "full copy")
    return {"method": method, "reference": None if ref is None else kind,
            "weights_MiB": live / 2 ** 20, "reference_MiB": ref_bytes / 2 ** 20, "step_MiB": pk.peak / 2 ** 20,
            "peak_MiB": (live + ref_bytes + pk.peak) / 2 ** 20, "trained_frac_of_linears": trained_frac,
            "trained_params": sum(p.numel() for p in params), "params": sum(p.numel() for p in model.parameters())}


def _salient(args) -> list[str]:
    """SURE's modules for the tiny model: 90th percentile of forget-gradient norm on the forget batch."""
    torch.manual_seed(0)
    cfg = tiny_config(args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 128), tie_word_embeddings=False)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(cfg)
    objective = build_objective("GradDiff", _settings(), model)
    sal, _ = forget_scores(model, objective.forget_loss, [_batch(args.vocab, args.batch, args.length, 0)],
                           attribution=False)
    return salient_modules(sal, 90.0)


def estimate_8b(trained_frac_linear: float) -> list[dict]:
    h, m, layers, vocab, kv = 4096, 14336, 32, 128256, 8
    head = 128
    attn = h * h * 2 + 2 * h * kv * head  # q, o + k, v
    mlp = 3 * h * m
    linear = layers * (attn + mlp)
    total = linear + 2 * vocab * h + layers * 2 * h + h  # + embed, lm_head, norms
    rows = []
    for method, trained, ref in [("GradDiff", total, 0), ("SURE_GradDiff", trained_frac_linear * linear, 0),
                                 ("NPO_KLR", total, total), ("NPO_KLR (shared)", total, total),
                                 ("SURE_NPO_KLR", trained_frac_linear * linear, total),
                                 ("SURE_NPO_KLR (shared)", trained_frac_linear * linear, trained_frac_linear * linear)]:
        weights = 2 * total
        states = trained * (4 + 4 + 4 + 4)  # fp32 grad, Adam m and v, fp32 master (DeepSpeed bf16)
        rows.append({"method": method, "weights_GiB": weights / GiB, "reference_GiB": 2 * ref / GiB,
                     "trained_state_GiB": states / GiB, "total_GiB": (weights + 2 * ref + states) / GiB})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one configuration, as JSON, in a fresh process
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.child:
        job = json.loads(args.child)
        print("RESULT " + json.dumps(measure(job["method"], job["shared"], args, job["salient"])))
        return
    salient = _salient(args)
    rows = []
    for method, shared in [("GradDiff", False), ("SURE_GradDiff", False), ("NPO_KLR", False), ("NPO_KLR", True),
                           ("SURE_NPO_KLR", False), ("SURE_NPO_KLR", True), ("LoRA_GradDiff", False),
                           ("LoRA_NPO_KLR", False)]:
        job = json.dumps({"method": method, "shared": shared, "salient": salient})
        cmd = [sys.executable, __file__, "--child", job] + [f"--{k}={v}" for k, v in vars(args).items() if k != "child"]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        rows.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (resident-set rise over the step)"
    print(f"one step, tiny Llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, "
          f"{rows[0]['params'] / 1e6:.2f}M params, batch {args.batch} x {args.length} tokens, fp32, {dev}\n")
    print("| method | reference | trained params | weights MiB | reference MiB | step MiB | peak MiB | vs GradDiff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['reference'] or '-'} | {r['trained_params'] / 1e6:.2f}M | {r['weights_MiB']:.1f} | "
              f"{r['reference_MiB']:.1f} | {r['step_MiB']:.1f} | {r['peak_MiB']:.1f} | "
              f"{r['peak_MiB'] / rows[0]['peak_MiB']:.2f}x |")
    full, shr = rows[4], rows[5]
    print(f"\nSURE_NPO_KLR, shared vs full-copy reference: peak {shr['peak_MiB']:.1f} / {full['peak_MiB']:.1f} MiB "
          f"= {shr['peak_MiB'] / full['peak_MiB']:.2f}x; reference {shr['reference_MiB']:.1f} / {full['reference_MiB']:.1f} MiB "
          f"= {shr['reference_MiB'] / max(full['reference_MiB'], 1e-9):.3f}x")
    frac = rows[1]["trained_frac_of_linears"]
    print(f"\nLlama-3.1-8B estimate (arithmetic; bf16 weights/reference, fp32 grads + AdamW + master for trained "
          f"tensors, no activations; SURE trains {frac:.1%} of the linear weights as measured above):\n")
    print("| method | weights GiB | reference GiB | trained-tensor state GiB | total GiB |")
    print("|---|---|---|---|---|")
    for r in estimate_8b(frac):
        print(f"| {r['method']} | {r['weights_GiB']:.1f} | {r['reference_GiB']:.1f} | {r['trained_state_GiB']:.1f} | "
              f"{r['total_GiB']:.1f} |")


if __name__ == "__main__":
    main()
