"""tools/run_workflow.py without ComfyUI: its aiohttp client (tools/comfy_client.py) against a small aiohttp
server that speaks ComfyUI's protocol (messages as ComfyUI 0.33 sends them), the pre-queue checks
(tools/prechecks.py) on real /object_info-shaped data and real media files, a server that dies, restarts or
drops the websocket mid-run, the environment toggles, and --fetch-missing: its contract with a stand-in
fetch_models module, then end to end with the real tools/fetch_models.py against the stand-in hub (tests/_fake_hub.py,
the real huggingface_hub client) fetching a file and the official sharded folder, and the hub's 404 / 401 / a
corrupt shard.
The same command is run against a real server in tests/integration."""
import asyncio
import importlib.util
import json
import pathlib
import struct
import sys
import threading
import zlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sd_run_workflow_offline", ROOT / "tools" / "run_workflow.py")
rw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rw)

OBJECT_INFO = {
    "LoadImage": {"input": {"required": {"image": [["reference.png", "me.png"], {"image_upload": True}]}},
                  "output_node": False},
    "LoadVideo": {"input": {"required": {"file": ["COMBO", {"options": ["dance.mp4"], "video_upload": True}]}},
                  "output_node": False},
    "UNETLike": {"input": {"required": {"model_name": [["tiny.safetensors"], {}], "image": ["IMAGE"]}},
                 "output_node": False},
    "CLIPLoader": {"input": {"required": {"clip_name": [[], {}], "type": [["wan", "sd3"]]}}, "output_node": False},
    "Saver": {"input": {"required": {"x": ["*"], "mode": ["COMBO", {"options": ["a", "b"]}]}}, "output_node": True},
}


def _png():
    """A valid 1x1 PNG, written by hand (chunks: length, type, data, CRC)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def _mp4(path, frames=3, size=32):
    """A real (tiny) MP4 written with PyAV, the library ComfyUI's LoadVideo reads with."""
    av = pytest.importorskip("av")
    import numpy as np
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 40 * i, np.uint8), format="rgb24")
            for pkt in s.encode(frame):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def _prompt(model="tiny.safetensors", mode="a"):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "me.png"}},
        "2": {"class_type": "UNETLike", "inputs": {"model_name": model, "image": ["1", 0]}},
        "3": {"class_type": "Saver", "inputs": {"x": ["2", 0], "mode": mode}},
        "4": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5.safetensors", "type": "wan"}},  # unused
    }


def test_precheck_names_a_missing_model_with_folder_and_url_and_skips_unused_nodes():
    hints = {"big.safetensors": {"name": "big.safetensors", "url": "https://example.org/big.safetensors",
                                 "directory": "diffusion_models"}}
    problems, missing = rw.check_inputs(_prompt(model="big.safetensors"), OBJECT_INFO, hints)
    assert problems == []
    assert len(missing) == 1 and "node 2 (UNETLike).model_name" in missing[0]
    assert "models/diffusion_models/" in missing[0] and "https://example.org/big.safetensors" in missing[0]
    # node 4 is not reachable from an output node: ComfyUI would not load it, so neither do we complain
    assert rw.reachable(_prompt(), OBJECT_INFO) == {"1", "2", "3"}


def test_precheck_of_a_custom_workflow_names_the_folder_and_the_known_download_url():
    # a hand-made API JSON: no UI twin, so the folder comes from the loader's input and the URL from the
    # pack's list of known files (shipped UI workflows' properties.models + the DWPose table)
    info = {"CLIPVisionLoader": {"input": {"required": {"clip_name": [["other.safetensors"]]}}, "output_node": False},
            "UNETLoader": {"input": {"required": {"unet_name": [[]], "weight_dtype": [["default"]]}},
                           "output_node": False},
            "Saver": OBJECT_INFO["Saver"]}
    prompt = {"1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vision_h.safetensors"}},
              "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "mine.safetensors", "weight_dtype": "default"}},
              "3": {"class_type": "Saver", "inputs": {"x": ["1", 0], "y": ["2", 0], "mode": "a"}}}
    problems, missing = rw.check_inputs(prompt, info, rw.known_models())
    assert problems == []
    clip = next(m for m in missing if "node 1" in m)
    assert "is not in models/clip_vision/" in clip
    assert "download: https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/" \
           "clip_vision/clip_vision_h.safetensors" in clip
    unet = next(m for m in missing if "node 2" in m)
    assert "is not in models/diffusion_models/" in unet and "download" not in unet


POSE_INFO = {"SteadyDancerPoseExtract": {"input": {"required": {
    "detector": [["yolox_l.onnx"]], "estimator": [["dw-ll_ucoco_384.onnx", "dw-ll_ucoco.onnx"]]}},
    "output_node": False}, "Saver": OBJECT_INFO["Saver"]}
POSE_PROMPT = {"1": {"class_type": "SteadyDancerPoseExtract",
                     "inputs": {"detector": "yolox_l.onnx", "estimator": "dw-ll_ucoco_384.onnx"}},
               "2": {"class_type": "Saver", "inputs": {"x": ["1", 0], "mode": "a"}}}


def test_precheck_asks_the_server_which_dwpose_files_exist():
    # the pose node's combos always list the default names (so a missing file gets a download hint when
    # run); only GET /models/dwpose tells whether the file is really there
    asked = []

    def files(folder):
        asked.append(folder)
        return ["yzd-v/DWPose/dw-ll_ucoco_384.onnx"]        # a comfyui_controlnet_aux download counts

    problems, missing = rw.check_inputs(POSE_PROMPT, POSE_INFO, rw.known_models(), files)
    assert problems == [] and set(asked) == {"dwpose"}
    # a file two nodes need is listed once
    two = {**POSE_PROMPT, "4": dict(POSE_PROMPT["1"]), "2": {"class_type": "Saver",
                                                             "inputs": {"x": ["1", 0], "y": ["4", 0], "mode": "a"}}}
    _, missing2 = rw.check_inputs(two, POSE_INFO, {}, files)
    assert len(missing2) == 1 and "node 1 (SteadyDancerPoseExtract).detector, node 4 " in missing2[0]
    assert len(missing) == 1 and "'yolox_l.onnx' is not in models/dwpose/ (needed by node 1 " \
                                 "(SteadyDancerPoseExtract).detector)" in missing[0]
    assert "download: https://huggingface.co/yzd-v/DWPose/resolve/main/yolox_l.onnx" in missing[0]
    # no listing (older server): nothing is claimed missing
    assert rw.check_inputs(POSE_PROMPT, POSE_INFO, {}, lambda f: None) == ([], [])


