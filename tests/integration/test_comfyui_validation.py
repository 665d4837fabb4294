"""Bad inputs in a real ComfyUI: wrong / truncated DiT and LoRA files refused when the prompt is queued (the Model
Loader's and LoRA node's VALIDATE_INPUTS, headers only, so no node runs), a LoRA that does not fit refused on the
LoRA node (not the sampler), a driving video without a person failing on the Pose Extract node, and DWPose's
GPU-to-CPU fallback shown on the node itself.
"""
import shutil

import pytest

from comfyui_harness import api_workflow, nodes_of, run_workflow, small

W, H, LENGTH = 64, 96, 9


def _place(comfy, folder, name, src=None, data=None):
    d = comfy.base / "models" / folder
    d.mkdir(parents=True, exist_ok=True)
    if src is not None:
        shutil.copyfile(src, d / name)
    else:
        (d / name).write_bytes(data)
    return d / name


def _rejected(comfy, prompt, node):
    """Queue the prompt; it must be refused with errors on ``node``; returns their details text."""
    with pytest.raises(run_workflow.PromptRejected) as e:
        comfy.client.queue(prompt)
    errs = e.value.body["node_errors"][node]["errors"]
    assert all(x["type"] == "custom_validation_failed" for x in errs), errs
    return " ".join(x["details"] for x in errs)


def test_wrong_and_truncated_dit_files_fail_at_prompt_validation(comfy):
    comfy.need("dit", "vae")
    prompt = small(api_workflow("steadydancer-dance"), W, H, LENGTH, steps=2)
    (loader,) = nodes_of(prompt, "SteadyDancerModelLoader")
    dit = comfy.shelf.built["dit"]
    data = dit.read_bytes()
    _place(comfy, "diffusion_models", "tiny_truncated.safetensors", data=data[: len(data) * 2 // 3])
    cases = {"some_other_model.safetensors": "looks like",            # a Wan VAE in the DiT folder
             "tiny_truncated.safetensors": "truncated"}
    for name, words in cases.items():
        prompt[loader]["inputs"]["model_name"] = name
        details = _rejected(comfy, prompt, loader)
        assert "model_name" in details and words in details, details
        assert details.count(name) == 1, details                      # the file named once, no path repeated
        assert str(comfy.base) not in details, details


def test_wrong_lora_file_fails_at_validation_and_unfitting_lora_on_the_lora_node(comfy):
    comfy.need("dit", "vae", "det", "pose", "lora")
    from safetensors.torch import save_file
    import torch

    prompt = small(api_workflow("steadydancer-turbo"), W, H, LENGTH, steps=1)
    (lora,) = nodes_of(prompt, "SteadyDancerLoraLoader")
    # a DiT put in the LoRA folder: refused before anything runs
    _place(comfy, "loras", "a_model_not_a_lora.safetensors", src=comfy.shelf.built["dit"])
    prompt[lora]["inputs"]["lora_name"] = "a_model_not_a_lora.safetensors"
    details = _rejected(comfy, prompt, lora)
    assert "lora_name" in details and "full model" in details, details
    # a valid LoRA made for the 14B (width 5120): its shapes do not fit the tiny model -> the LoRA node fails
    d = comfy.base / "models" / "loras"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 5120),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 4)},
              str(d / "lora_for_14b.safetensors"))
    prompt[lora]["inputs"]["lora_name"] = "lora_for_14b.safetensors"
    with pytest.raises(run_workflow.RunError) as e:
        comfy.run(prompt, timeout=600)
    msg = str(e.value)
    assert f"node {lora} (SteadyDancerLoraLoader) failed" in msg, msg
    assert "does not fit" in msg and "lora_for_14b.safetensors" in msg, msg


