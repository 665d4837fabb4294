"""Soak: 50 prompts on the tiny models in one real ComfyUI server, mixing good runs, model switches, LoRA changes,
rejected inputs, failing nodes, interrupts and a prompt removed from the queue. Every prompt's outcome is checked,
the server must answer after each, its queue must be empty at the end, and the server process's RAM (and the
GPU's used memory, where there is one) after the last prompt must be within 5% of what it was after the first.

Kept fast: 32x48 pixels, 5 frames, 1 turbo step; pose extraction and the encoders stay cached between prompts.
"""
import json
import pathlib
import time

import pytest

from comfyui_harness import api_workflow, models, nodes_of, run_workflow, small

W, H, LENGTH = 32, 48, 5
MODEL_B = "tiny_steadydancer_b.safetensors"      # a second DiT file: switching reloads
SLOW = "tiny_steadydancer_slow.safetensors"      # its own cache entry, slowed by SDTestSlowModel (interrupts)
CYCLE = ("good", "switch", "rejected_steps", "wrong_model", "interrupt", "rejected_missing", "broken_image",
         "slow_running", "pending_deleted", "lora")
N_PROMPTS = 50
TOLERANCE = 0.05


def _rss_bytes(pid):
    status = pathlib.Path(f"/proc/{pid}/status")
    if not status.exists():
        pytest.skip("no /proc: the server's RAM cannot be read on this OS")
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in {status}")


def _vram_used(stats):
    """Used memory of the server's first CUDA device (bytes), or None on a CPU-only server."""
    for d in stats.get("devices", []):
        if d.get("type") == "cuda":
            return d["vram_total"] - d["vram_free"]
    return None


class Soak:
    def __init__(self, comfy):
        self.comfy, self.client = comfy, comfy.client
        self.base = small(api_workflow("steadydancer-turbo"), W, H, LENGTH, steps=1)
        (self.loader,) = nodes_of(self.base, "SteadyDancerModelLoader")
        (self.lora,) = nodes_of(self.base, "SteadyDancerLoraLoader")
        (self.sampler,) = nodes_of(self.base, "SamplerCustomAdvanced")     # progress comes from it
        (self.noise,) = nodes_of(self.base, "RandomNoise")
        (self.guider,) = nodes_of(self.base, "BasicGuider")
        (self.sigmas,) = nodes_of(self.base, "SteadyDancerTurboSigmas")
        (self.image,) = nodes_of(self.base, "LoadImage")
        self.model_a = self.base[self.loader]["inputs"]["model_name"]
        self.model = self.model_a
        self.seed = 1000
        self.outcomes = []

    def prompt(self, model=None, seed=None, inputs=()):
        p = json.loads(json.dumps(self.base))
        p[self.loader]["inputs"]["model_name"] = model or self.model
        self.seed += 1
        p[self.noise]["inputs"]["noise_seed"] = self.seed if seed is None else seed
        for (nid, name), value in dict(inputs).items():
            p[nid]["inputs"][name] = value
        return p

    def slow(self, p, seconds=0.3, steps=4):
        p[self.loader]["inputs"]["model_name"] = SLOW
        p["900"] = {"class_type": "SDTestSlowModel",
                    "inputs": {"model": [self.lora, 0], "seconds_per_call": seconds, "log_file": ""}}
        p[self.guider]["inputs"]["model"] = ["900", 0]
        p[self.sigmas]["inputs"]["steps"] = steps
        return p

    def good(self, p):
        hist, _ = self.comfy.run(p, timeout=300)
        assert hist["status"]["status_str"] == "success", hist["status"]
        (f,) = [f for f in run_workflow.output_files(hist) if f["filename"].endswith(".mp4")]
        n, w, h, _ = models.video_info(self.comfy.output_path(f))
        assert (n, w, h) == (LENGTH, W, H)
        return "success"

    def rejected(self, p, node, error_type):
        with pytest.raises(run_workflow.PromptRejected) as e:
            self.client.queue(p)
        errs = e.value.body["node_errors"][node]["errors"]
        assert errs[0]["type"] == error_type, errs
        return f"rejected:{error_type}"

    def failed(self, p, node, class_type):
        with pytest.raises(run_workflow.RunError) as e:
            self.comfy.run(p, timeout=300)
        assert f"node {node} ({class_type}) failed" in str(e.value), str(e.value)
        return f"failed:{class_type}"

    def step(self, i, kind):
        log_loads = self.comfy.log().count("SteadyDancer loaded:")
        if kind == "good":
            out = self.good(self.prompt())
        elif kind == "switch":
            self.model = MODEL_B if self.model == self.model_a else self.model_a
            out = self.good(self.prompt())
            assert self.comfy.log().count("SteadyDancer loaded:") == log_loads + 1, "the model switch did not reload"
        elif kind == "lora":
            out = self.good(self.prompt(inputs={(self.lora, "strength"): 0.5 + 0.1 * (i % 5)}))
        elif kind == "rejected_steps":
            out = self.rejected(self.prompt(inputs={(self.sigmas, "steps"): 50}), self.sigmas, "value_bigger_than_max")
        elif kind == "rejected_missing":
            # the loader's VALIDATE_INPUTS takes model_name, so ComfyUI leaves the list check (and its type) to it
            out = self.rejected(self.prompt(model="SteadyDancer_absent.safetensors"), self.loader,
                                "custom_validation_failed")
        elif kind == "wrong_model":
            # refused when queued: the loader's VALIDATE_INPUTS reads the header (issue 11), nothing runs
            out = self.rejected(self.prompt(model="some_other_model.safetensors"), self.loader,
                                "custom_validation_failed")
        elif kind == "broken_image":
            out = self.failed(self.prompt(inputs={(self.image, "image"): "broken.png"}), self.image, "LoadImage")
        elif kind == "interrupt":
            seen = []

            def on_event(t, d):
                seen.append(t)
                if t == "progress" and str(d.get("node")) == self.sampler and "sent" not in seen:
                    seen.append("sent")
                    self.client.interrupt(d["prompt_id"])
            with pytest.raises(run_workflow.RunError, match="interrupted"):
                self.comfy.run(self.slow(self.prompt()), timeout=300, on_event=on_event)
            assert "sent" in seen and "execution_interrupted" in seen, seen
            out = "interrupted"
        elif kind == "slow_running":
            # this one runs slowly; the next is queued behind it and removed before it starts; then this one is
            # cancelled the way the run command's Ctrl-C does it
            ws = self.client.websocket()
            try:
                first = self.client.queue(self.slow(self.prompt(), seconds=0.3, steps=8))
                second = self.client.queue(self.prompt())
                state = {}

                def on_event(t, d):
                    if t == "progress" and str(d.get("node")) == self.sampler and "done" not in state:
                        state["done"] = (self.client.cancel(second), self.client.cancel(first))
                with pytest.raises(run_workflow.RunError, match="interrupted"):
                    run_workflow.wait_for_prompt(self.client, ws, first, on_event=on_event, timeout=300)
            finally:
                ws.close()
            assert state["done"] == ("removed it from the server's queue", "interrupted it on the server"), state
            self.pending = second
            out = "interrupted"
        elif kind == "pending_deleted":
            # the prompt queued (and removed) above: it never ran
            assert self.client.queue_state(self.pending) is None
            assert self.client.history(self.pending) is None
            out = "deleted"
        else:
            raise AssertionError(kind)
        assert self.client.alive(), f"prompt {i} ({kind}): the server stopped answering"
        self.outcomes.append((i, kind, out))


