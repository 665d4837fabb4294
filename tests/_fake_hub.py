"""A stand-in Hugging Face hub on 127.0.0.1 for the fetcher tests: an aiohttp server that answers the calls the
real ``huggingface_hub`` client makes, the way huggingface.co answers them (headers and JSON shapes as the client
parses them in huggingface_hub's ``file_download.get_hf_file_metadata``, ``HfApi.list_repo_tree`` and
``utils._http.hf_raise_for_status``):

- ``HEAD /<repo>/resolve/<rev>/<path>``: ``X-Repo-Commit``, ``ETag`` (git blob sha1), and for LFS files
  ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``;
- ``GET`` of the same URL, with ``Range: bytes=N-`` answered by 206 + ``Content-Range``;
- ``GET /api/models/<repo>/tree/<rev>[/<path>]?recursive=``: the file list (``type``, ``path``, ``size``, ``oid``,
  ``lfs``);
- errors with ``X-Error-Code`` (``EntryNotFound`` 404, ``GatedRepo`` 401/403, ``RepoNotFound`` 404).

Knobs for failure tests: ``gated`` repos need ``Authorization: Bearer <token>``; ``corrupt`` paths serve other
bytes than their advertised sha256; ``cut_once`` paths drop the connection half-way through the first GET.
Every request is logged in ``requests`` as (method, path, Range header).
"""
from __future__ import annotations

import asyncio
import hashlib
import socket
import threading

from aiohttp import web

COMMIT = "c0ffee" + "0" * 34
GOOD_TOKEN = "hf_goodtoken"


def git_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, repos):
        self.repos = {r: dict(files) for r, files in repos.items()}   # repo -> {path: bytes}
        self.gated, self.corrupt, self.cut_once = set(), set(), set()
        self.requests = []
        self._loop = self._runner = None
        self.url = None

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def is_lfs(path):
        return not path.endswith((".json", ".md", ".txt"))

    def entry(self, path, data):
        e = {"type": "file", "path": path, "size": len(data), "oid": git_sha1(data)}
        if self.is_lfs(path):
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return e

    def _error(self, status, code, message):
        return web.Response(status=status, headers={"X-Error-Code": code, "X-Error-Message": message},
                            text=message)

    def _auth(self, request, repo):
        if repo not in self.repos:
            return self._error(404, "RepoNotFound", "Repository not found")
        if repo in self.gated and request.headers.get("Authorization") != f"Bearer {GOOD_TOKEN}":
            status = 401 if "Authorization" not in request.headers else 403
            return self._error(status, "GatedRepo", f"Access to model {repo} is restricted.")
        return None

    # -- handlers -------------------------------------------------------------------------------
    async def resolve(self, request):
        m = request.match_info
        repo, path = f"{m['owner']}/{m['name']}", m["path"]
        self.requests.append((request.method, request.path, request.headers.get("Range")))
        if (err := self._auth(request, repo)) is not None:
            return err
        if path not in self.repos[repo]:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {m['rev']}")
        data = self.repos[repo][path]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{git_sha1(data)}"', "Accept-Ranges": "bytes"}
        if self.is_lfs(path):
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        if (repo, path) in self.corrupt:
            data = bytes(b ^ 0x5A for b in data)
        start = 0
        rng = request.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        if (repo, path) in self.cut_once and not rng:
            self.cut_once.discard((repo, path))
            resp = web.StreamResponse(status=200, headers={**headers, "Content-Length": str(len(data))})
            await resp.prepare(request)
            await resp.write(data[:len(data) // 2])
            await asyncio.sleep(0.05)
            request.transport.close()   # the connection drops half-way
            return resp
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return web.Response(status=206, body=data[start:], headers=headers)
        return web.Response(body=data, headers=headers)

    async def tree(self, request):
        m = request.match_info
        repo, folder = f"{m['owner']}/{m['name']}", m.get("path", "").strip("/")
        self.requests.append((request.method, request.path, None))
        if (err := self._auth(request, repo)) is not None:
            return err
        recursive = request.query.get("recursive", "false").lower() == "true"
        prefix = folder + "/" if folder else ""
        out, dirs = [], set()
        for path, data in sorted(self.repos[repo].items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/", 1)[0])
                continue
            out.append(self.entry(path, data))
        out += [{"type": "directory", "path": d, "oid": git_sha1(d.encode())} for d in sorted(dirs)]
        if folder and not out:
            return self._error(404, "EntryNotFound", f"{folder} does not exist")
        return web.json_response(out)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self):
        app = web.Application()
        app.router.add_get("/api/models/{owner}/{name}/tree/{rev}", self.tree)
        app.router.add_get("/api/models/{owner}/{name}/tree/{rev}/{path:.*}", self.tree)
        app.router.add_get("/{owner}/{name}/resolve/{rev}/{path:.*}", self.resolve, allow_head=True)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve():
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            ready.set()

        def run():
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "fake hub did not start"
        return self

    def stop(self):
        async def down():
            await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
