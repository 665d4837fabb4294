#!/usr/bin/env python3
"""Queue a shipped SteadyDancer workflow on a ComfyUI server and save the video it makes.

    python tools/run_workflow.py turbo --image person.png --video dance.mp4 --output out.mp4 \
        [--server http://127.0.0.1:8188 | --comfyui /path/to/ComfyUI [--python /path/to/python]] \
        [--set NODE_ID.input=value ...]

``turbo`` / ``dance`` name the API twins ``workflows_api/steadydancer-turbo.json`` / ``...-dance.json``; a
path to any API-format prompt works too. The reference image goes into the graph's ``LoadImage`` node and the
driving video into its ``LoadVideo`` node, after both are uploaded through ``/upload/image`` (ComfyUI stores
any uploaded file in ``input/``; the image is checked to be one first). Before queueing, every file name the
graph asks for is checked against the server's ``/object_info`` lists, and the DWPose files against
``GET /models/dwpose`` (the pose node lists the default names even when absent), so a missing model is reported
with its folder and, for the files the pack knows, the download URL instead of failing mid-run. Progress, and
the notes nodes show on themselves (size / length adjustments), come from the ``/ws`` websocket.

Standard library only (urllib + a minimal RFC 6455 websocket client; PIL for the image check when present), so
it runs with any Python >= 3.9, including ComfyUI's own interpreter.
"""
from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import pathlib
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

PACK_ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOW_DIR = PACK_ROOT / "example_workflows"
API_DIR = PACK_ROOT / "workflows_api"
VIDEO_EXTS = {".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif", ".m4v"}
MODEL_EXTS = (".safetensors", ".gguf", ".onnx", ".pt", ".pth", ".ckpt", ".bin", ".sft")
EXIT_CODES = """exit codes:
  0    the video was saved
  1    the run failed on the server (the failing node and its message are printed)
  2    bad usage or input (unknown workflow, UI-format JSON, --image not an image, --video not a video ...)
  3    server unreachable, or --comfyui could not start one (with a --cpu hint when the log shows no GPU)
  4    a model file is missing on the server (file, folder and download URL printed)
  5    the server rejected the prompt (validation errors per node printed)
  130  cancelled with Ctrl-C (our prompt is interrupted, or removed from the queue)"""


