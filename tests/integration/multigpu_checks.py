"""The Multi-GPU node inside ComfyUI's own process (run with ComfyUI's Python by test_comfyui_multigpu.py; prints
one JSON object). ComfyUI runs with --cpu; the test-only switch STEADYDANCER_MULTIGPU_CPU=1 lets the node use
CPU worker ranks (gloo), so rank 0 is this process and rank 1 a worker subprocess, as with two GPUs.

References: the same native MODEL through the same ComfyUI sampling path on one process (no Multi-GPU node).

    COMFYUI_PATH=/path/to/ComfyUI python multigpu_checks.py
"""
from __future__ import annotations

import gc
import json
import os
import signal
import time

os.environ["STEADYDANCER_MULTIGPU_CPU"] = "1"

import native_checks as NC  # noqa: E402  (sets ComfyUI up with --cpu and registers the pack)
import comfy.model_management as mm  # noqa: E402
import nodes as comfy_nodes  # noqa: E402
from steadydancer_turbo.nodes import model_nodes as mn  # noqa: E402
from steadydancer_turbo.nodes import multigpu_nodes as mg  # noqa: E402
from steadydancer_turbo.nodes import native_multigpu as nmg  # noqa: E402
from steadydancer_turbo.nodes import sampler_nodes as sn  # noqa: E402
from steadydancer_turbo.steadydancer.sampling import official as sampling  # noqa: E402

G = sampling.Guidance(5.0, 1.0, 0.1, 0.4)


def rcm(model, pos, seed=11, steps=3):
    (lat,) = sn.SteadyDancerTurboSampler().sample(model, pos, NC.empty_latent(), seed, steps, "rcm", 5.0, 200.0, "sde")
    return lat["samples"]


def _state(model):
    (w,) = model.wrappers["sampler_sample"][nmg.WRAPPER_KEY]
    return w.__self__


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _gone(pids, wait=10.0):
    end = time.monotonic() + wait
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


def check_multigpu():
    import folder_paths
    folder_paths.add_model_folder_path("loras", str(NC.TMP / "loras"))
    NC.lora_file(True)
    out = {}
    cond = NC.make_cond()
    pos, _ = NC.comfy_conds(cond)
    base = NC.native(NC.float_file())
    want_off = NC.run_official_native(base, cond, 7, 4, 5.0, G)
    want_rcm = rcm(base, pos)

    for layout in ("sequence", "2 x sequence"):  # 1x2: tokens split; 2x1: the batched passes split
        (mgm,) = mg.SteadyDancerMultiGPU().apply(base, 2, layout)
        st = _state(mgm)
        out[f"{layout}_official_rel"] = NC.rel(NC.run_official_native(mgm, cond, 7, 4, 5.0, G), want_off)
        out[f"{layout}_rcm_rel"] = NC.rel(rcm(mgm, pos), want_rcm)
        out[f"{layout}_weights_sent"] = st.pool.weights_sent
        if layout == "sequence":  # long video: context windows (3 latent frames, overlap 1) over 7 frames
            from steadydancer_turbo.steadydancer.sampling import context_windows as cwin
            ctx, cond7 = cwin.ContextOptions(window=3, overlap=1), NC.make_cond(frames=7)
            pos7, _ = NC.comfy_conds(cond7)

            def windowed(m):
                (lat,) = sn.SteadyDancerTurboSampler().sample(m, pos7, NC.empty_latent(7), 11, 3, "rcm", 5.0, 200.0,
                                                              "sde", context=ctx)
                return lat["samples"]

            out["windows_rcm_rel"] = NC.rel(windowed(mgm), windowed(base))
        out[f"{layout}_pids"] = st.pool.pids
        del mgm, st
    gc.collect()  # the first node's model is freed: its workers stop
    out["freed_model_workers_gone"] = _gone(out["sequence_pids"])

    # LoRAs through core LoraLoaderModelOnly after the Multi-GPU node, on float / fp8 / GGUF models; a strength
    # change re-sends the weights; the model file is not read again
    reads, orig = [], mn.load_model

    def counted(*a, **k):
        reads.append(a[0])
        return orig(*a, **k)

    for kind in ("f32", "fp8", "gguf"):
        path = NC.float_file() if kind == "f32" else NC.quant_file(kind)
        model = NC.native(path)
        (mgm,) = mg.SteadyDancerMultiGPU().apply(model, 2, "sequence")
        st = _state(mgm)
        mn.load_model = counted
        try:
            for n, strength in enumerate((1.0, 0.5), start=1):
                (one,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "lightx2v_layout.safetensors",
                                                                                strength)
                (multi,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(mgm, "lightx2v_layout.safetensors",
                                                                                  strength)
                want = rcm(one, pos)
                got = rcm(multi, pos)
                out[f"lora_{kind}_s{strength}_rel"] = NC.rel(got, want)
                out[f"lora_{kind}_s{strength}_vs_no_lora_rel"] = NC.rel(want, rcm(model, pos))
                out[f"lora_{kind}_s{strength}_weights_sent"] = st.pool.weights_sent
                del one, multi
        finally:
            mn.load_model = orig
        del model, mgm, st
        gc.collect()
    out["lora_model_file_reads"] = len(reads)

    # interrupt (ComfyUI's progress hook at step 2), then the pool is still usable
    (mgm,) = mg.SteadyDancerMultiGPU().apply(base, 2, "sequence")
    st = _state(mgm)
    pids = st.pool.pids
    NC.install_progress_hook()
    NC.INTERRUPT[0] = True
    try:
        rcm(mgm, pos)
        out["interrupt_raised"] = False
    except mm.InterruptProcessingException:
        out["interrupt_raised"] = True
    finally:
        NC.INTERRUPT[0] = False
    out["interrupt_pool_alive"] = st.pool is not None and st.pool.alive and st.pool.pids == pids
    out["after_interrupt_rcm_rel"] = NC.rel(rcm(mgm, pos), want_rcm)

    # a worker killed mid-run: a clear error, no process left; the next run starts the workers again
    import comfy.utils
    killed = []

    def kill_hook(value, total, preview, prompt_id=None, node_id=None):
        if value == 1 and not killed:
            killed.append(pids[0])
            os.kill(pids[0], signal.SIGKILL)

    comfy.utils.set_progress_bar_global_hook(kill_hook)
    try:
        rcm(mgm, pos)
        out["killed_error"] = None
    except Exception as e:  # noqa: BLE001
        out["killed_error"] = f"{type(e).__name__}: {e}"
    comfy.utils.set_progress_bar_global_hook(None)
    out["killed_workers_gone"] = _gone(pids)
    out["after_kill_rcm_rel"] = NC.rel(rcm(mgm, pos), want_rcm)
    new_pids = st.pool.pids
    out["after_kill_new_pids"] = new_pids != pids and all(_alive(p) for p in new_pids)

    # "Unload models" (POST /free unload_models: comfy.model_management.unload_all_models) stops the workers
    mm.unload_all_models()
    out["unload_workers_gone"] = _gone(new_pids) and st.pool is None
    out["after_unload_rcm_rel"] = NC.rel(rcm(mgm, pos), want_rcm)  # the next run starts them again
    last = st.pool.pids
    del mgm, st
    gc.collect()
    out["final_workers_gone"] = _gone(last)
    return out


if __name__ == "__main__":
    try:
        results = check_multigpu()
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
        import traceback
        results = {"multigpu_error": "".join(traceback.format_exception(e))[-4000:]}
    print("MULTIGPU_RESULTS " + json.dumps(results))
