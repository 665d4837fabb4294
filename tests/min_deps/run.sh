#!/usr/bin/env bash
# Does the pack work with the minimum versions requirements.txt declares?
# Makes a separate venv, installs torch (as tests/run.sh) plus every dependency pinned to its declared minimum
# (tests/min_deps/pins.py: requirements.txt and the [test] extra), then runs the suite there (default: all of
# tests/; pass pytest arguments to narrow it). Not part of the default CI run: it downloads and installs a
# second set of packages (a few minutes). Usage:
#   bash tests/min_deps/run.sh                 # whole suite on the minimum versions
#   MIN_DEPS_VENV=/tmp/x bash tests/min_deps/run.sh tests/test_sampling_official.py
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
VENV=${MIN_DEPS_VENV:-/tmp/steadydancer-min-deps-venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
"$VENV/bin/python" tests/min_deps/pins.py --test > "$VENV/min-pins.txt"
echo "minimum pins:"; sed 's/^/  /' "$VENV/min-pins.txt"
"$VENV/bin/python" -m pip install -q -r "$VENV/min-pins.txt"
# the pack itself, as tests/run.sh installs it (spawned test processes import steadydancer_turbo by name)
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
# the pins must be what is really installed (a resolver upgrade would make this run meaningless)
"$VENV/bin/python" - "$VENV/min-pins.txt" <<'PY'
import sys
from importlib.metadata import version
bad = []
for line in open(sys.argv[1]):
    name, want = line.strip().split("==")
    got = version(name)
    if got.split("+")[0] != want and not got.startswith(want + "."):
        bad.append(f"{name}: pinned {want}, installed {got}")
if bad:
    sys.exit("minimum pins not installed: " + "; ".join(bad))
print("installed exactly the declared minimums")
PY
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider "${@:-tests}"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi
exit "$rc"
