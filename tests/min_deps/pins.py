"""Print every declared dependency pinned to its declared minimum (``name==min``), one per line.

Reads requirements.txt (environment markers evaluated for this machine) and, with ``--test``, the pyproject
``[test]`` extra. A requirement without a ``>=`` lower bound is an error: every dependency states its minimum.
Used by ``tests/min_deps/run.sh``; standard library + ``packaging`` (vendored by pip) only.
"""
from __future__ import annotations

import pathlib
import sys

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always ships it
    from pip._vendor.packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[2]


def requirement_lines(test_extra: bool) -> list[str]:
    lines = []
    for raw in (ROOT / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line:
            lines.append(line)
    if test_extra:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            from pip._vendor import tomli as tomllib
        py = tomllib.loads((ROOT / "pyproject.toml").read_text())
        lines += py["project"]["optional-dependencies"]["test"]
    return lines


def minimum_pins(test_extra: bool = False) -> list[str]:
    pins = []
    for line in requirement_lines(test_extra):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if len(lows) != 1:
            raise SystemExit(f"{line!r}: every dependency must state exactly one '>=' minimum")
        pins.append(f"{req.name}=={lows[0]}")
    return pins


if __name__ == "__main__":
    print("\n".join(minimum_pins("--test" in sys.argv[1:])))
