"""Shared test helpers: the fixed-logit model, the in-process CLI, and the one tiny fine-tuned target
and oracle of the session.

Tiers: ``pytest -m "not slow"`` (fast, every module) and ``pytest -m slow`` (several processes, the real
SmolLM2, long training). TRITON_INTERPRET=1 is set by test_floor.py for its kernel tests only: every other
test runs the floor on its CPU (torch) path, as a CPU run does."""
import contextlib
import io
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one thread: the tiny models' ops are too small to share, and on a busy machine two threads waiting on
# each other make training and evaluation many times slower
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TOFU_SAMPLE = SHARED / "tofu_sample"
TOFU_FULL = SHARED / "tofu"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# ---- a Llama whose next-token distribution is fixed by construction --------------------------
WORDS = ["<pad>", "<s>", "</s>", "Question:", "Answer:", "q1", "q2", "a", "b", "c", "d", "e"]
# BIGRAM[prev] = {next: probability}; the rest of the row's mass is spread evenly over other tokens.
BIGRAM = {
    "Answer:": {"a": 0.5, "b": 0.25, "c": 0.125},
    "a": {"b": 0.6, "c": 0.2},
    "b": {"</s>": 0.7, "c": 0.1},
    "c": {"</s>": 0.4, "d": 0.4},
    "d": {"</s>": 0.9},
}


def bigram_prob(prev: str, nxt: str) -> float:
    row = BIGRAM.get(prev, {})
    if nxt in row:
        return row[nxt]
    rest = 1.0 - sum(row.values())
    return rest / (len(WORDS) - len(row))


def fixed_logit_model():
    """LlamaForCausalLM with hidden = vocab: embeddings are one-hot, every layer adds zero to the
    residual stream (o_proj, down_proj = 0), the final RMSNorm maps e_i to e_i, and lm_head column i
    holds log P(. | token i). So logits at a position depend only on its token, exactly as BIGRAM."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    V = len(WORDS)
    cfg = LlamaConfig(vocab_size=V, hidden_size=V, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=V, rms_norm_eps=1e-12, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(V))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1 / math.sqrt(V))
        logp = torch.tensor([[math.log(bigram_prob(prev, nxt)) for nxt in WORDS] for prev in WORDS])
        model.lm_head.weight.copy_(logp.T)  # logits = W @ e_prev = column prev
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def fixed_model():
    return fixed_logit_model()


def chat_tokenizer(text: str, template: str, pad: bool = True):
    """A tiny byte-level tokenizer trained on ``text`` with ``template`` as its chat template
    (``pad=False``: no pad token, as Llama-3's, so EOS pads)."""
    from robust_unlearn.models import train_tokenizer

    tok = train_tokenizer([text] * 8, 300)
    tok.chat_template = template
    if not pad:
        tok.pad_token = None
    return tok


# ---- the command line, in this process -----------------------------------------------------------
@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, cache=None, cwd=None) -> CliResult:
    """``robust-unlearn ARGS`` in this process (``robust_unlearn.cli.main``) with its stdout / stderr
    captured, as ``subprocess.run`` would give them. ``cache``: $ROBUST_UNLEARN_CACHE for the call;
    ``cwd``: the working directory for the call (default: the current one). What ``main`` changes for the process
    (the robust_unlearn logger's handler, level and propagation, warning filters, environment variables,
    the working directory, sys.argv) is put back afterwards, so nothing leaks into later tests."""
    from robust_unlearn.cli import main

    argv = [str(a) for a in args]
    logger = logging.getLogger("robust_unlearn")
    saved_logger = (logger.handlers[:], logger.level, logger.propagate)
    saved_env = dict(os.environ)
    saved_argv, saved_cwd = sys.argv[:], os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        if cache is not None:
            os.environ["ROBUST_UNLEARN_CACHE"] = str(cache)
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = ["robust-unlearn", *argv]  # as the console script sees them (run.json's command)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved_logger
        for k in set(os.environ) - set(saved_env):
            del os.environ[k]
        os.environ.update({k: v for k, v in saved_env.items() if os.environ.get(k) != v})
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return CliResult(rc, out.getvalue(), err.getvalue())


