#!/usr/bin/env bash
# Train the Sudoku diffusion model and its AR baseline side by side on one GPU machine.
#   OUT=DIR bash recipes/sudoku/gpu.sh run [MINUTES]  # everything in one command (default 6 minutes of training;
#       about MINUTES + 2 of wall time on one H100): data, a fresh init, both trainings at once with on-device
#       symmetry augmentation (augment=sudoku), eager unless COMPILE=1, export,
#       evaluation of both on the held-out puzzles. Writes to $OUT: diffusion.tar, ar.tar (bf16 checkpoints), metrics_*.csv, eval.json, eval_ar.json,
#       eval_reference.json, train_logs.txt, timings.txt. Data: .carry/sudoku/{train.jsonl,test.txt} when present (made by prepare.py
#       here), else generated on the machine's cores (N_TRAIN, N_TEST; about 40 s for 40k puzzles on 16 cores).
#       Knobs: SIZE (base), BATCH (512), N_TRAIN (40000), N_TEST (1000), plus those below.
# The shipped run's three-call form (background processes that outlive each call):
#   bash recipes/sudoku/gpu.sh start MINUTES   # set up, smoke-test, launch both runs (MINUTES of training each)
#   bash recipes/sudoku/gpu.sh wait SECONDS    # sleep, then report and export the latest checkpoints to $OUT
#   bash recipes/sudoku/gpu.sh finish          # wait for both runs, export, evaluate on the held-out puzzles
# Expects the base data in .carry/sudoku/{train.jsonl,test.txt} (made by prepare.py on any machine).
# Environment knobs: FROM=shipped continues from the models in src/dgemma/assets/sudoku (default: a fresh init);
# LR, WARMUP (steps), SEED (data order and a fresh set of symmetry images), AUG (images per puzzle),
# COMPILE=1 (torch.compile the objective; a run that fails to compile restarts eagerly for the minutes left;
# compiled gradients equal eager ones on CPU; on CUDA run tests/test_cuda.py's compiled-objective test first).
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
R=${WORK:-/root/sudoku}  # scratch space on the machine
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SEED=${SEED:-0}
COMMON=(--set batch_size=${BATCH:-512} --set lr=${LR:-1.5e-3} --set min_lr_ratio=0.05 --set warmup_steps=${WARMUP:-300}
        --set steps=1000000 --set seed=$SEED --set save_every=1000 --set log_every=100
        --set keep_checkpoints=2 -q)  # 2: an export never reads a dir being pruned

init_of() {  # the checkpoint a run starts from
  if [ "${FROM:-}" = shipped ]; then echo src/dgemma/assets/sudoku/$1; else echo $R/init; fi
}

launch() {  # launch MODEL CONFIG MINUTES: background run; with COMPILE=1 an eager retry if compiling fails
  local m=$1 cfg=$2 min=$3
  local args=(--config $cfg --set model=$(init_of $m) --set data=${DATA:-$R/train_aug.jsonl} --set out=$R/$m
              "${COMMON[@]}" ${EXTRA:-})
  if [ "${COMPILE:-0}" = 1 ]; then
    OUTDIR=$R/$m setsid nohup bash -c '
      t0=$(date +%s); min=$1; shift
      python3 -m dgemma train "$@" --set compile=true --set max_minutes=$min && exit 0
      echo "== compiled run failed; going on eagerly"
      if ls -d "$OUTDIR"/checkpoint-* > /dev/null 2>&1; then  # resume: the saved clock counts towards $min
        python3 -m dgemma train "$@" --set max_minutes=$min
      else  # nothing saved yet: start over with the minutes left
        rm -rf "$OUTDIR"
        python3 -m dgemma train "$@" --set max_minutes=$(python3 -c "print(max(0.5, $min - ($(date +%s) - $t0) / 60))")
      fi' _ "$min" "${args[@]}" > $R/$m.log 2>&1 < /dev/null &
  else
    setsid nohup python3 -m dgemma train "${args[@]}" --set max_minutes=$min > $R/$m.log 2>&1 < /dev/null &
  fi
}

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
run)
  MIN=${2:-6}
  t0=$(date +%s)
  stamp() { echo "$1 $(( $(date +%s) - t0 )) s" | tee -a "$OUT/timings.txt"; }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  rm -rf $R && mkdir -p $R
  if [ -f .carry/sudoku/train.jsonl ] && [ -f .carry/sudoku/test.txt ]; then
    cp .carry/sudoku/train.jsonl .carry/sudoku/test.txt $R/
  fi
  python3 recipes/sudoku/prepare.py --out $R --size ${SIZE:-base} --n-train ${N_TRAIN:-40000} \
    --n-test ${N_TEST:-1000} --seed $SEED || exit 1  # reuses carried data; makes the init
  stamp "data+init"
  export DATA=$R/train.jsonl EXTRA="--set augment=sudoku"
  COMPILE=${COMPILE:-0}  # compiled training: gradients checked on CPU, not yet on CUDA (docs/training.md)
  for m in diffusion ar; do
    cfg=recipes/sudoku/train.toml; [ $m = ar ] && cfg=recipes/sudoku/train_ar.toml
    launch $m $cfg $MIN
  done
  while pgrep -f "dgemma train" > /dev/null; do sleep 5; done  # each run stops itself after MINUTES of training
  stamp "training"
  report; export_latest
  for m in diffusion ar; do [ -f $R/export/$m/config.json ] || { echo "no $m checkpoint; see train_logs.txt"; exit 1; }; done
  python3 recipes/sudoku/sweep.py --model $R/export/diffusion --puzzles $R/test.txt --setting default: \
    --json-out $OUT/eval.json
  python3 recipes/sudoku/sweep.py --model $R/export/ar --puzzles $R/test.txt --mode ar \
    --json-out $OUT/eval_ar.json
  python3 -m dgemma sudoku eval --puzzles $R/test.txt --model $R/export/diffusion --sampler reference \
    --batch-size 500 --json > $OUT/eval_reference.json  # the reference sampler beside the fast one
  stamp "eval"
  ;;
start)
  MIN=$2
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, torch.nn.functional as F; print('torch', torch.__version__, torch.cuda.get_device_name(), 'F.grouped_mm', hasattr(F, 'grouped_mm'))"
  mkdir -p $R && cp .carry/sudoku/train.jsonl .carry/sudoku/test.txt $R/ || exit 1
  python3 recipes/sudoku/prepare.py --out $R --size base --augment ${AUG:-15} --seed $SEED || exit 1
  wc -l $R/train_aug.jsonl
  for m in diffusion ar; do  # smoke: a few steps on the GPU, in the foreground, so a broken run fails fast
    cfg=recipes/sudoku/train.toml; [ $m = ar ] && cfg=recipes/sudoku/train_ar.toml
    python3 -m dgemma train --config $cfg --set model=$(init_of $m) --set data=$R/train.jsonl \
      --set out=$R/smoke_$m --set steps=10 --set batch_size=512 --set log_every=5 -q || exit 1
    tail -n 2 $R/smoke_$m/metrics.csv
  done
  for m in diffusion ar; do
    cfg=recipes/sudoku/train.toml; [ $m = ar ] && cfg=recipes/sudoku/train_ar.toml
    launch $m $cfg $MIN
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
  echo "usage: bash recipes/sudoku/gpu.sh run [MINUTES] | start MINUTES | wait SECONDS | finish" >&2; exit 2
  ;;
esac
