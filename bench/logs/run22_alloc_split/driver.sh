# Issue 15, run 22: why are the fast path's batched passes not bit-reproducible in ComfyUI (runs 20-21)?
# 1. the GPU test (fp8 file, fast path, batch 2/3) in a plain process, torch's native allocator and cudaMallocAsync;
# 2. the ComfyUI repro with ComfyUI's cudaMallocAsync switched off (--disable-cuda-malloc);
# 3. the ComfyUI repro with each guidance pass split into one DiT call per item (STEADYDANCER_SPLIT_PASSES=1);
# 4. official 480p fast 40 steps, batched and split, same run, DWPose on the GPU (the 120 s target);
# 5. the plain batched loop under cudaMallocAsync; 6. fp8_matmul alone in ComfyUI.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/e2e/inductor
mkdir -p /tmp/e2e; P=/tmp/e2e/progress
say() { echo "$(date +%T) $*" >> $P; }
say start; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $P
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $P 2>&1
for alloc in native backend:cudaMallocAsync; do
  PYTORCH_CUDA_ALLOC_CONF=$([ $alloc = native ] || echo $alloc) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py -k "batched_passes" > /tmp/e2e/gpu_test_${alloc#backend:}.txt 2>&1; say "gpu test batched $alloc rc $?"
  grep -E "passed|failed|Error|assert" /tmp/e2e/gpu_test_${alloc#backend:}.txt | tail -4 >> $P
done
python3 bench/comfy_e2e.py --make-files /tmp/e2e/models --comfyui /tmp/comfyui --only dit,umt5,clip_vision,vae,dwpose,input > /tmp/e2e/make.log 2>&1; say "make-files rc $?"
FAST="--input attention=flex_sparse --input sparse_topk=0.1 --input fp8_matmul=true --input compile=true"
R() { tag=$1; shift; bash bench/repro_bisect.sh /tmp/comfyui /tmp/e2e/models /tmp/e2e/rb_$tag "$@" > /tmp/e2e/rb_$tag.out 2>&1; say "repro $tag rc $?"; grep -E "^\| (latent|frames) |first difference|same inputs|passes \|" /tmp/e2e/rb_$tag.out >> $P; grep "per step" /tmp/e2e/rb_$tag/shipped/results.md >> $P; }
ONLY=shipped STEPS=6 COLD_STEPS=6 R nomalloc $FAST --server-arg=--disable-cuda-malloc
STEADYDANCER_SPLIT_PASSES=1 ONLY=shipped STEPS=6 COLD_STEPS=6 R split $FAST
B="python3 bench/comfy_e2e.py --comfyui /tmp/comfyui --models /tmp/e2e/models --runs official480 --cold-steps 2"
$B --out /tmp/e2e/o480 $FAST > /tmp/e2e/b_o480.log 2>&1; say "official480 fast 40 rc $?"
grep -E "queue -> saved|per step" /tmp/e2e/o480/results.md >> $P
STEADYDANCER_SPLIT_PASSES=1 $B --out /tmp/e2e/o480s $FAST > /tmp/e2e/b_o480s.log 2>&1; say "official480 fast split 40 rc $?"
grep -E "queue -> saved|per step" /tmp/e2e/o480s/results.md >> $P
mkdir -p /tmp/pk && ln -sfn $(pwd) /tmp/pk/steadydancer_turbo
PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync PYTHONPATH=/tmp/pk:/tmp/site python3 bench/fast_path_determinism.py --variant fast --batches 2,3,3,2 --steps 6 > /tmp/e2e/det_async.txt 2>&1; say "plain loop cudaMallocAsync rc $?"
grep RESULT /tmp/e2e/det_async.txt >> $P
ONLY=shipped STEPS=6 COLD_STEPS=3 R fp8only --input fp8_matmul=true
say done
