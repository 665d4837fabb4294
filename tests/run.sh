#!/usr/bin/env bash
# The README's test command: make a virtual environment, install the pack with its test
# extra (torch as the CPU wheel torch==2.13.0; ComfyUI users keep their own torch) and run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu) avoids the CUDA wheel on machines whose pip has
# no local CPU wheel of torch 2.13.0.
.venv/bin/python -m pip install -q "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
.venv/bin/python -m pip install -q -e ".[test]"
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure here.
if [ "$rc" -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi
exit "$rc"
