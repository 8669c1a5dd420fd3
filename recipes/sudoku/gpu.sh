#!/usr/bin/env bash
# Train the Sudoku diffusion model and its AR baseline side by side on one GPU machine, in background processes
# that outlive the command (the lent machine of this workplace stays up between back-to-back calls).
#   bash recipes/sudoku/gpu.sh start MINUTES   # set up, smoke-test, launch both runs (MINUTES of training each)
#   bash recipes/sudoku/gpu.sh wait SECONDS    # sleep, then report and export the latest checkpoints to $OUT
#   bash recipes/sudoku/gpu.sh finish          # wait for both runs, export, evaluate on the held-out puzzles
# Expects the base data in .carry/sudoku/{train.jsonl,test.txt} (made by prepare.py on any machine).
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
R=/root/sudoku
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
COMMON=(--set batch_size=512 --set lr=1.5e-3 --set min_lr_ratio=0.05 --set warmup_steps=300 --set steps=1000000
        --set save_every=1000 --set log_every=100 --set keep_checkpoints=2 -q)  # 2: an export never reads a dir being pruned

report() {
  for m in diffusion ar; do
    echo "== $m: $(tail -n 1 $R/$m/metrics.csv 2>/dev/null)"; tail -n 3 $R/$m.log 2>/dev/null
  done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
}

export_latest() {
  for m in diffusion ar; do
    last=$(cat $R/$m/last 2>/dev/null) || continue
    rm -rf $R/export/$m && python3 recipes/sudoku/export.py $R/$m/$last $R/export/$m && echo "$last" > $R/export/$m/STEP
    tar -C $R/export -cf $OUT/$m.tar $m
    cp $R/$m/metrics.csv $OUT/metrics_$m.csv
  done
  cat $R/diffusion.log $R/ar.log > $OUT/train_logs.txt 2>/dev/null
}

case "${1:-}" in
start)
  MIN=$2
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, torch.nn.functional as F; print('torch', torch.__version__, torch.cuda.get_device_name(), 'F.grouped_mm', hasattr(F, 'grouped_mm'))"
  mkdir -p $R && cp .carry/sudoku/train.jsonl .carry/sudoku/test.txt $R/ || exit 1
  python3 recipes/sudoku/prepare.py --out $R --size base --augment ${AUG:-15} || exit 1
  wc -l $R/train_aug.jsonl
  for m in diffusion ar; do  # smoke: a few steps on the GPU, in the foreground, so a broken run fails fast
    cfg=recipes/sudoku/train.toml; [ $m = ar ] && cfg=recipes/sudoku/train_ar.toml
    python3 -m dgemma train --config $cfg --set model=$R/init --set data=$R/train.jsonl --set out=$R/smoke_$m \
      --set steps=20 --set batch_size=512 --set log_every=5 -q || exit 1
    tail -n 2 $R/smoke_$m/metrics.csv
  done
  for m in diffusion ar; do
    cfg=recipes/sudoku/train.toml; [ $m = ar ] && cfg=recipes/sudoku/train_ar.toml
    setsid nohup python3 -m dgemma train --config $cfg --set model=$R/init --set data=$R/train_aug.jsonl \
      --set out=$R/$m --set max_minutes=$MIN "${COMMON[@]}" > $R/$m.log 2>&1 < /dev/null &
  done
  sleep "${3:-60}"; report
  ;;
wait)
  sleep "$2"; report; export_latest
  if [ -n "${SWEEP:-}" ]; then
    python3 recipes/sudoku/sweep.py --model $R/export/diffusion --puzzles $R/test.txt \
      --limit 300 --setting default: --setting eb1_cold:entropy_bound=1.0,t_min=0.1,t_max=0.3
  fi
  ;;
finish)
  while pgrep -f "dgemma train" > /dev/null; do sleep 5; done  # the runs stop themselves at MINUTES
  report; export_latest
  python3 recipes/sudoku/sweep.py --model $R/export/diffusion --puzzles $R/test.txt --json-out $OUT/sweep.json
  python3 recipes/sudoku/sweep.py --model $R/export/ar --puzzles $R/test.txt --mode ar --json-out $OUT/sweep_ar.json
  ;;
*)
  echo "usage: bash recipes/sudoku/gpu.sh start MINUTES | wait SECONDS | finish" >&2; exit 2
  ;;
esac
