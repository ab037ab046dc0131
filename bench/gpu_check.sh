#!/usr/bin/env bash
# The CUDA backend on a real GPU, in one prepared run (issue 10): versions, the CUDA tests run
# natively (pytest -m gpu), the op parity suite, model parity on the boundaries suite, the real
# CUDA-graph capture/replay tests, then bench/cuda_kernels.py at V4-Flash shapes with a time budget;
# optionally the tiling sweeps of bench/cuda_tune.py and Nsight Compute on the default tilings.
#
#   bench/gpu_check.sh [OUT_DIR] [TOTAL_SECONDS] [STEPS]
#     OUT_DIR  default $OUT, else /tmp/gpu_check
#     TOTAL    seconds the whole run may take (default 440); the benchmark gets what is left
#     STEPS    comma list of tests, parity, bench, tune, ncu (default tests,parity,bench)
#
# Everything it prints also lands in OUT_DIR (at most 8 files: gpu_check.log, tests.log, parity.log,
# warm.log, bench.log, h200.json, h200.md, tune.log), written as it goes, so a run cut short still
# leaves what it measured. The correctness steps run side by side (separate processes on one GPU),
# beside `--compile-only` / `--warm-only` processes that fill Triton's on-disk cache with the
# benchmark's kernels (compiling them one after another would take most of the budget); the timed
# benchmark and sweeps run alone afterwards. Each step has its own timeout; one failing step does
# not stop the others. Exit status: the number of failed steps.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
TOTAL=${2:-440}
STEPS=",${3:-tests,parity,bench},"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TORCH_DEVICE_BACKEND_AUTOLOAD=0
unset TRITON_INTERPRET
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
want() { [[ "$STEPS" == *",$1,"* ]]; }
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
FAILED=0
note_rc() {  # step name, rc
    if [ "$2" -eq 0 ]; then echo "[$(elapsed)s] $1: ok"; else echo "[$(elapsed)s] $1: FAILED (exit $2)"; FAILED=$((FAILED + 1)); fi
}

echo "== 1. install and versions (steps:$STEPS)"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
note_rc install $?
DSV4="python3 -m v4.cli"
python3 - <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "(CUDA", torch.version.cuda, ") | triton", triton.__version__)
print("gpu", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability(),
      "| SMs", torch.cuda.get_device_properties(0).multi_processor_count)
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu \
    --format=csv
python3 -c "import xdist" 2>/dev/null && XDIST="-n 6" || XDIST=""
python3 -c "import pytest_timeout" 2>/dev/null && PTO="--timeout 170" || PTO=""
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
echo "pytest options: ${XDIST:-no xdist} ${PTO:-no per-test timeout}; ncu: ${NCU:-not found}"

echo "== 2-5. side by side: native CUDA tests | op parity, then model parity | Triton cache warm-up"
PIDS=""
if want tests; then
    (
        timeout -k 10 220 python3 -m pytest -m gpu $XDIST $PTO -q -rfE -p no:cacheprovider \
            tests/backends/cuda
        rc=$?
        echo "== 5. real CUDA-graph capture and replay (tests/backends/cuda/test_decode_graphs.py, Triton cache warm)"
        timeout -k 10 60 python3 -m pytest -q -rfE -p no:cacheprovider tests/backends/cuda/test_decode_graphs.py \
            -k "graph_steps_match or engine_with_graphs or hooks_attached or cli_generate_with_graphs or graph_mode_choices"
        exit $(( rc != 0 || $? != 0 ))
    ) >"$OUT_DIR/tests.log" 2>&1 &
    TESTS_PID=$!
fi
if want parity; then
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
fi
if want bench; then
    for group in attention,attention_fp8 moe,moe_fp4 indexer,linear_fp8,compress,hc_pre,hc_post,gate,rms_norm,rope; do
        timeout -k 10 230 python3 bench/cuda_kernels.py --compile-only --no-flush --only $group 2>&1 \
            | sed -u "s/^/[warm ${group%%,*}] /" >>"$OUT_DIR/warm.log" &
        PIDS="$PIDS $!"
    done
fi
if want tune; then
    for i in 0 1 2 3 4 5; do
        timeout -k 10 230 python3 bench/cuda_tune.py --warm-only --shard $i/6 2>&1 \
            | sed -u "s/^/[warm tune $i] /" >>"$OUT_DIR/warm.log" &
        PIDS="$PIDS $!"
    done
fi
if want tests; then
    wait $TESTS_PID; note_rc "cuda tests (native) + graph capture" $?
    tail -n 30 "$OUT_DIR/tests.log"
fi
if want parity; then
    wait $PARITY_PID; note_rc "parity ops + parity run" $?
    grep -vE "^\s+File|^Traceback|^\s*$" "$OUT_DIR/parity.log" | grep -vE "^layers\.[0-9]+\.[a-z_.]+ +.* PASS$" | tail -n 60
fi
for pid in $PIDS; do wait $pid; done
echo "[$(elapsed)s] cache warm-up done"
grep -E "ERROR|Error|cases:|done in" "$OUT_DIR/warm.log" | tail -n 20

if want tune; then
    echo "== 7. tiling sweeps (bench/cuda_tune.py)"
    timeout -k 10 150 python3 bench/cuda_tune.py >"$OUT_DIR/tune.log" 2>&1
    note_rc "bench/cuda_tune.py" $?
    grep -vE "^\s+File|^Traceback" "$OUT_DIR/tune.log" | grep -A40 "^best per case"
fi
if want ncu; then
    echo "== 8. Nsight Compute on the default tilings"
    # case:kernel regex:launches to skip:launches to profile (moe: the routed up and down GEMMs of the 2nd call)
    for spec in "attention:_sparse_mqa_sink_kernel:1:1" "indexer:_indexer_score_kernel:1:1" \
                "moe:_moe_up_kernel|_moe_down_kernel:4:2"; do
        IFS=: read -r case kern skip count <<<"$spec"
        echo "== ncu $case ($kern)" >>"$OUT_DIR/tune.log"
        timeout -k 10 90 "${NCU:-ncu}" --clock-control none -k "regex:$kern" --launch-skip "$skip" --launch-count "$count" \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
            --section WarpStateStats python3 bench/cuda_tune.py --ncu-case "$case" >>"$OUT_DIR/tune.log" 2>&1
        note_rc "ncu $case" $?
    done
    grep -E "^== ncu|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Theoretical Occupancy|Compute \(SM\) Throughput|Block Limit Registers|Warp Cycles Per Issued|Stall" \
        "$OUT_DIR/tune.log" | tail -n 60
fi

if want bench; then
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
fi
echo "== done in $(elapsed)s, $FAILED step(s) failed"
exit $FAILED
