#!/usr/bin/env bash
# Which part of the official workflow makes two identical GPU queues differ? (issue 15, run 17: the official
# workflow's latents differed queue to queue on an H200 while the turbo workflow's were bit-identical.)
# Runs bench/comfy_e2e.py's reproducibility check (--queues cold,warm,again --save-intermediates) on the official
# 480p workflow once per variant, each in its own server, and prints every variant's "first difference" table:
#   shipped     the workflow as shipped (2-3 batched guidance passes a step, UniPC, negative poses encoded)
#   no_pose_cfg pose_guidance 0: no third pass and no negative-pose encode
#   no_cfg      text_guidance 1 and pose_guidance 0: one pass a step, as the turbo workflow
#   euler       the official guidance with the Euler solver instead of UniPC (no linear solves)
#
#   bash bench/repro_bisect.sh COMFYUI_DIR MODELS_DIR OUT_DIR [extra comfy_e2e args, e.g. the fast --input options]
# MODELS_DIR from `python bench/comfy_e2e.py --make-files MODELS_DIR --comfyui COMFYUI_DIR`. STEPS (default 4)
# sets the warm/again queues' steps (pose guidance covers steps 0.1-0.4 of them), COLD_STEPS (default 2) the cold
# warm-up's; PYTHON (default python3) the Python that runs the bench; ONLY (default "shipped no_pose_cfg no_cfg euler")
# the variants to run. The server traces every DiT pass (STEADYDANCER_TRACE_PASSES=1) and bench/pass_trace.py names
# the first pass where warm and again part, and which of its inputs or its output differ.
# TORCH_LOGS=recompiles (or recompiles,autotuning) in the environment reaches the server: its log then shows
# which queue compiled what.
set -u
COMFY=$1; MODELS=$2; OUT=$3; shift 3
STEPS=${STEPS:-4}; COLD=${COLD_STEPS:-2}; PY=${PYTHON:-python3}
mkdir -p "$OUT"
export STEADYDANCER_TRACE_PASSES=1
HERE=$(cd "$(dirname "$0")" && pwd)
declare -A VARIANTS=(
  [shipped]=""
  [no_pose_cfg]="--input pose_guidance=0"
  [no_cfg]="--input text_guidance=1.0 --input pose_guidance=0"
  [euler]="--input solver=euler"
)
for v in ${ONLY:-shipped no_pose_cfg no_cfg euler}; do
  # shellcheck disable=SC2086
  "$PY" "$HERE/comfy_e2e.py" --comfyui "$COMFY" --models "$MODELS" --out "$OUT/$v" --runs official480 \
    --official-steps "$STEPS" --cold-steps "$COLD" --queues cold,warm,again --save-intermediates \
    ${VARIANTS[$v]} "$@" > "$OUT/$v.log" 2>&1
  echo "== $v (rc $?): ${VARIANTS[$v]:-as shipped}"
  grep -A9 "^Reproducibility" "$OUT/$v/results.md" 2>/dev/null || tail -3 "$OUT/$v.log"
  "$PY" "$HERE/pass_trace.py" "$OUT/$v/logs/official480.log"
done
