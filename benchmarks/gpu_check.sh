#!/usr/bin/env bash
# The GPU check of issue 18, as one prepared script for a lent GPU (within 8 minutes on an H100/H200):
# the Qwen2-VL-2B-shaped random VPT model (bf16, sdpa attention: transformers 5.6.0's flash-attention-2
# path is broken upstream) for training steps (plain, VPT reused prefix, VPT straightforward; para mask
# off and drawn) and for generation (plain, one-call loop, re-read flow; batch 1 and 8). Each benchmark
# prints its tokens/s, MFU and ratios, headlines last, and writes its section of docs/BENCHMARKS.md;
# with $OUT set (the device tool's folder), the report and the logs are copied there.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
run() {  # run NAME LIMIT_S COMMAND...: a benchmark with a time limit, its output kept
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "/tmp/gpu_check_$name.log"
}
run train 300 $PY benchmarks/bench_train.py --shape 2b --device cuda --dtype bfloat16 \
    --batch-size 4 --question-words 60 --answer-words 250 --grad-ckpt off --repeats 6 --warmup 2 --breakdown 0
run generate 150 $PY benchmarks/bench_generate.py --shape 2b --device cuda --dtype bfloat16 \
    --question-words 450 --answer-tokens 32 --batch-size 8 --repeats 2
if [ -n "$OUT" ]; then
  cp docs/BENCHMARKS.md /tmp/gpu_check_*.log "$OUT"/
fi
