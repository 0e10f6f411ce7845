"""Write a checkpoint of a model architecture with random weights and a given tokenizer, so that a
real-model recipe can run end to end where its hub weights cannot be downloaded (the device machine
reaches no hub): the pipeline, its memory and its time at the real size, not its metrics.

    python evals/random_checkpoint.py --config evals/configs/llama-3.2-1b.json \
        --tokenizer ~/.cache/robust_unlearn/models/target-<key> --seed 0 --out /tmp/llama-1b-random
    robust-unlearn run recipes/tofu/llama3.2-1b.yaml model.target=/tmp/llama-1b-random ...

- The architecture is the config's; ``vocab_size`` and the special-token ids become the tokenizer's
  (a Llama-3 tokenizer cannot be downloaded either), so the embedding and head rows differ from the
  real model's (49,152 rows with SmolLM2's tokenizer against Llama-3's 128,256).
- Weights: transformers' own initialisation of that config (``from_config``) under ``--seed``, saved in
  ``--dtype`` (default the config's ``torch_dtype``). Built on the GPU when there is one.
- The tokenizer's files are saved with it (its chat template too). A random model never ends an answer:
  every greedy answer runs to ``eval.max_new_tokens``, the slowest case.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a config.json (e.g. evals/configs/llama-3.2-1b.json)")
    ap.add_argument("--tokenizer", required=True, help="a directory or hub id whose tokenizer the checkpoint gets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the config's torch_dtype")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    raw = {k: v for k, v in json.loads(Path(args.config).read_text()).items() if not k.startswith("_")}
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    raw.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    conf = AutoConfig.for_model(raw.pop("model_type"), **raw)
    dtype = getattr(torch, args.dtype or str(raw.get("torch_dtype", "float32")))
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    out = Path(args.out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: {conf.model_type} {n / 1e6:.1f}M parameters, vocab {conf.vocab_size}, {dtype}, seed {args.seed}, "
          f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
