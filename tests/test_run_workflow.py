"""tools/run_workflow.py without ComfyUI: its websocket client and HTTP calls against a small aiohttp server
that speaks ComfyUI's protocol (messages as ComfyUI 0.33 sends them), and the pre-queue checks on real
/object_info-shaped data. The same command is run against a real server in tests/integration."""
import asyncio
import importlib.util
import json
import pathlib
import threading

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
    assert len(missing) == 1 and "(SteadyDancerPoseExtract).detector: 'yolox_l.onnx' is not in models/dwpose/" in missing[0]
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
    f = tmp_path / "ui.json"
    f.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(rw.RunError, match="UI-format"):
        rw.load_prompt(f)


def test_server_down_is_exit_code_3(capsys, tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(_prompt()))
    rc = rw.main([str(f), "--server", f"http://127.0.0.1:{rw.free_port()}", "--output", str(tmp_path / "o.mp4")])
    assert rc == 3
    assert "cannot reach ComfyUI" in capsys.readouterr().err


class FakeComfy:
    """aiohttp server with ComfyUI's routes and websocket messages (incl. binary preview frames)."""

    def __init__(self, fail=False):
        self.fail, self.prompts, self.uploads = fail, [], {}
        self.port = rw.free_port()
        self.ready = threading.Event()
        self.clients = {}

    async def _app(self):
        from aiohttp import web

        async def system_stats(request):
            return web.json_response({"system": {"comfyui_version": "0.33.0"}})

        async def object_info(request):
            info = json.loads(json.dumps(OBJECT_INFO))
            info["LoadImage"]["input"]["required"]["image"][0] += list(self.uploads)
            info["LoadVideo"]["input"]["required"]["file"][1]["options"] += list(self.uploads)
            info["Saver"]["output_node"] = True
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
            await sock.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}})
            async for _ in sock:
                pass
            return sock

        async def prompt(request):
            body = await request.json()
            self.prompts.append(body)
            pid = "p1"
            asyncio.get_running_loop().create_task(self._run(body["client_id"], pid))
            return web.json_response({"prompt_id": pid, "number": 0, "node_errors": {}})

        async def history(request):
            if self.fail:
                return web.json_response({"p1": {"status": {"status_str": "error", "completed": False}}})
            return web.json_response({"p1": {"status": {"status_str": "success", "completed": True},
                                             "outputs": {"3": {"images": [{"filename": "v_00001_.mp4",
                                                                           "subfolder": "video", "type": "output"}],
                                                               "animated": [True]}}}})

        async def view(request):
            assert request.query["filename"] == "v_00001_.mp4" and request.query["subfolder"] == "video"
            return web.Response(body=b"MP4DATA" * 10000)

        app = web.Application()
        app.add_routes([web.get("/system_stats", system_stats), web.get("/object_info", object_info),
                        web.post("/upload/image", upload), web.get("/ws", ws), web.post("/prompt", prompt),
                        web.get("/history/{pid}", history), web.get("/view", view)])
        return app

    async def _run(self, client_id, pid):
        sock = self.clients[client_id]
        await sock.send_json({"type": "execution_start", "data": {"prompt_id": pid}})
        await sock.send_json({"type": "executing", "data": {"node": "2", "prompt_id": pid}})
        for i in range(1, 4):
            await sock.send_bytes(b"\x00\x00\x00\x01" + b"\xff" * 70000)     # a (large) preview frame
            await sock.send_json({"type": "progress", "data": {"value": i, "max": 3, "node": "2", "prompt_id": pid}})
        if self.fail:
            await sock.send_json({"type": "execution_error", "data": {
                "prompt_id": pid, "node_id": "2", "node_type": "UNETLike", "exception_type": "ValueError",
                "exception_message": "model.safetensors is not a SteadyDancer DiT"}})
            return
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
        (tmp_path / "me.png").write_bytes(b"PNG")
        (tmp_path / "moves.mp4").write_bytes(b"MP4")
        p = json.loads(wf.read_text())
        p["6"] = {"class_type": "LoadVideo", "inputs": {"file": "dance.mp4"}}
        wf.write_text(json.dumps(p))
        out = tmp_path / "out" / "result.mp4"
        rc = rw.main([str(wf), "--server", f"http://127.0.0.1:{fake.port}", "--image", str(tmp_path / "me.png"),
                      "--video", str(tmp_path / "moves.mp4"), "--output", str(out), "--timeout", "20"])
        err = capsys.readouterr().err
    finally:
        fake.close()
    assert fake.uploads == {"me.png": b"PNG", "moves.mp4": b"MP4"}
    sent = fake.prompts[0]["prompt"]
    assert sent["1"]["inputs"]["image"] == "me.png" and sent["6"]["inputs"]["file"] == "moves.mp4"
    assert "UNETLike: 3/3" in err
    if fail:
        assert rc == 1 and "node 2 (UNETLike) failed: ValueError: model.safetensors is not a SteadyDancer DiT" in err
        assert not out.exists()
    else:
        assert rc == 0, err
        assert out.read_bytes() == b"MP4DATA" * 10000
