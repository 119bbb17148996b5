#!/usr/bin/env bash
# Every GPU check and measurement of the served-model gates, in one call on the GPU machine:
#   source benchmarks/gpu_env.sh && bash benchmarks/gpu_served.sh        (writes under $OUT)
# 1. The GPU tests of the runtime: the FP8/INT8 KV cache in the kernels, RuntimeLM on CUDA, a device-side assert,
#    and the existing fused/quantized/async runtime tests (the kernels changed under them).
# 2. benchmarks/kv_capacity_gpu.py: requests of 128/1024 that fit 4 GiB of KV with bf16, FP8 and INT8 K/V.
set -u -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/runtime/test_kv_quant_gpu.py tests/evals/test_runtime_lm_gpu.py tests/runtime/test_engine_faults_gpu.py \
  tests/runtime/test_fused_decode_gpu.py tests/runtime/test_quantized_runtime_gpu.py tests/runtime/test_async_scheduling_gpu.py \
  2>&1 | tail -40 | tee "$OUT/pytest.txt"
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/kv_capacity_gpu.py --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/kv_capacity.md"
