"""Both shipped API workflows on tiny models in a real ComfyUI: success and a video of the right size, clear
errors for a missing / wrong model file, /interrupt within one step, and the run command end to end.

The umt5 text encoder and CLIP vision are replaced by the fixture nodes (same output types and shapes); every
other node, including VAELoader/VAEDecode/CreateVideo/SaveVideo and the pack's own nodes, is the real one.
"""
import json
import time

import pytest

from comfyui_harness import WORKFLOWS, api_workflow, models, nodes_of, run_workflow, small

W, H, LENGTH = 64, 96, 9
TARGET_FPS = 12.0      # the driving fixture is 20 frames at 16 fps: 15 frames at 12 fps, trimmed to LENGTH
STEPS = {"steadydancer-dance": 3, "steadydancer-turbo": 4, "steadydancer-long": 4}


def _ready(comfy):
    comfy.need("dit", "vae", "det", "pose")


def _loader(prompt):
    (nid,) = nodes_of(prompt, "SteadyDancerModelLoader")
    return nid


def _sampler(prompt):
    """The sampling node (core SamplerCustomAdvanced in the shipped graphs): the progress bar is its."""
    (nid,) = nodes_of(prompt, "SamplerCustomAdvanced")
    return nid


def _guider(prompt):
    """The guider feeding SamplerCustomAdvanced (it takes the MODEL)."""
    return str(prompt[_sampler(prompt)]["inputs"]["guider"][0])


def _piece(prompt, name):
    """SamplerCustomAdvanced's ``name`` input node (noise / guider / sampler / sigmas)."""
    return str(prompt[_sampler(prompt)]["inputs"][name][0])


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_to_a_video_of_the_requested_size(comfy, name):
    _ready(comfy)
    if name.endswith(("turbo", "long")):
        comfy.need("lora")
    prompt = small(api_workflow(name), W, H, LENGTH, steps=STEPS[name])
    (resample,) = nodes_of(prompt, "SteadyDancerResampleFrames")
    prompt[resample]["inputs"]["target_fps"] = TARGET_FPS     # not the 16 a constant on Create Video would give
    t0 = time.monotonic()
    hist, events = comfy.run(prompt, timeout=900)
    assert hist["status"]["status_str"] == "success", hist["status"]
    videos = [f for f in run_workflow.output_files(hist) if f["filename"].endswith((".mp4", ".webm", ".mkv"))]
    assert len(videos) == 1, run_workflow.output_files(hist)
    n, w, h, fps = models.video_info(comfy.output_path(videos[0]))
    assert (n, w, h) == (LENGTH, W, H), f"{name}: {n} frames {w}x{h} in {time.monotonic() - t0:.1f} s"
    assert fps == TARGET_FPS, f"{name}: the video plays at {fps} fps, Resample Frames made {TARGET_FPS} fps"
    sampler = _sampler(prompt)
    steps = [d for t, d in events if t == "progress" and str(d.get("node")) == sampler]
    assert steps and steps[-1]["value"] == steps[-1]["max"], steps


def test_turbo_workflow_decodes_with_core_vae_decode_tiled(comfy):
    """Core VAEDecodeTiled instead of VAEDecode on our LATENT (the README's low-VRAM decode): spatial tiles
    (64 px, 16 px overlap on a 64x96 video) and temporal tiles (8 frames = 2 latent frames, overlap 1) still give
    exactly LENGTH frames of W x H."""
    _ready(comfy)
    comfy.need("lora")
    prompt = small(api_workflow("steadydancer-turbo"), W, H, LENGTH, steps=2)
    (dec,) = nodes_of(prompt, "VAEDecode")
    prompt[dec] = {"class_type": "VAEDecodeTiled", "inputs": {
        **prompt[dec]["inputs"], "tile_size": 64, "overlap": 16, "temporal_size": 8, "temporal_overlap": 4}}
    hist, _ = comfy.run(prompt, timeout=900)
    assert hist["status"]["status_str"] == "success", hist["status"]
    (video,) = [f for f in run_workflow.output_files(hist) if f["filename"].endswith((".mp4", ".webm", ".mkv"))]
    n, w, h, _ = models.video_info(comfy.output_path(video))
    assert (n, w, h) == (LENGTH, W, H)


