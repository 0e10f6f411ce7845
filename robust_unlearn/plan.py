"""A memory plan: the bytes one process holds at the peak of an unlearning step, per method, from the
model's config alone (built on the meta device: nothing is loaded, downloaded or run).

Each component is bytes per parameter times the parameters it applies to, or bytes per token:

- **weights**: every parameter, 2 bytes (bf16) or 4 (fp32 / mixed); ZeRO-3 divides by the processes.
- **trained share** T: all parameters; plain RMU its ``rmu_params``; SURE_ / Robust_ the linears at or
  above ``sure_percentile`` of saliency (which ones depends on the gradients: the plan takes that share
  of the modules at their mean size); LoRA r x (in + out) per adapted linear.
- **gradients** T x the weight bytes; **optimizer** AdamW's two moments, in the parameter dtype on one
  process or DDP. Under DeepSpeed bf16: fp32 gradients, fp32 master and two fp32 moments (4 + 12 bytes,
  ZeRO's mixed-precision accounting: Rajbhandari et al. 2020, section 3), divided by the processes at
  ZeRO-2 / 3 (gradients and optimizer) and ZeRO-3 (weights).
- **optimizer step**: torch's multi-tensor AdamW makes one temporary the size of the moments
  (``_foreach_sqrt`` of the second moment) while the gradients are alive.
- **reference** (methods with a KL term, NPO, DPO, UNDIAL, RMU): a full fp32 copy (``Reference``), the
  frozen copies of the trained tensors only (``SharedReference``, the default), nothing (LoRA: the
  adapters off), or under ZeRO-3 a partitioned engine: the weights / processes.
- **Robust_ state**: the update mask (1 byte) and the target's values (weight bytes) per trained
  weight, and the last ``robust_nullspace`` retain gradients (fp32) of the masked ones (``robust_topk``
  of them). The null-space step takes the forget term's gradient first (its forward and backward, then
  freed) and keeps only the retain stream for the backward: the kept activations and logits are the
  retain stream's, and the forget phase (one stream, the views' whole forget gradients) is the other
  candidate for the peak. ``robust_qat`` adds its parametrizations' target values (fp32), mask and
  target codes (int32), and each trained weight's deployed copy, kept for backward;
  ``robust_prune_view`` adds the pruned copies of the frozen decoder linears, the kept mask of the
  trained ones and their pruned deployed copy, and keeps both views' retain activations and logits
  until the one backward. Measured with ``evals/plan_check.py``, which runs the training loop's robust
  step; ``robust_relearn_view`` is not counted.
- **activations** per token and decoder layer, what autograd keeps for backward in transformers' Llama
  with SDPA attention: each RMSNorm's fp32 input and, when its weight trains, its normalised copy; the
  inputs of the trained linears (normed, the attention output's transposed copy, normed, the MLP
  product); q after RoPE, k and v repeated to every head (grouped-query attention with a padding mask),
  the attention output; the MLP's gate, SiLU and up. A frozen linear keeps no input, so SURE_ and LoRA
  keep less than full fine-tuning (SURE_ keeps no activation below its lowest salient module either,
  which the plan does not know: an upper bound there). With gradient checkpointing: each layer's input,
  plus one layer's activations while it is recomputed.
- **logits** (float32) over the scored positions: the log-softmax kept per stream for backward (a KL term also
  keeps the reference distribution), plus two same-sized gradients at the start of backward, or the last
  stream's forward, whichever holds more (an NLL's forward holds three, a KL term's seven).
- **LoRA**: each adapted linear also keeps its input cast to the adapters' fp32 (bf16 models) and its
  r-wide product.

Peak = the resident state (weights, reference, optimizer moments, Robust_ state) plus the larger of
backward (every kept activation and the output layer's gradient, plus the larger of the logits' phase
and one layer's backward: its gradients of the MLP and hidden states, and under checkpointing its
recomputed activations) and the optimizer step (every gradient, the step's temporary).
The per-layer activation count was checked against the bytes autograd actually saves
(``torch.autograd.graph.saved_tensors_hooks``) on a tiny Llama: within 4%, fp32 and bf16, full and frozen. Each stream (forget, retain; IdkDPO's refusals)
is ``batch_size / (processes x grad_accum)`` rows of ``max_length`` tokens.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

GiB = 1024 ** 3


@dataclass
class Shape:
    """What the plan needs of an architecture."""
    name: str
    params: int                 # unique parameters (tied embeddings once)
    layers: int
    hidden: int
    q_width: int                # heads x head dim
    kv_width: int               # key/value heads x head dim
    mlp: int
    vocab: int
    heads: int
    tied: bool
    head_params: int            # the output layer's parameters (the embedding when tied)
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)  # decoder linear -> (in, out)
    param_names: dict[str, int] = field(default_factory=dict)  # every parameter -> numel

    @property
    def linear_params(self) -> int:
        return sum(i * o for i, o in self.linears.values())


def shape_of(model, name: str = "") -> Shape:
    """The :class:`Shape` of a model built on the meta device (any decoder transformers builds)."""
    from .compress.linears import compressible_linears

    conf = model.config
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    names = {n: p.numel() for n, p in model.named_parameters()}  # tied weights appear once
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    return Shape(name=name, params=sum(names.values()), layers=text.num_hidden_layers, hidden=hidden,
                 q_width=heads * head_dim, kv_width=kv * head_dim,
                 mlp=getattr(text, "intermediate_size", 4 * hidden), vocab=text.vocab_size, heads=heads, tied=tied,
                 head_params=out.weight.numel() if out is not None else 0,
                 linears={n: (lin.in_features, lin.out_features) for n, lin in compressible_linears(model)},
                 param_names=names)


@dataclass
class Setup:
    """How the run is launched: processes, ZeRO stage, precision, batch, and the memory savers."""
    gpus: int = 1
    zero: int = 0               # 0: one process or DDP; 2, 3: DeepSpeed ZeRO
    precision: str = "bf16"     # bf16 | fp32 | mixed (fp32 weights, bf16 autocast)
    batch_size: int = 8         # global rows per stream and step
    grad_accum: int = 1
    seq_len: int = 256          # tokens per row
    scored_len: int | None = None  # positions with logits per row (None: every position)
    checkpointing: bool = False
    reference: str = "shared"   # full | shared | partitioned (ZeRO-3 engine)
    lora_r: int = 0

    @property
    def rows(self) -> int:
        return max(1, self.batch_size // (self.gpus * self.grad_accum))

    def describe(self, reference: bool = True) -> str:
        parts = [f"{self.gpus} GPU" + ("s" if self.gpus > 1 else "")]
        parts.append(f"ZeRO-{self.zero}" if self.zero else ("DDP" if self.gpus > 1 else "one process"))
        parts.append(self.precision)
        if self.grad_accum > 1:
            parts.append(f"grad_accum {self.grad_accum}")
        if self.checkpointing:
            parts.append("gradient checkpointing")
        if self.lora_r:
            parts.append(f"LoRA r {self.lora_r}")
        if reference:
            parts.append("reference: the adapters off" if self.lora_r else f"reference {self.reference}")
        return ", ".join(parts)


def trained_params(shape: Shape, method: str, settings: dict, lora_r: int = 0) -> int:
    """T: how many parameters the method trains (SURE_ / Robust_: the kept share of the linears at
    their mean size; which modules, and so the exact count, depends on the forget gradients)."""
    from .methods import split_method

    wrapper, base = split_method(method)
    targets = settings.get("lora", {}).get("targets") or []
    if wrapper is not None:  # the share of linears kept, at their mean size (which ones: the gradients')
        share = max(1, math.ceil(len(shape.linears) * (1 - float(settings["sure_percentile"]) / 100))) / len(shape.linears)
        per = sum(lora_r * (i + o) for i, o in shape.linears.values()) if lora_r else shape.linear_params
        return int(share * per)
    if lora_r:
        return sum(lora_r * (i + o) for n, (i, o) in shape.linears.items() if n.rsplit(".", 1)[-1] in targets)
    if base == "RMU":
        pat = re.compile(settings["rmu_params"])
        return sum(k for n, k in shape.param_names.items() if pat.search(n))
    return shape.params


# per stream: (vocabulary-wide float32 tensors kept for backward, those alive at once at the end of its
# forward), in units of rows x scored positions x vocab x 4 bytes. A token NLL keeps its log-softmax and a
# quarter more (the output layer's own logits); a KL term also keeps the reference distribution, and its
# forward holds both logits, both log-softmaxes, the exponential, the difference and their product. The
# start of backward adds two (the gradients of the log-softmax's output and input). Counted from the
# code, then measured (resident-set rise) on a one-layer model with a 32768-token vocabulary, where
# logits dominate: NLL kept 1.23-1.25 / forward 3.2, KL kept 2.0 / forward 7.1, backward +2.0.
_NLL, _KL = (1.25, 3.2), (2.0, 7.1)
_FORGET_KIND = {"undial": _KL, "ceu": _KL}


def stream_kinds(method: str, settings: dict) -> list[tuple[float, float]]:
    """The step's streams in the order the objective runs them: forget (IdkDPO: also the refusals), then
    retain when the method has a retain term."""
    from .methods import METHODS, split_method

    base = split_method(method)[1]
    if base == "RMU":
        return [(0, 0), (0, 0)]
    f_name, r_name = METHODS[base]
    out = [_FORGET_KIND.get(f_name, _NLL)] * (2 if f_name == "dpo" else 1)
    if r_name is not None and settings.get("alpha", 1.0) != 0:
        out.append(_KL if r_name == "klr" else _NLL)
    return out


def _adapted(shape: Shape, method: str, settings: dict) -> list[tuple[int, int]]:
    """(in, out) of the linears with adapters (SURE_: the kept share of all linears)."""
    from .methods import split_method

    if split_method(method)[0] is not None:
        keep = max(1, math.ceil(len(shape.linears) * (1 - float(settings["sure_percentile"]) / 100)))
        mean_in = sum(i for i, _ in shape.linears.values()) / len(shape.linears)
        return [(int(mean_in), 0)] * keep
    targets = set(settings.get("lora", {}).get("targets") or [])
    return [io for n, io in shape.linears.items() if n.rsplit(".", 1)[-1] in targets]


def needs_reference(method: str, settings: dict) -> bool:
    from .methods import METHODS, split_method
    from .methods.losses import NEEDS_REFERENCE

    base = split_method(method)[1]
    if base == "RMU":
        return True
    f_name, r_name = METHODS[base]
    return f_name in NEEDS_REFERENCE or (r_name == "klr" and settings.get("alpha", 1.0) != 0)


def layer_bytes_per_token(shape: Shape, compute: int, linear_share: float = 1.0, norms_trained: bool = True,
                          lora_inputs: float | None = None) -> float:
    """What autograd keeps of one decoder layer per token (see the module docstring). A frozen linear keeps
    no input and a frozen RMSNorm no normalised copy, so SURE_ (``linear_share`` of the linears trained,
    norms frozen) keeps less than full fine-tuning. ``lora_inputs``: bytes the adapters keep instead of
    the linears' inputs (each adapter's input cast to fp32, and its r-wide product)."""
    h, q, kv, m = shape.hidden, shape.q_width, shape.kv_width, shape.mlp
    s = linear_share
    # RMSNorm: its fp32 input (pow and the scaling keep it), the normalised copy when its weight trains
    norms = 2 * (4 * h + (compute * h if norms_trained else 0))
    # the linears' inputs: normed (q, k, v), attention output copy (o), normed (gate, up), product (down)
    inputs = compute * (2 * h + q + m) * s if lora_inputs is None else lora_inputs
    kv_kept = 2 * q if kv < q else 2 * kv  # SDPA keeps k and v, repeated to every head (GQA with a padding mask)
    attn = compute * (q + kv_kept + q) + 4 * shape.heads  # q after RoPE, k, v, output (+ log-sum-exp)
    mlp = compute * 3 * m  # gate (SiLU's input), SiLU, up (the product's inputs)
    return norms + inputs + attn + mlp


def _layer_span(shape: Shape, settings: dict) -> tuple[int, int]:
    """RMU: (first layer with a trained parameter, the loss's layer) -> nothing is kept outside them."""
    last = int(settings["rmu_layer"]) % shape.layers
    found = [int(mm.group(1)) for n in shape.param_names if re.search(settings["rmu_params"], n)
             for mm in [re.search(r"\.layers\.(\d+)\.", n)] if mm]
    first = min(found) if found and not any("embed" in n for n in shape.param_names
                                            if re.search(settings["rmu_params"], n)) else 0
    return min(first, last), last


def plan_method(shape: Shape, method: str, settings: dict, setup: Setup) -> dict:
    """-> component -> bytes for one process, plus ``peak``."""
    from .methods import split_method

    n = setup.gpus
    deepspeed_bf16 = setup.zero > 0 and setup.precision in ("bf16", "mixed")  # DeepSpeed's bf16 mode
    wb = 2 if setup.precision == "bf16" or deepspeed_bf16 else 4
    compute = 2 if setup.precision in ("bf16", "mixed") else 4
    lora = setup.lora_r if split_method(method)[1] != "RMU" else 0
    T = trained_params(shape, method, settings, lora)
    full_ft = T == shape.params and not lora
    shard_states = n if setup.zero >= 2 else 1
    out: dict[str, float] = {"trained_params": T}
    out["weights"] = shape.params * wb / (n if setup.zero == 3 else 1) + (lora and T * 4)
    if deepspeed_bf16:
        out["gradients"] = T * 4 / shard_states
        out["optimizer"] = T * 12 / shard_states            # fp32 master + two fp32 moments
        step_tmp = T * 4 / shard_states
    else:
        gb = 4 if lora else wb                               # adapters are fp32
        out["gradients"] = T * gb / shard_states
        out["optimizer"] = T * 2 * gb / shard_states
        step_tmp = T * gb / shard_states
    # the reference
    ref = 0.0
    if needs_reference(method, settings) and not lora:
        kind = setup.reference
        if kind == "partitioned":
            ref = shape.params * wb / n
        elif kind == "shared" and setup.zero != 3:
            ref = T * wb
        else:                                                # a full fp32 copy on every process
            ref = shape.params * 4
    out["reference"] = ref
    wrapper, base = split_method(method)
    robust = wrapper == "Robust" and not lora  # LoRA: the adapters train with the plain step
    kinds = stream_kinds(method, settings)
    # the null-space step (robust_nullspace > 0, a retain term): the forget term's forward and gradient
    # run first and are freed; only the retain stream's activations and logits are kept for the backward
    split = robust and int(settings.get("robust_nullspace", 0)) > 0 and len(kinds) > 1
    kept_streams = 1 if split else len(kinds)
    out["robust_state"] = 0.0
    if robust:  # the mask, the target's values, the last robust_nullspace retain gradients of the masked weights
        out["robust_state"] = T * (1 + wb + 4 * int(settings.get("robust_nullspace", 0)) * float(settings["robust_topk"]))
    qat = robust and bool(settings.get("robust_qat"))
    views = 2 if qat and float(settings.get("robust_prune_view") or 0) > 0 else 1
    deployed_kept = 0.0  # robust_qat: each view's deployed copy of the trained weights, kept for backward
    if qat:
        out["robust_state"] += T * (4 + 1 + 4)  # Deployed: target values (fp32), mask, target codes (int32)
        deployed_kept = T * wb * views
        if views == 2:  # PrunedView: pruned copies of the frozen decoder linears, the trained ones' kept mask
            out["robust_state"] += max(shape.linear_params - T, 0) * wb + T
    # activations
    rows = setup.rows * kept_streams * views
    tokens = rows * setup.seq_len
    layers = shape.layers
    if base == "RMU":  # the loss at rmu_layer, only rmu_params train: layers from the first trained one to it
        first, last = _layer_span(shape, settings)
        layers = last - first + 1
        share = sum(1 for n in shape.linears if re.search(settings["rmu_params"], n + ".weight")) / len(shape.linears)
        per_layer = layer_bytes_per_token(shape, compute, max(share, 1 / 7), norms_trained=False)
    elif lora:
        adapted = _adapted(shape, method, settings)
        kept = sum((4 * i if compute == 2 else 0) + 4 * lora for i, _ in adapted) / shape.layers
        if compute == 4:  # fp32: the adapters share the linears' inputs
            share = 1.0 if wrapper is None else len(adapted) / len(shape.linears)
            kept += 4 * (2 * shape.hidden + shape.q_width + shape.mlp) * share
        per_layer = layer_bytes_per_token(shape, compute, norms_trained=False, lora_inputs=kept)
    elif wrapper is not None:
        share = math.ceil(len(shape.linears) * (1 - float(settings["sure_percentile"]) / 100)) / len(shape.linears)
        per_layer = layer_bytes_per_token(shape, compute, share, norms_trained=False)
    else:
        per_layer = layer_bytes_per_token(shape, compute)
    if setup.checkpointing:  # each layer's input; one layer is recomputed at a time, in backward
        acts, recompute = tokens * layers * compute * shape.hidden, tokens * per_layer
    else:
        acts, recompute = tokens * layers * per_layer, 0
    acts += deployed_kept
    out["activations"] = acts + recompute
    if split_method(method)[1] == "RMU":
        out["logits"] = tokens * shape.hidden * 4 * 2          # the steering / reference activations
        head_grad = 0.0
    else:
        one = setup.rows * (setup.scored_len or setup.seq_len) * shape.vocab * 4
        held = kinds[-kept_streams:]  # split: the retain stream only
        kept = sum(k for k, _ in held)
        kept *= views  # robust_prune_view: the full model's streams and the pruned view's, one backward
        out["logits"] = one * max(kept + 2, kept - held[-1][0] + held[-1][1])  # backward start | last forward
        head_grad = shape.head_params * (out["gradients"] / T if T else 0) if full_ft else 0.0
    # a layer's backward: the gradients of the MLP's product, SiLU, up and gate and of two hidden states
    out["backward_transient"] = setup.rows * kept_streams * setup.seq_len * \
        (3 * shape.mlp + 2 * shape.hidden) * compute
    resident = out["weights"] + ref + out["optimizer"] + out["robust_state"]
    # the logits' phase (last forward, start of backward) and the layers' phase of backward come one after
    # the other, each on top of the kept activations
    backward = acts + head_grad + max(out["logits"], recompute + out["backward_transient"])
    if split and base != "RMU":  # the forget phase, one view at a time: that view's stream, its logits and
        # its backward, the earlier views' whole gradients and the one being taken
        fk, nf = kinds[:-1], len(kinds) - 1
        fkept = sum(k for k, _ in fk)
        f_logits = one * max(fkept + 2, fkept - fk[-1][0] + fk[-1][1])
        f_phase = acts / views * nf + max(f_logits, (recompute / views + out["backward_transient"]) * nf) + \
            T * wb * views
        out["forget_phase"] = f_phase
        backward = max(backward, f_phase)
    step = out["gradients"] + step_tmp
    out["step_peak"] = max(backward, step)
    out["peak"] = resident + out["step_peak"]
    return out


def candidates(setup: Setup, gpus: int, method: str, settings: dict) -> list[Setup]:
    """Configurations in order of cost: the recipe as written, then accumulation (same update, less
    activation memory), gradient checkpointing (~1/3 more compute), the processes as DDP then ZeRO-2 /
    ZeRO-3, and last LoRA (a different update)."""
    from .methods import split_method

    wrapper, base = split_method(method)
    plain_step = wrapper is None  # SURE_ / Robust_ step rules refuse accumulation
    robust = wrapper == "Robust"
    # where the robust options run: robust_relearn_view on one process, robust_qat not under ZeRO-3, a
    # view (pruned or relearned) never with gradient checkpointing
    relearn = robust and float(settings.get("robust_relearn_view") or 0) > 0
    views = relearn or (robust and float(settings.get("robust_prune_view") or 0) > 0)
    several = [] if relearn else [(gpus, 0), (gpus, 2)] + ([] if robust and settings.get("robust_qat") else [(gpus, 3)])
    launches = [(1, 0)] + (several if gpus > 1 else [])
    loras = [setup.lora_r] + ([16] if not setup.lora_r and base != "RMU" and not robust else [])
    out = []
    for r in loras:
        for g, z in launches:
            for ckpt in ([setup.checkpointing] + ([True] if not setup.checkpointing and not views else [])):
                # the training loop accumulates with the plain step, on one process or DDP only
                accums = (1, 2, 4, 8, 16, 32) if plain_step and z == 0 else (1,)
                for a in accums:
                    if a > setup.batch_size or setup.batch_size % (a * g):
                        continue
                    ref = "partitioned" if z == 3 else setup.reference
                    out.append(replace(setup, gpus=g, zero=z, grad_accum=a, checkpointing=ckpt, reference=ref, lora_r=r))
    return out


def cheapest(shape: Shape, method: str, settings: dict, setup: Setup, gpus: int, gpu_bytes: float):
    """-> (setup, plan) of the first candidate that fits ``gpu_bytes``, or (None, None)."""
    for s in candidates(setup, gpus, method, settings):
        p = plan_method(shape, method, settings, s)
        if p["peak"] <= gpu_bytes:
            return s, p
    return None, None


ROWS = ("weights", "gradients", "optimizer", "reference", "robust_state", "activations", "logits")


def render(shape: Shape, methods: list[str], settings_of, setup_of, gpus: int, gpu_gb: float,
           reserve_gb: float = 2.0) -> str:
    """The plan as Markdown: one table per method (component, bytes per parameter, GiB at the recipe's
    settings on one GPU), then the cheapest configuration that fits each (``candidates``)."""
    lines = [f"# memory plan: {shape.name}", "",
             f"{shape.params / 1e9:.3f}B parameters, {shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}; "
             f"{gpu_gb:g} GiB per GPU, of which {reserve_gb:g} are kept for the CUDA context and the allocator's "
             f"fragmentation; {gpus} GPU{'s' if gpus > 1 else ''} available. GiB per process.", ""]
    budget = (gpu_gb - reserve_gb) * GiB
    fits = []
    for m in methods:
        st, setup = settings_of(m), setup_of(m)
        p = plan_method(shape, m, st, setup)
        ref = needs_reference(m, st)
        lines += [f"## {m}: {setup.describe(ref)}, {setup.rows} rows x {setup.seq_len} tokens per stream",
                  "", f"trained parameters: {p['trained_params'] / 1e6:.1f}M ({p['trained_params'] / shape.params:.1%})",
                  "", "| component | bytes per parameter | GiB |", "|---|---|---|"]
        other = plan_method(shape, m, st, replace(setup, checkpointing=not setup.checkpointing))
        for k in ROWS:
            per = f"{p[k] / shape.params:.2f}" if k not in ("activations", "logits") else "-"
            label = k.replace("_", " ")
            if k == "activations":
                label += f" (gradient checkpointing {'on' if setup.checkpointing else 'off'})"
            lines.append(f"| {label} | {per} | {p[k] / GiB:.2f} |")
            if k == "activations":
                lines.append(f"| activations with gradient checkpointing {'off' if setup.checkpointing else 'on'} "
                             f"(peak then {other['peak'] / GiB:.2f}) | - | {other['activations'] / GiB:.2f} |")
        lines += [f"| **peak** (resident + max(backward, optimizer step)) | {p['peak'] / shape.params:.2f} | "
                  f"**{p['peak'] / GiB:.2f}** |", ""]
        s, q = cheapest(shape, m, st, setup, gpus, budget)
        fits.append((m, p, s and s.describe(ref), q))
    lines += [f"## what fits {gpu_gb:g} GiB ({gpu_gb - reserve_gb:g} for the run)", "",
              "| method | recipe as written, GiB | fits | cheapest configuration that fits | its peak GiB |",
              "|---|---|---|---|---|"]
    for m, p, s, q in fits:
        ok = "yes" if p["peak"] <= budget else "no"
        lines.append(f"| {m} | {p['peak'] / GiB:.1f} | {ok} | {s} | "
                     f"{q['peak'] / GiB:.1f} |" if s else f"| {m} | {p['peak'] / GiB:.1f} | {ok} | none of the candidates | - |")
    return "\n".join(lines) + "\n"
