"""check_lora_fp8 of native_checks.py (issue 15), in its own file: ComfyUI LoRA patches on fp8-matmul layers as
low-rank side terms, in ComfyUI's own process. ``h`` is the native_checks module (its helpers: ``native``,
``native_x0``, ``quant_file``, ``lora_file``, ``model_inputs``, ``rel``, ``TMP``, ``LOWVRAM_STATE``, ``U``,
``mm``); the test is test_comfyui_native.py."""
from __future__ import annotations

import torch


def diff_lora_file(h):
    """A LoRA with a full difference ("diff") on the weight of one fp8 Linear (blocks.0.self_attn.k)."""
    from safetensors.torch import save_file
    p = h.TMP / "loras" / "diff_on_fp8_layer.safetensors"
    if not p.exists():
        p.parent.mkdir(exist_ok=True)
        dim = h.U.CFG["dim"]
        g = torch.Generator().manual_seed(11)
        save_file({"diffusion_model.blocks.0.self_attn.k.diff": torch.randn(dim, dim, generator=g) * 0.01}, str(p))
    return str(p)


def check_lora_fp8(h):
    """fp8_matmul requested (issue 15): core LoraLoaderModelOnly patches on fp8 layers become low-rank side terms.
    The CPU has no fp8 tensor cores, so the layers fall back exactly as before (checked bit for bit); then a test
    hook makes the fp8 path run with the float product of the stored operands (``emulate``), so the side terms are
    compared alone with ComfyUI's merged-weight output (the same MODEL without the option)."""
    import comfy.lora
    import folder_paths
    import nodes as comfy_nodes
    from steadydancer_turbo.steadydancer.kernels import fp8_linear as f8
    from steadydancer_turbo.steadydancer.weights.quant import QuantLinear, dequantize_fp8
    folder_paths.add_model_folder_path("loras", str(h.TMP / "loras"))
    h.lora_file(True), diff_lora_file(h)
    loader_node = comfy_nodes.LoraLoaderModelOnly()
    cond, x, sigma = h.model_inputs()
    out = {}
    base = h.native(h.quant_file("fp8"))
    dit = base.model.diffusion_model
    fp8 = {f"diffusion_model.{n}.weight": m for n, m in dit.named_modules()
           if isinstance(m, QuantLinear) and m.fp8_matmul_capable()}

    def with_lora(strength, diff=False):
        (m,) = loader_node.load_lora_model_only(base, "lightx2v_layout.safetensors", strength)
        if diff:
            (m,) = loader_node.load_lora_model_only(m, "diff_on_fp8_layer.safetensors", 1.0)
        return m

    def host_terms():
        return sum(1 for n, _ in dit.named_buffers() if "host_lowrank" in n)

    strengths = (1.0, 0.5)
    merged = {s: h.native_x0(with_lora(s), cond, x, sigma) for s in strengths}   # fp8_matmul off: today's path
    merged["diff"] = h.native_x0(with_lora(1.0, True), cond, x, sigma)
    out["lora_fp8mm_off_host_terms"] = host_terms()
    plain = h.native_x0(base, cond, x, sigma)
    for m in fp8.values():  # the Model Loader's fp8_matmul, as it sets it on a GPU with fp8 tensor cores
        m.fp8_matmul = True
    merged_keys, mm_calls = [], []
    orig_calc, orig_supported, orig_mm = comfy.lora.calculate_weight, f8.fp8_matmul_supported, f8.scaled_mm_linear

    def counting_calc(patches, weight, key, *a, **k):
        merged_keys.append(key)
        return orig_calc(patches, weight, key, *a, **k)

    def emulated_mm(x, w, scale, bias, act_scaling, fast_accum, cd):
        mm_calls.append(1)
        return torch.nn.functional.linear(x, dequantize_fp8(w, scale, cd), None if bias is None else bias.to(cd))

    def emulate(on):
        f8.fp8_matmul_supported = (lambda device=None: True) if on else orig_supported
        f8.scaled_mm_linear = emulated_mm if on else orig_mm

    comfy.lora.calculate_weight = counting_calc
    try:
        for s in strengths:
            tag = f"s{s}"
            model = with_lora(s)
            lora_keys = sorted(k for k in model.patches if k in fp8)
            merged_keys.clear()
            got = h.native_x0(model, cond, x, sigma)           # CPU: fp8 matmul unavailable -> exact path as today
            out[f"lora_fp8mm_{tag}_cpu_fallback_equal"] = bool(torch.equal(got, merged[s]))
            out[f"lora_fp8mm_{tag}_cpu_merged_lora_layers"] = len(set(merged_keys) & set(lora_keys))
            # ComfyUI's memory checks count the terms: model_size() = the module's size as loaded now
            out[f"lora_fp8mm_{tag}_model_size"] = [model.model_size() == h.mm.module_size(model.model),
                                                   model.model_size() - base.model_size()]
            ok = []
            for k in lora_keys:                               # registered from the core patches, ComfyUI's scale
                lin = fp8[k]
                (strength, adapter, *_), = model.patches[k]
                up, down, alpha = adapter.weights[:3]
                scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
                ok.append(lin._host_rank == down.shape[0] and torch.allclose(
                    lin.host_lowrank_up.double(), up.double() * scale, rtol=1e-6, atol=1e-9)
                    and torch.equal(lin.host_lowrank_down, down.to(lin.compute_dtype)))
            out[f"lora_fp8mm_{tag}_terms_registered"] = [len(lora_keys), all(ok)]
            emulate(True)
            try:
                merged_keys.clear(), mm_calls.clear()
                got = h.native_x0(model, cond, x, sigma)
                out[f"lora_fp8mm_{tag}_side_terms_rel"] = h.rel(got, merged[s])
                out[f"lora_fp8mm_{tag}_merged_lora_layers"] = len(set(merged_keys) & set(lora_keys))
                out[f"lora_fp8mm_{tag}_fp8_calls"] = len(mm_calls)
                got = h.native_x0(model, cond, x, sigma, lowvram=200_000)
                out[f"lora_fp8mm_{tag}_lowvram_was_partial"] = h.LOWVRAM_STATE.get("partial")
                out[f"lora_fp8mm_{tag}_lowvram_rel"] = h.rel(got, merged[s])
            finally:
                emulate(False)
        out["lora_fp8mm_strengths_differ_rel"] = h.rel(merged[0.5], merged[1.0])
        # a full difference on one fp8 layer (a second LoRA): that layer keeps the exact merge, the others the terms
        model = with_lora(1.0, True)
        k_key = "diffusion_model.blocks.0.self_attn.k.weight"
        emulate(True)
        try:
            merged_keys.clear()
            got = h.native_x0(model, cond, x, sigma)
            out["lora_fp8mm_diff_layer_exact"] = [fp8[k_key]._host_rank is None, k_key in merged_keys,
                                                  sum(m._host_rank is not None for m in fp8.values())]
            out["lora_fp8mm_diff_rel"] = h.rel(got, merged["diff"])
            h.mm.unload_all_models()                            # unpatch_model: nothing left
            out["lora_fp8mm_after_unpatch"] = [host_terms(), sum(m.weight_patch_fn is not None for m in fp8.values()),
                                               h.mm.module_size(base.model) == base.model_size()]
            out["lora_fp8mm_base_after_equal"] = bool(torch.equal(h.native_x0(base, cond, x, sigma), plain))
        finally:
            emulate(False)
    finally:
        comfy.lora.calculate_weight = orig_calc
        h.mm.unload_all_models()
    return out
