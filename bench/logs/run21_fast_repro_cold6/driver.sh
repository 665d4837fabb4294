# Issue 15, run 21 (short): is the fast path's queue-to-queue difference the first call at a new batch shape?
# Cold queue with all 6 steps (it meets batch 3 itself), then warm and again: identical if so. DWPose on the CPU.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/e2e/inductor
mkdir -p /tmp/e2e; P=/tmp/e2e/progress
say() { echo "$(date +%T) $*" >> $P; }
say start; git log --oneline -1 >> $P
python3 bench/comfy_e2e.py --make-files /tmp/e2e/models --comfyui /tmp/comfyui --only dit,umt5,clip_vision,vae,dwpose,input > /tmp/e2e/make.log 2>&1; say "make-files rc $?"
FAST="--input attention=flex_sparse --input sparse_topk=0.1 --input fp8_matmul=true --input compile=true"
TORCH_LOGS=recompiles ONLY=shipped STEPS=6 COLD_STEPS=6 bash bench/repro_bisect.sh /tmp/comfyui /tmp/e2e/models /tmp/e2e/rb_c6 $FAST > /tmp/e2e/rb_c6.out 2>&1; say "fast cold6 rc $?"
cat /tmp/e2e/rb_c6.out >> $P
grep -h "Recompiling\|got prompt\|guard failure\|expected .*actual" /tmp/e2e/rb_c6/shipped/logs/official480.log | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220 >> $P
say done
