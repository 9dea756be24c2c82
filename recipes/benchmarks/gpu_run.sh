#!/usr/bin/env bash
# Every benchmark of recipes/benchmarks/ in the GPU settings the issues name (GPT-2 small, bf16), in
# parts that each fit one 10-minute command of the device tool. Run on the GPU machine, repo root:
#   bash recipes/benchmarks/gpu_run.sh engine     # per-sample gradients, projection, collection
#   bash recipes/benchmarks/gpu_run.sh train      # GPT-2 patches (+ torch.compile), GQC overhead
#   bash recipes/benchmarks/gpu_run.sh quality    # GQC vs fixed accumulation at equal data
#   bash recipes/benchmarks/gpu_run.sh pareto     # eval loss vs optimizer steps at equal data, seed 0
#   bash recipes/benchmarks/gpu_run.sh pareto2    # seeds 1, 2, then the 3-seed table + PNG of both parts
#     (pareto2 reads $DEST/gqc_pareto_cuda_s0.csv: run it on the same machine, or copy that CSV back in)
# Wheels from gpu_wheels.sh (carried as .whl) are installed into /tmp/site first. Results (CSV, PNG,
# one log per part with the environment) go to $OUT, which the device tool brings back, else
# ./gpu_results. Commit the CSVs with their device/versions/date columns.
# TOY=1 runs the same parts on the CPU at toy sizes: a check of this script, not a measurement.
# PYTHON=/path/to/python picks the interpreter (default: python3 on PATH), e.g. a virtualenv's when
# it is not activated (the tests pass their own).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
PART="${1:?usage: gpu_run.sh engine|train|quality|pareto|pareto2}"
case "$PART" in engine|train|quality|pareto|pareto2) ;; *) echo "unknown part $PART: engine, train, quality, pareto or pareto2" >&2; exit 2 ;; esac
DEST="${OUT:-$PWD/gpu_results}"
mkdir -p "$DEST"
LOG="$DEST/$PART.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${TOY:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then  # TOY runs use this machine's packages
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
B=recipes/benchmarks
if [ "${TOY:-0}" = 1 ]; then
  SMALL=(--device cpu --batch 2 --seq 16); PATCH=(--device cpu --batch 2 --seq 16)
  REPS=(--reps 1 --warmup 1); ROUNDS=(--rounds 1 --reps 1 --warmup 1)
  COLL=(--steps 1 --warmup 1 --rounds 1 --dd-mib 4); PSTEPS=(--reps 1 --steps 1 --warmup 1 --mask_calls 5)
  RANK=(--rank 64); GQC_ENV=(BENCH_REPEATS=1)
  Q_ENV=(QUALITY_EPOCHS=1 QUALITY_TRAIN_BLOCKS=128 QUALITY_EVAL_BLOCKS=8 QUALITY_VARIANTS=fixed_ga1,gnts_rel0.8)
  PARETO=(--smoke)
  SUFFIX=_toy
else
  SMALL=(--device cuda --model gpt2-small --batch 8 --seq 512 --bf16)
  PATCH=(--device cuda --model gpt2-small --seq 1024 --batch 4 --bf16 --compile)
  REPS=(); ROUNDS=(); COLL=(); PSTEPS=(); RANK=(--rank 256)
  GQC_ENV=(BENCH_DEVICE=cuda); Q_ENV=(QUALITY_DEVICE=cuda)
  PARETO=(--device cuda)  # GPT-2 small, bf16, B8 T256, 256 microbatches per run, all 18 variants
  SUFFIX=_cuda
fi
run() {  # name, time limit (s), command...: one benchmark, its output appended to the part's log
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%FT%TZ)): $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}
{
  echo "part $PART, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import sys, torch, transformers, accelerate; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$LOG"
case "$PART" in
  engine)
    run per_sample_grads 230 "$PY" $B/bench_per_sample_grads.py "${SMALL[@]}" "${REPS[@]}" --out "$DEST/bench_per_sample_grads$SUFFIX.csv"
    run projection 140 "$PY" $B/bench_projection.py "${SMALL[@]}" "${ROUNDS[@]}" "${RANK[@]}" --out "$DEST/bench_projection$SUFFIX.csv"
    run collection 200 "$PY" $B/bench_collection.py "${SMALL[@]}" "${COLL[@]}" --workdir /tmp/bench_collection --out "$DEST/bench_collection$SUFFIX.csv"
    ;;
  train)
    run gpt2_patches 330 "$PY" $B/bench_gpt2_patches.py "${PATCH[@]}" "${PSTEPS[@]}" --out "$DEST/bench_gpt2_patches$SUFFIX.csv"
    run gqc_overhead 240 env "${GQC_ENV[@]}" "$PY" $B/bench_gqc_overhead.py --out "$DEST/bench_gqc_overhead$SUFFIX.csv"
    ;;
  quality)
    run gqc_quality 560 env "${Q_ENV[@]}" QUALITY_OUT="$DEST/gqc_quality$SUFFIX" "$PY" $B/gqc_quality.py
    ;;
  pareto)
    run gqc_pareto 570 "$PY" $B/gqc_pareto.py "${PARETO[@]}" --seeds 0 --out "$DEST/gqc_pareto${SUFFIX}_s0.csv"
    ;;
  pareto2)
    run gqc_pareto 570 "$PY" $B/gqc_pareto.py "${PARETO[@]}" --seeds 1,2 --out "$DEST/gqc_pareto${SUFFIX}_s12.csv"
    run gqc_pareto_merge 60 "$PY" $B/gqc_pareto.py --from-csv "$DEST/gqc_pareto${SUFFIX}_s0.csv,$DEST/gqc_pareto${SUFFIX}_s12.csv" --out "$DEST/gqc_pareto$SUFFIX.csv"
    ;;
esac
