"""GPTQ and AWQ (W4A16, compressed-tensors group layout) with llm-compressor, as model -> model.

``compress_calibrated(model, fmt, calibration)`` runs ``llmcompressor.oneshot`` with a
``GPTQModifier`` (symmetric) or ``AWQModifier`` (asymmetric) on the decoder linears (lm_head kept),
saves the result as a compressed-tensors checkpoint (what vLLM serves) and returns that checkpoint
loaded back dequantized to fp32 (``CompressedTensorsConfig(dequantize=True)``): the model evaluated is
the one a deployment would load. The checkpoint is cached under ``calibration.cache_dir`` per
(checkpoint id, format, calibration id), so a resumed sweep reuses it.

llm-compressor is the project's ``gptq`` extra. Version 0.14.0.1 declares ``transformers<=5.17``
while the project pins 5.24 (constraints.txt); it is installed with ``--no-deps`` next to
``compressed-tensors`` and ``loguru`` (README), and the tests run it on 5.24.

CPU-only machines: llm-compressor's AWQ pins its cached activations to page-locked memory
(``IntermediatesCache.pin_memory``), which needs an accelerator; without one it is made a no-op
for the duration of the call (pinning only speeds up host-to-device copies).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

# sweep.calibration keys that set the quantizers themselves (the rest choose the calibration text)
QUANTIZER_KEYS = ("awq_n_grid", "awq_duo_scaling", "gptq_dampening", "weight_observer")


def quantizer_settings(c: dict) -> dict:
    """The quantizer settings of a recipe's ``sweep.calibration`` block."""
    return {k: c[k] for k in QUANTIZER_KEYS}


EXTRA = ("pip install --no-deps -c constraints.txt llmcompressor compressed-tensors loguru "
         "(the gptq extra; see README)")


@dataclass
class Calibration:
    """What GPTQ / AWQ see: ``samples`` token-id rows of equal length, where they came from, and where
    compressed checkpoints are cached. ``ckpt``: the id of the checkpoint being compressed (set per
    checkpoint by the sweep)."""
    samples: list[list[int]]
    source: str                      # e.g. "retain 32x256" (recorded in each ledger row)
    cache_dir: Path | None = None
    ckpt: str = "model"
    awq_n_grid: int = 10
    gptq_dampening: float = 0.01
    awq_duo_scaling: bool | str = True  # or "both"
    weight_observer: str = "minmax"     # or "mse"

    @classmethod
    def of(cls, c: dict, samples: list[list[int]], source: str, **kw) -> "Calibration":
        """The calibration of a recipe's ``sweep.calibration`` block ``c``: its quantizer settings
        (``QUANTIZER_KEYS``) with these samples."""
        return cls(samples, source, **quantizer_settings(c), **kw)

    @property
    def quantizer(self) -> dict:
        """The quantizer settings, as recorded next to each compressed checkpoint and ledger row."""
        return {k: getattr(self, k) for k in QUANTIZER_KEYS}

    @property
    def id(self) -> str:
        key = {"samples": self.samples, "awq_n_grid": self.awq_n_grid, "dampening": self.gptq_dampening}
        if self.awq_duo_scaling is not True:  # only when not on, so the ids cached before the key stay
            key["awq_duo_scaling"] = self.awq_duo_scaling
        if self.weight_observer != "minmax":  # likewise
            key["weight_observer"] = self.weight_observer
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]

    def describe(self) -> str:
        return f"{self.source} ({self.id})"


def require_llmcompressor(name: str) -> None:
    """UserError (one line) when llm-compressor is not installed."""
    try:
        import compressed_tensors  # noqa: F401
        import llmcompressor  # noqa: F401
    except ImportError:
        raise UserError(f"compression '{name}' needs llm-compressor, which is not installed: {EXTRA}") from None


