#!/usr/bin/env bash
# The GPU benchmark sets of docs/benchmarks.md, each in one go.
#
# Usage, from the repository root of a CUDA machine:
#     OUT=gpu-results bash benchmarks/gpu_suite.sh            # memory and speed (about 5 minutes on an H100)
#     OUT=gpu-results bash benchmarks/gpu_suite.sh frontier   # speed and scale (about 7 minutes on an H100 or H200)
# Writes to $OUT: benchmarks.md (one section per suite), <suite>.json per suite, gpu.log, nvidia-smi.txt. Put a
# suite into docs/benchmarks.md with:
#     monai-diffusion benchmark --from-json $OUT/<suite>.json --section <suite> --output docs/benchmarks.md
#
# memory and speed: gpu (256x256x64: ours vs MONAI stock, factors, checkpointing, adversarial, LDM), gpu-large
# (512x512x128), gpu-options (cudnn.benchmark, channels-last, torch.compile).
# speed and scale: gpu-frontier (256x256x64 fp16 batch 1 at [4,2] and [8,2] with the memory-saving path, target
# <= 1.0 GiB, then with offload_activations; MONAI's own checkpointing beside), gpu-whole (whole 512x512x256, target
# < 16 GiB, and 512x512x512, target < 24 GiB, at [8,2] with and without offload; running out of memory is recorded
# as a failed case), gpu-compile (eager against device.compile, ours against MONAI stock, the LDM step; a compiled
# case compiles during its warm-up, about a minute).
#
# A machine without the project's dependencies can be given wheels in .whl/ (monai, pydantic and its needs):
# they are installed into /tmp/site first. Cases run in one process each suite (--in-process) to save start-up
# time; CUDA peaks are reset per step and compiled graphs dropped between cases, so cases do not see each other.
# Every suite runs under a time limit and saves after each case, so a slow or failing case (torch.compile, out of
# memory) loses nothing else.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$LOG"

bench() {  # bench SECONDS SUITE [options...]
    local limit=$1 name=$2
    shift 2
    echo "=== suite $name (limit ${limit}s) ===" | tee -a "$LOG"
    timeout "$limit" python3 -m monai_diffusion.memory.benchmark --suite "$name" --in-process \
        --output "$OUT/benchmarks.md" --json "$OUT/$name.json" "$@" 2>&1 | tee -a "$LOG"
}

if [ "${1:-memory}" = frontier ]; then
    bench ${FRONTIER_LIMIT:-80} gpu-frontier --steps 5 --warmup 2
    bench ${WHOLE_LIMIT:-140} gpu-whole --steps 2 --warmup 1
    # Last: compiling is the slowest part, and what a time limit cuts first.
    bench ${COMPILE_LIMIT:-200} gpu-compile --steps 5 --warmup 3
else
    # 256x256x64, fp16 AMP, channels (16,32,64): ours vs MONAI stock, factors, checkpointing, adversarial, LDM.
    bench ${GPU_LIMIT:-170} gpu --steps 5 --warmup 2
    # 512x512x128 with [8,2] and per-axis factors.
    bench ${LARGE_LIMIT:-90} gpu-large --steps 3 --warmup 1
    # cudnn.benchmark, channels-last, torch.compile (compile last: its first step can take minutes).
    bench ${OPTIONS_LIMIT:-100} gpu-options --steps 5 --warmup 2
fi
echo "done" | tee -a "$LOG"
