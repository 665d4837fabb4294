"""The shipped dance graph (core SamplerCustomAdvanced with RandomNoise + our sigmas / guider / sampler nodes) and
the same graph on core KSampler in a real ComfyUI server, run to a video; "Unload models" (POST /free) releases
the DiT's RAM in the server process (measured with a ~0.3 GB float32 DiT)."""
import time

import pytest
from comfyui_harness import api_workflow, models, nodes_of, run_workflow, small

W, H, LENGTH = 64, 96, 9


def _dance(comfy):
    """(the small dance prompt, the SamplerCustomAdvanced node id)"""
    comfy.need("dit", "vae", "det", "pose")
    prompt = small(api_workflow("steadydancer-dance"), W, H, LENGTH, steps=2)
    (sampler,) = nodes_of(prompt, "SamplerCustomAdvanced")
    return prompt, sampler


def _video(comfy, prompt):
    hist, events = comfy.run(prompt, timeout=900)
    assert hist["status"]["status_str"] == "success", hist["status"]
    (f,) = [f for f in run_workflow.output_files(hist) if f["filename"].endswith((".mp4", ".webm", ".mkv"))]
    n, w, h, _ = models.video_info(comfy.output_path(f))
    assert (n, w, h) == (LENGTH, W, H)
    return events


def test_core_ksampler_runs_steadydancer_to_a_video(comfy):
    """SamplerCustomAdvanced and its pieces swapped for core KSampler on the guider's model and conditioning."""
    prompt, sampler = _dance(comfy)
    i = prompt[sampler]["inputs"]
    g = prompt[str(i["guider"][0])]["inputs"]
    for piece in ("noise", "guider", "sampler", "sigmas"):
        del prompt[str(i[piece][0])]
    prompt[sampler] = {"class_type": "KSampler", "inputs": {
        "model": g["model"], "positive": g["positive"], "negative": g["negative"], "latent_image": i["latent_image"],
        "seed": 3, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    events = _video(comfy, prompt)
    assert any(t == "progress" and str(d.get("node")) == sampler for t, d in events)


@pytest.mark.parametrize("pose_guidance", [1.0, 0.0])
def test_sampler_custom_advanced_with_our_pieces_runs_to_a_video(comfy, pose_guidance):
    """The shipped graph as it is, with the official sigmas taking the shift from the model (shift 0). pose 0: the
    negative pose frames are disconnected, so the guider must run without a negative_pose set (it drops it when no
    step of the schedule has pose guidance; the VAE never encodes negative poses)."""
    prompt, sampler = _dance(comfy)
    i = prompt[sampler]["inputs"]
    sig, guider = str(i["sigmas"][0]), str(i["guider"][0])
    assert prompt[sig]["class_type"] == "SteadyDancerOfficialSigmas"
    assert prompt[guider]["class_type"] == "SteadyDancerGuider"
    prompt[sig]["inputs"].update(shift=0.0, model=prompt[guider]["inputs"]["model"])
    if not pose_guidance:
        prompt[guider]["inputs"]["pose_guidance"] = 0.0
        prompt[nodes_of(prompt, "SteadyDancerConditioning")[0]]["inputs"].pop("negative_pose_frames")
    events = _video(comfy, prompt)
    steps = [d for t, d in events if t == "progress" and str(d.get("node")) == sampler]
    assert steps and steps[-1]["value"] == steps[-1]["max"] == 2, steps


def _probe(comfy, tag):
    import json
    hist, _ = comfy.run({"1": {"class_type": "SDTestMemoryProbe", "inputs": {"tag": tag}}}, timeout=120)
    return json.loads(hist["outputs"]["1"]["text"][0])


def test_unload_models_frees_the_dit_ram(comfy):
    import torch
    from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
    from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT
    from safetensors.torch import save_file

    path = comfy.base / "models" / "diffusion_models" / "big_steadydancer.safetensors"
    if not path.exists():
        cfg = SteadyDancerConfig(**{k: v for k, v in {**models.TINY_DIT, "dim": 1024, "num_heads": 8,
                                                         "ffn_dim": 4096, "num_layers": 4}.items()
                                    if k in SteadyDancerConfig.__dataclass_fields__})
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in SteadyDancerDiT(cfg).state_dict().items()}, str(path))
    size_mb = path.stat().st_size / 2 ** 20
    prompt, sampler = _dance(comfy)
    prompt[nodes_of(prompt, "SteadyDancerModelLoader")[0]]["inputs"].update(model_name=path.name,
                                                                           compute_dtype="fp32")
    comfy.client.post_json("/free", {"unload_models": True, "free_memory": True})
    time.sleep(2)
    before = _probe(comfy, "before")
    _video(comfy, prompt)
    loaded = _probe(comfy, "loaded")
    comfy.client.post_json("/free", {"unload_models": True, "free_memory": True})
    time.sleep(2)             # the prompt worker applies the flags on its next loop (<= ~1 s when idle)
    after = _probe(comfy, "after")
    print(f"server: {before}, {loaded}, {after} ({size_mb:.0f} MB DiT file)")
    assert before["live_dits"] == 0 and loaded["live_dits"] >= 1 and after["live_dits"] == 0
    if "cuda_allocated_mb" not in loaded:   # --cpu: the weights lived in the server's RAM
        assert after["rss_mb"] - before["rss_mb"] < 0.5 * size_mb      # nothing of the DiT left in RAM
        assert loaded["rss_mb"] - before["rss_mb"] > 0.5 * size_mb
        assert loaded["rss_mb"] - after["rss_mb"] > 0.5 * size_mb
    else:   # COMFYUI_TEST_GPU=1: the weights went to the card and came off it (RSS is no measure there: the first
        # GPU run maps CUDA libraries into the process; H200: +180 MB RSS after a 350 MB DiT was freed)
        assert loaded["cuda_allocated_mb"] - before["cuda_allocated_mb"] > 0.9 * size_mb
        assert after["cuda_allocated_mb"] - before["cuda_allocated_mb"] < 0.05 * size_mb
        assert after["cuda_reserved_mb"] - before["cuda_reserved_mb"] < 0.1 * size_mb   # soft_empty_cache ran
