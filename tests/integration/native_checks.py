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
    # SD_NATIVE_ARGS: ComfyUI flags instead of --cpu, e.g. "--lowvram" on a GPU machine (then the references still
    # run on the CPU and the ComfyUI side on the GPU: compare with a looser tolerance there)
    extra = os.environ.get("SD_NATIVE_ARGS", "--cpu").split()
    sys.argv = [sys.argv[0], *extra, "--preview-method", "latent2rgb"]
    spec = importlib.util.spec_from_file_location("steadydancer_turbo", PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["steadydancer_turbo"] = mod
    spec.loader.exec_module(mod)


_setup()

import torch  # noqa: E402

import _loader_util as U  # noqa: E402
import native_lora_fp8_checks  # noqa: E402  (this folder: sys.path[0] when run as a script)
import comfy.model_management as mm  # noqa: E402
from steadydancer_turbo.nodes import conditioning_nodes as cn  # noqa: E402
from steadydancer_turbo.nodes import model_nodes as mn  # noqa: E402
from steadydancer_turbo.nodes import native_model as nm  # noqa: E402
from steadydancer_turbo.nodes import native_sampling as ns  # noqa: E402
from steadydancer_turbo.nodes import sampler_nodes as sn  # noqa: E402
from steadydancer_turbo.steadydancer.sampling import conditioning as sdc  # noqa: E402
from steadydancer_turbo.steadydancer.sampling import latents, official as sampling
from steadydancer_turbo.steadydancer.weights import loader  # noqa: E402
from steadydancer_turbo.turbo import rcm  # noqa: E402

TMP = pathlib.Path(tempfile.mkdtemp(prefix="sd_native_"))
OPTS = mn.LoadOptions(weight_storage="auto", compute_dtype="fp32", attention="sdpa")
T, H, W = 3, 4, 6


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
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


def make_cond(seed=3, neg_pose=True, frames=T):
    T = frames
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


def empty_latent(frames=T):
    return {"samples": torch.zeros(1, 16, frames, H, W)}


def run_official_native(model, cond, seed, steps, shift, g, solver="unipc"):
    pos, neg = comfy_conds(cond)
    guider = ns.make_guider(model, pos, neg, g)
    sampler = ns.native().FlowSampler(solver)
    sigmas = sn.official_sigmas(steps, shift, model)
    return ns.sample_custom_advanced(guider, sampler, sigmas, empty_latent(cond.y.shape[2]), seed)["samples"]


def count_blocks(model):
    """Counts DiT block-stack runs (one per forward that is not skipped by a cache)."""
    dit = model.model.diffusion_model
    calls = []
    orig = type(dit).run_blocks

    def run_blocks(*a, **k):
        calls.append(a[0].shape[0])
        return orig(dit, *a, **k)

    dit.run_blocks = run_blocks
    return calls, lambda: dit.__dict__.pop("run_blocks", None)


INTERRUPT = [False]


def install_progress_hook():
    """ComfyUI's progress hook as main.py installs it (progress, previews, interrupt check), recording
    (value, total, has preview) per update; with INTERRUPT[0] set it interrupts at value 2."""
    import comfy.utils
    seen = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        seen.append((value, total, preview is not None))
        if value == 2 and INTERRUPT[0]:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(hook)
    return seen


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


def check_deferred_pose():
    """The Conditioning node's deferred negative-pose encode through the real guider: with pose guidance it is
    encoded once (two runs) and the samples equal, bit for bit, those of the same latent given as a tensor;
    with pose guidance 0 it is never encoded."""
    import dataclasses
    model, cond = native(float_file()), make_cond()
    raw = latents.denormalize(cond.cond_neg)  # what the Wan VAE would return; vae_encode normalizes it
    calls = []

    class CountingVAE:
        def encode(self, pixels):
            calls.append(tuple(pixels.shape))
            return raw.clone()

    bare = dataclasses.replace(cond, cond_neg=None)
    frames = torch.zeros(4 * (T - 1) + 1, 8 * H, 8 * W, 3)
    eager = dataclasses.replace(cond, cond_neg=latents.normalize(raw.float()))

    def run(pos, neg, guidance):
        guider = ns.make_guider(model, pos, neg, guidance)
        return ns.sample_custom_advanced(guider, ns.native().FlowSampler("unipc"), sn.official_sigmas(6, 5.0, model),
                                         empty_latent(), 7)["samples"]

    out = {}
    for tag, g in (("on", sampling.Guidance(5.0, 1.0, 0.1, 0.4)), ("off", sampling.Guidance(5.0, 0.0, 0.1, 0.4))):
        calls.clear()
        deferred = cn.DeferredLatent(CountingVAE(), frames, tuple(cond.cond_neg.shape), "negative_pose_frames")
        pos, neg = cn.native_conditioning(bare, [[bare.context, {}]], [[bare.context_null, {}]], deferred)
        got = [run(pos, neg, g) for _ in range(2)]
        want = run(*comfy_conds(eager), g)
        out[f"deferred_pose_{tag}_encodes"] = len(calls)
        out[f"deferred_pose_{tag}_equal"] = bool(torch.equal(got[0], want) and torch.equal(got[1], want))
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


def _pytest_stub():
    """test_loader_lora (the LoRA builders shared with the core tests) imports pytest, which ComfyUI's venv may
    lack; its decorators are not used here."""
    if "pytest" in sys.modules:
        return
    try:
        import pytest  # noqa: F401
    except ImportError:
        import types
        stub = types.ModuleType("pytest")
        ident = lambda *a, **k: (lambda f: f)  # noqa: E731
        stub.fixture = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
        stub.mark = types.SimpleNamespace(parametrize=ident, skipif=ident)
        sys.modules["pytest"] = stub


def lora_file(with_diff_m=True):
    _pytest_stub()
    from test_loader_lora import lora_tensors, write_lora
    name = "lightx2v_layout.safetensors" if with_diff_m else "no_diff_m.safetensors"
    p = TMP / "loras" / name
    if not p.exists():
        p.parent.mkdir(exist_ok=True)
        d = lora_tensors(1)
        if not with_diff_m:
            d = {k: v for k, v in d.items() if v[0] != "diff_m"}
        write_lora(p, d, "kijai")
    return str(p)


def model_inputs(seed=5, sigma=0.7):
    cond = make_cond()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, T, H, W, generator=g)
    return cond, x, torch.tensor([sigma])