def test_precheck_reports_bad_combo_values_and_unknown_node_types():
    p = _prompt(mode="zzz")
    p["5"] = {"class_type": "NotInstalled", "inputs": {}}
    problems, missing = rw.check_inputs(p, OBJECT_INFO)
    assert missing == []
    assert any("'zzz' is not one of the allowed values ['a', 'b']" in x for x in problems)
    assert any("'NotInstalled' is not installed" in x for x in problems)
    assert rw.check_inputs(_prompt(), OBJECT_INFO) == ([], [])


def test_media_inputs_overrides_and_seeds():
    p = {"1": {"class_type": "LoadImage", "inputs": {"image": "x"}},
         "2": {"class_type": "LoadVideo", "inputs": {"file": "y"}},
         "3": {"class_type": "S", "inputs": {"seed": 1, "steps": 4, "text": "a"}}}
    rw.set_media_inputs(p, "me.png", "moves.mp4")
    rw.apply_overrides(p, ["3.steps=2", "3.text=hello world", "3.flag=true"])
    rw.randomize_seeds(p, 7)
    assert p["1"]["inputs"]["image"] == "me.png" and p["2"]["inputs"]["file"] == "moves.mp4"
    assert p["3"]["inputs"] == {"seed": 7, "steps": 2, "text": "hello world", "flag": True}
    with pytest.raises(rw.RunError):
        rw.apply_overrides(p, ["9.steps=2"])
    p["4"] = {"class_type": "LoadImage", "inputs": {"image": "z"}}
    with pytest.raises(rw.RunError, match="2 LoadImage nodes"):
        rw.set_media_inputs(p, "me.png", None)


def test_ui_format_file_is_refused_with_a_hint(tmp_path):
    ui = json.dumps({"nodes": [], "links": [], "version": 0.4})
    f = tmp_path / "ui.json"
    f.write_text(ui)
    with pytest.raises(rw.RunError, match="UI-format") as e:
        rw.load_prompt(f)
    # the shipped API twins are workflows_api/<same name>.json, not "..._api.json"
    assert "_api.json" not in str(e.value) and "`turbo` / `dance`" in str(e.value)
    assert str(rw.API_DIR) in str(e.value) and e.value.code == 2
    f = tmp_path / "steadydancer-dance.json"       # e.g. a copy of the shipped UI workflow
    f.write_text(ui)
    with pytest.raises(rw.RunError) as e:
        rw.load_prompt(f)
    assert "`dance`" in str(e.value) and str(rw.API_DIR / "steadydancer-dance.json") in str(e.value)


