"""Drive ComfyUI's real frontend in headless Chromium over the Chrome DevTools Protocol (aiohttp).

``convert_workflows(url, [ui_json, ...])`` opens the page served by a running ComfyUI, loads each UI workflow
with ``window.app.loadGraphData`` and returns, per workflow, the node types the frontend does not know and the
API prompt from ``await window.app.graphToPrompt()`` (the same code path as the menu's "Export (API)").
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium():
    exe = os.environ.get("CHROMIUM")
    if exe:
        return exe
    for n in CHROMIUM_NAMES:
        p = shutil.which(n)
        if p:
            return p
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CDP:
    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def call(self, method, **params):
        self.n += 1
        mid = self.n
        await self.ws.send_json({"id": mid, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expr, timeout=60):
        r = await asyncio.wait_for(self.call("Runtime.evaluate", expression=expr, awaitPromise=True,
                                             returnByValue=True, timeout=timeout * 1000), timeout + 5)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise RuntimeError(f"page error: {d.get('exception', {}).get('description') or d.get('text')}")
        return r["result"].get("value")


_CONVERT_JS = """
(async () => {
  const wf = %s;
  const known = (t) => !!(window.LiteGraph && LiteGraph.registered_node_types && LiteGraph.registered_node_types[t]);
  const missing = [...new Set(wf.nodes.map(n => n.type).filter(t => !known(t)))];
  await window.app.loadGraphData(wf, true, true, "sdtest");
  const graph = window.app.graph;
  const nodes = (graph.nodes || graph._nodes);
  const flagged = nodes.filter(n => n.has_errors).map(n => n.type);   // e.g. a model file not on the server
  const p = await window.app.graphToPrompt();
  // layout after the media previews have loaded: Load Video grows to show its video, Load Image its image
  const sizes = () => JSON.stringify(nodes.map(n => [n.id, ...n.size]));
  const deadline = Date.now() + %d;
  let last = "", stable = 0, videos = [];
  while (Date.now() < deadline) {
    await new Promise(r => setTimeout(r, 250));
    videos = [...document.querySelectorAll("video")].map(v => ({w: v.videoWidth, h: v.videoHeight, ready: v.readyState}));
    const now = sizes();
    stable = (now === last) ? stable + 1 : 0;
    last = now;
    const want = nodes.filter(n => n.type === "LoadVideo").length;
    if (videos.filter(v => v.ready >= 1 && v.w > 0).length >= want && stable >= 4) break;
  }
  const rect = (r) => Array.from(r).slice(0, 4).map(Number);
  const layout = {
    nodes: nodes.map(n => ({id: String(n.id), type: n.type, rect: rect(n.getBounding ? n.getBounding() : n.boundingRect),
                            size: Array.from(n.size).map(Number)})),
    groups: (graph.groups || graph._groups || []).map(g => ({title: g.title,
                            rect: rect(g.boundingRect || g._bounding || [...g.pos, ...g.size])})),
    videos,
  };
  return JSON.stringify({missing, flagged, output: p.output, nodeCount: nodes.length, layout,
                         frontendVersion: window.__COMFYUI_FRONTEND_VERSION__ || null});
})()
"""


async def _convert(url, workflows, chromium, timeout, media_wait):
    import aiohttp

    port = _free_port()
    profile = tempfile.mkdtemp(prefix="sdtest-chromium-")
    proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-dev-shm-usage", f"--remote-debugging-port={port}",
                             f"--user-data-dir={profile}", "--window-size=1400,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            targets = None
            while time.monotonic() < deadline:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json") as r:
                        targets = await r.json()
                    if any(t.get("type") == "page" for t in targets):
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
            page = next(t for t in targets if t.get("type") == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                cdp = CDP(ws)
                await cdp.call("Page.enable")
                await cdp.call("Runtime.enable")
                await cdp.call("Page.navigate", url=url)
                deadline = time.monotonic() + timeout
                while True:
                    ok = await cdp.evaluate("!!(window.app && window.app.graph && window.LiteGraph && "
                                            "window.app.vueAppReady !== false && "
                                            "Object.keys(LiteGraph.registered_node_types||{}).length > 100)")
                    if ok:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the ComfyUI frontend at {url} did not come up in {timeout} s")
                    await asyncio.sleep(0.5)
                await asyncio.sleep(1.0)
                results = []
                for wf in workflows:
                    raw = await cdp.evaluate(_CONVERT_JS % (json.dumps(wf), int(media_wait * 1000)),
                                             timeout=timeout + media_wait)
                    results.append(json.loads(raw))
                return results
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def convert_workflows(url, workflows, chromium=None, timeout=90, media_wait=20):
    """Per workflow: {missing, flagged, output (the API prompt), nodeCount, frontendVersion, layout}; ``layout``
    is measured once the Load Video previews have loaded (at most ``media_wait`` s): every node's bounding
    rectangle (title bar included) and size, every group's rectangle, and the page's videos (natural size)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium found (apt-get install chromium, or set CHROMIUM)")
    return asyncio.run(_convert(url, workflows, chromium, timeout, media_wait))


UI_ONLY_TYPES = ("Note", "MarkdownNote")


def _overlap(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _inside(a, b):
    return a[0] >= b[0] and a[1] >= b[1] and a[0] + a[2] <= b[0] + b[2] and a[1] + a[3] <= b[1] + b[3]


def layout_problems(layout):
    """What is wrong with a measured layout: node rectangles that overlap (any two nodes, notes included), and
    nodes other than notes that do not lie wholly inside exactly one group."""
    nodes, groups = layout["nodes"], layout["groups"]
    out = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if _overlap(a["rect"], b["rect"]):
                out.append(f"node {a['id']} ({a['type']}) {a['rect']} overlaps node {b['id']} ({b['type']}) {b['rect']}")
    for n in nodes:
        if n["type"] in UI_ONLY_TYPES:
            continue
        holders = [g["title"] for g in groups if _inside(n["rect"], g["rect"])]
        if len(holders) != 1:
            out.append(f"node {n['id']} ({n['type']}) {n['rect']} lies inside {len(holders)} groups {holders}")
    return out


UI_ONLY_INPUT_SUFFIX = "-preview"


def comparable(prompt):
    """An API prompt reduced to what the server executes: {id: {class_type, inputs}}.

    ``_meta`` (titles) is dropped, and so are the frontend's preview widgets (``LoadVideo``'s
    ``"video-preview": ""`` appears in "Export (API)" only when the chosen file exists on that server, so no
    shipped file could match both cases; the server ignores it)."""
    return {str(k): {"class_type": v["class_type"],
                     "inputs": {n: x for n, x in v["inputs"].items() if not n.endswith(UI_ONLY_INPUT_SUFFIX)}}
            for k, v in prompt.items()}