def native_x0(model, cond, x, sigma, lowvram=0):
    """One denoiser call through ComfyUI: load (full, or partial with ``lowvram`` bytes), BaseModel.apply_model."""
    mm.unload_all_models()
    if lowvram:   # a partial load by hand, onto ComfyUI's load device (the GPU in a COMFYUI_TEST_GPU run)
        model.patch_model(mm.get_torch_device(), lowvram_model_memory=lowvram)
        LOWVRAM_STATE["partial"] = bool(model.model.model_lowvram)
    else:
        mm.load_models_gpu([model])
    try:
        with torch.no_grad():
            return _apply(model,
                x, sigma, c_concat=cond.y, c_crossattn=torch.nn.functional.pad(cond.context, (0, 0, 0, 505)),
                clip_fea=cond.clip_fea, clip_fea_c=cond.clip_fea_c, pose_latents=cond.cond_pos, ref_x=cond.ref_x,
                ref_c=cond.ref_c, transformer_options={})
    finally:
        if lowvram:
            model.unpatch_model(model.offload_device)


def _apply(model, *args, **kw):
    return model.model.apply_model(*args, **kw).cpu()


def ref_x0(module, cond, x, sigma):
    with torch.no_grad():
        v = module(x, sigma * 1000, cond.context, cond.clip_fea, cond.clip_fea_c, cond.y, cond.cond_pos, cond.ref_x,
                   cond.ref_c)
    return x - sigma.view(-1, 1, 1, 1, 1) * v


LOWVRAM_STATE = {}