def test_a_non_image_reference_is_refused_before_anything_is_uploaded(tmp_path, capsys, monkeypatch):
    wf = tmp_path / "p.json"
    wf.write_text(json.dumps(_prompt()))
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a picture")
    dead = f"http://127.0.0.1:{rw.free_port()}"
    rc = rw.main([str(wf), "--server", dead, "--image", str(fake), "--output", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--image {fake}: not an image" in err, err       # 2, not 3: checked before connecting
    real = tmp_path / "real.png"
    real.write_bytes(_png())
    rw.check_image(real)
    # without PIL: the magic bytes decide
    monkeypatch.setitem(sys.modules, "PIL", None)      # makes `from PIL import ...` raise ImportError
    rw.check_image(real)
    with pytest.raises(rw.RunError, match="not an image file"):
        rw.check_image(fake)


def test_comfyui_that_dies_at_start_up_for_lack_of_a_gpu_is_exit_3_with_a_cpu_hint(tmp_path, capsys):
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    # what ComfyUI 0.33 prints without --cpu on a machine without an NVIDIA driver (the user's trial log)
    (comfy / "main.py").write_text(
        "import sys\nprint('Traceback (most recent call last):')\n"
        "print('RuntimeError: Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU "
        "and installed a driver from http://www.nvidia.com/Download/index.aspx')\nsys.exit(1)\n")
    wf = tmp_path / "p.json"
    wf.write_text(json.dumps(_prompt()))
    rc = rw.main([str(wf), "--comfyui", str(comfy), "--python", sys.executable, "--output", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "exited with code 1 during start-up; see " in err and "add --cpu" in err
    log = pathlib.Path(err.split("; see ", 1)[1].split()[0])
    assert "Found no NVIDIA driver" in log.read_text()          # the log is kept and named when start-up fails
    log.unlink()


def test_server_down_is_exit_code_3(capsys, tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(_prompt()))
    rc = rw.main([str(f), "--server", f"http://127.0.0.1:{rw.free_port()}", "--output", str(tmp_path / "o.mp4")])
    assert rc == 3
    assert "cannot reach ComfyUI" in capsys.readouterr().err


class FakeComfy:
    """aiohttp server with ComfyUI's routes and websocket messages (incl. binary preview frames)."""

    def __init__(self, fail=False, hold=False, dwpose_files=None, mid_run=None, models_dir=None, late=0.0,
                 node_errors=None):
        self.fail, self.prompts, self.uploads = fail, [], {}
        self.node_errors = node_errors or {}  # returned with HTTP 200: ComfyUI queued only the valid outputs
        self.hold, self.running, self.interrupts, self.deleted = hold, False, [], []
        self.dwpose_files = dwpose_files
        # mid_run: "die" (the process goes away), "restart" (back at once, queue and history empty),
        # "drop" (only the websocket closes; the prompt runs on)
        self.mid_run, self.finished, self.restarted, self.dead = mid_run, False, False, False
        self.models_dir = models_dir          # UNETLike's combo lists models_dir/diffusion_models
        self.late = late                      # seconds between the history entry and the final message
        self.port = rw.free_port()
        self.ready = threading.Event()
        self.clients, self.transports = {}, {}

    async def _app(self):
        from aiohttp import web

        async def system_stats(request):
            return web.json_response({"system": {"comfyui_version": "0.33.0"}})

        async def object_info(request):
            info = json.loads(json.dumps(OBJECT_INFO))
            info["LoadImage"]["input"]["required"]["image"][0] += list(self.uploads)
            info["LoadVideo"]["input"]["required"]["file"][1]["options"] += list(self.uploads)
            info["Saver"]["output_node"] = True
            if self.models_dir is not None:
                d = self.models_dir / "diffusion_models"
                info["UNETLike"]["input"]["required"]["model_name"][0] = sorted(
                    f.name for f in d.iterdir()) if d.is_dir() else []
            return web.json_response(info)

        async def upload(request):
            post = await request.post()
            f = post["image"]
            self.uploads[f.filename] = f.file.read()
            assert post["type"] == "input" and post["overwrite"] == "true"
            return web.json_response({"name": f.filename, "subfolder": "", "type": "input"})

        async def ws(request):
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            self.clients[request.query["clientId"]] = sock
            self.transports[request.query["clientId"]] = request.transport
            await sock.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}})
            async for _ in sock:
                pass
            return sock

        async def prompt(request):
            body = await request.json()
            self.prompts.append(body)
            pid = "p1"
            asyncio.get_running_loop().create_task(self._run(body["client_id"], pid))
            if self.node_errors:
                self.running = True
            return web.json_response({"prompt_id": pid, "number": 0, "node_errors": self.node_errors})

        async def folder_paths(request):
            if self.models_dir is None:
                return web.Response(status=404)
            return web.json_response({k: [str(self.models_dir / k)] for k in ("diffusion_models", "loras", "vae")})

        async def history(request):
            if self.restarted or not self.finished:
                return web.json_response({})
            if self.fail:
                return web.json_response({"p1": {"status": {"status_str": "error", "completed": False}}})
            return web.json_response({"p1": {"status": {"status_str": "success", "completed": True},
                                             "outputs": {"3": {"images": [{"filename": "v_00001_.mp4",
                                                                           "subfolder": "video", "type": "output"}],
                                                               "animated": [True]}}}})

        async def models(request):
            if request.match_info["folder"] == "dwpose" and self.dwpose_files is not None:
                return web.json_response(self.dwpose_files)
            return web.Response(status=404)

        async def queue_get(request):
            running = [[0, "p1", {}, {}, []]] if self.running else []
            return web.json_response({"queue_running": running, "queue_pending": []})

        async def queue_post(request):
            self.deleted += (await request.json()).get("delete", [])
            return web.Response(status=200)

        async def interrupt(request):
            self.interrupts.append(await request.json())
            self.running = False
            return web.Response(status=200)

        async def view(request):
            assert request.query["filename"] == "v_00001_.mp4" and request.query["subfolder"] == "video"
            return web.Response(body=b"MP4DATA" * 10000)

        @web.middleware
        async def gone(request, handler):
            if self.dead:                          # also on a kept-alive connection of the client's pool
                request.transport.abort()
                return web.Response(status=500)
            return await handler(request)

        app = web.Application(middlewares=[gone])
        app.add_routes([web.get("/system_stats", system_stats), web.get("/object_info", object_info),
                        web.post("/upload/image", upload), web.get("/ws", ws), web.post("/prompt", prompt),
                        web.get("/history/{pid}", history), web.get("/view", view),
                        web.get("/models/{folder}", models), web.get("/queue", queue_get),
                        web.post("/queue", queue_post), web.post("/interrupt", interrupt),
                        web.get("/internal/folder_paths", folder_paths)])
        return app

    async def _run(self, client_id, pid):
        sock = self.clients[client_id]
        await sock.send_json({"type": "execution_start", "data": {"prompt_id": pid}})
        self.running = True
        await sock.send_json({"type": "executing", "data": {"node": "2", "prompt_id": pid}})
        # a node's text (send_progress_text: event 3, u32 length of the node id, node id, text), as
        # nodes/comfy_bridge.node_message sends the size/length adjustments
        await sock.send_bytes(struct.pack(">I", 3) + struct.pack(">I", 1) + b"2"
                              + "size 70x96 is not a multiple of 16; using 64x96.".encode())
        for i in range(1, 4):
            await sock.send_bytes(b"\x00\x00\x00\x01" + b"\xff" * 70000)     # a (large) preview frame
            await sock.send_json({"type": "progress", "data": {"value": i, "max": 3, "node": "2", "prompt_id": pid}})
        while self.hold and self.running:
            await asyncio.sleep(0.02)
        if self.mid_run == "die":
            self.dead = True                       # as when the process dies: the kernel drops its sockets,
            self.transports[client_id].abort()     # and nothing answers any more (see `gone`)
            self.stop = True
            return
        if self.mid_run in ("restart", "drop"):
            self.restarted = self.mid_run == "restart"
            self.running = not self.restarted
            await sock.close()
            if self.restarted:
                return
            for _ in range(250):              # the client opens a new websocket
                if self.clients[client_id] is not sock:
                    break
                await asyncio.sleep(0.02)
            sock = self.clients[client_id]
        if self.hold:
            await sock.send_json({"type": "execution_interrupted", "data": {"prompt_id": pid, "node_id": "2"}})
            return
        if self.fail:
            self.finished, self.running = True, False
            await asyncio.sleep(self.late)
            await sock.send_json({"type": "execution_error", "data": {
                "prompt_id": pid, "node_id": "2", "node_type": "UNETLike", "exception_type": "ValueError",
                "exception_message": "model.safetensors is not a SteadyDancer DiT"}})
            return
        self.finished, self.running = True, False
        await sock.send_json({"type": "executing", "data": {"node": None, "prompt_id": pid}})
        await sock.send_json({"type": "execution_success", "data": {"prompt_id": pid}})

    def serve(self):
        from aiohttp import web

        async def main():
            runner = web.AppRunner(await self._app())
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self.ready.set()
            while not self.stop:
                await asyncio.sleep(0.05)
            await runner.cleanup()

        self.stop = False
        self.thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def close(self):
        self.stop = True
        self.thread.join(10)


@pytest.mark.parametrize("fail", [False, True])
def test_run_uploads_follows_the_websocket_and_saves_the_video(tmp_path, capsys, fail):
    pytest.importorskip("aiohttp")
    fake = FakeComfy(fail=fail).serve()
    try:
        wf = tmp_path / "wf.json"
        wf.write_text(json.dumps(_prompt()))
        (tmp_path / "me.png").write_bytes(_png())
        _mp4(tmp_path / "moves.mp4")
        p = json.loads(wf.read_text())
        p["6"] = {"class_type": "LoadVideo", "inputs": {"file": "dance.mp4"}}
        wf.write_text(json.dumps(p))
        out = tmp_path / "out" / "result.mp4"
        rc = rw.main([str(wf), "--server", f"http://127.0.0.1:{fake.port}", "--image", str(tmp_path / "me.png"),
                      "--video", str(tmp_path / "moves.mp4"), "--output", str(out), "--timeout", "20"])
        err = capsys.readouterr().err
    finally:
        fake.close()
    assert fake.uploads == {"me.png": _png(), "moves.mp4": (tmp_path / "moves.mp4").read_bytes()}
    sent = fake.prompts[0]["prompt"]
    assert sent["1"]["inputs"]["image"] == "me.png" and sent["6"]["inputs"]["file"] == "moves.mp4"
    assert "UNETLike: 3/3" in err
    # the node's visible warning reaches the command's output
    assert "note from UNETLike: size 70x96 is not a multiple of 16; using 64x96." in err
    if fail:
        assert rc == 1 and "node 2 (UNETLike) failed: ValueError: model.safetensors is not a SteadyDancer DiT" in err
        assert not out.exists()
    else:
        assert rc == 0, err
        assert out.read_bytes() == b"MP4DATA" * 10000


def test_the_last_messages_are_read_when_history_shows_the_end_first(monkeypatch):
    """ComfyUI writes the history entry before its message queue reaches the socket: a /history poll that sees
    the end must still deliver the execution_error (or _interrupted) event to on_event."""
    pytest.importorskip("aiohttp")
    monkeypatch.setattr(sys.modules["comfy_client"], "POLL_S", 0.1)
    fake = FakeComfy(fail=True, late=0.4).serve()
    client = rw.ComfyClient(f"http://127.0.0.1:{fake.port}", timeout=10)
    seen = []
    try:
        ws = client.websocket()
        pid = client.queue(_prompt())
        with pytest.raises(rw.RunError, match="node 2 .UNETLike. failed: ValueError: model.safetensors is not a"):
            rw.wait_for_prompt(client, ws, pid, on_event=lambda t, d: seen.append(t), timeout=20)
        ws.close()
    finally:
        client.close()
        fake.close()
    assert seen[-1] == "execution_error", seen


def _run_fake(tmp_path, fake, prompt, *extra):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(prompt))
    return rw.main([str(wf), "--server", f"http://127.0.0.1:{fake.port}", "--output", str(tmp_path / "o.mp4"),
                    "--timeout", "20", *extra])


