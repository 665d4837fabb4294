# Issue 15, GPU run 24 (tree d66ecb7+): the in-DiT split rule on a GPU (test, plain process), Retarget Poses thread
# sweep on 16 cores, the restart's DiT share phase by phase, official 480p and 720p fast 40 steps in full.
# (the no-split log, det_fast_--no-split.txt on the box, is det_fast_no_split.txt in this folder)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/e2e/inductor
mkdir -p /tmp/e2e; P=/tmp/e2e/progress
say() { echo "$(date +%T) $*" >> $P; }
say start; git log --oneline -1 >> $P 2>&1; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $P
for alloc in native backend:cudaMallocAsync; do
  PYTORCH_CUDA_ALLOC_CONF=$([ $alloc = native ] || echo $alloc) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py -k "batched_passes" > /tmp/e2e/gpu_test_${alloc#backend:}.txt 2>&1; say "gpu test batched $alloc rc $?"
  grep -E "passed|failed|Error|assert" /tmp/e2e/gpu_test_${alloc#backend:}.txt | tail -4 >> $P
done
mkdir -p /tmp/pk && ln -sfn $(pwd) /tmp/pk/steadydancer_turbo
PYTHONPATH=/tmp/pk:/tmp/site python3 bench/pose_draw_speed.py --sizes 832x480 --threads 2,4,8,16 --reps 3 > /tmp/e2e/pose_draw.txt 2>&1; say "pose_draw rc $?"; tail -8 /tmp/e2e/pose_draw.txt >> $P
for v in "fast" "fast --no-split"; do
  PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync PYTHONPATH=/tmp/pk:/tmp/site timeout 240 python3 bench/fast_path_determinism.py --variant $v --batches 2,3,3,2 --steps 4 > "/tmp/e2e/det_${v// /_}.txt" 2>&1; say "plain $v rc $?"
  grep -E "RESULT|Error" "/tmp/e2e/det_${v// /_}.txt" | tail -2 | cut -c1-600 >> $P
done
python3 bench/comfy_e2e.py --make-files /tmp/e2e/models --comfyui /tmp/comfyui --only dit,umt5,clip_vision,vae,dwpose,input > /tmp/e2e/make.log 2>&1; say "make-files rc $?"
DIT=$(ls /tmp/e2e/models/diffusion_models/*fp8*.safetensors | head -1); say "dit $DIT"
for l in cold restart; do
  PYTHONPATH=/tmp/pk:/tmp/site timeout 300 python3 bench/restart_breakdown.py --file $DIT --cache /tmp/e2e/rcache --label $l $([ $l = restart ] && echo --floors) > /tmp/e2e/restart_$l.txt 2>&1; say "restart_breakdown $l rc $?"
  grep -E "^\| (cold|restart)|RESULT" /tmp/e2e/restart_$l.txt | cut -c1-900 >> $P
done
FAST="--input attention=flex_sparse --input sparse_topk=0.1 --input fp8_matmul=true --input compile=true"
B="python3 bench/comfy_e2e.py --comfyui /tmp/comfyui --models /tmp/e2e/models"
$B --out /tmp/e2e/o480 --runs official480 --cold-steps 2 $FAST > /tmp/e2e/b_o480.log 2>&1; say "official480 fast 40 rc $?"
$B --out /tmp/e2e/o720 --runs official720 --cold-steps 2 $FAST > /tmp/e2e/b_o720.log 2>&1; say "official720 fast 40 rc $?"
say done
