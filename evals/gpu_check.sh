#!/usr/bin/env bash
# The checks that need a GPU, in one go (a few minutes on one H100 / H200): the quantization-bin floor
# kernel's bandwidth against a device copy, and `robust-unlearn plan` against measured peaks of one
# unlearning step on the shapes of Llama-3.2-1B and Llama-3.1-8B (random weights: nothing is downloaded).
#   OUT=DIR bash evals/gpu_check.sh          (python3 with torch, triton, transformers and peft)
# The floor bench times every launch setting in BLOCKS x WARPS x PARTIAL (default: the kernel's own, plus
# the alternatives below); PLAN=0 skips the plan check.
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
  for s in 4096x4096 8192x8192; do
    $PY evals/floor_bench.py --shape "$s" --dtype bf16 --formats "$f" --block-sizes "${BLOCKS:-1024,2048,4096}" \
      --warps "${WARPS:-4,8}" --partial "${PARTIAL:-0,1}" 2>&1 | tee -a "$OUT/floor_bench.txt"
  done
done
[ "${PLAN:-1}" = 0 ] && exit 0
timeout "${PLAN_1B_S:-200}" $PY evals/plan_check.py --model-config evals/configs/llama-3.2-1b.json --rows 4 \
  --length 256 --json "$OUT/plan_1b.json" 2>&1 | tee "$OUT/plan_1b.txt"
# fp32 full fine-tuning of 8B (16 bytes per parameter, 128 GB) does not fit one GPU: bf16, SURE, LoRA only
timeout "${PLAN_8B_S:-300}" $PY evals/plan_check.py --model-config evals/configs/llama-3.1-8b.json --rows 2 \
  --length 256 --only 1,4,5,6,7,8 --json "$OUT/plan_8b.json" 2>&1 | tee "$OUT/plan_8b.txt"
