"""SteadyDancer as a native ComfyUI model, checked inside ComfyUI's own process (run with ComfyUI's Python by
test_comfyui_native.py; prints one JSON object of measured figures).

    COMFYUI_PATH=/path/to/ComfyUI python native_checks.py [check ...]

Everything below runs ComfyUI 0.33's real code (model management, ModelPatcher, LoRA loader, CFGGuider /
calc_cond_batch, SamplerCustomAdvanced, KSampler, ModelSamplingSD3, EasyCache, context windows, previews,
interrupt) on the pack's nodes; the references are the pack's core functions (sample_official, sample_rcm,
apply_loras) on a separately loaded copy of the same file, which the parity tests of the core tie to the
official code.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import weakref

HERE = pathlib.Path(__file__).resolve().parent
PACK_ROOT = HERE.parents[1]
COMFY = pathlib.Path(os.environ["COMFYUI_PATH"]).resolve()


def _setup():
    sys.path.insert(0, str(COMFY))
    sys.path.insert(0, str(PACK_ROOT / "tests"))
    import comfy.options
    comfy.options.enable_args_parsing()
    sys.argv = [sys.argv[0], "--cpu", "--preview-method", "latent2rgb"]
    spec = importlib.util.spec_from_file_location("steadydancer_turbo", PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["steadydancer_turbo"] = mod
    spec.loader.exec_module(mod)


_setup()

import torch  # noqa: E402

import _loader_util as U  # noqa: E402
import comfy.model_management as mm  # noqa: E402
from steadydancer_turbo.nodes import conditioning_nodes as cn  # noqa: E402
from steadydancer_turbo.nodes import model_nodes as mn  # noqa: E402
from steadydancer_turbo.nodes import native_model as nm  # noqa: E402
from steadydancer_turbo.nodes import native_sampling as ns  # noqa: E402
from steadydancer_turbo.nodes import sampler_nodes as sn  # noqa: E402
from steadydancer_turbo.steadydancer import conditioning as sdc  # noqa: E402
from steadydancer_turbo.steadydancer import latents, loader, sampling  # noqa: E402
from steadydancer_turbo.turbo import rcm  # noqa: E402

TMP = pathlib.Path(tempfile.mkdtemp(prefix="sd_native_"))
OPTS = mn.LoadOptions(weight_storage="auto", compute_dtype="fp32", attention="sdpa")
T, H, W = 3, 4, 6


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def float_file():
    p = TMP / "f32.safetensors"
    if not p.exists():
        U.write_safetensors(U.state_dict(U.reference_model()), p)
    return str(p)


def quant_file(kind):
    p = TMP / ("fp8.safetensors" if kind == "fp8" else "q.gguf")
    if not p.exists():
        sd = U.state_dict(U.reference_model())
        if kind == "fp8":
            U.write_fp8(sd, p, layout="kijai")
        else:
            import gguf
            U.write_gguf(sd, p, [gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q8_0])
    return str(p)


def reference(path):
    return loader.load_steadydancer(path, compute_dtype=torch.float32, device="cpu", attention="sdpa")


def native(path):
    model, module = mn.load_model(path, OPTS)
    return model


def make_cond(seed=3, neg_pose=True):
    cfg = U.tiny_config()
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mask = sdc.build_i2v_mask(4 * (T - 1) + 1, H, W)
    return sdc.SteadyDancerConditioning(
        context=r(1, 7, cfg.text_dim), context_null=r(1, 5, cfg.text_dim), clip_fea=r(1, 257, cfg.clip_dim),
        clip_fea_c=r(1, 257, cfg.clip_dim), y=sdc.build_y(mask, r(1, 16, T, H, W)), cond_pos=r(1, 16, T, H, W),
        cond_neg=r(1, 16, T, H, W) if neg_pose else None, ref_x=sdc.build_ref_x(r(1, 16, 1, H, W)),
        ref_c=sdc.build_ref_c(r(1, 16, 1, H, W)))


def comfy_conds(cond):
    return cn.native_conditioning(cond, [[cond.context, {}]], [[cond.context_null, {}]])


def empty_latent():
    return {"samples": torch.zeros(1, 16, T, H, W)}


def run_official_native(model, cond, seed, steps, shift, g, solver="unipc", callback_guider=None):
    pos, neg = comfy_conds(cond)
    guider = ns.make_guider(model, pos, neg, g)
    sampler = ns.native().FlowSampler(solver)
    sigmas = sn.official_sigmas(steps, shift, model)
    return ns.sample_custom_advanced(guider, sampler, sigmas, empty_latent(), seed)["samples"]


# ---------------------------------------------------------------------------------------------- checks
def check_official():
    ref, model, cond = reference(float_file()), native(float_file()), make_cond()
    g = sampling.Guidance(5.0, 1.0, 0.1, 0.4)
    out = {}
    for solver in ("unipc", "euler"):
        want = latents.denormalize(sampling.sample_official(ref, cond, seed=7, steps=10, shift=5.0, guidance=g,
                                                            solver=solver, batch_passes=False))
        got = run_official_native(model, cond, 7, 10, 5.0, g, solver)
        out[f"official_{solver}_rel"] = rel(got, want)
    # the one-node sampler is the same pieces
    pos, neg = comfy_conds(cond)
    (lat,) = sn.SteadyDancerSampler().sample(model, pos, neg, empty_latent(), 7, 10, 5.0, 5.0, 1.0, 0.1, 0.4, "unipc")
    want = latents.denormalize(sampling.sample_official(ref, cond, seed=7, steps=10, shift=5.0, guidance=g))
    out["official_node_rel"] = rel(lat["samples"], want)
    return out


def check_rcm():
    ref, model, cond = reference(float_file()), native(float_file()), make_cond()
    pos, _ = comfy_conds(cond)
    out = {}
    for schedule, mode in (("rcm", "sde"), ("shift", "sde"), ("rcm", "ode")):
        want = latents.denormalize(rcm.sample_rcm(ref, cond, seed=11, steps=4, schedule=schedule, mode=mode))
        (lat,) = sn.SteadyDancerTurboSampler().sample(model, pos, empty_latent(), 11, 4, schedule, 5.0, 200.0, mode)
        out[f"rcm_{schedule}_{mode}_rel"] = rel(lat["samples"], want)
    return out


def check_ksampler():
    import nodes as comfy_nodes
    model, cond = native(float_file()), make_cond()
    pos, neg = comfy_conds(cond)
    (lat,) = comfy_nodes.common_ksampler(model, 5, 4, 4.0, "euler", "simple", pos, neg, empty_latent())
    s = lat["samples"]
    return {"ksampler_shape": list(s.shape), "ksampler_finite": bool(torch.isfinite(s).all()),
            "ksampler_std": float(s.std())}


CHECKS = {"official": check_official, "rcm": check_rcm, "ksampler": check_ksampler}

if __name__ == "__main__":
    names = sys.argv_orig if hasattr(sys, "argv_orig") else None
    results = {}
    for name in (os.environ.get("SD_CHECKS") or ",".join(CHECKS)).split(","):
        try:
            results.update(CHECKS[name]())
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            import traceback
            results[f"{name}_error"] = "".join(traceback.format_exception(e))[-3000:]
    print("NATIVE_RESULTS " + json.dumps(results))
