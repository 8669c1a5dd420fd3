#!/usr/bin/env bash
# The GPU check of the fast path, for one H100 from a bare machine (torch and triton preinstalled), in <= 8 minutes:
#   benchmarks/gpu_check.sh OUTDIR [PART]
# PART "fast" (the default): 1. the CUDA tests (compiled vs eager logits, the fast sampler on the GPU, CUDA-graph
# replay), 2. dgemma bench of 26b-a4b random weights in bf16 at prompt 4096 (fixed16, fixed48, adaptive, ar), 3. the
# engine at concurrency 1 and 8 with 48 steps.
# PART "quant" (issue 14): 1. the CUDA tests, 2. the int4 kernel's micro-benchmark (benchmarks/int4_kernel_bench.py),
# 3. bench 26b-a4b at prompt 4096 in bf16 (fixed16, ar: the baseline on the same machine), fp8 (fixed16, adaptive,
# ar) and int4 (fixed16, ar; through the Triton kernel), each with its share of its own floor.
# Every step writes JSON (and its log) into OUTDIR and has its own time limit, so one slow step cannot eat the
# others' budget. Needs: torch with CUDA, and dgemma's pure-Python deps (pip install -e . or PYTHONPATH=src with
# safetensors/tokenizers present); pytest for step 1 (skipped with a note if missing).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [fast|quant]}
PART=${2:-fast}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="$OUT/.inductor"
t0=$(date +%s)
note() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/log.txt"; }

$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" > "$OUT/env.txt" 2>&1
note "env: $(cat "$OUT/env.txt")"

if $PY -c "import pytest" 2>/dev/null; then
  note "1/3 CUDA tests"
  DGEMMA_SLOW_TESTS=1 timeout $([ "$PART" = quant ] && echo 80 || echo 150) $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    --junitxml "$OUT/tests.xml" > "$OUT/tests.txt" 2>&1
  note "tests rc=$? ($(tail -1 "$OUT/tests.txt"))"
else
  note "1/3 skipped: pytest is not installed"
fi

if [ "$PART" = quant ]; then
  note "int4 kernel micro-benchmark (one layer's products: bf16, int4 Triton, int4 dequantized)"
  timeout 40 $PY benchmarks/int4_kernel_bench.py --json "$OUT/int4_kernel.json" > "$OUT/int4_kernel.txt" 2>&1
  note "int4 kernel bench rc=$?"
  for spec in "bf16::fixed16,ar:100" "fp8:--format fp8:fixed16,adaptive,ar:140" "int4:--format int4:fixed16,ar:120"; do
    IFS=: read -r name flags modes limit <<< "$spec"
    note "bench 26b-a4b $name prompt 4096 ($modes)"
    # shellcheck disable=SC2086
    timeout "$limit" $PY -m dgemma bench --random-weights --preset 26b-a4b $flags --prompt-len 4096 --modes "$modes" \
      --repeats 1 --json "$OUT/bench_26b_$name.json" > "$OUT/bench_26b_$name.txt" 2>&1
    note "bench $name rc=$?"
  done
  rm -rf "$OUT/.inductor"
  note "done"
  exit 0
fi

note "2/3 bench 26b-a4b bf16 prompt 4096"
timeout 270 $PY -m dgemma bench --random-weights --preset 26b-a4b --prompt-len 4096 \
  --modes fixed16,fixed48,adaptive,ar --repeats 1 --json "$OUT/bench_26b.json" > "$OUT/bench_26b.txt" 2>&1
note "bench rc=$?"

note "3/3 engine concurrency 1 and 8, 48 steps"
timeout 120 $PY benchmarks/engine_bench.py --preset 26b-a4b --concurrency 1,8 --steps 48 --prompt-len 128 \
  --json "$OUT/engine_26b.json" > "$OUT/engine_26b.txt" 2>&1
note "engine rc=$?"
rm -rf "$OUT/.inductor"
note "done"
