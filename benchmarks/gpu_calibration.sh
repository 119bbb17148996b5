#!/usr/bin/env bash
# Calibrated builds at real sizes on the GPU machine (one step per call; each fits the 600 s limit):
#   source benchmarks/gpu_env.sh && bash benchmarks/gpu_calibration.sh STEP        (writes under $OUT)
# carrying build/gpu-carry (tokenizer/ and calib.json.gz, see below) and .whl.
# STEP:
#   8b        GPU tests of onloaded calibration, then the Llama-3.1-8B shape: int8 RTN, FP8 static, SmoothQuant
#             W8A8, int4 AWQ g128 (128 x 2048 tokens)
#   8b-gptq   the 8B shape with int4 GPTQ g128
#   kernels   GPU tests of the GPTQ block kernel, onloading, the 8-bit kernels, the grouped expert kernel and the fused decode
#             paths (Qwen3's q/k norms included); GPTQ's column loop
#             against its Triton block kernel on the 8B layer's Linear shapes; the grouped expert kernel on a Qwen3-30B-A3B
#             layer shape (benchmarks/moe_kernel_gpu.py); then the 8B shape with int4 GPTQ g128 (and $SCHEMES, e.g. smoothquant-w8a8)
#   gptq-kernel  the same without the 8B build
#   70b       the Llama-3.1-70B layer shape with 4, then 12 decoder layers, int4 AWQ g128, --max-device-memory
#             $BUDGET (default 14GiB: the smallest budget the estimate accepts for this layer) and --max-host-memory
#             $HOST_BUDGET (default 24GiB: finished layers parked in mapped files)
# build/gpu-carry: tokenizer/ (any tokenizer folder, e.g. the SmolLM2 source's tokenizer files) and calib.json.gz
# (python -c "from optforge.evals.datasets import export_splits; export_splits('build/gpu-carry/calib.json.gz',
# [('boolq', 'validation')])"). Models and the build cache live in build/gpu-work (kept while the machine is warm).
set -u -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
COMMON=(--tokenizer build/gpu-carry/tokenizer --data build/gpu-carry/calib.json.gz --out "$OUT")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
free -g | tee -a "$OUT/gpu.txt"
case "${1:-8b}" in
  8b)
    timeout 240 python3 -m pytest -q --tb=short -m gpu -p no:cacheprovider tests/passes/test_onload_gpu.py tests/runtime/test_kv_quant_gpu.py \
      tests/runtime/test_quantized_runtime_gpu.py 2>&1 | tail -30 | tee "$OUT/pytest.txt"
    timeout 420 python3 benchmarks/calibration_scale_gpu.py --shape 8b --schemes int8-rtn fp8-static smoothquant-w8a8 int4-awq-g128 "${COMMON[@]}" 2>&1 \
      | grep -v -E "Warning|it/s\]" | tee "$OUT/8b.log"
    ;;
  kernels|gptq-kernel)
    timeout 150 python3 -m pytest -q --tb=short -m gpu -p no:cacheprovider tests/passes/quant/test_gptq_block.py tests/passes/test_onload_gpu.py \
      tests/formats/test_kernels_gpu.py tests/runtime/test_moe_kernel.py tests/runtime/test_qk_norm_decode.py tests/runtime/test_fused_decode_gpu.py \
      2>&1 | tail -30 | tee "$OUT/pytest.txt"
    timeout 60 python3 benchmarks/gptq_kernel_gpu.py --out "$OUT" 2>&1 | tee "$OUT/gptq_kernel.log"
    timeout 90 python3 benchmarks/moe_kernel_gpu.py --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/moe_kernel.log"
    [ "$1" = gptq-kernel ] || timeout ${BUILD_TIMEOUT:-260} python3 benchmarks/calibration_scale_gpu.py --shape 8b --schemes int4-gptq-g128 ${SCHEMES:-} "${COMMON[@]}" 2>&1 \
      | grep -v -E "Warning|it/s\]" | tee "$OUT/8b-kernels.log"
    ;;
  8b-gptq)
    timeout 90 python3 -m pytest -q -x --tb=short -m gpu -p no:cacheprovider tests/passes/test_onload_gpu.py 2>&1 | tail -40 | tee "$OUT/pytest-onload.txt"
    timeout 480 python3 benchmarks/calibration_scale_gpu.py --shape 8b --schemes int4-gptq-g128 "${COMMON[@]}" 2>&1 | grep -v -E "Warning|it/s\]" | tee "$OUT/8b-gptq.log"
    ;;
  70b)
    rm -rf build/gpu-work/model-8b  # disk
    for n in 4 12; do
      timeout 250 python3 benchmarks/calibration_scale_gpu.py --shape 70b-layers --layers $n --schemes int4-awq-g128 --max-device-memory ${BUDGET:-14GiB} \
        --max-host-memory ${HOST_BUDGET:-24GiB} "${COMMON[@]}" 2>&1 \
        | grep -v -E "Warning|it/s\]" | tee "$OUT/70b-$n.log"
      rm -rf build/gpu-work/model-70b-layers-$n  # disk: the next stack needs the room
    done
    ;;
esac
df -h . | tail -1 | tee -a "$OUT/gpu.txt"
