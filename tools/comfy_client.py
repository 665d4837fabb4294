"""A small synchronous client for ComfyUI's HTTP API and ``/ws`` websocket, on aiohttp.

aiohttp is in every ComfyUI Python (the server is built on it). Its calls run on a private event loop in a
background thread, so the callers (the run command, the real-ComfyUI tests) stay plain synchronous code: a
callback may call the client again (``interrupt()`` from a progress handler), and Ctrl-C in the main thread
stops the wait without leaving a half-read socket behind.

Errors meant for the user are ``RunError`` with the process exit code the run command returns.
"""
from __future__ import annotations

import asyncio
import json
import mimetypes
import pathlib
import socket
import struct
import sys
import threading
import time
import urllib.parse
import uuid

try:
    import aiohttp
except ImportError:          # reported when a client is made, so the offline checks still work
    aiohttp = None


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


class ServerLost(RunError):
    """The server went away (or restarted) while our prompt was queued or running."""

    def __init__(self, message):
        super().__init__(message, code=3)


class HTTPStatusError(RunError):
    def __init__(self, method, path, status, body):
        self.status, self.body = status, body
        super().__init__(f"{method} {path} failed: HTTP {status} {body[:300]!r}", code=1)


class PromptRejected(RunError):
    def __init__(self, body):
        self.body = body
        err = body.get("error", {}) if isinstance(body, dict) else {}
        lines = [f"ComfyUI rejected the prompt: {err.get('message', body)}"]
        for node_id, ne in ((body.get("node_errors") if isinstance(body, dict) else None) or {}).items():
            for e in ne.get("errors", []):
                lines.append(f"  node {node_id} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
        super().__init__("\n".join(lines), code=5)


class ConnectionClosed(ConnectionError):
    """The websocket was closed (by the server, or because it died)."""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ the loop
class _Loop:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for a coroutine from synchronous code."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="comfy-client", daemon=True)
        self.thread.start()

    def run(self, coro):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:         # KeyboardInterrupt while waiting: stop the coroutine too
            fut.cancel()
            raise

    def stop(self):
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


_CONNECTION_ERRORS = (ConnectionError, OSError, asyncio.TimeoutError) + (
    (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) if aiohttp else ())


# ------------------------------------------------------------------------------------------------ the client
class ComfyClient:
    def __init__(self, base_url, timeout=30.0):
        if aiohttp is None:
            raise RunError(f"this command needs aiohttp, which this Python ({sys.executable}) lacks: run it with "
                           "ComfyUI's own Python (aiohttp is part of every ComfyUI install) or `pip install aiohttp`",
                           code=2)
        self.base = base_url.rstrip("/")
        u = urllib.parse.urlparse(self.base)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise RunError(f"--server {base_url!r}: give a URL such as http://127.0.0.1:8188", code=2)
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        self._loop = None
        self._session = None

    # -- plumbing
    def _run(self, coro):
        if self._loop is None:
            self._loop = _Loop()
        return self._loop.run(coro)

    async def _sess(self):
        if self._session is None or self._session.closed:
            # a read timeout, not a total one: a large video download may take longer than `timeout`
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=None, connect=self.timeout, sock_connect=self.timeout, sock_read=self.timeout))
        return self._session

    def close(self):
        if self._loop is None:
            return
        if self._session is not None and not self._session.closed:
            try:
                self._run(self._session.close())
            except Exception:  # noqa: BLE001 - closing
                pass
        self._loop.stop()
        self._loop = self._session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, method, path, *, json_body=None, data=None, ok_404=False):
        """(status, body bytes); a status >= 400 raises HTTPStatusError (or returns (404, b"") with ok_404)."""
        async def go():
            s = await self._sess()
            async with s.request(method, self.base + path, json=json_body, data=data) as r:
                return r.status, await r.read()
        try:
            status, body = self._run(go())
        except _CONNECTION_ERRORS as e:
            raise ServerUnreachable(self.base, _why(e)) from None
        if status == 404 and ok_404:
            return status, b""
        if status >= 400:
            raise HTTPStatusError(method, path, status, body)
        return status, body

    def get_json(self, path):
        _, body = self.request("GET", path)
        return json.loads(body)

    def get_bytes(self, path):
        return self.request("GET", path)[1]

    def post_json(self, path, obj):
        _, body = self.request("POST", path, json_body=obj)
        return json.loads(body) if body else None

    # -- ComfyUI's routes
    def alive(self):
        try:
            self.get_json("/system_stats")
            return True
        except (RunError, ValueError):
            return False

    def system_stats(self):
        return self.get_json("/system_stats")

    def upload(self, path, overwrite=True):
        """Upload a file into the server's input/ folder; returns the name to put in LoadImage/LoadVideo."""
        path = pathlib.Path(path)
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        with open(path, "rb") as fh:
            form = aiohttp.FormData()
            form.add_field("overwrite", "true" if overwrite else "false")
            form.add_field("type", "input")
            form.add_field("image", fh, filename=path.name, content_type=ctype)
            try:
                _, body = self.request("POST", "/upload/image", data=form)
            except HTTPStatusError as e:
                raise RunError(f"uploading {path} failed: HTTP {e.status} {e.body[:200]!r}", code=2) from None
        resp = json.loads(body)
        name = resp["name"]
        return f"{resp['subfolder']}/{name}" if resp.get("subfolder") else name

    def queue(self, prompt, extra_data=None):
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        try:
            resp = self.post_json("/prompt", body)
        except HTTPStatusError as e:
            try:
                parsed = json.loads(e.body)
            except ValueError:
                raise RunError(f"POST /prompt failed: HTTP {e.status} {e.body[:300]!r}") from None
            raise PromptRejected(parsed) from None
        errors = resp.get("node_errors") or {}
        if errors:
            # HTTP 200 with node errors: ComfyUI queued only the outputs whose inputs passed validation (e.g. the
            # pose preview of a graph whose sampler has a bad value). Stop that partial run and say what failed.
            done = self.cancel(resp["prompt_id"])
            raise PromptRejected({"error": {"type": "prompt_outputs_failed_validation",
                                            "message": f"some outputs failed validation (ComfyUI queued the rest; "
                                                       f"{done})"},
                                  "node_errors": errors})
        return resp["prompt_id"]

    def history(self, prompt_id):
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def interrupt(self, prompt_id=None):
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def queue_state(self, prompt_id):
        """'running', 'pending' or None for a prompt id, from GET /queue."""
        q = self.get_json("/queue")
        ids = lambda items: {item[1] for item in items if len(item) > 1}     # (number, prompt_id, prompt, ...)
        if prompt_id in ids(q.get("queue_running", [])):
            return "running"
        if prompt_id in ids(q.get("queue_pending", [])):
            return "pending"
        return None

    def cancel(self, prompt_id):
        """Stop our prompt only: interrupt it when it runs, remove it when it waits in the queue.
        Returns what was done, for the user."""
        state = self.queue_state(prompt_id)
        if state == "running":
            self.interrupt(prompt_id)
            return "interrupted it on the server"
        if state == "pending":
            self.post_json("/queue", {"delete": [prompt_id]})
            return "removed it from the server's queue"
        return "it was no longer queued or running"

    def model_files(self, folder):
        """File names the server has in a model folder (GET /models/<folder>), or None when it has no such
        folder (older ComfyUI, or the pack did not register it)."""
        try:
            return self.get_json(f"/models/{urllib.parse.quote(folder)}")
        except HTTPStatusError:
            return None

    def folder_paths(self):
        """{folder kind: [absolute paths]} from GET /internal/folder_paths (the frontend's route), or None."""
        try:
            return self.get_json("/internal/folder_paths")
        except (HTTPStatusError, ValueError):
            return None

    def object_info(self, node_class=None):
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def view(self, filename, subfolder="", type_="output"):
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type_})
        return self.get_bytes(f"/view?{q}")

    def websocket(self):
        ws = WebSocket(self)
        ws.connect()
        return ws


