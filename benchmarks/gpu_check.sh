#!/usr/bin/env bash
# GPU check of the CUDA SOARTC path: tests, the kernel benchmark, the pipeline with soartc on the GPU.
# Run from the repository root on a CUDA machine with python3, numpy, cupy, numba, opencv-python-headless,
# onnxruntime, pytest and hypothesis, plus the package's own dependencies (pydantic, pyzmq, typer...; on
# the lent GPU machine they travel as wheels, see BENCHMARKS.md). No network used. Steps (STEPS, default
# "tests bench inference pipeline"); everything goes under $OUT (default ./gpu_out):
#   env.txt               GPU, driver and package versions
#   gpu_tests.log         pytest of the SOARTC kernels and the soartc stage (CUDA vs CPU)
#   bench_soartc_gpu.*    kernel benchmark table (.log) and numbers (.json); DeepPCB is absent there, so the
#                         benchmark falls back to its synthetic PCB pattern and says so
#   bench_inference_gpu.* one frame's soartc work (SOARTC on the CPU and on the GPU) and the model (CPU ORT)
#   bench_pipeline_gpu.*  the whole pipeline at 1920x1080, soartc on the CPU then on the GPU, same run
#   exit_codes.txt        one "step rc" line per step
# A failing step does not stop the next one; the script exits with the first non-zero code.
set -u

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Compiled Numba and CuPy kernels go to a scratch folder, not into the checkout or $HOME.
SCRATCH="$(mktemp -d)"
export NUMBA_CACHE_DIR="$SCRATCH/numba" CUPY_CACHE_DIR="$SCRATCH/cupy"
: > "$OUT/exit_codes.txt"
first_rc=0

record() {  # record STEP RC
    echo "$1 $2" | tee -a "$OUT/exit_codes.txt"
    if [ "$first_rc" -eq 0 ] && [ "$2" -ne 0 ]; then first_rc=$2; fi
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    python3 - <<'EOF' 2>&1
import platform, numpy, numba, cv2
print("python", platform.python_version(), "numpy", numpy.__version__, "numba", numba.__version__, "opencv", cv2.__version__)
import cupy
print("cupy", cupy.__version__, "cuda runtime", cupy.cuda.runtime.runtimeGetVersion(),
      "devices", cupy.cuda.runtime.getDeviceCount())
EOF
} > "$OUT/env.txt" 2>&1
record env $?

STEPS="${STEPS:-tests bench inference pipeline}"
if [[ " $STEPS " == *" tests "* ]]; then
    timeout 240 python3 -m pytest tests/test_soartc_cuda.py tests/test_soartc.py tests/test_tokens.py -q \
        -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
    record tests "${PIPESTATUS[0]}"
fi
if [[ " $STEPS " == *" bench "* ]]; then
    timeout 240 python3 benchmarks/bench_soartc.py --out "$OUT/bench_soartc_gpu.json" --repeats 50 --threads 16 \
        2>&1 | tee "$OUT/bench_soartc_gpu.log"
    record bench "${PIPESTATUS[0]}"
fi
if [[ " $STEPS " == *" inference "* ]]; then
    timeout 240 python3 benchmarks/bench_inference.py --repeats 30 --threads 4 --out "$OUT/bench_inference_gpu.json" \
        2>&1 | tee "$OUT/bench_inference_gpu.log"
    record inference "${PIPESTATUS[0]}"
fi
if [[ " $STEPS " == *" pipeline "* ]]; then
    # ONNX Runtime on 4 threads: its default (every core, spinning) starves the soartc process.
    timeout 300 python3 benchmarks/bench_pipeline.py --sizes 1920x1080 --cameras 1 --soartc-devices cpu cuda \
        --threads 4 --fps 30 --seconds 20 --warmup 5 --skip-transport --out "$OUT/bench_pipeline_gpu.json" 2>&1 \
        | tee "$OUT/bench_pipeline_gpu.log"
    record pipeline "${PIPESTATUS[0]}"
fi

rm -rf "$SCRATCH"
exit "$first_rc"