# ---- the tiny fine-tuned target and retain oracle, once per session -------------------------------
# A from-scratch 2-layer Llama on 4 fictitious authors x 4 QA (forget25 = the last author), fine-tuned
# until it knows the forget set (forget answer probability > 0.6): what test_methods / test_robust /
# test_sweep / test_cli unlearn, sweep and evaluate. Tests add their own unlearn / sweep / eval overrides.
TINY = ["model.base=tiny", "model.prompt=qa", "data.num_authors=4", "data.qa_per_author=4",
        "data.forget_split=forget25", "data.train_utility=false", "finetune.precision=fp32", "finetune.lr=3e-3",
        "finetune.epochs=40", "finetune.batch_size=4", "finetune.freeze_embeddings=false",
        "sweep.compressions=[none]", "unlearn.lr=5e-4", "unlearn.steps=null", "unlearn.epochs=20", "unlearn.alpha=5",
        "unlearn.precision=fp32", "unlearn.stop_forget_prob=null", "unlearn.collapse_floor=null",
        # RMU on a 2-layer model: steer the last layer, train all MLP projections
        "unlearn.rmu_layer=1", "unlearn.per_method.RMU.steps=null", "unlearn.per_method.RMU.precision=fp32",
        r"unlearn.per_method.RMU.rmu_params=model\.layers\.(0|1)\.mlp\.(down|up|gate)_proj\.weight",
        "unlearn.per_method.RMU.lr=2e-3", "unlearn.per_method.RMU.alpha=10", "unlearn.per_method.RMU.rmu_steering=5",
        "unlearn.per_method.SimNPO.lr=2e-3", "unlearn.per_method.SimNPO.alpha=5", "unlearn.per_method.SimNPO.simnpo_beta=4.5",
        "unlearn.per_method.GA.epochs=10", "unlearn.per_method.NPO_ForgetOnly.epochs=10",
        # the token-weighted ascents move slowly on the tiny model: a larger step (SatImp also weighs its
        # forget term 0.1 by default)
        "unlearn.per_method.WGA.lr=2e-3", "unlearn.per_method.SatImp.lr=3e-3", "unlearn.per_method.SatImp.gamma=1.0",
        # the recipe's GradDiff settings are for SmolLM2 (lr 1.5e-4, early stop at 0.12): TINY's instead
        "unlearn.per_method.GradDiff.lr=5e-4", "unlearn.per_method.GradDiff.stop_forget_prob=null"]


@dataclass
class TinyModels:
    cache: Path        # the session's model cache (also the recipe's cache_dir)
    overrides: list    # TINY + cache_dir=...: `run` / `unlearn` with these reuse the fine-tuned models
    cfg: dict
    bench: dict
    target: str
    target_key: str
    oracle: str
    oracle_key: str


@pytest.fixture(scope="session")
def tiny_models(cache_dir) -> TinyModels:
    from robust_unlearn import pipeline
    from robust_unlearn.config import load_recipe
    from robust_unlearn.data import load_benchmark

    cache = cache_dir / "tiny"
    overrides = TINY + [f"cache_dir={cache}"]
    cfg = load_recipe(None, overrides)
    bench = load_benchmark(cfg)
    target, target_key = pipeline.target_checkpoint(cfg, bench)
    oracle, oracle_key = pipeline.oracle_checkpoint(cfg, bench)
    return TinyModels(cache, overrides, cfg, bench, target, target_key, oracle, oracle_key)


@pytest.fixture(scope="session")
def gibberish_dir(tmp_path_factory):
    """A tiny sequence classifier (random weights, two classes) and its tokenizer, saved as a checkpoint."""
    from transformers import LlamaForSequenceClassification

    from robust_unlearn.models import tiny_config, train_tokenizer

    tok = train_tokenizer(["a b c d French author wrote the novel"] * 8, 300)
    with torch.random.fork_rng():  # the other tests' random state is left as it was
        torch.manual_seed(0)
        clf = LlamaForSequenceClassification(tiny_config(len(tok), num_labels=2))
    out = tmp_path_factory.mktemp("gibberish")
    clf.save_pretrained(out)
    tok.save_pretrained(out)
    return out