class RunError(Exception):
    """A failure with a message meant for the user, and the process exit code."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


class ServerUnreachable(RunError):
    def __init__(self, url, why):
        super().__init__(
            f"cannot reach ComfyUI at {url} ({why}). Is the server running? Start it with "
            f"`python main.py --listen 127.0.0.1 --port 8188` in your ComfyUI folder, or pass "
            f"--comfyui /path/to/ComfyUI to let this command start one.", code=3)


class PromptRejected(RunError):
    def __init__(self, body):
        self.body = body
        err = body.get("error", {}) if isinstance(body, dict) else {}
        lines = [f"ComfyUI rejected the prompt: {err.get('message', body)}"]
        for node_id, ne in (body.get("node_errors") or {}).items():
            for e in ne.get("errors", []):
                lines.append(f"  node {node_id} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
        super().__init__("\n".join(lines), code=5)


# --------------------------------------------------------------------------------------------- HTTP client
class ComfyClient:
    def __init__(self, base_url, timeout=30.0):
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _open(self, req):
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError, socket.timeout) as e:
            raise ServerUnreachable(self.base, getattr(e, "reason", e))

    def get_json(self, path):
        with self._open(urllib.request.Request(self.base + path)) as r:
            return json.loads(r.read())

    def get_bytes(self, path):
        with self._open(urllib.request.Request(self.base + path)) as r:
            return r.read()

    def post_json(self, path, obj):
        data = json.dumps(obj).encode()
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        with self._open(req) as r:
            raw = r.read()
            return json.loads(raw) if raw else None

    def alive(self):
        try:
            self.get_json("/system_stats")
            return True
        except (RunError, urllib.error.HTTPError, json.JSONDecodeError):
            return False

    def upload(self, path, overwrite=True):
        """Upload a file into the server's input/ folder; returns the name to put in LoadImage/LoadVideo."""
        path = pathlib.Path(path)
        boundary = uuid.uuid4().hex
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        parts = [
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\n{'true' if overwrite else 'false'}\r\n".encode(),
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\ninput\r\n".encode(),
            (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
             f"Content-Type: {ctype}\r\n\r\n").encode() + path.read_bytes() + b"\r\n",
            f"--{boundary}--\r\n".encode(),
        ]
        req = urllib.request.Request(self.base + "/upload/image", data=b"".join(parts),
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with self._open(req) as r:
                resp = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RunError(f"uploading {path} failed: HTTP {e.code} {e.read()[:200]!r}", code=2)
        name = resp["name"]
        return f"{resp['subfolder']}/{name}" if resp.get("subfolder") else name

    def queue(self, prompt, extra_data=None):
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        try:
            resp = self.post_json("/prompt", body)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError:
                raise RunError(f"POST /prompt failed: HTTP {e.code} {raw[:300]!r}")
            raise PromptRejected(parsed)
        return resp["prompt_id"]

    def history(self, prompt_id):
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def interrupt(self, prompt_id=None):
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def cancel(self, prompt_id):
        """Stop our prompt only: interrupt it when it runs, remove it when it waits in the queue.
        Returns what was done, for the user."""
        q = self.get_json("/queue")
        ids = lambda items: {item[1] for item in items if len(item) > 1}     # (number, prompt_id, prompt, ...)
        if prompt_id in ids(q.get("queue_running", [])):
            self.interrupt(prompt_id)
            return "interrupted it on the server"
        if prompt_id in ids(q.get("queue_pending", [])):
            self.post_json("/queue", {"delete": [prompt_id]})
            return "removed it from the server's queue"
        return "it was no longer queued or running"

    def model_files(self, folder):
        """File names the server has in a model folder (GET /models/<folder>), or None when it has no such
        folder (older ComfyUI, or the pack did not register it)."""
        try:
            return self.get_json(f"/models/{urllib.parse.quote(folder)}")
        except urllib.error.HTTPError:
            return None

    def object_info(self, node_class=None):
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def view(self, filename, subfolder="", type_="output"):
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type_})
        return self.get_bytes(f"/view?{q}")

    def websocket(self):
        return WebSocket.connect(self.base, f"/ws?clientId={self.client_id}", timeout=self.timeout)


