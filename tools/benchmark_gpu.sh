#!/usr/bin/env bash
# The paper-size benchmark on a CUDA GPU, sized to run in a few minutes: every GPU lever for inference on the sample
# CT and for training, and the main pipelines on the 512x512x150 volume too. Writes JSON and logs to OUT.
#   bash tools/benchmark_gpu.sh [inference|training|all] [OUT] [DATASET_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:-all}
out=${2:-benchmark_gpu}
dataset=${3:-$(python3 tools/sample_data.py | tail -n 1)}  # its last line: the folder
mkdir -p "$out"
bench=(python3 tools/benchmark.py --size paper --dataset_dir "$dataset" --pipeline_timeout 180)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,temperature.gpu --format=csv >"$out/gpu.txt"
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)" >>"$out/gpu.txt"
cat "$out/gpu.txt"
if [[ $phase == inference || $phase == all ]]; then
    [[ -f ${SWIN_UNETR_CACHE:-$HOME/.cache/swin_unetr_bundles}/benchmark/paper_finetuned.pt ]] ||
        python3 tools/benchmark.py make_weights --size paper --dataset_dir "$dataset" >"$out/weights.log" 2>&1
    tail -n 1 "$out/weights.log" 2>/dev/null
    "${bench[@]}" --workflow inference --pipelines all --inputs sample --out "$out/inference_sample.json" \
        2>"$out/inference_sample.log"
    "${bench[@]}" --workflow inference --pipelines "ours,ours, reference blending,ours, TF32 instead of AMP" \
        --inputs native --out "$out/inference_native.json" 2>"$out/inference_native.log"
fi
if [[ $phase == training || $phase == all ]]; then
    "${bench[@]}" --workflow training --pipelines all --iterations 12 --warmup 4 --out "$out/training.json" \
        2>"$out/training.log"
fi
