# Issue 15, run 23: which fast option is not bit-reproducible under cudaMallocAsync (ComfyUI's allocator)? Run 22:
# the plain batched loop of the fast path (8 blocks) differs forward to forward under cudaMallocAsync, not under
# torch's native allocator; ComfyUI with --disable-cuda-malloc is bit-identical queue to queue.
export PYTHONPATH=/tmp/pk:/tmp/site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
mkdir -p /tmp/pk /tmp/e2e && ln -sfn $(pwd) /tmp/pk/steadydancer_turbo
for v in "fp8" "flex" "flex --flex-defaults" "compiled" "fast --flex-defaults" "default"; do
  timeout 200 python3 bench/fast_path_determinism.py --variant $v --batches 3,2 --steps 2 2>&1 | grep -E "RESULT|Error" | tail -2
done
# second call (same box, warm):
#   for v in "flex_compiled --flex-defaults" "fp8_compiled"; do
#     timeout 85 python3 bench/fast_path_determinism.py --variant $v --batches 3,2 --steps 1 | grep -E "RESULT|Error"; done
# (variants flex_compiled / fp8_compiled were added to the script between the two calls)