# ------------------------------------------------------------------------------- minimal websocket (RFC 6455)
class WebSocket:
    """Client side of RFC 6455, enough for ComfyUI's /ws: text and binary frames, ping/pong, close."""

    def __init__(self, sock):
        self.sock = sock
        self._buf = b""

    @classmethod
    def connect(cls, base_url, path, timeout=30.0):
        u = urllib.parse.urlparse(base_url)
        if u.scheme == "https":
            raise RunError("https servers are not supported by the built-in websocket client; use http://", 2)
        host, port = u.hostname, u.port or 80
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ServerUnreachable(base_url, e)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        ws = cls(sock)
        head = ws._read_until(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RunError(f"websocket handshake failed: {head[:200]!r}")
        return ws

    def _read_until(self, marker):
        while marker not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self._buf += chunk
        head, self._buf = self._buf.split(marker, 1)
        return head

    def _read_exact(self, n):
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise ConnectionError("websocket closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send(self, opcode, payload=b""):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def recv(self, timeout=None):
        """Next message: ("text", str) or ("binary", bytes); raises socket.timeout / ConnectionError."""
        self.sock.settimeout(timeout)
        message, kind = b"", None
        while True:
            b0, b1 = self._read_exact(2)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read_exact(8))[0]
            mask = self._read_exact(4) if b1 & 0x80 else None
            payload = self._read_exact(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x9:          # ping
                self._send(0xA, payload)
                continue
            if opcode == 0xA:          # pong
                continue
            if opcode == 0x8:          # close
                raise ConnectionError("websocket closed by server")
            if opcode in (0x1, 0x2):
                kind = "text" if opcode == 0x1 else "binary"
            message += payload
            if fin:
                return (kind, message.decode("utf-8")) if kind == "text" else (kind, message)

    def close(self):
        try:
            self._send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        self.sock.close()


# ------------------------------------------------------------------------------------------ waiting for a run
def wait_for_prompt(client, ws, prompt_id, on_event=None, timeout=3600.0):
    """Follow a queued prompt over the websocket until it ends; returns its /history entry.

    ``on_event(type, data)`` sees every JSON message for this prompt, and ("progress_text", {"node", "text"})
    for the texts nodes show on themselves while it runs (our nodes' size/length adjustments, for example). Raises RunError with the node's message
    when the run fails and RunError("interrupted") when it was interrupted.
    """
    deadline = time.monotonic() + timeout
    ours = False              # our prompt is the one running (node texts carry no prompt id)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RunError(f"timed out after {timeout:.0f} s waiting for prompt {prompt_id}")
        try:
            kind, msg = ws.recv(timeout=min(left, 5.0))
        except socket.timeout:
            # a message can be missed if the run finished before the socket was open: poll history
            h = client.history(prompt_id)
            if h and h.get("status", {}).get("completed") is not None and h["status"].get("status_str") in ("success", "error"):
                return _finish(h, prompt_id)
            continue
        if kind != "text":
            note = progress_text(msg)     # other binary frames are latent previews
            if note and ours and on_event:
                on_event("progress_text", {"node": note[0], "text": note[1], "prompt_id": prompt_id})
            continue
        m = json.loads(msg)
        t, data = m.get("type"), m.get("data", {})
        if data.get("prompt_id") not in (None, prompt_id):
            ours = False if t in ("execution_start", "executing") else ours
            continue
        if data.get("prompt_id") == prompt_id:
            ours = t not in ("execution_success", "execution_error", "execution_interrupted")
        if on_event:
            on_event(t, data)
        if t == "execution_error":
            raise RunError(
                f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                f"{data.get('exception_type', '')}: {str(data.get('exception_message', '')).strip()}")
        if t == "execution_interrupted":
            raise RunError(f"the run was interrupted (node {data.get('node_id')} {data.get('node_type')})")
        if t == "execution_success" or (t == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id):
            for _ in range(50):
                h = client.history(prompt_id)
                if h:
                    return _finish(h, prompt_id)
                time.sleep(0.1)
            raise RunError(f"prompt {prompt_id} finished but has no history entry")


BINARY_TEXT = 3   # ComfyUI's BinaryEventTypes.TEXT: the text a node shows on itself (PromptServer.send_progress_text)


def progress_text(frame):
    """(node id, text) of a binary 'progress text' frame: event 3, node-id length (u32 BE), node id, UTF-8 text."""
    if len(frame) < 8 or struct.unpack(">I", frame[:4])[0] != BINARY_TEXT:
        return None
    n = struct.unpack(">I", frame[4:8])[0]
    if len(frame) < 8 + n:
        return None
    return frame[8:8 + n].decode("utf-8", "replace"), frame[8 + n:].decode("utf-8", "replace")


def _finish(h, prompt_id):
    status = h.get("status", {})
    if status.get("status_str") == "error":
        for name, data in status.get("messages", []):
            if name == "execution_error":
                raise RunError(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                               f"{data.get('exception_type', '')}: {str(data.get('exception_message', '')).strip()}")
        raise RunError(f"prompt {prompt_id} failed: {status}")
    return h


def output_files(history_entry):
    """Every file a run wrote, as dicts with filename/subfolder/type (video savers report under 'images')."""
    files = []
    for node_out in history_entry.get("outputs", {}).values():
        for key in ("videos", "images", "gifs", "video"):
            for f in node_out.get(key, []) or []:
                if isinstance(f, dict) and "filename" in f:
                    files.append(f)
    return files


def progress_printer(prompt, stream=None):
    stream = stream or sys.stderr
    titles = {nid: (n.get("_meta", {}).get("title") or n["class_type"]) for nid, n in prompt.items()}

    def on_event(t, data):
        if t == "executing" and data.get("node") is not None:
            print(f"[{data['node']}] {titles.get(str(data['node']), '?')}", file=stream, flush=True)
        elif t == "progress":
            v, mx = data.get("value", 0), data.get("max", 0)
            bar = "#" * int(30 * v / max(mx, 1))
            print(f"    {titles.get(str(data.get('node')), '')}: {v}/{mx} [{bar:<30}]", file=stream, flush=True)
        elif t == "progress_text" and data.get("text"):
            print(f"    note from {titles.get(str(data.get('node')), data.get('node'))}: {data['text']}",
                  file=stream, flush=True)
        elif t == "execution_cached" and data.get("nodes"):
            print(f"(cached: {', '.join(map(str, data['nodes']))})", file=stream, flush=True)
    return on_event


# ------------------------------------------------------------------------------------- model-file pre-check
def _combo_options(spec):
    """Options of a combo input spec from /object_info (V1 ``[[...]]`` or V3 ``["COMBO", {"options": [...]}]``)."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1].get("options")
    return None


def models_from_ui_workflow(ui_path):
    """{file name: {"url", "directory"}} from the UI workflow's ``properties.models`` entries."""
    out = {}
    try:
        wf = json.loads(pathlib.Path(ui_path).read_text())
    except (OSError, json.JSONDecodeError):
        return out
    for node in wf.get("nodes", []):
        for m in (node.get("properties") or {}).get("models", []) or []:
            if isinstance(m, dict) and m.get("name"):
                out[m["name"]] = m
    for m in wf.get("models", []) or []:
        if isinstance(m, dict) and m.get("name"):
            out.setdefault(m["name"], m)
    return out


def reachable(prompt, object_info):
    """Ids of the nodes ComfyUI will validate and run: output nodes and everything they depend on."""
    todo = [nid for nid, n in prompt.items()
            if object_info.get(n["class_type"], {}).get("output_node") or n["class_type"] not in object_info]
    seen = set()
    while todo:
        nid = todo.pop()
        if nid in seen or nid not in prompt:
            continue
        seen.add(nid)
        for v in prompt[nid].get("inputs", {}).values():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) and isinstance(v[1], int):
                todo.append(str(v[0]))
    return seen


# ComfyUI model folder of the file inputs of the usual loaders: (node class, input) first, then the input name.
LOADER_FOLDERS = {
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("SteadyDancerModelLoader", "model_name"): "diffusion_models",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("SteadyDancerLoraLoader", "lora_name"): "loras",
    ("VAELoader", "vae_name"): "vae",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("SteadyDancerPoseExtract", "detector"): "dwpose",
    ("SteadyDancerPoseExtract", "estimator"): "dwpose",
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
}
INPUT_FOLDERS = {"unet_name": "diffusion_models", "lora_name": "loras", "vae_name": "vae",
                 "ckpt_name": "checkpoints", "control_net_name": "controlnet", "clip_name1": "text_encoders",
                 "clip_name2": "text_encoders", "upscale_model": "upscale_models"}
# Folders whose combos list the default file names even when the file is absent (our pose node does, so the
# node can answer a missing file with its download link): their real content is asked of GET /models/<folder>.
ALWAYS_LISTED_FOLDERS = ("dwpose",)


def model_folder(class_type, input_name, hint=None):
    """ComfyUI model folder (``diffusion_models``, ``loras`` ...) a file input reads from, or None."""
    if hint and hint.get("directory"):
        return hint["directory"]
    return LOADER_FOLDERS.get((class_type, input_name)) or INPUT_FOLDERS.get(input_name)


def known_models():
    """{file name: {"name", "url", "directory"}} of every file the pack knows: the shipped UI workflows'
    ``properties.models`` and the DWPose table (dwpose/models.py, the pack's one list of those URLs)."""
    out = {}
    for ui in sorted(WORKFLOW_DIR.glob("*.json")):
        for name, m in models_from_ui_workflow(ui).items():
            out.setdefault(name, m)
    try:
        import importlib.util
        spec = importlib.util.spec_from_file_location("_sd_dwpose_models", PACK_ROOT / "dwpose" / "models.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for name, f in mod.MODEL_FILES.items():
            out.setdefault(name, {"name": name, "url": f.url, "directory": mod.COMFY_MODEL_SUBFOLDER})
    except Exception:  # noqa: BLE001 - hints only
        pass
    return out


def _present(value, files):
    """Whether a file name is among a folder listing (sub-folder entries match by base name, as the pose
    node also finds comfyui_controlnet_aux's ``ckpts/<repo>/`` downloads)."""
    base = value.replace("\\", "/").rsplit("/", 1)[-1]
    return any(f == value or f.replace("\\", "/").rsplit("/", 1)[-1] == base for f in files)


def check_inputs(prompt, object_info, model_hints=None, folder_files=None):
    """Problems found before queueing: unknown node types and file names that are not on the server.

    Only nodes that will run are checked (like the server, which ignores nodes no output depends on).
    ``folder_files(folder)`` -> the file names the server has in a model folder, or None when unknown
    (GET /models/<folder>); it is asked about ``ALWAYS_LISTED_FOLDERS`` only."""
    model_hints = model_hints or {}
    problems, missing = [], {}      # (file, folder) -> [(node id, class, input)], one entry per file
    live = reachable(prompt, object_info)
    for nid, node in prompt.items():
        if nid not in live:
            continue
        info = object_info.get(node["class_type"])
        if info is None:
            problems.append(f"node {nid}: node type {node['class_type']!r} is not installed on the server "
                            f"(is the SteadyDancer Turbo pack in custom_nodes and did it import without errors?)")
            continue
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, value in node.get("inputs", {}).items():
            if not isinstance(value, str):
                continue
            opts = _combo_options(specs.get(name))
            if opts is None:
                continue
            hint = model_hints.get(value) or model_hints.get(value.replace("\\", "/").rsplit("/", 1)[-1]) or {}
            folder = model_folder(node["class_type"], name, hint)
            if value in opts:
                files = folder_files(folder) if folder_files and folder in ALWAYS_LISTED_FOLDERS else None
                if files is None or _present(value, files):
                    continue
            elif not value.lower().endswith(MODEL_EXTS):
                problems.append(f"node {nid} ({node['class_type']}).{name}: {value!r} is not one of the allowed "
                                f"values {opts[:8]}{'...' if len(opts) > 8 else ''}")
                continue
            missing.setdefault((value, folder, hint.get("url")), []).append(f"node {nid} ({node['class_type']}).{name}")
    missing_models = []
    for (value, folder, url), users in missing.items():
        where = f"models/{folder}/" if folder else "the matching models/ folder"
        missing_models.append(f"  {value!r} is not in {where} (needed by {', '.join(users)})"
                              + (f"\n      download: {url}" if url else ""))
    return problems, missing_models


# ------------------------------------------------------------------------------------------ server process
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfy_python(comfyui_path, explicit=None):
    if explicit:
        return explicit
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    root = pathlib.Path(comfyui_path).resolve()
    for cand in (root / "venv" / "bin" / "python", root / ".venv" / "bin" / "python",
                 root.parent / "venv" / "bin" / "python", root.parent / "python_embeded" / "python.exe"):
        if cand.exists():
            return str(cand)
    return sys.executable


class ComfyServer:
    """A ComfyUI server process started from a checkout (``main.py``), stopped by ``stop()``."""

    def __init__(self, comfyui_path, port=None, base_directory=None, python=None, cpu=True, extra_args=(),
                 log_path=None):
        self.comfyui_path = pathlib.Path(comfyui_path).resolve()
        if not (self.comfyui_path / "main.py").exists():
            raise RunError(f"{self.comfyui_path} is not a ComfyUI checkout (no main.py)", code=2)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.python = comfy_python(self.comfyui_path, python)
        self.args = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port)]
        if cpu:
            self.args.append("--cpu")
        if base_directory:
            self.args += ["--base-directory", str(base_directory)]
        self.args += list(extra_args)
        self.log_path = pathlib.Path(log_path) if log_path else None
        self.proc = None
        self._log = None

    def start(self, timeout=120.0):
        if self.log_path:
            self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, cwd=self.comfyui_path, stdout=self._log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        client = ComfyClient(self.url, timeout=5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self._log:
                    self._log.close()
                    self._log = None
                raise RunError(f"ComfyUI exited with code {self.proc.returncode} during start-up"
                               + (f"; see {self.log_path}" if self.log_path else "")
                               + self.startup_hint(), code=3)
            if client.alive():
                return self
            time.sleep(0.3)
        self.stop()
        raise RunError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s"
                       + (f"; see {self.log_path}" if self.log_path else ""), code=3)

    NO_GPU_SIGNS = ("Found no NVIDIA driver", "Torch not compiled with CUDA enabled", "No CUDA GPUs are available",
                    "no CUDA-capable device", "CUDA driver initialization failed", "NVIDIA driver on your system is too old",
                    "Failed to initialize NVML", "No HIP GPUs are available")

    def startup_hint(self):
        """A hint for a start-up failure, read from the server log."""
        text = self.log_text()
        if "--cpu" not in self.args and any(s.lower() in text.lower() for s in self.NO_GPU_SIGNS):
            return ("\n  The log says there is no usable GPU / driver: add --cpu to run ComfyUI on the CPU "
                    "(slow, but it works), or fix the NVIDIA driver / CUDA build of torch.")
        tail = [ln for ln in text.strip().splitlines() if ln.strip()][-3:]
        return ("\n  last lines of the log:\n    " + "\n    ".join(tail)) if tail else ""

    def log_text(self):
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ------------------------------------------------------------------------------------------------ the command
def resolve_workflow(name):
    """(API prompt path, UI workflow path or None) for 'turbo', 'dance', 'long' or a file path.

    The shipped API twins live in ``workflows_api/<name>.json`` next to the UI files in
    ``example_workflows/<name>.json`` (kept apart so ComfyUI's template browser lists only the UI files).
    """
    short = {"turbo": "steadydancer-turbo", "dance": "steadydancer-dance", "long": "steadydancer-long"}.get(name)
    p = pathlib.Path(name)
    if short is None and p.is_file():
        ui = WORKFLOW_DIR / p.name
        return p, (ui if ui.is_file() and ui.resolve() != p.resolve() else None)
    short = short or name
    for cand in (API_DIR / f"{short}.json", WORKFLOW_DIR / f"{short}_api.json"):
        if cand.is_file():
            ui = WORKFLOW_DIR / f"{short}.json"
            return cand, (ui if ui.is_file() else None)
    raise RunError(f"no workflow {name!r}: give 'turbo', 'dance', 'long' or a path to an API-format JSON "
                   f"(looked in {API_DIR})", 2)


