#!/usr/bin/env bash
# The GPU check: on a CUDA machine, from a clean clone, set up, run the GPU-marked tests (ONNX Runtime's CUDA
# provider, TorchScript and eager torch on CUDA, bf16 parity, NCCL data-parallel training on the GPUs present) and
# the denoiser, sampling, input-pipeline and service-load benchmarks, and write one Markdown report: a table of the
# steps (passed or not, seconds), then each benchmark's own report. Each step has a time limit; together they stay
# under 9 minutes, so one call on a lent GPU machine does it all.
#
#   benchmarks/gpu_check.sh [REPORT.md]            # default: gpu-check.md
#
# EMSERVE_PYTHON=python3  use an interpreter that already has emserve's dependencies instead of `make setup` (a
#                         machine without internet: its packages on PYTHONPATH, e.g. wheels carried in and
#                         installed with pip --target; without onnxruntime-gpu the ONNX CUDA test is skipped and
#                         says so, and the benchmarks' onnx rows run on the CPU).
# GPU_CHECK_DEVICE=cpu    the same steps on the CPU with tiny sizes: how the test suite checks this script where
#                         there is no GPU (the GPU-marked tests are then skipped, and say so).
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=$(realpath -m "${1:-gpu-check.md}")
mkdir -p "$(dirname "$REPORT")"
DEVICE=${GPU_CHECK_DEVICE:-cuda}
WORK=$(mktemp -d -t emserve-gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
LOG="$WORK/log.txt"
STEPS="$WORK/steps.md"
SECTIONS="$WORK/sections.md"
: >"$STEPS"
: >"$SECTIONS"

if [ -n "${EMSERVE_PYTHON:-}" ]; then
    PY=$EMSERVE_PYTHON
else
    make setup >>"$LOG" 2>&1 || { echo "make setup failed; its output:" >&2; cat "$LOG" >&2; exit 1; }
    PY=.venv/bin/python
fi

if [ "$DEVICE" = cuda ]; then   # the study's sizes
    MODEL=study; BATCHES=1,8; SAMPLERS=dpmpp_3m:20; PATCH=96; WORKERS=0,4,8; STEPS_DRAWN=200
    LOAD=(--clients 16 --duration 30 --solo 5)
else                            # tiny: what the tests run on a CPU
    MODEL=tiny; BATCHES=1; SAMPLERS=ddim:2; PATCH=32; WORKERS=0,1; STEPS_DRAWN=6
    LOAD=(--clients 2 --duration 2 --solo 1 --steps 2)
fi
STORE=${GPU_CHECK_STORE:-$WORK/phantom/phantom_a.zarr}

# step NAME SECONDS COMMAND...: run it with a time limit, its output to the log, a row in the table of steps
step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "### $name: $*" >>"$LOG"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local result="passed"
    [ $rc -eq 124 ] && result="stopped at its limit of ${limit} s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && result="failed (exit $rc; see the log)"
    echo "| $name | $result | $(( $(date +%s) - start )) |" >>"$STEPS"
    return $rc
}

step "GPU-marked tests" 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --basetemp "$WORK/pytest" tests -rs
sed -n '/^### GPU-marked tests/,$p' "$LOG" | grep -E "SKIPPED|FAILED|ERROR|passed|failed|skipped|error" \
    | sed 's/^/    /' >"$WORK/tests.txt"
step "denoiser benchmark" 120 "$PY" -m benchmarks.denoiser --model "$MODEL" --device "$DEVICE" --exporter legacy \
    --batches "$BATCHES" --repeats 5 --workdir "$WORK/denoiser" --out "$SECTIONS"
step "sampling benchmark" 90 "$PY" -m benchmarks.sampling --model "$MODEL" --device "$DEVICE" --exporter legacy \
    --samplers "$SAMPLERS" --batch 8 --workdir "$WORK/denoiser" --out "$SECTIONS"
if [ ! -d "$STORE" ]; then
    step "phantom data for the input pipeline" 60 "$PY" -m emserve.cli data phantom "$WORK/phantom" --datasets 1
fi
step "input-pipeline benchmark" 60 "$PY" -m benchmarks.input_pipeline --store "$STORE" --patch-size "$PATCH" \
    --steps "$STEPS_DRAWN" --workers "$WORKERS" --out "$SECTIONS"
if step "service-load benchmark" 90 "$PY" benchmarks/service_load.py "${LOAD[@]}" --json "$WORK/load.json"; then
    { echo "## Service load (benchmarks/service_load.py ${LOAD[*]})"; echo; echo '```json'; cat "$WORK/load.json"
      echo '```'; echo; } >>"$SECTIONS"
fi

{
    echo "# GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- device: $DEVICE; $(nvidia-smi -L 2>/dev/null | head -n 4 | paste -sd ';' - || true)"
    echo "- python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)')"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    cat "$STEPS"
    echo
    echo "GPU-marked tests:"
    echo
    cat "$WORK/tests.txt"
    echo
    cat "$SECTIONS"
} >"$REPORT"
cp "$LOG" "${REPORT%.md}.log"
echo "wrote $REPORT (log: ${REPORT%.md}.log)"
! grep -q "failed\|stopped" "$STEPS"
