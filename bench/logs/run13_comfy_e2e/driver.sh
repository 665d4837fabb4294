# One GPU session for issue 15: set-up, SageAttention build, random full-size files, then the end-to-end bench
# variants one after another, all in the background (setsid); poll /tmp/e2e/progress.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/e2e/inductor
REPO=$(pwd); mkdir -p /tmp/e2e; P=/tmp/e2e/progress
say() { echo "$(date +%T) $*" >> $P; }
say start
cp -r .devcarry/sage /tmp/sage_src
(cd /tmp/sage_src && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=10 python3 -m pip install --no-build-isolation --no-deps --no-cache-dir --target /tmp/sage . > /tmp/e2e/sage_build.log 2>&1; echo "sage build rc $?" >> $P) &
SAGE=$!
python3 bench/comfy_e2e.py --make-files /tmp/e2e/models --comfyui /tmp/comfyui > /tmp/e2e/make.log 2>&1; say "make-files rc $?"
df -h /tmp | tail -1 >> $P
wait $SAGE
B="python3 bench/comfy_e2e.py --comfyui /tmp/comfyui --models /tmp/e2e/models"
$B --out /tmp/e2e/out --runs turbo480,official480 --official-steps 8 > /tmp/e2e/bench1.log 2>&1; say "bench default 480 rc $?"
$B --out /tmp/e2e/fast --runs turbo480 --input attention=flex_sparse --input sparse_topk=0.1 --input fp8_matmul=true --input compile=true > /tmp/e2e/bench2.log 2>&1; say "bench fast (cold compile) rc $?"
$B --out /tmp/e2e/fast_restart --runs turbo480 --input attention=flex_sparse --input sparse_topk=0.1 --input fp8_matmul=true --input compile=true > /tmp/e2e/bench3.log 2>&1; say "bench fast (compile cache on disk) rc $?"
$B --out /tmp/e2e/out --runs turbo720 > /tmp/e2e/bench4.log 2>&1; say "bench default 720 rc $?"
PYTHONPATH=/tmp/site:/tmp/sage python3 bench/attention_backends.py --out /tmp/e2e/attn > /tmp/e2e/attn.log 2>&1; say "attention bench rc $?"
say done