def test_long_workflow_runs_windows_to_a_video_with_the_exact_frame_count(comfy):
    """The long workflow with 9-frame windows overlapping by 4 frames on the 17-frame fixture (5 latent frames:
    windows (0,3) (2,5)): the sampler's progress counts window passes (steps x 2), the Colour Guard runs, and the
    video has exactly 17 frames."""
    _ready(comfy)
    comfy.need("lora")
    frames, steps = 17, 2
    prompt = small(api_workflow("steadydancer-long"), W, H, frames, steps=steps)
    (ctx,) = nodes_of(prompt, "SteadyDancerContextOptions")
    prompt[ctx]["inputs"].update(window_frames=9, overlap_frames=4)
    (guard,) = nodes_of(prompt, "SteadyDancerColourGuard")
    prompt[guard]["inputs"]["strength"] = 0.5
    hist, events = comfy.run(prompt, timeout=900)
    assert hist["status"]["status_str"] == "success", hist["status"]
    videos = [f for f in run_workflow.output_files(hist) if f["filename"].endswith((".mp4", ".webm", ".mkv"))]
    assert len(videos) == 1, run_workflow.output_files(hist)
    n, w, h, _ = models.video_info(comfy.output_path(videos[0]))
    assert (n, w, h) == (frames, W, H)
    sampler = _sampler(prompt)
    bar = [d for t, d in events if t == "progress" and str(d.get("node")) == sampler]
    assert bar and bar[-1]["max"] == steps * 2 and bar[-1]["value"] == bar[-1]["max"], bar


