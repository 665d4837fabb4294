#!/bin/sh
# Copy this checkout's core packages + bench into <main>/.devcarry (git-ignored there) for a device run.
# Usage: bench/sync_devcarry.sh [/work/main]
set -e
SRC=$(cd "$(dirname "$0")/.." && pwd)
DST=${1:-/work/main}/.devcarry
rm -rf "$DST/steadydancer_turbo" "$DST/bench"
mkdir -p "$DST/steadydancer_turbo"
: > "$DST/steadydancer_turbo/__init__.py"   # the pack root imports nodes/ (ComfyUI); the bench needs only the core
for d in steadydancer turbo; do [ -d "$SRC/$d" ] && cp -r "$SRC/$d" "$DST/steadydancer_turbo/"; done
cp -r "$SRC/bench" "$DST/bench"
find "$DST" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$DST"
