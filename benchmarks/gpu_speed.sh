#!/usr/bin/env bash
# Serving speed of 8B-shaped artifacts on the GPU machine (one step per call; each fits the 600 s limit):
#   source benchmarks/gpu_env.sh && bash benchmarks/gpu_speed.sh STEP        (writes under $OUT)
# carrying build/gpu-carry (tokenizer/, see gpu_calibration.sh) and .whl.
# STEP:
#   fp8-8b   the Llama-3.1-8B shape (random bf16 weights) built into an FP8 artifact (per-channel weights, dynamic
#            per-token activations) with `optforge build --device cuda`, then `optforge bench` at batch 1 (6 requests
#            of 128/128) and 1,024 requests of 128/128 at concurrency 256, the FP8 artifact and the bf16 folder;
#            Python stacks of every thread are written every 60 s of a bench (bench-*-stacks.txt), showing where
#            a slow start spends its time.
set -u -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORK=build/gpu-work
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

bench() {  # LABEL TIMEOUT MODEL ARGS...: optforge bench under a stack dumper
  local label=$1 limit=$2 model=$3
  shift 3
  local started=$SECONDS
  timeout -k 5 "$limit" python3 - "$OUT/bench-$label-stacks.txt" "$model" "$@" <<'PY' 2>&1 | grep -v -E "Warning|it/s\]" | tail -25 | tee "$OUT/bench-$label.txt"
import faulthandler, sys
stacks = open(sys.argv[1], "w")
faulthandler.dump_traceback_later(60, repeat=True, file=stacks)
sys.argv = ["optforge", "bench", *sys.argv[2:]]
from optforge.cli import main
main()
PY
  echo "bench $label: $((SECONDS - started)) s wall (rc ${PIPESTATUS[0]})" | tee -a "$OUT/bench-$label.txt"
}

case "${1:-fp8-8b}" in
  fp8-8b)
    python3 -c "
from pathlib import Path
import sys; sys.path.insert(0, 'benchmarks')
from calibration_scale_gpu import make_model
make_model(Path('$WORK/model-8b'), '8b', None, Path('build/gpu-carry/tokenizer'), 'cuda')" 2>&1 | grep -v Warning | tee "$OUT/model.txt"
    cat > "$WORK/fp8.yaml" <<YAML
name: fp8-8b
model: {source: model-8b, dtype: bfloat16}  # paths relative to this recipe file
data: {eval: {perplexity: null}}
passes: [{name: quant.fp8}]
output: fp8-8b
YAML
    started=$SECONDS
    timeout 200 python3 -m optforge build "$WORK/fp8.yaml" --device cuda --cache-dir "$WORK/cache" 2>&1 | grep -v -E "Warning|it/s\]" | tail -15 | tee "$OUT/build-fp8.txt"
    echo "build: $((SECONDS - started)) s" | tee -a "$OUT/build-fp8.txt"
    COMMON=(--device cuda --dtype bfloat16 --no-hf --input-len 128 --output-len 128)
    bench fp8-b1 130 "$WORK/fp8-8b" "${COMMON[@]}" --num-requests 6 --concurrency 1
    bench bf16-b1 100 "$WORK/model-8b" "${COMMON[@]}" --num-requests 6 --concurrency 1 --no-verify
    bench fp8-c256 130 "$WORK/fp8-8b" "${COMMON[@]}" --num-requests 1024 --concurrency 256
    ;;
esac
df -h . | tail -1 | tee -a "$OUT/gpu.txt"
