# Issue 15, GPU run 25: the loader's parallel reads against the old memory-map copy (same process kind, same file),
# and Retarget Poses with the 4-thread default. No ComfyUI needed.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/e2e; P=/tmp/e2e/progress
say() { echo "$(date +%T) $*" >> $P; }
say start
mkdir -p /tmp/pk && ln -sfn $(pwd) /tmp/pk/steadydancer_turbo
F=/tmp/e2e/dit_fp8.safetensors
PYTHONPATH=/tmp/pk python3 -c "
import sys, argparse; sys.path.insert(0, 'bench'); import loader_formats as L
cfg = L.config(argparse.Namespace(tiny=False, layers=40)); print(L.write_safetensors_stream('$F', L.shapes(cfg), 'cuda', fp8=True))" >> $P 2>&1; say "file rc $?"
R="python3 bench/restart_breakdown.py --file $F --cache /tmp/e2e/rcache"
PYTHONPATH=/tmp/pk $R --label cold > /tmp/e2e/r_cold.txt 2>&1; say "cold rc $?"; grep -E "^\| cold" /tmp/e2e/r_cold.txt >> $P
PYTHONPATH=/tmp/pk $R --label restart-mmap --mmap-copy > /tmp/e2e/r_mmap.txt 2>&1; say "mmap rc $?"; grep -E "^\| restart" /tmp/e2e/r_mmap.txt >> $P
PYTHONPATH=/tmp/pk $R --label restart-pread --floors > /tmp/e2e/r_pread.txt 2>&1; say "pread rc $?"; grep -E "^\| restart|RESULT" /tmp/e2e/r_pread.txt | cut -c1-700 >> $P
PYTHONPATH=/tmp/pk $R --label restart-mmap2 --mmap-copy > /tmp/e2e/r_mmap2.txt 2>&1; say "mmap2 rc $?"; grep -E "^\| restart" /tmp/e2e/r_mmap2.txt >> $P
PYTHONPATH=/tmp/pk $R --label restart-pread2 > /tmp/e2e/r_pread2.txt 2>&1; say "pread2 rc $?"; grep -E "^\| restart" /tmp/e2e/r_pread2.txt >> $P
PYTHONPATH=/tmp/pk python3 bench/pose_draw_speed.py --sizes 832x480 --reps 3 > /tmp/e2e/pose_draw.txt 2>&1; say "pose_draw rc $?"; tail -4 /tmp/e2e/pose_draw.txt >> $P
say done
cat $P
tar -czf $OUT/e2e.tgz -C /tmp --exclude='*.safetensors' --exclude=rcache e2e
