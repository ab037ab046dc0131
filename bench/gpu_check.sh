#!/usr/bin/env bash
# The CUDA backend on a real GPU, in one prepared run (issue 10): versions, the CUDA tests run
# natively (pytest -m cuda), the op parity suite, model parity on the boundaries suite, the real
# CUDA-graph capture/replay tests, then bench/cuda_kernels.py at V4-Flash shapes with a time budget.
#
#   bench/gpu_check.sh [OUT_DIR] [TOTAL_SECONDS]     # OUT_DIR default $OUT or /tmp/gpu_check; 440 s
#
# Everything it prints also lands in OUT_DIR (8 files: gpu_check.log, env.txt, tests.log,
# parity.log, warm.log, bench.log, h200.json, h200.md), written as it goes, so a run cut short
# still leaves what it measured. The correctness steps run side by side (separate processes on one
# GPU), beside three `cuda_kernels.py --compile-only` processes that fill Triton's on-disk cache
# with the benchmark's kernels (compiling them one after another would take most of the budget);
# the timed benchmark runs alone afterwards with what is left of TOTAL_SECONDS. Each step has its
# own timeout; one failing step does not stop the others. Exit status: the number of failed steps.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
TOTAL=${2:-440}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TORCH_DEVICE_BACKEND_AUTOLOAD=0
unset TRITON_INTERPRET
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
FAILED=0
note_rc() {  # step name, rc
    if [ "$2" -eq 0 ]; then echo "[$(elapsed)s] $1: ok"; else echo "[$(elapsed)s] $1: FAILED (exit $2)"; FAILED=$((FAILED + 1)); fi
}

echo "== 1. install and versions"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT_DIR/env.txt" 2>&1
note_rc install $?
DSV4="python3 -m v4.cli"
python3 - >>"$OUT_DIR/env.txt" 2>&1 <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "(CUDA", torch.version.cuda, ") | triton", triton.__version__)
print("gpu", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability(),
      "| SMs", torch.cuda.get_device_properties(0).multi_processor_count)
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu \
    --format=csv >>"$OUT_DIR/env.txt" 2>&1
python3 -c "import xdist" 2>/dev/null && XDIST="-n 6" || XDIST=""
python3 -c "import pytest_timeout" 2>/dev/null && PTO="--timeout 170" || PTO=""
echo "pytest options: ${XDIST:-no xdist} ${PTO:-no per-test timeout}" >>"$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt"

echo "== 2-5. correctness, side by side: native CUDA tests | op parity, then model parity"
(
    timeout -k 10 220 python3 -m pytest -m cuda $XDIST $PTO -q -rfE -p no:cacheprovider \
        tests/test_cuda_*.py tests/test_decode_graphs.py
    rc=$?
    echo "== 5. real CUDA-graph capture and replay (tests/test_decode_graphs.py, Triton cache warm)"
    timeout -k 10 60 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_decode_graphs.py \
        -k "graph_steps_match or engine_with_graphs or cli_generate_with_graphs or graph_mode_choices"
    exit $(( rc != 0 || $? != 0 ))
) >"$OUT_DIR/tests.log" 2>&1 &
TESTS_PID=$!
(
    echo "== 3. dsv4 parity ops --backend cuda (fp32, then bf16)"
    timeout -k 10 100 $DSV4 parity ops --backend cuda
    a=$?
    timeout -k 10 60 $DSV4 parity ops --backend cuda --dtype bf16
    b=$?
    echo "== 4. dsv4 parity run --backends reference:fp64,cuda:fp32,cuda:bf16 --suite boundaries"
    timeout -k 10 150 $DSV4 parity run --backends reference:fp64,cuda:fp32,cuda:bf16 --suite boundaries
    c=$?
    exit $(( a != 0 || b != 0 || c != 0 ))
) >"$OUT_DIR/parity.log" 2>&1 &
PARITY_PID=$!
WARM_PIDS=""
for group in attention,attention_fp8 moe,moe_fp4 indexer,linear_fp8,compress,hc_pre,hc_post,gate,rms_norm,rope; do
    timeout -k 10 230 python3 bench/cuda_kernels.py --compile-only --no-flush --only $group 2>&1 \
        | sed -u "s/^/[warm ${group%%,*}] /" >>"$OUT_DIR/warm.log" &
    WARM_PIDS="$WARM_PIDS $!"
done
wait $TESTS_PID; note_rc "cuda tests (native) + graph capture" $?
tail -n 30 "$OUT_DIR/tests.log"
wait $PARITY_PID; note_rc "parity ops + parity run" $?
grep -vE "^\s+File|^Traceback|^\s*$" "$OUT_DIR/parity.log" | tail -n 45
for pid in $WARM_PIDS; do wait $pid; done
echo "[$(elapsed)s] cache warm-up done"
grep -E "ERROR|Error|cases:" "$OUT_DIR/warm.log" | tail -n 20

LEFT=$(( TOTAL - $(elapsed) - 15 ))
echo "== 6. bench/cuda_kernels.py at V4-Flash shapes (budget ${LEFT}s)"
if [ "$LEFT" -gt 60 ]; then
    timeout -k 10 $(( LEFT + 5 )) python3 bench/cuda_kernels.py --budget-s $(( LEFT - 10 )) \
        --only attention,indexer,moe,attention_fp8,moe_fp4,linear_fp8,compress,hc_pre,hc_post,gate,rms_norm,rope,model \
        --json "$OUT_DIR/h200.json" --markdown "$OUT_DIR/h200.md" >"$OUT_DIR/bench.log" 2>&1
    note_rc "bench/cuda_kernels.py" $?
    grep -vE "^\s+File|^Traceback" "$OUT_DIR/bench.log" | tail -n 75
else
    echo "no time left for the benchmark"
    FAILED=$((FAILED + 1))
fi
echo "== done in $(elapsed)s, $FAILED step(s) failed"
exit $FAILED
