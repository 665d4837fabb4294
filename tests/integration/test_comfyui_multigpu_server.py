"""The Multi-GPU node in a real ComfyUI server (--cpu; the test-only STEADYDANCER_MULTIGPU_CPU=1 that conftest sets
lets it use a CPU worker rank): the shipped dance graph with the node between the loader and the sampler runs to a
video with one worker process of the server, which stays up between prompts and stops on "Unload models"
(POST /free); a GPU count that does not divide the model's heads fails at the node with the reason. The numbers of
the Multi-GPU MODEL against one process are checked in test_comfyui_multigpu.py."""
import os
import time

import pytest

from comfyui_harness import api_workflow, models, nodes_of, run_workflow, small

W, H, LENGTH = 64, 96, 9
NODE = "990"


def _workers(server_pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == server_pid and any(c.endswith(b"_pool_worker.py") for c in cmd):
            out.append(int(d))
    return out


def _prompt(comfy, gpus, layout):
    """The shipped graph with the node between the Model Loader and everything that takes its MODEL (the guider
    and the sigmas of the SamplerCustomAdvanced section)."""
    comfy.need("dit", "vae", "det", "pose")
    prompt = small(api_workflow("steadydancer-dance"), W, H, LENGTH, steps=2)
    (loader,) = nodes_of(prompt, "SteadyDancerModelLoader")
    (sampler,) = nodes_of(prompt, "SamplerCustomAdvanced")
    users = [(n, k) for n, node in prompt.items() for k, v in node["inputs"].items() if v == [loader, 0]]
    assert users, "nothing takes the Model Loader's MODEL"
    for n, k in users:
        prompt[n]["inputs"][k] = [NODE, 0]
    prompt[NODE] = {"class_type": "SteadyDancerMultiGPU",
                    "inputs": {"model": [loader, 0], "gpus": gpus, "layout": layout}}
    return prompt, sampler


def _wait(cond, timeout=15.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and not cond():
        time.sleep(0.2)
    return cond()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the server's child processes from /proc")
def test_multigpu_node_runs_the_dance_graph_and_unload_stops_the_worker(comfy):
    server = comfy.server.proc.pid
    # the server's tiny DiT has one attention head: its 2 ranks split the batched guidance passes (2 x 1)
    prompt, sampler = _prompt(comfy, 2, "2 x sequence")
    hist, events = comfy.run(prompt, timeout=900)
    assert hist["status"]["status_str"] == "success", hist["status"]
    (f,) = [f for f in run_workflow.output_files(hist) if f["filename"].endswith((".mp4", ".webm", ".mkv"))]
    assert models.video_info(comfy.output_path(f))[:3] == (LENGTH, W, H)
    assert any(t == "progress" and str(d.get("node")) == sampler for t, d in events)  # progress as on one GPU
    workers = _workers(server)
    assert len(workers) == 1, workers                  # one worker for 2 ranks, kept after the prompt
    (noise,) = nodes_of(prompt, "RandomNoise")
    prompt[noise]["inputs"]["noise_seed"] += 1         # the sampler runs again
    hist, _ = comfy.run(prompt, timeout=900)
    assert hist["status"]["status_str"] == "success", hist["status"]
    assert _workers(server) == workers                 # the same worker process served the second prompt
    comfy.client.post_json("/free", {"unload_models": True})
    assert _wait(lambda: not _workers(server)), _workers(server)


def test_multigpu_node_refuses_a_gpu_count_that_does_not_divide_the_heads(comfy):
    prompt, _ = _prompt(comfy, 3, "sequence")  # the tiny model has one head: no sequence split
    with pytest.raises(run_workflow.RunError) as e:
        comfy.run(prompt, timeout=600)
    msg = str(e.value)
    assert f"node {NODE} (SteadyDancerMultiGPU) failed" in msg, msg
    assert "3 GPUs per sequence group do not divide the model's 1 attention heads" in msg, msg
    assert not _workers(comfy.server.proc.pid)