def _args(fmt, observer: str = "minmax"):
    """The format's compressed-tensors weight scheme; ``observer``: how each group's scale (and zero point)
    is chosen (llm-compressor's weight observers: ``minmax``, its default, or ``mse``)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=fmt.symmetric, strategy="group",
                            group_size=fmt.group, observer=None if observer == "minmax" else observer)


def ct_codes(w2d: torch.Tensor, fmt) -> torch.Tensor:
    """compressed-tensors' own codes of a [rows, cols] weight (flat, int32): its min-max
    ``calculate_qparams`` per group and its ``quantize``."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = _args(fmt)
    rows, cols = w2d.shape
    x = w2d.detach().float()
    g = x.reshape(rows, cols // fmt.group, fmt.group)
    s, z = calculate_qparams(g.amin(-1), g.amax(-1), args)
    return quantize(x, s, z, args).round().to(torch.int32).reshape(-1)


def stored_codes(lin) -> torch.Tensor | None:
    """Codes of a linear that llm-compressor has quantized in memory (``weight_scale`` and
    ``weight_zero_point`` attached; the weight fake-quantized): round(w / s) + z, flat int32."""
    s = getattr(lin, "weight_scale", None)
    if s is None:
        return None
    z = getattr(lin, "weight_zero_point", None)
    g = lin.weight.shape[1] // s.shape[1]
    x = lin.weight.detach().float() / s.detach().float().repeat_interleave(g, 1)
    if z is not None:
        x = x + z.detach().float().repeat_interleave(g, 1)
    return torch.round(x).to(torch.int32).reshape(-1)


def checkpoint_codes(path: str | Path) -> dict[str, torch.Tensor]:
    """The integer codes a saved compressed-tensors checkpoint stores (its ``weight_packed`` unpacked),
    per layer name -> int8 [out, in] in [-8, 7]: what a deployment of that checkpoint computes with."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.endswith(".weight_packed"):
                    name = key[: -len(".weight_packed")]
                    shape = torch.Size(f.get_tensor(f"{name}.weight_shape").tolist())
                    out[name] = unpack_from_int32(f.get_tensor(key), 4, shape)
    return out


@contextlib.contextmanager
def _cpu_safe():
    """Page-locked memory needs an accelerator: without one, llm-compressor's activation cache is not pinned."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    has_acc = torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())
    saved = IntermediatesCache.pin_memory
    if not has_acc:
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = saved


def _quiet():
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
    from llmcompressor import LoggerConfig, configure_logger

    configure_logger(LoggerConfig(console_log_level=os.environ["LLM_COMPRESSOR_LOG_LEVEL"], metrics_disabled=True))


def oneshot_quantize(model, fmt, calibration: Calibration):
    """Quantize ``model`` in place with llm-compressor (GPTQ or AWQ, lm_head kept) on the calibration
    samples; returns the model holding scales, zero points and fake-quantized weights."""
    require_llmcompressor(fmt.name)
    fmt.check_model(model)
    from compressed_tensors.quantization import QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot

    _quiet()
    scheme = {"group_0": QuantizationScheme(targets=["Linear"], weights=_args(fmt, calibration.weight_observer))}
    if fmt.quant_type == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = [GPTQModifier(config_groups=scheme, ignore=["lm_head"], dampening_frac=calibration.gptq_dampening)]
    else:  # AWQ's smoothing (its scale search on the scheme's grid), then the quantization itself
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe = [AWQModifier(n_grid=calibration.awq_n_grid, duo_scaling=calibration.awq_duo_scaling),
                  QuantizationModifier(config_groups=scheme, ignore=["lm_head"])]
    samples = calibration.samples
    if not samples:
        raise UserError(f"{fmt.name}: no calibration samples (expected sweep.calibration to select some text)")
    ds = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(r) for r in samples]})
    with _cpu_safe():
        oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(samples),
                max_seq_length=max(len(r) for r in samples), shuffle_calibration_samples=False)
    return model


def load_dequantized(path: str | Path):
    """A compressed-tensors checkpoint loaded back as a plain fp32 model."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from ..models import quiet_transformers

    quiet_transformers()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the model's own quantization_config will be used": intended
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
    model.eval()
    return model


def compress_calibrated(model, fmt, calibration: Calibration | None):
    """GPTQ / AWQ of ``model`` -> the compressed-tensors checkpoint loaded back dequantized (fp32).
    Cached per (calibration.ckpt, format, calibration id) when ``calibration.cache_dir`` is set."""
    if calibration is None:
        raise UserError(f"compression '{fmt.name}' needs calibration data (the sweep provides it from "
                        "sweep.calibration)")
    require_llmcompressor(fmt.name)  # also to read a cached checkpoint back (compressed-tensors)
    if calibration.cache_dir is None:
        tmp = tempfile.mkdtemp(prefix=f"{fmt.name}-")
        try:
            oneshot_quantize(model, fmt, calibration).save_pretrained(tmp, save_compressed=True)
            return load_dequantized(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    out = Path(calibration.cache_dir) / f"{calibration.ckpt}-{fmt.name}-{calibration.id}"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            oneshot_quantize(model, fmt, calibration).save_pretrained(tmp, save_compressed=True)
            (tmp / "calibration.json").write_text(json.dumps({"format": fmt.name, "calibration": calibration.source,
                                                              "id": calibration.id, **calibration.quantizer}))
            if out.exists():  # a half-written one from an older run
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        log.info("%s: reusing the compressed checkpoint %s", fmt.name, out)
    return load_dequantized(out)