def _why(e):
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__


class WebSocket:
    """ComfyUI's ``/ws?clientId=...`` on aiohttp's ``ws_connect`` (pings, fragments and close handled there)."""

    def __init__(self, client):
        self.client = client
        self._ws = None

    def connect(self):
        c = self.client

        async def go():
            s = await c._sess()
            return await s.ws_connect(f"{c.base}/ws?clientId={c.client_id}", max_msg_size=0, autoping=True)
        try:
            self._ws = c._run(go())
        except aiohttp.WSServerHandshakeError as e:
            raise RunError(f"websocket handshake with {c.base}/ws failed: HTTP {e.status} {e.message}") from None
        except _CONNECTION_ERRORS as e:
            raise ServerUnreachable(c.base, _why(e)) from None
        return self

    def recv(self, timeout=None):
        """Next message: ("text", str) or ("binary", bytes); raises TimeoutError, or ConnectionClosed when the
        socket closes."""
        ws = self._ws

        async def go():
            return await ws.receive(timeout=timeout)
        if ws is None or ws.closed:
            raise ConnectionClosed("websocket closed")
        try:
            msg = self.client._run(go())
        except asyncio.TimeoutError:
            raise TimeoutError(f"no message in {timeout} s") from None
        except _CONNECTION_ERRORS as e:
            raise ConnectionClosed(_why(e)) from None
        if msg.type == aiohttp.WSMsgType.TEXT:
            return "text", msg.data
        if msg.type == aiohttp.WSMsgType.BINARY:
            return "binary", msg.data
        raise ConnectionClosed(f"websocket closed by the server ({msg.type.name}"
                               + (f": {msg.extra}" if msg.extra else "") + ")")

    def close(self):
        ws, self._ws = self._ws, None
        if ws is not None and not ws.closed and self.client._loop is not None:
            try:
                self.client._run(ws.close())
            except Exception:  # noqa: BLE001 - closing
                pass


