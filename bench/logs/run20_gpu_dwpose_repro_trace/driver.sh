# Issue 15, session 5 (run 20): (1) DWPose on onnxruntime-gpu 1.31.1 (carried in 4 parts), plain process;
# (2) is the official workflow reproducible queue to queue with the SHIPPED DEFAULTS, and where do the fast
# option's queues part (per-pass trace); (3) turbo 480p fast with GPU DWPose: cold, warm, re-roll, then a
# restart with the compile cache on disk; (4) int8_sparse in the compiled turbo fast path; (5) official 480p
# fast 40 steps with GPU DWPose. Background (setsid); poll /tmp/e2e/progress.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/e2e/inductor
mkdir -p /tmp/e2e; P=/tmp/e2e/progress
say() { echo "$(date +%T) $*" >> $P; }
say start; git log --oneline -1 >> $P; git status --short >> $P
python3 -c "import torch, onnxruntime as o; print('ort', o.__version__, o.__file__, o.get_available_providers())" >> $P 2>&1
python3 bench/comfy_e2e.py --make-files /tmp/e2e/models --comfyui /tmp/comfyui > /tmp/e2e/make.log 2>&1; say "make-files rc $?"
mkdir -p /tmp/pk && ln -sfn $(pwd) /tmp/pk/steadydancer_turbo
PYTHONPATH=/tmp/pk:/tmp/site python3 bench/dwpose_speed.py --providers cuda,cpu --cpu-frames 8 --repeats 3 > /tmp/e2e/dwpose_speed.md 2>/tmp/e2e/dwpose_speed.err; say "dwpose_speed rc $?"
tail -12 /tmp/e2e/dwpose_speed.md >> $P
B="python3 bench/comfy_e2e.py --comfyui /tmp/comfyui --models /tmp/e2e/models"
FAST="--input attention=flex_sparse --input sparse_topk=0.1 --input fp8_matmul=true --input compile=true"
INT8="--input attention=int8_sparse --input sparse_topk=0.1 --input fp8_matmul=true --input compile=true"
ONLY=shipped STEPS=6 COLD_STEPS=2 bash bench/repro_bisect.sh /tmp/comfyui /tmp/e2e/models /tmp/e2e/rb_def > /tmp/e2e/rb_def.out 2>&1; say "repro defaults rc $?"
cat /tmp/e2e/rb_def.out >> $P
ONLY="shipped no_cfg" STEPS=6 COLD_STEPS=2 bash bench/repro_bisect.sh /tmp/comfyui /tmp/e2e/models /tmp/e2e/rb_fast $FAST > /tmp/e2e/rb_fast.out 2>&1; say "repro fast rc $?"
cat /tmp/e2e/rb_fast.out >> $P
$B --out /tmp/e2e/t480 --runs turbo480 $FAST --queues cold,warm,reseed > /tmp/e2e/b_t480.log 2>&1; say "turbo480 fast gpu-dwpose rc $?"
$B --out /tmp/e2e/t480i8 --runs turbo480 $INT8 --queues cold,warm,reseed > /tmp/e2e/b_t480i8.log 2>&1; say "turbo480 int8 rc $?"
$B --out /tmp/e2e/t480r --runs turbo480 $FAST --queues cold,warm,reseed > /tmp/e2e/b_t480r.log 2>&1; say "turbo480 fast restart rc $?"
$B --out /tmp/e2e/o480 --runs official480 $FAST --cold-steps 4 > /tmp/e2e/b_o480.log 2>&1; say "official480 fast 40 gpu-dwpose rc $?"
say done