def test_a_partly_valid_prompt_is_stopped_and_reported_as_rejected(tmp_path, capsys):
    """ComfyUI answers 200 and queues only the outputs that passed validation when others failed (a graph with a
    preview output besides the video). The run command stops that partial run and names the failed node (exit 5)."""
    pytest.importorskip("aiohttp")
    errors = {"2": {"class_type": "UNETLike", "dependent_outputs": ["3"],
                    "errors": [{"type": "value_bigger_than_max", "message": "Value 50 bigger than max of 8",
                                "details": "steps"}]}}
    fake = FakeComfy(hold=True, node_errors=errors).serve()
    try:
        rc = _run_fake(tmp_path, fake, _prompt())
    finally:
        fake.close()
    err = capsys.readouterr().err
    assert rc == 5, err
    assert "node 2 (UNETLike): Value 50 bigger than max of 8: steps" in err, err
    assert "interrupted it on the server" in err and fake.interrupts == [{"prompt_id": "p1"}], (err, fake.interrupts)


def test_ctrl_c_interrupts_our_prompt_on_the_server(tmp_path, capsys, monkeypatch):
    pytest.importorskip("aiohttp")
    printer = rw.progress_printer

    def ctrl_c_at_first_step(prompt, stream=None):
        show = printer(prompt, stream)

        def on_event(t, data):
            show(t, data)
            if t == "progress":
                raise KeyboardInterrupt
        return on_event

    monkeypatch.setattr(rw, "progress_printer", ctrl_c_at_first_step)
    fake = FakeComfy(hold=True).serve()
    try:
        rc = _run_fake(tmp_path, fake, _prompt())
        err = capsys.readouterr().err
    finally:
        fake.close()
    assert rc == 130, err
    assert fake.interrupts == [{"prompt_id": "p1"}] and fake.deleted == []   # only ours, not a global interrupt
    assert "cancelled (prompt p1: interrupted it on the server)" in err


def test_missing_dwpose_file_is_found_through_models_dwpose_and_is_exit_4(tmp_path, capsys):
    pytest.importorskip("aiohttp")
    prompt = {**_prompt(), "7": {"class_type": "SteadyDancerPoseExtract",
                                 "inputs": {"detector": "yolox_l.onnx", "estimator": "dw-ll_ucoco_384.onnx"}}}
    prompt["3"]["inputs"]["y"] = ["7", 0]
    OBJECT_INFO["SteadyDancerPoseExtract"] = POSE_INFO["SteadyDancerPoseExtract"]
    fake = FakeComfy(dwpose_files=["dw-ll_ucoco_384.onnx"]).serve()
    try:
        rc = _run_fake(tmp_path, fake, prompt)
        err = capsys.readouterr().err
    finally:
        fake.close()
        del OBJECT_INFO["SteadyDancerPoseExtract"]
    assert rc == 4, err
    assert "'yolox_l.onnx' is not in models/dwpose/" in err and "dw-ll_ucoco_384" not in err
    assert "https://huggingface.co/yzd-v/DWPose/resolve/main/yolox_l.onnx" in err
    assert fake.prompts == []                                       # refused before queueing


def test_long_is_a_shipped_workflow_name():
    api, ui = rw.resolve_workflow("long")
    assert api == rw.API_DIR / "steadydancer-long.json" and ui == rw.WORKFLOW_DIR / "steadydancer-long.json"
    assert any(v["class_type"] == "SteadyDancerContextOptions" for v in rw.load_prompt(api).values())


