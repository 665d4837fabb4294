#!/usr/bin/env bash
# The GPU-only checks, in one command on a CUDA box (repo root as cwd):
#   bash bench/gpu_checks.sh WHEELS_DIR [OFFICIAL_CHECKOUT] [OUT_DIR]
# WHEELS_DIR holds wheels missing on the box (gguf, diffusers, einops, pytest...), installed to /tmp/site.
# Runs: the CUDA-gated tests (block swap through pinned memory and a side stream, fp8 _scaled_mm, VRAM
# release, CPU-vs-GPU noise), the official bf16 parity script when a checkout is given, then the loader bench and
# the fp8 + ComfyUI-LoRA layer bench (bench/lora_fp8_bench.py).
set -u
export PYTHONUNBUFFERED=1
W=${1:?wheels dir}; OFF=${2:-}; OUT=${3:-/tmp/gpu_checks}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$W"/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py tests/test_rcm.py tests/test_sampling_official.py \
    tests/test_fp8_linear.py tests/test_sparse_attention.py tests/test_loader_blockswap.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
if [ -n "$OFF" ]; then
    python3 bench/official_bf16_parity.py --official "$OFF" 2>&1 | tee "$OUT/official_bf16_parity.log" | tail -12
fi
python3 bench/loader_formats.py --layers 20 --plan "${LOADER_PLAN:-bf16:0;fp8:0,20;fp8mm:0;q8_0:0;q4_k:0}" \
    --time-budget "${LOADER_BUDGET:-330}" 2>&1 | tee "$OUT/loader_bench.log" | tail -30
python3 bench/lora_fp8_bench.py 2>&1 | tee "$OUT/lora_fp8_bench.log" | tail -30
