# Issue 15, session 4, phase 1: is a GPU queue reproducible (official 480p fast, warm vs again, with the pose
# frames / latent / decoded frames saved), is core Save Video reproducible on those frames, then 720p with the
# fast options (turbo cold/warm/re-roll; official 10 steps + estimate). Background (setsid); poll /tmp/e2e/progress.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/e2e/inductor
mkdir -p /tmp/e2e; P=/tmp/e2e/progress
say() { echo "$(date +%T) $*" >> $P; }
say start; git log --oneline -1 >> $P; git status --short >> $P
python3 bench/comfy_e2e.py --make-files /tmp/e2e/models --comfyui /tmp/comfyui > /tmp/e2e/make.log 2>&1; say "make-files rc $?"
B="python3 bench/comfy_e2e.py --comfyui /tmp/comfyui --models /tmp/e2e/models"
FAST="--input attention=flex_sparse --input sparse_topk=0.1 --input fp8_matmul=true --input compile=true"
$B --out /tmp/e2e/repro --runs official480 $FAST --official-steps 16 --cold-steps 4 --queues cold,warm,again --save-intermediates > /tmp/e2e/b_repro.log 2>&1; say "official480 repro rc $?"
grep -A9 "^Reproducibility" /tmp/e2e/repro/results.md >> $P
python3 bench/encoder_repro.py --comfyui /tmp/comfyui --frames /tmp/e2e/repro/intermediates/official480/warm --pattern 'frames_*.png' --runs 8 > /tmp/e2e/encoder_repro.md 2>/tmp/e2e/encoder_repro.err; say "encoder repro rc $?"
cat /tmp/e2e/encoder_repro.md >> $P
$B --out /tmp/e2e/t720 --runs turbo720 $FAST --queues cold,warm,reseed > /tmp/e2e/b_t720.log 2>&1; say "turbo720 fast rc $?"
$B --out /tmp/e2e/o720 --runs official720 $FAST --official-steps 10 --cold-steps 2 > /tmp/e2e/b_o720.log 2>&1; say "official720 fast 10 steps rc $?"
say done