def check_lora():
    import folder_paths
    import nodes as comfy_nodes
    folder_paths.add_model_folder_path("loras", str(TMP / "loras"))
    lora_file(True), lora_file(False)
    cond, x, sigma = model_inputs()
    out = {}
    reads = []
    orig = mn.load_model

    def counted(*a, **k):
        reads.append(a[0])
        return orig(*a, **k)

    for kind in ("f32", "fp8", "gguf"):
        path = float_file() if kind == "f32" else quant_file(kind)
        base = native(path)
        stored = {n: m.weight.dtype for n, m in base.model.diffusion_model.named_modules() if hasattr(m, "qkind")}
        plain = ref_x0(reference(path), cond, x, sigma)
        mn.load_model = counted
        try:
            for strength in (1.0, 0.5):
                ref = reference(path)
                loader.apply_loras(ref, [(lora_file(True), strength)])
                want = ref_x0(ref, cond, x, sigma)
                ref = reference(path)
                loader.apply_loras(ref, [(lora_file(False), strength)])
                want_no_m = ref_x0(ref, cond, x, sigma)
                (core,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(base, "lightx2v_layout.safetensors",
                                                                                 strength)
                (ours,) = mn.SteadyDancerLoraLoader().apply(base, lora_file(True), strength)
                tag = f"{kind}_s{strength}"
                got = native_x0(core, cond, x, sigma)
                out[f"lora_core_{tag}_rel"] = rel(got, want)
                out[f"lora_core_{tag}_vs_no_lora_rel"] = rel(got, plain)
                out[f"lora_core_{tag}_vs_no_diff_m_rel"] = rel(got, want_no_m)
                out[f"lora_core_{tag}_lowvram_rel"] = rel(native_x0(core, cond, x, sigma, lowvram=200_000), want)
                out[f"lora_core_{tag}_lowvram_was_partial"] = LOWVRAM_STATE.get("partial")
                out[f"lora_ours_{tag}_rel"] = rel(native_x0(ours, cond, x, sigma), want)
                del ref, core, ours
            out[f"lora_{kind}_unpatched_base_rel"] = rel(native_x0(base, cond, x, sigma), plain)
            now = {n: m.weight.dtype for n, m in base.model.diffusion_model.named_modules() if hasattr(m, "qkind")}
            out[f"lora_{kind}_quantized_layers_kept_stored"] = (now == stored, len(stored))
        finally:
            mn.load_model = orig
        del base
        mm.unload_all_models()
    out["lora_base_file_reads_during_strength_changes"] = len(reads)
    return out


def big_file():
    """A ~0.3 GB float32 DiT, so that freeing it shows in the process RSS."""
    p = TMP / "big.safetensors"
    if not p.exists():
        from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
        from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT
        cfg = SteadyDancerConfig.tiny(**{**U.CFG, "dim": 1024, "num_heads": 8, "ffn_dim": 4096, "num_layers": 4})
        U.write_safetensors({k: v.contiguous() for k, v in SteadyDancerDiT(cfg).state_dict().items()}, p)
    return str(p)


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def check_free():
    """What "Unload models" (POST /free, unload_models + free_memory) does in the server: ComfyUI's
    unload_all_models, then the executor drops its cached node outputs; here the MODEL reference is dropped."""
    path = big_file()
    gc.collect()
    before = rss_mb()
    model = native(path)
    ref = weakref.ref(model.model.diffusion_model)
    mm.load_models_gpu([model])
    loaded = rss_mb()
    mm.unload_all_models()
    del model
    gc.collect()
    mm.soft_empty_cache()
    after = rss_mb()
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages; the server process does the same
    return {"free_rss_after_trim_mb": rss_mb(),"free_rss_before_mb": before, "free_rss_loaded_mb": loaded, "free_rss_after_mb": after,
            "free_dit_object_released": ref() is None, "free_file_mb": os.path.getsize(path) / 2 ** 20}


def check_compose():
    from comfy_extras import nodes_context_windows, nodes_easycache, nodes_model_advanced, nodes_torch_compile
    import comfy.utils
    out = {}
    ref, model, cond = reference(float_file()), native(float_file()), make_cond()
    g = sampling.Guidance(5.0, 1.0, 0.1, 0.4)
    # ModelSamplingSD3: shift 8 via the model; our sigmas node reads it (shift 0)
    (m8,) = nodes_model_advanced.ModelSamplingSD3().patch(model, 8.0)
    out["msd3_sigmas_equal_official_shift8"] = bool(torch.equal(sn.official_sigmas(10, 0, m8),
                                                                sampling.official_schedule(10, 8.0)[0]))
    want = latents.denormalize(sampling.sample_official(ref, cond, seed=7, steps=10, shift=8.0, guidance=g))
    out["msd3_sampling_rel"] = rel(run_official_native(m8, cond, 7, 10, 0, g), want)
    # EasyCache: fewer DiT runs, result still close
    (ec,) = nodes_easycache.EasyCacheNode.execute(model, 0.2, 0.15, 0.95, False).result
    calls, undo = count_blocks(ec)
    got = run_official_native(ec, cond, 7, 20, 5.0, g)
    undo()
    plain_calls, undo = count_blocks(model)
    base = run_official_native(model, cond, 7, 20, 5.0, g)
    undo()
    out["easycache_block_runs"], out["easycache_block_runs_without"] = len(calls), len(plain_calls)
    out["guider_max_batch"] = max(plain_calls)  # the passes of a step ran as one batched forward
    out["easycache_rel_vs_uncached"] = rel(got, base)
    # core context windows (Wan node): 7 latent frames, windows of 5 with overlap 2
    cond7 = make_cond(frames=7)
    (cw,) = nodes_context_windows.WanContextWindowsManualNode.execute(model, 17, 8, __import__("comfy.context_windows").context_windows.ContextSchedules.STATIC_STANDARD, 1, False,
                                                                 "pyramid", False).result
    calls, undo = count_blocks(cw)
    got = run_official_native(cw, cond7, 7, 4, 5.0, sampling.Guidance(5.0, 0.0))
    undo()
    full = run_official_native(model, cond7, 7, 4, 5.0, sampling.Guidance(5.0, 0.0))
    out["context_windows_block_runs"] = len(calls)
    out["context_windows_shape_ok"] = list(got.shape) == list(full.shape)
    out["context_windows_rel_vs_full"] = rel(got, full)
    # TorchCompileModel (inductor on CPU needs a C++ compiler; any failure is reported)
    try:
        (tc,) = nodes_torch_compile.TorchCompileModel.execute(model, "inductor").result
        got = run_official_native(tc, cond, 7, 3, 5.0, g)
        want = run_official_native(model, cond, 7, 3, 5.0, g)
        out["torch_compile_rel"] = rel(got, want)
    except Exception as e:  # noqa: BLE001
        out["torch_compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    # previews and interrupt through ComfyUI's progress hook (what main.py installs)
    seen = install_progress_hook()
    try:
        INTERRUPT[0] = False
        run_official_native(model, cond, 7, 4, 5.0, g)
        out["preview_steps_with_image"] = sum(p for _, _, p in seen)
        out["preview_steps"] = len(seen)
        seen.clear()
        INTERRUPT[0] = True
        calls, undo = count_blocks(model)
        try:
            run_official_native(model, cond, 7, 10, 5.0, sampling.Guidance(5.0, 0.0))
            out["interrupt_raised"] = False
        except mm.InterruptProcessingException:
            out["interrupt_raised"] = True
        undo()
        out["interrupt_steps_reported"] = len(seen)
        out["interrupt_block_runs"] = len(calls)
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
    return out


def check_windows():
    """Our context windows on the native MODEL (options in transformer_options, the DiT call windows itself)
    against the core samplers with ``context=`` on the same file: 7 latent frames, windows (0,3) (2,5) (4,7)."""
    import comfy.utils
    import nodes as comfy_nodes
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
    from steadydancer_turbo.steadydancer.sampling import context_windows as cwin
    out = {}
    ref, model, cond = reference(float_file()), native(float_file()), make_cond(frames=7)
    ctx = cwin.ContextOptions(window=3, overlap=1)
    out["windows_planned"] = [list(w) for w in ctx.windows(7)]
    g = sampling.Guidance(5.0, 1.0, 0.1, 0.4)
    pos, neg = comfy_conds(cond)
    lat7 = empty_latent(7)
    # the one-node samplers with the context input = sample_official / sample_rcm with context=
    (lat,) = sn.SteadyDancerSampler().sample(model, pos, neg, lat7, 7, 6, 5.0, 5.0, 1.0, 0.1, 0.4, "unipc",
                                             context=ctx)
    want = latents.denormalize(sampling.sample_official(ref, cond, seed=7, steps=6, shift=5.0, guidance=g,
                                                        context=ctx))
    out["windows_official_node_rel"] = rel(lat["samples"], want)
    out["windows_official_node_vs_no_windows_rel"] = rel(
        lat["samples"], latents.denormalize(sampling.sample_official(ref, cond, seed=7, steps=6, shift=5.0,
                                                                     guidance=g)))
    for schedule, mode in (("rcm", "sde"), ("shift", "ode")):
        (lat,) = sn.SteadyDancerTurboSampler().sample(model, pos, lat7, 11, 4, schedule, 5.0, 200.0, mode, context=ctx)
        want = latents.denormalize(rcm.sample_rcm(ref, cond, seed=11, steps=4, schedule=schedule, mode=mode,
                                                  context=ctx))
        out[f"windows_rcm_{schedule}_{mode}_node_rel"] = rel(lat["samples"], want)
    # SamplerCustomAdvanced with our pieces and core RandomNoise on a windowed MODEL (the Context Windows on Model
    # node) = sample_official(noise=that)
    from steadydancer_turbo.nodes.context_nodes import SteadyDancerApplyContextWindows
    (wm,) = SteadyDancerApplyContextWindows().apply(model, ctx)
    guider = ns.make_guider(wm, pos, neg, g)
    noise = Noise_RandomNoise(7).generate_noise(lat7)
    got = ns.sample_custom_advanced(guider, ns.native().FlowSampler("unipc"), sn.official_sigmas(6, 5.0), lat7, 7)
    want = latents.denormalize(sampling.sample_official(ref, cond, seed=7, steps=6, shift=5.0, guidance=g,
                                                        noise=noise, context=ctx))
    out["windows_custom_advanced_rel"] = rel(got["samples"], want)
    # the Noise (context windows) node: the windows' start draw when ctx makes several windows, core RandomNoise's
    # draw when the video fits one window
    from steadydancer_turbo.nodes.context_nodes import SteadyDancerContextNoise
    (cnoise,) = SteadyDancerContextNoise().get(7, ctx)
    out["context_noise_windowed_equal"] = bool(torch.equal(cnoise.generate_noise(lat7),
                                                           cwin.initial_window_noise((1, 16, 7, 4, 6), 7, ctx)))
    out["context_noise_windowed_differs_from_random"] = not torch.equal(cnoise.generate_noise(lat7), noise)
    lat3 = empty_latent(3)
    out["context_noise_one_window_equal"] = bool(torch.equal(cnoise.generate_noise(lat3),
                                                             Noise_RandomNoise(7).generate_noise(lat3)))
    # SamplerCustomAdvanced with that noise, BasicGuider on the windowed MODEL, the rCM SAMPLER and the turbo sigmas
    # (the long workflow's pieces) = sample_rcm with context=
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced
    res = SamplerCustomAdvanced.execute(cnoise, ns.basic_guider(wm, pos), ns.native().RCMSampler("sde", "float32"),
                                        sn.rcm_sigmas(4, "shift", 5.0, 200.0), lat7).result[0]
    want = latents.denormalize(rcm.sample_rcm(ref, cond, seed=7, steps=4, schedule="shift", mode="sde", context=ctx))
    out["windows_long_workflow_pieces_rel"] = rel(res["samples"], want)
    # KSampler on the windowed MODEL: every step runs the DiT per window (cond + uncond batched or not)
    calls, undo = count_blocks(wm)
    (ks,) = comfy_nodes.common_ksampler(wm, 5, 3, 4.0, "euler", "simple", pos, neg, lat7)
    undo()
    out["windows_ksampler_shape"] = list(ks["samples"].shape)
    out["windows_ksampler_finite"] = bool(torch.isfinite(ks["samples"]).all())
    out["windows_ksampler_block_runs"] = len(calls)
    # progress per window pass (turbo: 4 steps x 3 windows) and interrupt after a window pass
    seen = install_progress_hook()
    try:
        INTERRUPT[0] = False
        sn.SteadyDancerTurboSampler().sample(model, pos, lat7, 11, 4, "shift", 5.0, 200.0, "sde", context=ctx)
        out["windows_progress"] = list(seen[-1][:2]) if seen else None
        out["windows_progress_updates"] = len(seen)
        seen.clear()
        INTERRUPT[0] = True
        calls, undo = count_blocks(model)
        try:
            sn.SteadyDancerTurboSampler().sample(model, pos, lat7, 11, 4, "shift", 5.0, 200.0, "sde", context=ctx)
            out["windows_interrupt_raised"] = False
        except mm.InterruptProcessingException:
            out["windows_interrupt_raised"] = True
        undo()
        out["windows_interrupt_block_runs"] = len(calls)
    finally:
        INTERRUPT[0] = False
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
    return out


CHECKS = {"free": check_free, "official": check_official, "deferred_pose": check_deferred_pose, "rcm": check_rcm, "ksampler": check_ksampler, "lora": check_lora,
          "lora_fp8": lambda: native_lora_fp8_checks.check_lora_fp8(sys.modules[__name__]),
          "compose": check_compose, "windows": check_windows}

if __name__ == "__main__":
    results = {}
    for name in (os.environ.get("SD_CHECKS") or ",".join(CHECKS)).split(","):
        try:
            results.update(CHECKS[name]())
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            import traceback
            results[f"{name}_error"] = "".join(traceback.format_exception(e))[-3000:]
    results["device"] = str(mm.get_torch_device())
    print("NATIVE_RESULTS " + json.dumps(results))