def _saved_latent(comfy, hist, node):
    from safetensors.torch import load_file
    (f,) = hist["outputs"][node]["latents"]
    return load_file(str(comfy.output_path(f)))["latent_tensor"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_shipped_sampler_section_equals_the_one_node_sampler(comfy, name):
    """The shipped graphs sample with core SamplerCustomAdvanced + RandomNoise (long: the Context Noise node) and
    our sigmas / guider / SAMPLER. The same prompt also runs our one-node sampler with those nodes' settings (the
    sampler the workflows used before; it is checked against the core sample_official / sample_rcm in
    test_comfyui_native.py): both LATENTs are saved with core SaveLatent and must agree. The long graph runs
    windowed (17 frames in 9-frame windows overlapping by 4 frames), so its FreeNoise start noise counts."""
    _ready(comfy)
    if name != "steadydancer-dance":
        comfy.need("lora")
    frames = 17 if name == "steadydancer-long" else LENGTH
    prompt = small(api_workflow(name), W, H, frames, steps=3)
    sca = _sampler(prompt)
    inp = prompt[sca]["inputs"]
    noise, guider, sampler, sigmas = (prompt[_piece(prompt, k)]["inputs"] for k in ("noise", "guider", "sampler",
                                                                                   "sigmas"))
    g = prompt[_guider(prompt)]
    if name == "steadydancer-dance":
        one = {"class_type": "SteadyDancerSampler", "inputs": {
            "model": guider["model"], "positive": guider["positive"], "negative": guider["negative"],
            "latent": inp["latent_image"], "seed": noise["noise_seed"], "steps": sigmas["steps"],
            "shift": sigmas["shift"], "solver": sampler["solver"],
            **{k: guider[k] for k in ("text_guidance", "pose_guidance", "pose_guidance_start", "pose_guidance_end")}}}
    else:
        assert g["class_type"] == "BasicGuider" and sampler["timestep_rounding"] == "float32"  # = schedule "shift"
        model = guider["model"]
        one = {"class_type": "SteadyDancerTurboSampler", "inputs": {
            "positive": guider["conditioning"], "latent": inp["latent_image"], "seed": noise["noise_seed"],
            "mode": sampler["mode"], **{k: sigmas[k] for k in ("steps", "schedule", "shift", "sigma_max")}}}
        if name == "steadydancer-long":
            (ctx,) = nodes_of(prompt, "SteadyDancerContextOptions")
            prompt[ctx]["inputs"].update(window_frames=9, overlap_frames=4)
            windowed = prompt[str(model[0])]
            assert windowed["class_type"] == "SteadyDancerApplyContextWindows"
            model = windowed["inputs"]["model"]                      # the one-node sampler windows itself
            one["inputs"]["context"] = [ctx, 0]
        one["inputs"]["model"] = model
    prompt["950"] = one
    prompt["951"] = {"class_type": "SaveLatent", "inputs": {"samples": [sca, 0], "filename_prefix": f"latents/{name}_sca"}}
    prompt["952"] = {"class_type": "SaveLatent", "inputs": {"samples": ["950", 0], "filename_prefix": f"latents/{name}_one"}}
    hist, _ = comfy.run(prompt, timeout=900)
    assert hist["status"]["status_str"] == "success", hist["status"]
    a, b = _saved_latent(comfy, hist, "951"), _saved_latent(comfy, hist, "952")
    rel = float((a - b).norm() / b.norm())
    print(f"{name}: SamplerCustomAdvanced vs one-node sampler, latent {list(a.shape)}, rel {rel:.2e}")
    assert a.shape == b.shape and float(b.abs().max()) > 0
    assert rel < 1e-6, rel


def test_lora_strength_change_reuses_the_loaded_model(comfy):
    """In the real executor the loader node stays cached when only a LoRA strength changes; the LoRA node then
    patches a clone of the loaded MODEL (ComfyUI patches): no second "SteadyDancer loaded" (a read of the file)."""
    _ready(comfy)
    comfy.need("lora")
    prompt = small(api_workflow("steadydancer-turbo"), W, H, LENGTH, steps=1)
    (lora,) = nodes_of(prompt, "SteadyDancerLoraLoader")
    prompt[lora]["inputs"]["strength"] = 0.9
    hist, _ = comfy.run(prompt, timeout=900)
    assert hist["status"]["status_str"] == "success", hist["status"]
    loads = comfy.log().count("SteadyDancer loaded:")
    for strength in (0.4, 0.0):    # 0 = the LoRA node passes the model through: LoRA removed
        prompt[lora]["inputs"]["strength"] = strength
        hist, _ = comfy.run(prompt, timeout=900)
        assert hist["status"]["status_str"] == "success", hist["status"]
    log = comfy.log()
    assert log.count("SteadyDancer loaded:") == loads, log[-3000:]


def test_out_of_range_input_on_our_node_is_a_validation_error(comfy):
    prompt = small(api_workflow("steadydancer-turbo"), W, H, LENGTH)
    sigmas = _piece(prompt, "sigmas")
    assert prompt[sigmas]["class_type"] == "SteadyDancerTurboSigmas"
    prompt[sigmas]["inputs"]["steps"] = 50                        # the turbo sigmas take 1-8
    with pytest.raises(run_workflow.PromptRejected) as e:
        comfy.client.queue(prompt)
    body = e.value.body
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    (err,) = body["node_errors"][sigmas]["errors"]
    assert err["type"] == "value_bigger_than_max" and "steps" in err["details"], err
    assert "node" in str(e.value) and "steps" in str(e.value)     # the run command's message names it


def test_missing_model_file_is_named_before_and_at_queue_time(comfy, tmp_path, capsys):
    prompt = small(api_workflow("steadydancer-turbo"), W, H, LENGTH)
    loader = _loader(prompt)
    prompt[loader]["inputs"]["model_name"] = "SteadyDancer_missing_fp8.safetensors"
    # the server: a validation error naming the input and the file
    with pytest.raises(run_workflow.PromptRejected) as e:
        comfy.client.queue(prompt)
    errs = e.value.body["node_errors"][loader]["errors"]
    # the loader's VALIDATE_INPUTS takes model_name (header check), so ComfyUI leaves the list check to it
    assert errs[0]["type"] == "custom_validation_failed" and "Value not in list" in errs[0]["details"]
    assert "SteadyDancer_missing_fp8.safetensors" in errs[0]["details"]
    # the run command: refuses before queueing, says which folder (and the download URL when it knows one)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(prompt))
    rc = run_workflow.main([str(wf), "--server", comfy.url, "--output", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert rc == 4, err
    assert "SteadyDancer_missing_fp8.safetensors" in err and "missing model file" in err
    assert "models/" in err


def test_wrong_model_file_is_a_clear_validation_error(comfy):
    """A file that is not a SteadyDancer DiT is refused when the prompt is queued (the loader's VALIDATE_INPUTS
    reads its header), with the loader's words: more cases in test_comfyui_validation.py."""
    _ready(comfy)
    prompt = small(api_workflow("steadydancer-dance"), W, H, LENGTH, steps=2)
    loader = _loader(prompt)
    prompt[loader]["inputs"]["model_name"] = "some_other_model.safetensors"     # a Wan VAE, not a DiT
    with pytest.raises(run_workflow.PromptRejected) as e:
        comfy.client.queue(prompt)
    (err,) = e.value.body["node_errors"][loader]["errors"]
    assert err["type"] == "custom_validation_failed", err
    detail = err["details"]
    # a message for the user, not a Python slip from deep inside the loader
    assert "some_other_model.safetensors" in detail and "looks like" in detail, detail
    assert "Error" not in detail.split("-", 1)[1], detail


def _slow_model(comfy, prompt, loader, log_name, delay=0.4):
    """Node "900": the fixture SDTestSlowModel around the loader's (slow-file) model, logging each DiT call to
    temp/``log_name``; the caller wires "900" where the model goes. Returns (log path, seconds per call)."""
    prompt[loader]["inputs"]["model_name"] = "tiny_steadydancer_slow.safetensors"   # own cache entry
    log = comfy.base / "temp" / log_name
    log.write_text("")
    prompt["900"] = {"class_type": "SDTestSlowModel",
                     "inputs": {"model": [loader, 0], "seconds_per_call": delay, "log_file": str(log)}}
    return log, delay


def test_interrupt_during_sampling_stops_within_one_step(comfy):
    _ready(comfy)
    prompt = small(api_workflow("steadydancer-dance"), W, H, LENGTH, steps=8)
    loader, sampler = _loader(prompt), _sampler(prompt)
    log, delay = _slow_model(comfy, prompt, loader, "forward_calls.txt")
    prompt[_guider(prompt)]["inputs"]["model"] = ["900", 0]
    state = {}

    def on_event(t, d):
        if t == "progress" and str(d.get("node")) == sampler and d["value"] >= 2 and "t" not in state:
            state["t"] = time.time()
            state["step"] = d["value"]
            comfy.client.interrupt()
        if t == "execution_interrupted":
            state["t_end"] = time.time()

    with pytest.raises(run_workflow.RunError, match="interrupted"):
        comfy.run(prompt, on_event=on_event, timeout=300)
    assert "t" in state, "no sampler progress was seen"
    calls = [float(x) for x in log.read_text().split()]
    per_step = len([c for c in calls if c < state["t"]]) / state["step"]
    after = [c for c in calls if c >= state["t"]]
    print(f"interrupt at step {state['step']}: {len(calls) - len(after)} DiT calls before ({per_step:.1f}/step), "
          f"{len(after)} after, stopped {state['t_end'] - state['t']:.2f} s later")
    # The step in flight may finish; no further step may start. The official sampler evaluates the DiT at
    # most 3 times per step (positive, text-negative, pose-negative), 2 outside the pose-guidance window.
    assert len(after) <= 3, (len(after), per_step)
    assert len(calls) < 2 * 8, "the sampler ran (nearly) all 8 steps"
    assert state["t_end"] - state["t"] < 4 * delay + 6.0          # generous: a busy 2-core box


def test_interrupt_during_long_sampling_stops_within_one_window_pass(comfy):
    """Long workflow, 4 windows per step (17 frames = 5 latent, 5-frame windows overlapping by 4): after
    /interrupt at most the window pass in flight finishes; no further DiT call starts."""
    _ready(comfy)
    comfy.need("lora")
    prompt = small(api_workflow("steadydancer-long"), W, H, 17, steps=4)
    (ctx,) = nodes_of(prompt, "SteadyDancerContextOptions")
    prompt[ctx]["inputs"].update(window_frames=5, overlap_frames=4)
    loader, sampler = _loader(prompt), _sampler(prompt)
    log, delay = _slow_model(comfy, prompt, loader, "forward_calls_long.txt")
    (lora,) = nodes_of(prompt, "SteadyDancerLoraLoader")
    prompt[lora]["inputs"]["model"] = ["900", 0]
    state = {}

    def on_event(t, d):
        if t == "progress" and str(d.get("node")) == sampler and d["value"] >= 2 and "t" not in state:
            state["t"] = time.time()
            state["value"], state["max"] = d["value"], d["max"]
            comfy.client.interrupt()
        if t == "execution_interrupted":
            state["t_end"] = time.time()

    with pytest.raises(run_workflow.RunError, match="interrupted"):
        comfy.run(prompt, on_event=on_event, timeout=300)
    assert "t" in state, "no sampler progress was seen"
    assert state["max"] == 4 * 4                                  # the bar counts window passes: steps x windows
    calls = [float(x) for x in log.read_text().split()]
    after = [c for c in calls if c >= state["t"]]
    print(f"interrupt at window pass {state['value']}/{state['max']}: {len(calls) - len(after)} DiT calls before, "
          f"{len(after)} after, stopped {state['t_end'] - state['t']:.2f} s later")
    assert len(after) <= 1, (len(after), calls)
    assert len(calls) < 8, "the sampler ran on after the interrupt"


def test_run_command_queues_uploads_and_saves_the_video(comfy, tmp_path, capsys):
    """The README's run command against the running server, with a user's image and video."""
    _ready(comfy)
    comfy.need("lora")
    prompt = small(api_workflow("steadydancer-turbo"), W, H, LENGTH)
    (cond,) = nodes_of(prompt, "SteadyDancerConditioning")
    prompt[cond]["inputs"]["length"] = LENGTH + 2                # not 4n+1: the node adjusts it and says so
    wf = tmp_path / "turbo_small.json"
    wf.write_text(json.dumps(prompt))
    img, vid = models.build_media(tmp_path / "me.png", tmp_path / "moves.mp4", width=80, height=128, frames=14)
    out = tmp_path / "result.mp4"
    rc = run_workflow.main([str(wf), "--server", comfy.url, "--image", str(img), "--video", str(vid),
                            "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "queued" in err and "done in" in err
    # the text the node shows on itself (nodes/comfy_bridge.node_message) reaches the command's output
    notes = [ln for ln in err.splitlines() if "note from" in ln]
    assert any(str(LENGTH + 2) in ln and str(LENGTH) in ln for ln in notes), err
    n, w, h, _ = models.video_info(out)
    assert (n, w, h) == (LENGTH, W, H)
    assert (comfy.base / "input" / "moves.mp4").exists() and (comfy.base / "input" / "me.png").exists()


def test_run_command_starts_its_own_server_from_a_checkout(comfy, tmp_path, capsys):
    """--comfyui PATH: start ComfyUI, run, save, stop (here with a native-only graph and the tiny VAE)."""
    comfy.need("vae")
    prompt = {
        "1": {"class_type": "LoadVideo", "inputs": {"file": "dance.mp4"}},
        "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_wan21_vae.safetensors"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["3", 0]}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["3", 0]}},
        "6": {"class_type": "CreateVideo", "inputs": {"images": ["5", 0], "fps": 8}},
        "7": {"class_type": "SaveVideo", "inputs": {"video": ["6", 0], "filename_prefix": "video/own",
                                                    "format": "auto", "format.codec": "auto", "codec": "auto"}},
    }
    wf = tmp_path / "native.json"
    wf.write_text(json.dumps(prompt))
    _, vid = models.build_media(tmp_path / "x.png", tmp_path / "clip.mp4", frames=9)
    out = tmp_path / "own.mp4"
    rc = run_workflow.main([str(wf), "--comfyui", str(comfy.server.comfyui_path), "--python", comfy.server.python,
                            "--cpu", "--base-directory", str(comfy.base), "--video", str(vid),
                            "--output", str(out), "--server-log", str(tmp_path / "own_server.log")])
    err = capsys.readouterr().err
    assert rc == 0, err + (tmp_path / "own_server.log").read_text()[-3000:]
    assert "starting ComfyUI" in err
    n, w, h, fps = models.video_info(out)
    assert (n, w, h, fps) == (9, 96, 160, 8)


def test_missing_dwpose_file_is_caught_before_queueing_and_at_run_time(comfy, tmp_path, capsys):
    """The pose node's combos always list the default .onnx names; the run command asks GET /models/dwpose, and
    the node itself re-checks the file on every run (earlier tests left its ORT sessions cached)."""
    _ready(comfy)
    prompt = small(api_workflow("steadydancer-dance"), W, H, LENGTH, steps=2)
    for nid in nodes_of(prompt, "SteadyDancerPoseExtract"):
        prompt[nid]["inputs"]["canvas_width"] = 72             # a new cache key: ComfyUI must run the node
    det = comfy.base / "models" / "dwpose" / "yolox_l.onnx"
    url = "https://huggingface.co/yzd-v/DWPose/resolve/main/yolox_l.onnx"
    hidden = det.with_name("yolox_l.onnx.hidden")
    det.rename(hidden)
    try:
        wf = tmp_path / "dance_small.json"
        wf.write_text(json.dumps(prompt))
        rc = run_workflow.main([str(wf), "--server", comfy.url, "--output", str(tmp_path / "o.mp4")])
        err = capsys.readouterr().err
        assert rc == 4, err
        assert "'yolox_l.onnx' is not in models/dwpose/ (needed by node " in err and url in err, err
        with pytest.raises(run_workflow.RunError) as e:
            comfy.run(prompt, timeout=300)
    finally:
        hidden.rename(det)
    msg = str(e.value)
    # exception type as ComfyUI prints it (module + qualname): not the custom_nodes path of the pack
    assert "failed: steadydancer_turbo.dwpose.ModelNotFoundError: DWPose model file 'yolox_l.onnx' not found" in msg, msg
    assert url in msg and str(det.parent) in msg