def test_fifty_prompts_leave_the_server_healthy_and_its_memory_flat(comfy):
    comfy.need("dit", "vae", "det", "pose", "lora")
    comfy.shelf.place("diffusion_models", MODEL_B, kind="dit")
    (comfy.base / "input" / "broken.png").write_text("not a picture: a user's broken upload")
    soak = Soak(comfy)
    pid = comfy.server.proc.pid
    t0 = time.monotonic()
    kinds = [CYCLE[i % len(CYCLE)] for i in range(N_PROMPTS)]
    assert kinds[0] == "good" and kinds[-1] == "lora"
    rss = vram = None
    trace = []
    for i, kind in enumerate(kinds):
        ts = time.monotonic()
        soak.step(i, kind)
        trace.append((kind, time.monotonic() - ts, _rss_bytes(pid) / 2**20))
        if i == 0:
            time.sleep(0.5)
            rss, vram = _rss_bytes(pid), _vram_used(comfy.client.system_stats())
    time.sleep(0.5)
    rss_end, vram_end = _rss_bytes(pid), _vram_used(comfy.client.system_stats())
    took = time.monotonic() - t0
    table = "\n".join(f"{i:2d} {k:18s} {dt:6.2f} s  RSS {r:7.1f} MiB" for i, (k, dt, r) in enumerate(trace))

    expected = {"good": "success", "switch": "success", "lora": "success", "interrupt": "interrupted",
                "slow_running": "interrupted", "pending_deleted": "deleted",
                "rejected_steps": "rejected:value_bigger_than_max", "rejected_missing": "rejected:custom_validation_failed",
                "wrong_model": "rejected:custom_validation_failed", "broken_image": "failed:LoadImage"}
    assert [(k, o) for _, k, o in soak.outcomes] == [(k, expected[k]) for k in kinds]
    q = comfy.client.get_json("/queue")
    assert q["queue_running"] == [] and q["queue_pending"] == [], q
    print(f"{N_PROMPTS} prompts in {took:.1f} s; server RSS {rss / 2**20:.0f} MiB after the first, "
          f"{rss_end / 2**20:.0f} MiB after the last"
          + (f"; GPU used {vram / 2**20:.0f} -> {vram_end / 2**20:.0f} MiB" if vram is not None
             else "; the server runs on the CPU: no VRAM to check (COMFYUI_TEST_GPU=1 runs it on the GPU)"))
    assert abs(rss_end - rss) <= TOLERANCE * rss, f"server RSS {rss} -> {rss_end} bytes; per prompt:\n{table}"
    if vram is not None:
        assert abs(vram_end - vram) <= TOLERANCE * vram, f"GPU used {vram} -> {vram_end} bytes; per prompt:\n{table}"