def load_prompt(path):
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: not a readable workflow JSON ({e})", 2)
    if "nodes" in data and "links" in data:
        twin = API_DIR / path.name
        short = {"steadydancer-turbo.json": "turbo", "steadydancer-dance.json": "dance",
                 "steadydancer-long.json": "long"}.get(path.name)
        if twin.is_file():
            use = (f"`{short}` (or {twin})" if short else str(twin))
        else:
            use = (f"`turbo` / `dance` for the shipped workflows (their API twins are {API_DIR}/<same name>.json), "
                   f"or export yours with Workflow > Export (API) in ComfyUI")
        raise RunError(f"{path} is a UI-format workflow; this command needs an API-format prompt: use {use}", 2)
    data = data.get("prompt", data)
    return data


def apply_overrides(prompt, sets):
    for s in sets or []:
        try:
            target, value = s.split("=", 1)
            nid, inp = target.split(".", 1)
        except ValueError:
            raise RunError(f"--set {s!r}: use NODE_ID.input=value", 2)
        if nid not in prompt:
            raise RunError(f"--set {s!r}: the workflow has no node {nid}", 2)
        try:
            prompt[nid]["inputs"][inp] = json.loads(value)
        except json.JSONDecodeError:
            prompt[nid]["inputs"][inp] = value


IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def check_image(path):
    """Refuse a --image that is not an image before uploading it (the server would only fail mid-run, naming
    its own copy). Uses PIL when this Python has it (what ComfyUI's LoadImage opens files with), else the
    file's magic bytes."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        Image = None
    if Image is not None:
        try:
            with Image.open(path) as im:
                im.verify()
            return
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise RunError(f"--image {path}: not an image file this server can open ({e})", 2)
    with open(path, "rb") as f:
        head = f.read(16)
    if any(head.startswith(m) for m, _ in IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return
    raise RunError(f"--image {path}: not an image file (PNG, JPEG, WEBP, GIF, BMP or TIFF expected)", 2)


def set_media_inputs(prompt, image_name=None, video_name=None):
    images = [nid for nid, n in prompt.items() if n["class_type"] == "LoadImage"]
    videos = [nid for nid, n in prompt.items() if n["class_type"] == "LoadVideo"]
    if image_name is not None:
        if len(images) != 1:
            raise RunError(f"the workflow has {len(images)} LoadImage nodes; use --set NODE.image=NAME", 2)
        prompt[images[0]]["inputs"]["image"] = image_name
    if video_name is not None:
        if len(videos) != 1:
            raise RunError(f"the workflow has {len(videos)} LoadVideo nodes; use --set NODE.file=NAME", 2)
        prompt[videos[0]]["inputs"]["file"] = video_name


def randomize_seeds(prompt, seed):
    for n in prompt.values():
        for k in ("seed", "noise_seed"):
            if k in n["inputs"] and not isinstance(n["inputs"][k], list):
                n["inputs"][k] = seed


def run(args, out=None):
    out = out or sys.stderr
    prompt_path, ui_path = resolve_workflow(args.workflow)
    prompt = load_prompt(prompt_path)
    for label, f in (("--image", args.image), ("--video", args.video)):
        if f and not pathlib.Path(f).is_file():
            raise RunError(f"{label} {f}: no such file", 2)
    if args.image:
        check_image(args.image)
    if args.video and pathlib.Path(args.video).suffix.lower() not in VIDEO_EXTS:
        raise RunError(f"--video {args.video}: not a video file ({', '.join(sorted(VIDEO_EXTS))})", 2)

    server, keep_log = None, False
    if args.comfyui:
        log_path = args.server_log or os.path.join(tempfile.gettempdir(), f"comfyui-run-{os.getpid()}.log")
        server = ComfyServer(args.comfyui, port=args.port, base_directory=args.base_directory,
                             python=args.python, cpu=args.cpu, log_path=log_path)
        print(f"starting ComfyUI from {server.comfyui_path} on {server.url} ...", file=out, flush=True)
        server.start()          # a start-up failure keeps the temporary log: the message names it
        url = server.url
    else:
        url = args.server
    try:
        client = ComfyClient(url, timeout=args.http_timeout)
        if not client.alive():
            raise ServerUnreachable(url, "no answer on /system_stats")
        image_name = client.upload(args.image) if args.image else None
        video_name = client.upload(args.video) if args.video else None
        set_media_inputs(prompt, image_name, video_name)
        apply_overrides(prompt, args.set)
        if args.seed is not None:
            randomize_seeds(prompt, args.seed)

        hints = known_models()
        hints.update(models_from_ui_workflow(ui_path) if ui_path else {})
        listed = {}
        problems, missing = check_inputs(
            prompt, client.object_info(), hints,
            lambda folder: listed[folder] if folder in listed else listed.setdefault(folder, client.model_files(folder)))
        if missing:
            raise RunError("missing model file(s) on the server:\n" + "\n".join(missing)
                           + "\nPut the files in those folders (or list them in extra_model_paths.yaml) "
                             "and try again; ComfyUI re-reads the folders on every request.", code=4)
        if problems:
            raise RunError("the workflow does not fit this server:\n" + "\n".join(problems), code=2)

        ws = client.websocket()
        prompt_id = None
        try:
            prompt_id = client.queue(prompt)
            print(f"queued {prompt_path.name} as {prompt_id}", file=out, flush=True)
            t0 = time.monotonic()
            hist = wait_for_prompt(client, ws, prompt_id, on_event=progress_printer(prompt, out),
                                   timeout=args.timeout)
        except KeyboardInterrupt:
            done = "no prompt was queued"
            if prompt_id:
                try:
                    done = f"prompt {prompt_id}: " + client.cancel(prompt_id)
                except (RunError, urllib.error.URLError, OSError, ValueError, KeyboardInterrupt) as e:
                    done = f"prompt {prompt_id}: could not cancel it ({e}); POST /interrupt to stop it"
            raise RunError(f"cancelled ({done})", 130) from None
        finally:
            ws.close()
        files = output_files(hist)
        videos = [f for f in files if pathlib.Path(f["filename"]).suffix.lower() in VIDEO_EXTS]
        if not videos:
            raise RunError(f"the run finished but produced no video (outputs: {files})")
        f = videos[-1]
        data = client.view(f["filename"], f.get("subfolder", ""), f.get("type", "output"))
        dest = pathlib.Path(args.output)
        if dest.is_dir():
            dest = dest / f["filename"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        print(f"done in {time.monotonic() - t0:.1f} s: {dest}", file=out, flush=True)
        return dest
    except RunError as e:
        if server and e.code == 1 and not args.server_log:    # a node failed: its traceback is in the log
            keep_log = True
            e.args = (f"{e}\n  server log: {log_path}",)
        raise
    finally:
        if server:
            server.stop()
            if not args.server_log and not keep_log:
                pathlib.Path(log_path).unlink(missing_ok=True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", help="'turbo', 'dance', 'long', or a path to an API-format workflow JSON")
    p.add_argument("--image", help="reference image (the person to animate)")
    p.add_argument("--video", help="driving dance video")
    p.add_argument("--output", "-o", default="steadydancer.mp4", help="where to save the video (file or folder)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--server", default="http://127.0.0.1:8188", help="URL of a running ComfyUI (default %(default)s)")
    g.add_argument("--comfyui", help="path to a ComfyUI checkout: start a server from it for this run")
    p.add_argument("--python", help="with --comfyui: the Python that runs ComfyUI (default: COMFYUI_PYTHON, "
                                    "ComfyUI/venv, ComfyUI/../venv, or this Python)")
    p.add_argument("--base-directory", help="with --comfyui: ComfyUI --base-directory (models/, custom_nodes/ ...)")
    p.add_argument("--port", type=int, help="with --comfyui: port (default: a free one)")
    p.add_argument("--cpu", action="store_true", help="with --comfyui: run ComfyUI with --cpu (needed without an NVIDIA GPU / driver)")
    p.add_argument("--server-log", help="with --comfyui: write the server log here")
    p.add_argument("--set", action="append", metavar="NODE.input=value",
                   help="override an input (value parsed as JSON when possible); repeatable")
    p.add_argument("--seed", type=int, help="set every seed input of the graph")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for the run")
    p.add_argument("--http-timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("cancelled (nothing was queued)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