# ------------------------------------------------------------------------------------ local video probe
def test_a_file_named_mp4_that_is_not_a_video_is_refused_before_connecting(tmp_path, capsys, monkeypatch):
    wf = tmp_path / "p.json"
    wf.write_text(json.dumps(_prompt()))
    text = tmp_path / "dance.mp4"
    text.write_text("<html>404 Not Found</html>")           # what a failed download often leaves behind
    dead = f"http://127.0.0.1:{rw.free_port()}"
    rc = rw.main([str(wf), "--server", dead, "--video", str(text), "--output", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--video {text}: not a video file this command can read" in err, err
    good = _mp4(tmp_path / "good.mp4")
    rw.check_video(good)
    # an MP4 cut short before its index (moov) was written: PyAV opens it but finds no video stream
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(rw.RunError, match="no video stream") as e:
        rw.check_video(cut)
    assert e.value.code == 2
    with pytest.raises(rw.RunError, match="not a video file"):
        rw.check_video(tmp_path / "p.json")                  # wrong extension: refused by name
    # without PyAV: OpenCV decodes the first frame
    monkeypatch.setitem(sys.modules, "av", None)
    pytest.importorskip("cv2")
    rw.check_video(good)
    with pytest.raises(rw.RunError, match="OpenCV"):
        rw.check_video(text)
    # without either: the container's magic bytes
    monkeypatch.setitem(sys.modules, "cv2", None)
    rw.check_video(good)
    with pytest.raises(rw.RunError, match="no MP4/MOV, WebM/MKV, AVI or GIF header"):
        rw.check_video(text)


# ------------------------------------------------------------------------------- the server goes away
@pytest.mark.parametrize("mid_run", ["die", "restart"])
def test_a_server_that_dies_or_restarts_mid_run_is_exit_3_with_a_clear_message(tmp_path, capsys, mid_run):
    pytest.importorskip("aiohttp")
    fake = FakeComfy(mid_run=mid_run).serve()
    try:
        rc = _run_fake(tmp_path, fake, _prompt(), "--server-grace", "1.5")
        err = capsys.readouterr().err
    finally:
        fake.close()
    assert rc == 3, err
    assert "Traceback" not in err and "ConnectionError" not in err
    assert "UNETLike: 3/3" in err                 # it was running when the server went
    if mid_run == "die":
        assert f"the ComfyUI server at http://127.0.0.1:{fake.port} went away while prompt p1 was queued or " \
               f"running" in err and "did not answer again within 2 s" in err, err
    else:
        assert "restarted while prompt p1 was queued or running: the prompt is gone from its queue and " \
               "history" in err and "Queue it again" in err, err
    assert not (tmp_path / "o.mp4").exists()


def test_a_dropped_websocket_is_reopened_and_the_run_finishes(tmp_path, capsys):
    pytest.importorskip("aiohttp")
    fake = FakeComfy(mid_run="drop").serve()
    try:
        rc = _run_fake(tmp_path, fake, _prompt())
        err = capsys.readouterr().err
    finally:
        fake.close()
    assert rc == 0, err
    assert (tmp_path / "o.mp4").read_bytes() == b"MP4DATA" * 10000


def test_the_started_server_dying_names_its_exit_and_keeps_its_log(tmp_path, capsys):
    """--comfyui: the process the command started is killed mid-run (as the OOM killer does)."""
    pytest.importorskip("aiohttp")
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    # a stand-in main.py: answers /system_stats, /object_info and /prompt, then SIGKILLs itself once queued
    (comfy / "main.py").write_text(f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from aiohttp import web
port = int(sys.argv[sys.argv.index('--port') + 1])
async def ok(r): return web.json_response({{"system": {{}}}})
async def info(r): return web.json_response({{"Saver": {{"input": {{"required": {{}}}}, "output_node": True}}}})
async def ws(r):
    s = web.WebSocketResponse(); await s.prepare(r)
    async for _ in s: pass
    return s
async def prompt(r):
    print("killed by the OOM killer (stand-in)", flush=True)
    import asyncio; asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGKILL)
    return web.json_response({{"prompt_id": "p9", "number": 0, "node_errors": {{}}}})
app = web.Application()
app.add_routes([web.get('/system_stats', ok), web.get('/object_info', info), web.get('/ws', ws),
                web.post('/prompt', prompt)])
web.run_app(app, host='127.0.0.1', port=port, print=None)
""")
    wf = tmp_path / "p.json"
    wf.write_text(json.dumps({"1": {"class_type": "Saver", "inputs": {}}}))
    rc = rw.main([str(wf), "--comfyui", str(comfy), "--python", sys.executable, "--output", str(tmp_path / "o.mp4"),
                  "--server-grace", "1"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "went away while prompt p9" in err
    assert "the ComfyUI process killed by signal 9 (SIGKILL: the out-of-memory killer does this)" in err, err
    log = pathlib.Path(err.split("server log: ", 1)[1].split()[0])
    assert "OOM killer (stand-in)" in log.read_text()
    log.unlink()


# ------------------------------------------------------------------------------------ environment toggles
def _api(name):
    return json.loads((rw.API_DIR / f"steadydancer-{name}.json").read_text())


def _args(*argv):
    return rw.build_parser().parse_args(["turbo", *argv])


def _node(prompt, class_type):
    (nid,) = [k for k, n in prompt.items() if n["class_type"] == class_type]
    return prompt[nid]["inputs"]


def test_turbo_steps_and_guide_scale_come_from_the_environment_and_a_flag_overrides_them():
    """The shipped graphs run on SamplerCustomAdvanced: the turbo steps are on the turbo sigmas, the text guidance
    on the SteadyDancer guider (a workflow with the one-node samplers gets the same values on those nodes)."""
    env = {"TURBO_STEPS": "6", "STEADYDANCER_GUIDE_SCALE": "3.5"}
    turbo, dance = _api("turbo"), _api("dance")
    assert _node(turbo, "SteadyDancerTurboSigmas")["steps"] == 4 and _node(dance, "SteadyDancerGuider")["text_guidance"] == 5
    settings, notes = rw.inference_settings(_args(), env)
    assert notes == []
    t_notes = rw.apply_inference_settings(turbo, settings)
    d_notes = rw.apply_inference_settings(dance, settings)
    assert _node(turbo, "SteadyDancerTurboSigmas")["steps"] == 6
    assert _node(dance, "SteadyDancerGuider")["text_guidance"] == 3.5
    assert _node(dance, "SteadyDancerOfficialSigmas")["steps"] == 40            # the official steps are not touched
    assert any("the turbo sampler's steps: 6 (from TURBO_STEPS" in n for n in t_notes)
    # the env default that has no node to act on is said, not dropped
    assert any(n.startswith("STEADYDANCER_GUIDE_SCALE=3.5 is not used: the workflow has no SteadyDancerSampler or "
                            "SteadyDancerGuider node (the turbo sampler runs without CFG") for n in t_notes), t_notes
    assert any(n.startswith("TURBO_STEPS=6 is not used") for n in d_notes)
    # the one-node samplers take the same toggles
    one = {"1": {"class_type": "SteadyDancerSampler", "inputs": {"text_guidance": 5.0, "steps": 40}},
           "2": {"class_type": "SteadyDancerTurboSampler", "inputs": {"steps": 4}}}
    rw.apply_inference_settings(one, settings)
    assert one["1"]["inputs"] == {"text_guidance": 3.5, "steps": 40} and one["2"]["inputs"] == {"steps": 6}
    # flags win
    turbo = _api("turbo")
    settings, _ = rw.inference_settings(_args("--turbo-steps", "2", "--guide-scale", "7"), env)
    assert settings == {"turbo_steps": (2, "--turbo-steps"), "text_guidance": (7.0, "--guide-scale")}
    # ... and a flag that cannot act is an error, not a note
    with pytest.raises(rw.RunError, match="--guide-scale sets the official sampler's text guidance, but the "
                                          "workflow has no SteadyDancerSampler or SteadyDancerGuider node") as e:
        rw.apply_inference_settings(turbo, settings)
    assert e.value.code == 2


@pytest.mark.parametrize("env,message", [
    ({"TURBO_STEPS": "12"}, "TURBO_STEPS=12: the turbo sampler's toggle takes 4 to 8 steps"),
    ({"TURBO_STEPS": "3"}, "TURBO_STEPS=3: the turbo sampler's toggle takes 4 to 8 steps"),
    ({"TURBO_STEPS": "four"}, "TURBO_STEPS='four': not a whole number"),
    ({"STEADYDANCER_GUIDE_SCALE": "high"}, "STEADYDANCER_GUIDE_SCALE='high': not a number"),
    ({"STEADYDANCER_GUIDE_SCALE": "nan"}, "not a finite number"),
])
def test_a_bad_toggle_value_is_exit_2(env, message):
    with pytest.raises(rw.RunError) as e:
        rw.inference_settings(_args(), env)
    assert message in str(e.value) and e.value.code == 2


def test_turbo_guide_scale_other_than_1_is_reported_as_ignored_with_the_reason():
    for value in ("1", "1.0", ""):
        assert rw.inference_settings(_args(), {"TURBO_GUIDE_SCALE": value}) == ({}, [])
    settings, notes = rw.inference_settings(_args(), {"TURBO_GUIDE_SCALE": "3"})
    assert settings == {}
    (note,) = notes
    assert note.startswith("TURBO_GUIDE_SCALE=3 is ignored: the turbo sampler runs the distilled few-step path "
                           "without CFG"), note


def test_the_toggles_reach_the_queued_prompt_and_the_output(tmp_path, capsys, monkeypatch):
    pytest.importorskip("aiohttp")
    monkeypatch.setenv("TURBO_STEPS", "5")
    monkeypatch.setenv("TURBO_GUIDE_SCALE", "2.5")
    prompt = _prompt()
    prompt["8"] = {"class_type": "SteadyDancerTurboSampler", "inputs": {"steps": 4, "seed": 1, "model": ["2", 0]}}
    prompt["3"]["inputs"]["y"] = ["8", 0]
    OBJECT_INFO["SteadyDancerTurboSampler"] = {"input": {"required": {"steps": ["INT", {"min": 1, "max": 8}],
                                                                      "seed": ["INT"], "model": ["MODEL"]}},
                                               "output_node": False}
    fake = FakeComfy().serve()
    try:
        rc = _run_fake(tmp_path, fake, prompt)
        err = capsys.readouterr().err
        # --set beats the toggles
        rc2 = rw.main([str(tmp_path / "wf.json"), "--server", f"http://127.0.0.1:{fake.port}", "--output",
                       str(tmp_path / "o2.mp4"), "--set", "8.steps=7", "--timeout", "20"])
    finally:
        fake.close()
        del OBJECT_INFO["SteadyDancerTurboSampler"]
    assert rc == 0 and rc2 == 0, err
    assert fake.prompts[0]["prompt"]["8"]["inputs"]["steps"] == 5
    assert fake.prompts[1]["prompt"]["8"]["inputs"]["steps"] == 7
    assert "the turbo sampler's steps: 5 (from TURBO_STEPS, node 8)" in err
    assert "note: TURBO_GUIDE_SCALE=2.5 is ignored: the turbo sampler runs the distilled few-step path without CFG" in err


# ------------------------------------------------------------------------------------------ --fetch-missing
DIT = "Wan21_SteadyDancer_fp8_e4m3fn_scaled_KJ.safetensors"       # a file the shipped workflows list


class FakeFetchModels:
    """Stands in for tools/fetch_models.py (its contract: fetch_missing(missing, models_dir, token, dry_run))."""

    class FetchError(Exception):
        pass

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def fetch_missing(self, missing, models_dir, token=None, dry_run=False):
        self.calls.append((missing, models_dir, token, dry_run))
        if self.fail:
            raise self.FetchError(self.fail)
        out = []
        for m in missing:
            p = models_dir / m["directory"] / m["name"]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"weights")
            out.append(p)
        return out


def _shipped_url(name):
    return rw.known_models()[name]["url"]


@pytest.mark.parametrize("how", ["--models-dir", "asked of the local server"])
def test_fetch_missing_downloads_what_the_precheck_finds_missing_then_queues(tmp_path, capsys, monkeypatch, how):
    pytest.importorskip("aiohttp")
    fetch = FakeFetchModels()
    monkeypatch.setitem(sys.modules, "fetch_models", fetch)
    models = tmp_path / "models"
    models.mkdir()
    fake = FakeComfy(models_dir=models).serve()
    try:
        wf = tmp_path / "wf.json"
        wf.write_text(json.dumps(_prompt(model=DIT)))
        base = [str(wf), "--server", f"http://127.0.0.1:{fake.port}", "--output", str(tmp_path / "o.mp4"),
                "--timeout", "20"]
        assert rw.main(base) == 4 and fetch.calls == []                    # without the flag: only reported
        assert "--fetch-missing downloads the ones with a URL" in capsys.readouterr().err
        rc = rw.main(base + ["--fetch-missing"] + (["--models-dir", str(models)] if how == "--models-dir" else []))
        err = capsys.readouterr().err
    finally:
        fake.close()
    assert rc == 0, err
    ((missing, models_dir, token, dry_run),) = fetch.calls
    assert missing == [{"name": DIT, "directory": "diffusion_models", "url": _shipped_url(DIT)}]
    assert models_dir == models and isinstance(models_dir, pathlib.Path) and dry_run is False
    assert (models / "diffusion_models" / DIT).read_bytes() == b"weights"
    assert f"fetching 1 missing model(s) (a file or a sharded folder each) into {models}" in err and f"fetched {models / 'diffusion_models' / DIT}" in err
    assert len(fake.prompts) == 1 and fake.prompts[0]["prompt"]["2"]["inputs"]["model_name"] == DIT


def test_fetch_missing_failures_are_exit_4_and_a_remote_server_needs_models_dir(tmp_path, capsys, monkeypatch):
    pytest.importorskip("aiohttp")
    fetch = FakeFetchModels(fail="401 Unauthorized: the repository is gated; set HF_TOKEN")
    monkeypatch.setitem(sys.modules, "fetch_models", fetch)
    models = tmp_path / "models"
    models.mkdir()
    fake = FakeComfy(models_dir=models).serve()
    try:
        wf = tmp_path / "wf.json"
        base = [str(wf), "--server", f"http://127.0.0.1:{fake.port}", "--output", str(tmp_path / "o.mp4"),
                "--fetch-missing"]
        wf.write_text(json.dumps(_prompt(model=DIT)))
        rc = rw.main(base)
        err = capsys.readouterr().err
        assert rc == 4 and "error: --fetch-missing: 401 Unauthorized: the repository is gated; set HF_TOKEN" in err
        # a file with no known URL is not sent to fetch_missing, and stays an exit-4 report
        fetch.fail, fetch.calls = None, []
        wf.write_text(json.dumps(_prompt(model="my_own_finetune.safetensors")))
        rc = rw.main(base)
        err = capsys.readouterr().err
        assert rc == 4 and fetch.calls == [] and "'my_own_finetune.safetensors' is not in the matching models/" in err
        assert "--fetch-missing cannot download 'my_own_finetune.safetensors': no known download URL" in err
        assert "still does not list them" not in err
        # a fetch that wrote the file where this server does not look
        fetch.calls = []
        fetch.fetch_missing = lambda missing, models_dir, token=None, dry_run=False: [models_dir / "elsewhere"]
        wf.write_text(json.dumps(_prompt(model=DIT)))
        rc = rw.main(base)
        err = capsys.readouterr().err
        assert rc == 4 and f"--fetch-missing wrote 1 file(s) into {models}, but the server still does not list" in err
    finally:
        fake.close()
    assert fake.prompts == []

    class Remote:
        base = "http://gpu-box.example:8188"
    args = rw.build_parser().parse_args(["turbo", "--server", Remote.base, "--fetch-missing"])
    with pytest.raises(rw.RunError) as e:
        rw.find_models_dir(args, Remote(), None)
    assert e.value.code == 2
    assert "the server http://gpu-box.example:8188 is not on this machine" in str(e.value) and "--models-dir" in str(e.value)
    args.models_dir = str(tmp_path / "nope")
    with pytest.raises(rw.RunError, match="no such folder"):
        rw.find_models_dir(args, Remote(), None)
    args.models_dir = str(models)
    assert rw.find_models_dir(args, Remote(), None) == models


def test_models_root_from_comfyuis_folder_paths():
    # GET /internal/folder_paths as ComfyUI 0.33 answers it (first path of each kind; diffusion_models -> unet)
    paths = {"checkpoints": ["/srv/ComfyUI/models/checkpoints"], "loras": ["/srv/ComfyUI/models/loras"],
             "diffusion_models": ["/srv/ComfyUI/models/unet", "/srv/ComfyUI/models/diffusion_models"],
             "custom_nodes": ["/srv/ComfyUI/custom_nodes"], "vae": ["/srv/ComfyUI/models/vae", "/mnt/extra/vae"]}
    assert rw.models_root(paths) == pathlib.Path("/srv/ComfyUI/models")
    assert rw.models_root(None) is None and rw.models_root({}) is None


def test_a_real_ctrl_c_while_waiting_on_the_websocket_interrupts_our_prompt(tmp_path):
    """SIGINT arrives while the main thread waits for the client's event-loop thread: the wait stops, and our
    prompt is interrupted through the same client."""
    pytest.importorskip("aiohttp")
    import signal
    import subprocess
    fake = FakeComfy(hold=True).serve()
    try:
        wf = tmp_path / "wf.json"
        wf.write_text(json.dumps(_prompt()))
        proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "run_workflow.py"), str(wf), "--server",
                                 f"http://127.0.0.1:{fake.port}", "--output", str(tmp_path / "o.mp4")],
                                stderr=subprocess.PIPE, text=True)
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "UNETLike: 3/3" in line:
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=30)[1]
    finally:
        fake.close()
    err = "".join(lines) + rest
    assert proc.returncode == 130, err
    assert "cancelled (prompt p1: interrupted it on the server)" in err and "Traceback" not in err, err
    assert fake.interrupts == [{"prompt_id": "p1"}]


def test_every_shipped_api_twin_has_a_short_name():
    names = rw.shipped_workflows()
    assert list(names)[:2] == ["turbo", "dance"]
    for short, stem in names.items():
        api, ui = rw.resolve_workflow(short)
        assert api == rw.API_DIR / f"{stem}.json" and ui == rw.WORKFLOW_DIR / f"{stem}.json"
        assert all("class_type" in n for n in rw.load_prompt(api).values())


# ------------------------------------------------------------- --fetch-missing with the real tools/fetch_models.py
def _hub_repos(tmp_path):
    """The stand-in hub's repositories under their real names: the fp8 DiT the shipped workflows list (tiny bytes)
    and the official sharded release (a tiny real checkpoint, fp32 shards + index by huggingface_hub's sharder)."""
    import torch  # noqa: F401  (the sharded checkpoint is a real one)
    import _loader_util as U
    src = U.write_hub_sharded(U.state_dict(U.reference_model()), tmp_path / "hub-src", max_shard_size="5MB")
    fp8 = rw.known_models()[DIT]["url"].split("/resolve/main/", 1)[1]
    return {"Kijai/WanVideo_comfy_fp8_scaled": {fp8: b"fp8 weights " * 5000},
            "MCG-NJU/SteadyDancer-14B": {p.name: p.read_bytes() for p in src.iterdir()}}


@pytest.fixture
def real_fetch(tmp_path, monkeypatch):
    """tools/fetch_models.py itself (not a stand-in) talking to tests/_fake_hub.py through HF_ENDPOINT."""
    pytest.importorskip("aiohttp")
    pytest.importorskip("huggingface_hub")
    pytest.importorskip("safetensors")
    from _fake_hub import FakeHub
    hub = FakeHub(_hub_repos(tmp_path)).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delitem(sys.modules, "fetch_models", raising=False)      # `import fetch_models` finds tools/
    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    fake = FakeComfy(models_dir=models).serve()
    yield hub, fake, models
    fake.close()
    hub.stop()


def _two_models_prompt():
    """The official sharded folder and the fp8 file, both needed (node 5 feeds node 2's output on)."""
    p = _prompt(model=rw.known_models()["SteadyDancer-14B"]["name"])
    p["5"] = {"class_type": "UNETLike", "inputs": {"model_name": DIT, "image": ["2", 0]}}
    p["3"]["inputs"]["x"] = ["5", 0]
    return p


def _files(models):
    return sorted(str(p.relative_to(models)) for p in models.rglob("*") if p.is_file())


def test_fetch_missing_runs_the_real_fetcher_against_the_hub_then_queues(real_fetch, tmp_path, capsys):
    from steadydancer_turbo.steadydancer.weights import probe
    hub, fake, models = real_fetch
    rc = _run_fake(tmp_path, fake, _two_models_prompt(), "--fetch-missing")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "fetching 2 missing model(s) (a file or a sharded folder each)" in err
    folder = models / "diffusion_models" / "SteadyDancer-14B"
    for repo, files in hub.repos.items():           # every file the pre-check's two entries stand for, byte-exact
        for path, data in files.items():
            target = folder / path if repo == "MCG-NJU/SteadyDancer-14B" else models / "diffusion_models" / DIT
            assert target.read_bytes() == data, target
    assert not list(models.rglob(".*.part"))
    assert probe.probe_model(folder).startswith("SteadyDancer DiT, dim 256, 3 blocks; sharded folder (float32")
    gets = [r[1] for r in hub.requests if r[0] == "GET" and "/MCG-NJU/SteadyDancer-14B/resolve/" in r[1]]
    assert gets[-1].endswith("diffusion_pytorch_model.safetensors.index.json")     # the folder's index comes last
    assert len(fake.prompts) == 1
    assert fake.prompts[0]["prompt"]["2"]["inputs"]["model_name"] == "SteadyDancer-14B"
    # everything present now: a second run fetches nothing and queues at once
    n = len(hub.requests)
    assert _run_fake(tmp_path, fake, _two_models_prompt(), "--fetch-missing") == 0
    assert "fetching" not in capsys.readouterr().err and len(hub.requests) == n


@pytest.mark.parametrize("fault", ["404", "401", "corrupt shard"])
def test_fetch_missing_hub_failures_are_exit_4_and_leave_nothing_half_written(real_fetch, tmp_path, capsys, fault):
    hub, fake, models = real_fetch
    shards = sorted(p for p in hub.repos["MCG-NJU/SteadyDancer-14B"] if p.endswith(".safetensors"))
    if fault == "404":                                  # the fp8 file is gone from its repository (renamed)
        repo = hub.repos["Kijai/WanVideo_comfy_fp8_scaled"]
        repo["SteadyDancer/Wan21_SteadyDancer_fp8_e4m3fn_scaled_KJ_v2.safetensors"] = repo.pop(
            rw.known_models()[DIT]["url"].split("/resolve/main/", 1)[1])
    elif fault == "401":                                # a gated repository and no token
        hub.gated.add("MCG-NJU/SteadyDancer-14B")
    else:                                               # the second shard arrives with other bytes than its sha256
        hub.corrupt.add(("MCG-NJU/SteadyDancer-14B", shards[1]))
    rc = _run_fake(tmp_path, fake, _two_models_prompt(), "--fetch-missing")
    err = capsys.readouterr().err
    assert rc == 4, err
    assert "Traceback" not in err and fake.prompts == []
    if fault == "404":
        assert (f"error: --fetch-missing: Kijai/WanVideo_comfy_fp8_scaled:SteadyDancer/{DIT}: not found on the hub "
                f"(404)") in err
        assert "Wan21_SteadyDancer_fp8_e4m3fn_scaled_KJ_v2.safetensors" in err     # what the folder holds now
    elif fault == "401":
        assert "error: --fetch-missing: MCG-NJU/SteadyDancer-14B:/: the hub needs a token (401)" in err
        assert "HF_TOKEN" in err
    else:
        assert f"error: --fetch-missing: MCG-NJU/SteadyDancer-14B:{shards[1]}: checksum mismatch" in err
    fetched = _files(models / "diffusion_models")
    assert not [f for f in fetched if f.endswith(".part")]          # no partial download left anywhere
    if fault == "corrupt shard":
        # the files before it are complete and checked; the corrupt one and the index (always last) are not
        # there, so no loader sees a folder that looks like a checkpoint
        assert fetched == ["SteadyDancer-14B/config.json", f"SteadyDancer-14B/{shards[0]}"]
        for f in fetched:
            assert (models / "diffusion_models" / f).read_bytes() == hub.repos["MCG-NJU/SteadyDancer-14B"][
                f.split("/", 1)[1]]
    else:
        assert fetched == []                            # the hub is asked about every file before any download