def _video(path, frames, bright):
    """An H.264 video: the fixture's bright figure in the frames ``bright`` says, black elsewhere."""
    import av
    import numpy as np

    w, h = 96, 160
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for t in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            if bright(t):
                img[h // 6: h - h // 6, w // 2 - w // 8: w // 2 + w // 8] = (230, 200, 180)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def _driving_extract(prompt):
    (retarget,) = nodes_of(prompt, "SteadyDancerPoseRetarget")
    return str(prompt[retarget]["inputs"]["driving_poses"][0])


def test_driving_video_without_a_person_fails_on_the_extract_node(comfy):
    comfy.need("dit", "vae", "det", "pose")
    _video(comfy.base / "input" / "black.mp4", 20, lambda t: False)
    _video(comfy.base / "input" / "half.mp4", 20, lambda t: t % 2 == 0)    # every other frame empty
    prompt = small(api_workflow("steadydancer-dance"), W, H, LENGTH, steps=1)
    (load,) = nodes_of(prompt, "LoadVideo")
    ext = _driving_extract(prompt)
    for video, words in (("black.mp4", "no person in any of the"), ("half.mp4", "max_missing_share 25%")):
        prompt[load]["inputs"]["file"] = video
        with pytest.raises(run_workflow.RunError) as e:
            comfy.run(prompt, timeout=600)
        msg = str(e.value)
        assert f"node {ext} (SteadyDancerPoseExtract) failed" in msg and words in msg, msg


def test_dwpose_gpu_fallback_warning_is_shown_on_the_node(comfy):
    """providers=cuda on a machine without a usable CUDA: the session runs on the CPU and the Extract node says so
    (a progress text on the node, which the run command prints), not only the server log."""
    comfy.need("det", "pose")
    if shutil.which("nvidia-smi"):
        pytest.skip("a CUDA GPU may be usable here: no fallback to observe")
    prompt = small(api_workflow("steadydancer-dance"), W, H, LENGTH, steps=1)
    ext = _driving_extract(prompt)
    prompt[ext]["inputs"]["providers"] = "cuda"
    # keep only what the Extract node needs (no sampling): LoadVideo -> components -> resample -> extract + a sink
    keep = {}
    stack = [ext]
    while stack:
        node = stack.pop()
        keep[node] = prompt[node]
        stack += [str(v[0]) for v in prompt[node]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    keep["990"] = {"class_type": "PreviewImage", "inputs": {"images": [ext, 1]}}
    notes = []
    hist, events = comfy.run(keep, timeout=600,
                             on_event=lambda t, d: notes.append(d) if t == "progress_text" else None)
    assert hist["status"]["status_str"] == "success", hist["status"]
    texts = [d["text"] for d in notes if str(d["node"]) == ext]
    assert any("requested CUDAExecutionProvider" in t and "CPUExecutionProvider" in t for t in texts) or \
        any("CUDAExecutionProvider" in t and "retrying with CPUExecutionProvider" in t for t in texts), texts


def test_official_sharded_folder_is_one_loader_entry_and_its_bad_shards_fail_at_validation(comfy):
    """What `tools/fetch_models.py --variant bf16` writes (the official layout: fp32 shards + index + config.json,
    here by huggingface_hub's own sharder from the tiny DiT): the Model Loader lists the folder once and no shard,
    the run command's pre-check finds it present, it runs; a truncated or missing shard is refused when queued."""
    comfy.need("dit", "vae")
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file
    import torch

    folder = comfy.base / "models" / "diffusion_models" / "SteadyDancer-14B"
    sd = {k: v.to(torch.float32) for k, v in load_file(str(comfy.shelf.built["dit"])).items()}
    folder.mkdir()
    save_torch_state_dict(sd, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size="5MB")
    (folder / "config.json").write_text('{"_class_name": "WanModel", "model_type": "i2v"}')
    shards = sorted(folder.glob("*.safetensors"))
    try:
        assert len(shards) >= 2
        options = comfy.client.object_info("SteadyDancerModelLoader")["SteadyDancerModelLoader"]["input"][
            "required"]["model_name"][0]
        assert "SteadyDancer-14B" in options and not [o for o in options if "diffusion_pytorch_model" in o]
        prompt = small(api_workflow("steadydancer-dance"), W, H, LENGTH, steps=1)
        (loader,) = nodes_of(prompt, "SteadyDancerModelLoader")
        prompt[loader]["inputs"]["model_name"] = "SteadyDancer-14B"
        problems, missing = run_workflow.precheck(comfy.client, prompt, None)
        assert not missing and not problems, (problems, missing)
        hist, _ = comfy.run(prompt, timeout=600)
        assert hist["status"]["status_str"] == "success", hist["status"]
        # a shard cut short, then a shard gone: refused at queue time, the shard named, no path
        data = shards[1].read_bytes()
        shards[1].write_bytes(data[: len(data) // 2])
        details = _rejected(comfy, prompt, loader)
        assert f"SteadyDancer-14B: {shards[1].name}: " in details and "truncated" in details, details
        assert str(comfy.base) not in details, details
        shards[1].unlink()
        details = _rejected(comfy, prompt, loader)
        assert "shards listed in diffusion_pytorch_model.safetensors.index.json are missing" in details, details
        assert shards[1].name in details, details
    finally:
        shutil.rmtree(folder, ignore_errors=True)
