"""requirements.txt rules: every dependency states one minimum (what tests/min_deps/run.sh installs and tests), torch
is never installed, exactly one ONNX Runtime package on every platform, and every dependency is really imported
by the pack (an unused one has no minimum to state)."""
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "min_deps"))
import pins  # noqa: E402

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # pragma: no cover
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement

IMPORT_NAME = {"numpy": "numpy", "safetensors": "safetensors", "gguf": "gguf", "diffusers": "diffusers",
               "opencv-python": "cv2", "onnxruntime-gpu": "onnxruntime", "onnxruntime": "onnxruntime",
               "pillow": "PIL", "huggingface_hub": "huggingface_hub"}


def _reqs():
    return [Requirement(line) for line in pins.requirement_lines(test_extra=False)]


def test_every_dependency_states_one_minimum_and_torch_is_not_installed():
    got = pins.minimum_pins(test_extra=True)            # raises for a requirement without exactly one '>='
    assert got and all(re.fullmatch(r"[A-Za-z0-9_.-]+==\d+(\.\d+)*", p) for p in got), got
    assert not any(r.name.lower() in ("torch", "torchvision", "torchaudio") for r in _reqs())


@pytest.mark.parametrize("platform", ["linux", "win32", "darwin"])
def test_exactly_one_onnxruntime_package_per_platform(platform):
    env = dict(default_environment(), sys_platform=platform)
    ort = [r.name for r in _reqs() if r.name.startswith("onnxruntime") and (r.marker is None or r.marker.evaluate(env))]
    assert len(ort) == 1, (platform, ort)


def test_every_dependency_is_imported_by_the_pack():
    code = "\n".join(p.read_text() for d in ("steadydancer", "dwpose", "turbo", "nodes", "tools")
                     for p in (ROOT / d).rglob("*.py"))
    for r in _reqs():
        mod = IMPORT_NAME.get(r.name.lower())
        assert mod is not None, f"{r.name}: add its import name here"
        assert re.search(rf"^\s*(import {mod}\b|from {mod}[. ])", code, re.M), f"{r.name} is declared but never imported"
