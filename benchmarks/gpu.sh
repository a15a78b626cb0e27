#!/usr/bin/env bash
# The GPU benchmark: workloads A, B, C (benchmarks/workloads.py) in fp32 (TF32 off) and bf16, forward and
# forward+backward, then the 256..4096 px sweep; about 5-8 minutes on one H100 (a 420 s time limit
# stops starting new cases, so a slower card still ends with a complete JSON).
# Writes JSON, Markdown and PNG into $OUT (or results/). Run from the repository root:
#     bash benchmarks/gpu.sh
# then refresh the docs page with both runs:
#     python -m benchmarks report results/cpu-all.json results/cuda-all.json --markdown docs/benchmarks.md
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
if ! python -c "import matplotlib" 2>/dev/null; then
    echo "matplotlib not installed (pip install -e '.[plot]'): JSON and Markdown only" >&2
fi
# the fraction of cuBLAS's float32 rate (TF32 off) each path reaches, forward and training step
python -m benchmarks roofline --device cuda --repeats 5 --out "$out" --name cuda-roofline
# deformable convolution (DCNv2 training step, 128/256/1024 px) against torchvision's op (skipped, with the
# reason, where torchvision does not load) and a grid_sample implementation; TF32 off
python -m benchmarks deform --device cuda --repeats 5 --out "$out" --name cuda-deform
python -m benchmarks run --device cuda --suite all --dtype float32,bfloat16 --repeats 5 --max-seconds 10 \
    --time-limit "${TIME_LIMIT:-420}" --out "$out" --name cuda-all "$@"
