"""Real-ComfyUI harness (helpers; the fixture is in conftest.py): runs only when ``COMFYUI_PATH`` points at a ComfyUI checkout.

    COMFYUI_PATH=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/python] python -m pytest tests/integration

pytest runs in the pack's own environment; the ComfyUI server runs with ``COMFYUI_PYTHON``, else
``COMFYUI_PATH/../venv/bin/python`` / ``COMFYUI_PATH/venv/bin/python``, else this interpreter.

One server per session, started with ``--cpu`` on a free port and a throw-away ``--base-directory`` whose
``custom_nodes/`` holds symlinks to this checkout (as ``ComfyUI-SteadyDancer-Turbo``) and to the test-only
fixture pack, and whose ``models/`` folders hold tiny models under the file names the shipped workflows ask
for (read from the UI workflows' ``properties.models``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile

try:
    import pytest
except ImportError:      # bench/comfy_e2e.py --tiny uses the prompt / model helpers with ComfyUI's Python
    pytest = None

HERE = pathlib.Path(__file__).resolve().parent
PACK_ROOT = HERE.parents[1]
PACK_FOLDER = "ComfyUI-SteadyDancer-Turbo"
FIXTURE_FOLDER = "steadydancer_test_fixtures"
API_DIR = PACK_ROOT / "workflows_api"
UI_DIR = PACK_ROOT / "example_workflows"
WORKFLOWS = ("steadydancer-dance", "steadydancer-turbo", "steadydancer-long")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


run_workflow = _load("sd_run_workflow", PACK_ROOT / "tools" / "run_workflow.py")
models = _load("sd_integration_models", HERE / "fixtures" / "models.py")


def comfyui_path():
    p = os.environ.get("COMFYUI_PATH")
    if not p:
        pytest.skip("COMFYUI_PATH is not set (point it at a ComfyUI checkout to run the real-ComfyUI tests)")
    p = pathlib.Path(p).resolve()
    if not (p / "main.py").exists():
        pytest.skip(f"COMFYUI_PATH={p} is not a ComfyUI checkout (no main.py)")
    return p


def ui_workflow(name):
    p = UI_DIR / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def api_workflow(name):
    p = API_DIR / f"{name}.json"
    if not p.exists():
        pytest.skip(f"{p.relative_to(PACK_ROOT)} is not in this checkout yet")
    return json.loads(p.read_text())


def required_models():
    """{(directory, file name)} of every model file the shipped UI workflows declare."""
    out = set()
    for name in WORKFLOWS:
        wf = ui_workflow(name)
        if wf is None:
            continue
        for node in wf.get("nodes", []):
            for m in (node.get("properties") or {}).get("models", []) or []:
                out.add((m["directory"], m["name"]))
    return out


class ModelShelf:
    """Builds each kind of tiny model once and copies it under every name the workflows use."""

    def __init__(self, root, comfy, python, cache=None):
        self.root, self.comfy, self.python = pathlib.Path(root), comfy, python
        self.cache = pathlib.Path(cache) if cache else pathlib.Path(tempfile.mkdtemp(prefix="sd_tiny_models_"))
        self.cache.mkdir(parents=True, exist_ok=True)
        self.built, self.errors = {}, {}

    def _get(self, kind):
        if kind in self.built or kind in self.errors:
            return self.built.get(kind)
        target = self.cache / {"dit": "dit.safetensors", "lora": "lora.safetensors", "vae": "vae.safetensors",
                               "det": "det.onnx", "pose": "pose.onnx"}[kind]
        try:
            if kind == "dit":
                models.build_dit(target)
            elif kind == "lora":
                dit = self._get("dit")
                if dit is None:
                    raise RuntimeError(f"no tiny DiT: {self.errors.get('dit')}")
                models.build_lora(target, dit)
            elif kind == "vae":
                models.build_vae(target, self.comfy, self.python)
            elif kind == "det":
                models.build_dwpose_detector(target)
            elif kind == "pose":
                models.build_dwpose_estimator(target)
            self.built[kind] = target
        except Exception as e:  # reported by the tests that need the model
            self.errors[kind] = f"{type(e).__name__}: {e}"
        return self.built.get(kind)

    @staticmethod
    def kind_of(directory, name):
        n = name.lower()
        if n.endswith(".onnx"):
            return "det" if ("yolo" in n or "det" in n) else "pose"
        if directory in ("vae",):
            return "vae"
        if directory in ("loras",):
            return "lora"
        if directory in ("diffusion_models", "unet"):
            return "dit"
        return None                    # text encoders / CLIP vision: replaced by fixture nodes

    def place(self, directory, name, kind=None):
        kind = kind or self.kind_of(directory, name)
        if kind is None:
            return None
        src = self._get(kind)
        if src is None:
            return None
        dst = self.root / directory / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return dst


class Comfy:
    def __init__(self, server, base, shelf):
        self.server, self.base, self.shelf = server, base, shelf
        self.url = server.url
        self.client = run_workflow.ComfyClient(server.url, timeout=60)

    def log(self):
        return self.server.log_text()

    def need(self, *kinds):
        missing = [f"{k}: {self.shelf.errors.get(k, 'not built')}" for k in kinds if k not in self.shelf.built]
        if missing:
            pytest.skip("tiny model(s) unavailable in this checkout: " + "; ".join(missing))

    def run(self, prompt, timeout=600, on_event=None):
        """Queue and wait; returns (history entry, [events])."""
        events = []

        def record(t, d):
            events.append((t, d))
            if on_event:
                on_event(t, d)

        ws = self.client.websocket()
        try:
            pid = self.client.queue(prompt)
            hist = run_workflow.wait_for_prompt(self.client, ws, pid, on_event=record, timeout=timeout)
        finally:
            ws.close()
        return hist, events

    def output_path(self, f):
        return self.base / f.get("type", "output") / f.get("subfolder", "") / f["filename"]


# ------------------------------------------------------------------------------------ prompt preparation
def swap_encoders(prompt):
    """Replace CLIPTextEncode / CLIPVisionEncode by the fixture nodes (same output types, no weights)."""
    p = json.loads(json.dumps(prompt))
    for node in p.values():
        if node["class_type"] == "CLIPTextEncode":
            node["class_type"] = "SDTestTextEncode"
            node["inputs"] = {"text": node["inputs"]["text"]}
        elif node["class_type"] == "CLIPVisionEncode":
            node["class_type"] = "SDTestClipVisionEncode"
            node["inputs"] = {"image": node["inputs"]["image"], "crop": node["inputs"].get("crop", "none")}
    return p


def nodes_of(prompt, class_type):
    return [nid for nid, n in prompt.items() if n["class_type"] == class_type]


def small(prompt, width=64, height=96, length=9, steps=None):
    """Shrink a shipped workflow to a CPU-sized run: size, frame count, steps; input files -> fixtures."""
    p = swap_encoders(prompt)
    for nid, node in p.items():
        ins = node["inputs"]
        ct = node["class_type"]
        if ct == "LoadImage":
            ins["image"] = "reference.png"
        elif ct == "LoadVideo":
            ins["file"] = "dance.mp4"
        if "width" in ins and "height" in ins and "length" in ins:
            ins.update(width=width, height=height, length=length)
        if "max_frames" in ins:
            ins["max_frames"] = length
        if steps is not None and "steps" in ins and ct.startswith("SteadyDancer"):
            ins["steps"] = steps
        if ct == "SaveVideo":
            ins["filename_prefix"] = f"video/test_{nid}"
    used = {str(v[0]) for n in p.values() for v in n["inputs"].values() if isinstance(v, list) and len(v) == 2}
    for nid in [nid for nid, n in p.items() if n["class_type"] in ("CLIPLoader", "CLIPVisionLoader")]:
        if nid not in used:
            del p[nid]                 # the encoders they fed were replaced by fixture nodes
    return p


def run_checks(script: str, marker: str, timeout=1500) -> dict:
    """Run ``script`` (an in-process checks file here) with ComfyUI's Python; its last ``MARKER {json}`` line."""
    import subprocess
    path = comfyui_path()
    python = run_workflow.comfy_python(path)
    env = dict(os.environ, COMFYUI_PATH=str(path))
    p = subprocess.run([python, str(HERE / script)], env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(marker + " ")]
    assert lines, f"{script} printed no results (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    r = json.loads(lines[-1][len(marker) + 1:])
    print(json.dumps(r, indent=1))
    return r