# ------------------------------------------------------------------------------------------ waiting for a run
POLL_S = 5.0      # with no websocket message for this long, ask /history (a message may have been missed)
BINARY_TEXT = 3   # ComfyUI's BinaryEventTypes.TEXT: the text a node shows on itself (PromptServer.send_progress_text)


def progress_text(frame):
    """(node id, text) of a binary 'progress text' frame: event 3, node-id length (u32 BE), node id, UTF-8 text."""
    if len(frame) < 8 or struct.unpack(">I", frame[:4])[0] != BINARY_TEXT:
        return None
    n = struct.unpack(">I", frame[4:8])[0]
    if len(frame) < 8 + n:
        return None
    return frame[8:8 + n].decode("utf-8", "replace"), frame[8 + n:].decode("utf-8", "replace")


def _node_failed(data):
    return RunError(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type', '')}: {str(data.get('exception_message', '')).strip()}")


def _finish(h, prompt_id):
    status = h.get("status", {})
    if status.get("status_str") == "error":
        for name, data in status.get("messages", []):
            if name == "execution_error":
                raise _node_failed(data)
            if name == "execution_interrupted":
                raise RunError(f"the run was interrupted (node {data.get('node_id')} {data.get('node_type')})")
        raise RunError(f"prompt {prompt_id} failed: {status}")
    return h


def _done(h):
    return bool(h) and h.get("status", {}).get("completed") is not None \
        and h["status"].get("status_str") in ("success", "error")


def recover(client, ws, prompt_id, why, grace=15.0):
    """After the websocket closed mid-run: the finished history entry, or None once the websocket is open
    again and the prompt still queued / running; raises ServerLost when the server died or restarted."""
    deadline = time.monotonic() + grace
    while True:
        if client.alive():
            try:
                h = client.history(prompt_id)
                if _done(h):
                    return h
                if client.queue_state(prompt_id) is not None:
                    ws.close()
                    ws.connect()
                    return None
                h = client.history(prompt_id)       # it may have finished between the two calls
                if _done(h):
                    return h
            except RunError:
                pass
            else:
                raise ServerLost(
                    f"the ComfyUI server at {client.base} restarted while prompt {prompt_id} was queued or "
                    f"running: the prompt is gone from its queue and history ({why}). Queue it again.")
        if time.monotonic() > deadline:
            raise ServerLost(
                f"the ComfyUI server at {client.base} went away while prompt {prompt_id} was queued or running "
                f"({why}); it did not answer again within {grace:.0f} s. It stopped or crashed (an out-of-memory "
                f"kill looks like this): see the server's console or log, then run the command again.")
        time.sleep(0.5)


def wait_for_prompt(client, ws, prompt_id, on_event=None, timeout=3600.0, grace=15.0):
    """Follow a queued prompt over the websocket until it ends; returns its /history entry.

    ``on_event(type, data)`` sees every JSON message for this prompt, and ("progress_text", {"node", "text"})
    for the texts nodes show on themselves while it runs (our nodes' size/length adjustments, for example).
    Raises RunError with the node's message when the run fails, RunError("interrupted") when it was
    interrupted, and ServerLost (exit 3) when the server dies or restarts before the prompt ends (a websocket
    that only dropped is re-opened when the server still has the prompt).
    """
    deadline = time.monotonic() + timeout
    ours = False              # our prompt is the one running (node texts carry no prompt id)
    final = None              # history says it ended: read what the websocket still has, then finish
    final_by = 0.0
    while True:
        now = time.monotonic()
        left = deadline - now
        if final is not None and now >= final_by:
            return _finish(final, prompt_id)
        if left <= 0:
            raise RunError(f"timed out after {timeout:.0f} s waiting for prompt {prompt_id}")
        try:
            kind, msg = ws.recv(timeout=max(0.01, min(left, POLL_S) if final is None else final_by - now))
        except TimeoutError:
            if final is not None:
                return _finish(final, prompt_id)
            # a message can be missed if the run finished before the socket was open: poll history
            try:
                h = client.history(prompt_id)
            except ServerUnreachable:
                h = recover(client, ws, prompt_id, "GET /history got no answer", grace)
            if _done(h):
                # the server writes history before its message queue reaches the socket: take those first
                final, final_by = h, time.monotonic() + 1.0
            continue
        except ConnectionClosed as e:
            h = final or recover(client, ws, prompt_id, str(e), grace)
            if h is not None:
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
            raise _node_failed(data)
        if t == "execution_interrupted":
            raise RunError(f"the run was interrupted (node {data.get('node_id')} {data.get('node_type')})")
        if t == "execution_success" or (t == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id):
            for _ in range(50):
                h = client.history(prompt_id)
                if h:
                    return _finish(h, prompt_id)
                time.sleep(0.1)
            raise RunError(f"prompt {prompt_id} finished but has no history entry")


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
