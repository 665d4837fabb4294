# One GPU session for issue 15 (second e2e run): random full-size files, the CUDA test of the LoRA side terms,
# then the end-to-end variants one after another, all in the background (setsid); poll /tmp/e2e/progress.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/e2e/inductor
mkdir -p /tmp/e2e; P=/tmp/e2e/progress
say() { echo "$(date +%T) $*" >> $P; }
say start; git log --oneline -1 >> $P
python3 bench/comfy_e2e.py --make-files /tmp/e2e/models --comfyui /tmp/comfyui > /tmp/e2e/make.log 2>&1; say "make-files rc $?"
python3 -m pytest -q tests/test_gpu_paths.py -k "side_terms or lora" > /tmp/e2e/gputest.log 2>&1; say "gpu test rc $? $(tail -1 /tmp/e2e/gputest.log)"
B="python3 bench/comfy_e2e.py --comfyui /tmp/comfyui --models /tmp/e2e/models"
FAST="--input attention=flex_sparse --input sparse_topk=0.1 --input fp8_matmul=true --input compile=true"
$B --out /tmp/e2e/fast --runs turbo480 $FAST --queues cold,warm,reseed > /tmp/e2e/b_fast.log 2>&1; say "turbo fast (empty compile cache) rc $?"
$B --out /tmp/e2e/fast_restart --runs turbo480 $FAST --queues cold,warm,reseed > /tmp/e2e/b_fast_restart.log 2>&1; say "turbo fast (compile cache on disk) rc $?"
$B --out /tmp/e2e/off_fast --runs official480 $FAST --cold-steps 4 > /tmp/e2e/b_off_fast.log 2>&1; say "official fast 40 rc $?"
$B --out /tmp/e2e/off_fast_ec --runs official480 $FAST --cold-steps 4 --model-node EasyCache:reuse_threshold=0.2,start_percent=0.15,end_percent=0.95,verbose=true > /tmp/e2e/b_off_fast_ec.log 2>&1; say "official fast 40 + EasyCache rc $?"
python3 bench/video_diff.py /tmp/e2e/off_fast_ec/videos/official480-warm.mp4 /tmp/e2e/off_fast/videos/official480-warm.mp4 >> $P 2>&1
$B --out /tmp/e2e/default --runs turbo480 --queues cold,warm,reseed > /tmp/e2e/b_default.log 2>&1; say "turbo defaults rc $?"
say done
