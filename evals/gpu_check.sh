#!/usr/bin/env bash
# The checks that need a GPU, in one go (a few minutes on one H100 / H200): the quantization-bin floor
# kernel's bandwidth against a device copy, `robust-unlearn plan` against measured peaks of one
# unlearning step on the shapes of Llama-3.2-1B and Llama-3.1-8B, and the TOFU Llama-3.2-1B recipe end to
# end on a 1B-shaped model (random weights and SmolLM2's tokenizer: nothing is downloaded).
#   OUT=DIR bash evals/gpu_check.sh          (python3 with torch, triton, transformers and peft)
# The floor bench times every launch setting in BLOCKS x WARPS x PARTIAL (default: the kernel's own, plus
# the alternatives below); FLOOR=0 skips it. PLAN=0 skips the plan check (PLAN_ONLY picks its rows at
# 1B, PLAN_8B=0 skips 8B); ROBUST=0 the Robust_ row at the recipe's own batch; RECIPE=0 the recipe run.
# The recipe run needs TOFU=DIR (TOFU's files, or evals/tofu_subset.py's) and TOKENIZER=DIR (any
# checkpoint's, e.g. the built-in target's), with datasets, bitsandbytes and rouge-score installed; it is
# stopped after RECIPE_S seconds (default 400), METHODS and NEW_TOKENS pick its methods and answer length.
set -uo pipefail
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# the package must be installed (its Triton kernels install as robust_unlearn.kernels); the NF4 / FP4 code
# levels come from bitsandbytes, so the floor bench runs int8 alone where bitsandbytes is missing
$PY -c "import robust_unlearn.kernels" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "install the package first: pip install --no-deps -e ."; exit 2; }
FORMATS="nf4 int8 nf4,int8"
$PY -c "import bitsandbytes" 2>/dev/null || FORMATS="int8"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
for f in $FORMATS; do
  [ "${FLOOR:-1}" = 0 ] && break
  for s in 4096x4096 8192x8192; do
    $PY evals/floor_bench.py --shape "$s" --dtype bf16 --formats "$f" --block-sizes "${BLOCKS:-1024,2048,4096}" \
      --warps "${WARPS:-4,8}" --partial "${PARTIAL:-0,1}" 2>&1 | tee -a "$OUT/floor_bench.txt"
  done
done
if [ "${PLAN:-1}" != 0 ]; then
  timeout "${PLAN_1B_S:-200}" $PY evals/plan_check.py --model-config evals/configs/llama-3.2-1b.json --rows 4 \
    --length 256 ${PLAN_ONLY:+--only $PLAN_ONLY} --json "$OUT/plan_1b.json" 2>&1 | tee "$OUT/plan_1b.txt"
  # fp32 full fine-tuning of 8B (16 bytes per parameter, 128 GB) does not fit one GPU: bf16, SURE, LoRA only
  [ "${PLAN_8B:-1}" = 0 ] || timeout "${PLAN_8B_S:-300}" $PY evals/plan_check.py --model-config \
    evals/configs/llama-3.1-8b.json --rows 2 --length 256 --only 1,4,5,6,7,8 --json "$OUT/plan_8b.json" 2>&1 \
    | tee "$OUT/plan_8b.txt"
fi
# Robust_GradDiff with its shipped options (robust_qat, robust_prune_view 0.3) at the TOFU recipe's batch,
# 32 rows x 512 tokens: the plan puts it at 121 GiB on one process
[ "${ROBUST:-1}" = 0 ] || timeout "${ROBUST_S:-200}" $PY evals/plan_check.py --model-config \
  evals/configs/llama-3.2-1b.json --rows 32 --length 512 --only 9 --json "$OUT/plan_1b_b32.json" 2>&1 \
  | tee "$OUT/plan_1b_b32.txt"
[ "${RECIPE:-1}" = 0 ] && exit 0
# recipes/tofu/llama3.2-1b.yaml on a 1B-shaped model with random weights (evals/random_checkpoint.py):
# the pipeline's time and peak memory at that size, not its metrics. Two methods (GradDiff; Robust_GradDiff
# with its shipped options, its whole 90 steps: a random oracle would stop it at once) and three columns;
# the collapse guard is off (a random model's answers loop).
CK=${CK:-/tmp/gpu_check_models}
RUN=${RUN:-/tmp/gpu_check_recipe}
for s in 0 1; do
  [ -e "$CK/llama-1b-$s/model.safetensors" ] || $PY evals/random_checkpoint.py --tokenizer "$TOKENIZER" \
    --config "${RECIPE_CONFIG:-evals/configs/llama-3.2-1b.json}" --seed $s --out "$CK/llama-1b-$s" 2>&1 | grep -v "Writing model"
done
timeout "${RECIPE_S:-400}" $PY -c 'import atexit, signal, sys, torch
signal.signal(signal.SIGTERM, lambda *a: sys.exit(124))  # stopped by timeout: the peak is still printed
atexit.register(lambda: torch.cuda.is_available() and print(f"peak GPU memory of the run: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"))
from robust_unlearn.cli import main
sys.argv[0] = "robust-unlearn"
main()' -v run recipes/tofu/llama3.2-1b.yaml "data.path=$TOFU" data.forget_split=forget01 \
  "model.target=$CK/llama-1b-0" "model.oracle=$CK/llama-1b-1" "unlearn.methods=[${METHODS:-GradDiff,Robust_GradDiff}]" \
  "sweep.compressions=[none,nf4,prune30]" unlearn.per_method.Robust_GradDiff.robust_qat=true \
  unlearn.per_method.Robust_GradDiff.robust_prune_view=0.3 unlearn.collapse_floor=null \
  unlearn.per_method.Robust_GradDiff.stop_forget_prob=null \
  "eval.max_new_tokens=${NEW_TOKENS:-50}" eval.batch_size=64 --out "$RUN" 2>&1 | grep -v "Loading weights" \
  | tee "$OUT/recipe.log"
cp "$RUN/report.md" "$OUT/recipe_report.md" 2>/dev/null
cp "$RUN/results.jsonl" "$OUT/recipe_results.jsonl" 2>/dev/null
