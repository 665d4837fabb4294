# phase 1b: the official 480p repro again with ComfyUI --deterministic (torch.use_deterministic_algorithms,
# warn_only: the server log names ops without a deterministic kernel), then the turbo 480p repro (batch 1).
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/e2e/inductor
P=/tmp/e2e/progress
say() { echo "$(date +%T) $*" >> $P; }
B="python3 bench/comfy_e2e.py --comfyui /tmp/comfyui --models /tmp/e2e/models"
FAST="--input attention=flex_sparse --input sparse_topk=0.1 --input fp8_matmul=true --input compile=true"
$B --out /tmp/e2e/repro_det --runs official480 $FAST --official-steps 6 --cold-steps 2 --queues cold,warm,again --save-intermediates --server-arg=--deterministic > /tmp/e2e/b_repro_det.log 2>&1; say "official480 repro --deterministic rc $?"
grep -A9 "^Reproducibility" /tmp/e2e/repro_det/results.md >> $P
grep -i "determinis" /tmp/e2e/repro_det/logs/official480.log | sort | uniq -c | head -20 >> $P
$B --out /tmp/e2e/repro_turbo --runs turbo480 $FAST --queues cold,warm,again --save-intermediates > /tmp/e2e/b_repro_turbo.log 2>&1; say "turbo480 repro rc $?"
grep -A9 "^Reproducibility" /tmp/e2e/repro_turbo/results.md >> $P
say fin2
