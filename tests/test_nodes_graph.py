"""Both shipped API graphs executed through our node functions on CPU, with tiny real-format models.

Our nodes run for real: DWPose on tiny ONNX models with the real I/O layout, retargeting, the conditioning
node, the model loader reading a tiny SteadyDancer .safetensors (official key names), a real-format LoRA file
for the turbo graph, and both samplers. The ComfyUI core nodes around them are replaced by stand-ins that
return what ComfyUI 0.33 returns (see test_nodes_support.py). The LATENT must have the Wan2.1 shape and be in
ComfyUI's convention: the core sampler's normalized result de-normalized with ComfyUI's own Wan21 constants.
"""
from __future__ import annotations

import copy
import importlib
import json
import pathlib

import numpy as np
import pytest
import torch

from test_nodes_support import FakeWanVAE, clip_vision_output, comfy_process_out, text_conditioning

pytest.importorskip("onnx")
pytest.importorskip("steadydancer_turbo.steadydancer.model.dit")
pytest.importorskip("steadydancer_turbo.steadydancer.weights.loader")
pytest.importorskip("steadydancer_turbo.steadydancer.sampling.official")
pytest.importorskip("steadydancer_turbo.turbo.rcm")
pytest.importorskip("steadydancer_turbo.dwpose.pipeline")
M = pytest.importorskip("dwpose_onnx_models")  # tiny ONNX builders shared with the DWPose tests

from safetensors.torch import save_file  # noqa: E402

pack = importlib.import_module("steadydancer_turbo")
cb = importlib.import_module("steadydancer_turbo.nodes.comfy_bridge")
from steadydancer_turbo.steadydancer.sampling import official as sampling  # noqa: E402
from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig  # noqa: E402
from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT  # noqa: E402
from steadydancer_turbo.turbo import rcm  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
W, H, FRAMES = 32, 48, 9  # output size and frames for the test runs (latent 16 x 3 x 6 x 4)
SRC_W, SRC_H = 48, 64  # reference / driving frames

# A standing figure in the pose model's 288x384 crop (COCO-17), hands and face planted around wrists / nose.
BODY = [(144, 60), (152, 52), (136, 52), (160, 56), (128, 56), (176, 100), (112, 100), (196, 150), (92, 150),
        (204, 200), (84, 200), (164, 200), (124, 200), (166, 270), (122, 270), (168, 340), (120, 340)]


def _simcc():
    pts = list(BODY)
    pts += [(168 + i, 350) for i in range(3)] + [(120 - i, 350) for i in range(3)]  # feet 17-22
    pts += [(134 + (i % 10) * 2, 50 + (i // 10) * 3) for i in range(68)]  # face 23-90
    pts += [(204 + (i % 5), 204 + i) for i in range(21)]  # left hand 91-111
    pts += [(84 - (i % 5), 204 + i) for i in range(21)]  # right hand 112-132
    sx = np.full((133, 576), -1.0, np.float32)
    sy = np.full((133, 768), -1.0, np.float32)
    for k, (x, y) in enumerate(pts):
        sx[k, 2 * x] = 1.0
        sy[k, 2 * y] = 0.9
    return sx, sy


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    r = min(640 / SRC_H, 640 / SRC_W)
    box = np.array([6, 4, 42, 62], np.float64)  # the person in the 48x64 frames
    raw = M.yolox_raw([box * r], [0.9], [np.eye(80)[0] * 0.9])
    (d / "yolox_l.onnx").write_bytes(M.gated_detector(raw))
    (d / "dw-ll_ucoco_384.onnx").write_bytes(M.planted_pose(*_simcc()))

    torch.manual_seed(0)
    dit = SteadyDancerDiT(SteadyDancerConfig.tiny(text_dim=4096)).eval()
    with torch.no_grad():  # zero-initialised heads would make every output 0; use small random values
        for p in dit.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(d / "steadydancer_tiny.safetensors"))

    g = torch.Generator().manual_seed(1)
    q = dit.blocks[0].self_attn.q
    lora = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, q.in_features, generator=g) * 0.1,
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(q.out_features, 4, generator=g) * 0.1,
            "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0)}
    save_file(lora, str(d / "lora_tiny.safetensors"))
    return d


class FakeCore:
    """ComfyUI core nodes of the graphs, returning ComfyUI 0.33-shaped values."""

    def __init__(self):
        self.saved, self.previews = [], []
        g = torch.Generator().manual_seed(7)
        self.reference = torch.rand(1, SRC_H, SRC_W, 3, generator=g)
        self.video = torch.rand(40, SRC_H, SRC_W, 3, generator=g)  # 40 frames at 24 fps -> 26 at 16 fps -> 9 used
        self.vae = FakeWanVAE(3)

    def run(self, cls, inp):
        if cls == "LoadImage":
            return (self.reference, torch.zeros(1, SRC_H, SRC_W))
        if cls == "LoadVideo":
            return ("VIDEO",)
        if cls == "GetVideoComponents":
            return (self.video, None, 24.0, 8, "sRGB")
        if cls in ("CLIPLoader", "CLIPVisionLoader"):
            return (cls,)
        if cls == "VAELoader":
            return (self.vae,)
        if cls == "CLIPTextEncode":
            return (text_conditioning(min(512, len(inp["text"].split())), seed=len(inp["text"])),)
        if cls == "CLIPVisionEncode":
            assert inp["crop"] == "none"
            return (clip_vision_output(seed=int(inp["image"].sum() * 1000) % 1000, batch=inp["image"].shape[0]),)
        if cls == "ImageFromBatch":
            i, n = inp["batch_index"], inp["length"]
            return (inp["image"][i:i + n],)
        if cls == "VAEDecode":
            images = inp["vae"].decode(inp["samples"]["samples"])
            return (images.reshape(-1, *images.shape[-3:]),)
        if cls == "CreateVideo":
            return ((inp["images"], inp["fps"]),)
        if cls == "SaveVideo":
            self.saved.append(inp["video"])
            return ()
        if cls == "PreviewImage":
            self.previews.append(inp["images"])
            return ()
        raise KeyError(cls)


def run_graph(api: dict, core: FakeCore):
    outputs = {}

    def ev(nid):
        if nid in outputs:
            return outputs[nid]
        node = api[nid]
        inp = {}
        for k, v in node["inputs"].items():
            inp[k] = ev(v[0])[v[1]] if isinstance(v, list) else v
        cls = node["class_type"]
        if cls in pack.NODE_CLASS_MAPPINGS:
            c = pack.NODE_CLASS_MAPPINGS[cls]
            if "hidden" in c.INPUT_TYPES():
                inp["unique_id"] = nid
            outputs[nid] = getattr(c(), c.FUNCTION)(**inp)
        else:
            outputs[nid] = core.run(cls, inp)
        return outputs[nid]

    for nid in api:
        ev(nid)
    return outputs


def prepare(name, models, steps=None):
    api = json.loads((ROOT / "workflows_api" / f"{name}.json").read_text())
    api = copy.deepcopy(api)
    for node in api.values():
        i, c = node["inputs"], node["class_type"]
        if c == "SteadyDancerModelLoader":
            i["model_name"] = str(models / "steadydancer_tiny.safetensors")
            i["compute_dtype"] = "fp32"
        elif c == "SteadyDancerLoraLoader":
            i["lora_name"] = str(models / "lora_tiny.safetensors")
        elif c == "SteadyDancerPoseExtract":
            i["detector"] = str(models / i["detector"])
            i["estimator"] = str(models / i["estimator"])
            i["providers"] = "cpu"
        elif c == "SteadyDancerPoseRetarget":
            i.update(width=W, height=H)
        elif c == "SteadyDancerResampleFrames":
            i["max_frames"] = FRAMES
        elif c in ("SteadyDancerOfficialSigmas", "SteadyDancerTurboSigmas") and steps:
            i["steps"] = steps
    return api


def _ids(api, cls):
    return [k for k, v in api.items() if v["class_type"] == cls]


# nodes that need ComfyUI's model management / samplers (they run in tests/integration)
NEEDS_COMFY = ("SteadyDancerModelLoader", "SteadyDancerLoraLoader", "SteadyDancerGuider", "SteadyDancerSamplerUniPC",
               "SteadyDancerSamplerRCM", "SteadyDancerApplyContextWindows", "SteadyDancerContextNoise", "RandomNoise",
               "BasicGuider", "SamplerCustomAdvanced", "VAEDecode", "CreateVideo", "SaveVideo")


@pytest.mark.parametrize("name", ["steadydancer-dance", "steadydancer-turbo"])
def test_shipped_graph_runs_on_tiny_models(name, models):
    """Everything up to SamplerCustomAdvanced runs here (the sigmas too); the MODEL, LoRA, guider, SAMPLER and
    SamplerCustomAdvanced need ComfyUI's model management and run in tests/integration (test_comfyui_workflows.py,
    test_comfyui_native.py)."""
    official = name == "steadydancer-dance"
    api = prepare(name, models)
    core = FakeCore()
    out = run_graph({k: v for k, v in api.items() if v["class_type"] not in NEEDS_COMFY}, core)

    # poses: one person per frame, drawn at the reference size, negatives differ from positives
    for nid in _ids(api, "SteadyDancerPoseExtract"):
        poses, img = out[nid]
        assert all(len(p["people"]) == 1 for p in poses)
        assert img.ndim == 4 and img.shape[-1] == 3 and img.max() > 0
    ref, pos, neg, aligned = out[_ids(api, "SteadyDancerPoseRetarget")[0]]
    assert ref.shape == (1, H, W, 3)
    assert pos.shape == (FRAMES, H, W, 3) and neg.shape == pos.shape
    assert pos.max() > 0 and not torch.equal(pos, neg)
    # the pose preview shows exactly the retargeted pose frames the conditioning node gets
    (shown,) = core.previews
    assert shown is pos

    cid = _ids(api, "SteadyDancerConditioning")[0]
    positive, negative, latent, w, h, n = out[cid]
    assert (w, h, n) == (W, H, FRAMES)
    assert latent["samples"].shape == (1, 16, 3, H // 8, W // 8)
    from steadydancer_turbo.nodes import native_model as nm
    # the dance graph feeds negative poses (pose guidance); the turbo graph has no use for them
    assert (nm.KEY_POSE_NEG in positive[0][1]) == official

    # SamplerCustomAdvanced samples into the conditioning node's latent with its positive (and negative)
    (sca,) = _ids(api, "SamplerCustomAdvanced")
    node = api[sca]["inputs"]
    assert node["latent_image"] == [cid, 2]
    guider = api[node["guider"][0]]
    assert guider["class_type"] == ("SteadyDancerGuider" if official else "BasicGuider")
    gi = guider["inputs"]
    assert gi.get("positive", gi.get("conditioning")) == [cid, 0]
    assert gi.get("negative", [cid, 1]) == [cid, 1]
    model_src = api[gi["model"][0]]["class_type"]
    assert model_src == ("SteadyDancerModelLoader" if official else "SteadyDancerLoraLoader")
    # the sigmas: official 40 steps ending in 0; turbo = the lightx2v shift formula on a uniform grid (float64)
    (sigmas,) = out[node["sigmas"][0]]
    if official:
        assert len(sigmas) == 41 and float(sigmas[-1]) == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    else:
        u = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
        want = torch.cat([5 * u / (1 + 4 * u), torch.zeros(1, dtype=torch.float64)]).float()
        torch.testing.assert_close(sigmas, want, rtol=0, atol=1e-7)


def test_loader_options_and_speed_options(models):
    """attention / sparse_topk reach the loaded module (flex_sparse -> a top-k backend for self-attention); the
    choices offer auto/sdpa and only importable kernels; memory placement options are ComfyUI's now."""
    from steadydancer_turbo.steadydancer.weights import loader
    from steadydancer_turbo.steadydancer.kernels.attention import available_backends
    mn = pack.nodes.model_nodes
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerModelLoader"]()
    req = node.INPUT_TYPES()["required"]
    choices = req["attention"][0]
    assert choices[:2] == ["auto", "sdpa"] and req["attention"][1]["default"] == "auto"
    # every choice can run here, except int8_sparse and sage, listed always (refused with what is missing)
    assert all(c in available_backends() for c in choices if c not in mn.ALWAYS_LISTED) and choices[-1] == "sage"
    assert list(req) == ["model_name", "weight_storage", "compute_dtype", "attention", "sparse_topk", "fp8_matmul",
                         "compile"]
    module = loader.load_steadydancer(str(models / "steadydancer_tiny.safetensors"), compute_dtype="fp32",
                                      device="cpu")
    mn.apply_speed_options(module, mn.LoadOptions(attention="auto"))
    assert module.attention_backend == "auto"
    if "flex_sparse" in choices:
        mn.apply_speed_options(module, mn.LoadOptions(attention="flex_sparse", sparse_topk=0.2))
        assert module.attention_backend == "flex_sparse:0.2"


LONG = 25  # the fake driving video gives 26 frames at 16 fps -> 25 (4n+1) = 7 latent frames


def _long_api(models, window=9, overlap=4, strength=1.0):
    api = prepare("steadydancer-long", models)
    for nid in _ids(api, "SteadyDancerResampleFrames"):
        api[nid]["inputs"]["max_frames"] = 161          # the shipped default: all 26 frames, trimmed to 25
    (ctx,) = _ids(api, "SteadyDancerContextOptions")
    api[ctx]["inputs"].update(window_frames=window, overlap_frames=overlap)
    (guard,) = _ids(api, "SteadyDancerColourGuard")
    api[guard]["inputs"]["strength"] = strength
    return api


def test_long_graph_runs_up_to_the_sampler_with_its_windows(models):
    """The shipped long graph on the native wires with 9-frame windows (3 latent) overlapping by 4 frames: 25
    frames -> 7 latent frames -> windows (0,3) (2,5) (4,7); SamplerCustomAdvanced gets the conditioning node's
    positive/latent, the LoRA'd MODEL through Context Windows on Model, the noise and the Colour Guard the same options. The
    windowed sampling itself (every window, exact frame count, interrupt per window pass) runs in real ComfyUI
    (tests/integration/test_comfyui_workflows.py, test_comfyui_native.py)."""
    api = _long_api(models)
    out = run_graph({k: v for k, v in api.items() if v["class_type"] not in NEEDS_COMFY + ("SteadyDancerColourGuard",)},
                    FakeCore())
    cid = _ids(api, "SteadyDancerConditioning")[0]
    positive, negative, latent, w, h, n = out[cid]
    assert n == LONG and latent["samples"].shape == (1, 16, 7, H // 8, W // 8)
    (ctx_id,) = _ids(api, "SteadyDancerContextOptions")
    (opts,) = out[ctx_id]
    assert (opts.window, opts.overlap) == (3, 1) and opts.windows(7) == [(0, 3), (2, 5), (4, 7)]
    (sca,) = _ids(api, "SamplerCustomAdvanced")
    node = api[sca]["inputs"]
    assert node["latent_image"] == [cid, 2]
    assert api[node["noise"][0]]["inputs"]["context"] == [ctx_id, 0]               # the windows' own noise
    guider = api[node["guider"][0]]["inputs"]
    assert guider["conditioning"] == [cid, 0]
    windowed = api[guider["model"][0]]
    assert windowed["class_type"] == "SteadyDancerApplyContextWindows" and windowed["inputs"]["context"] == [ctx_id, 0]
    assert api[windowed["inputs"]["model"][0]]["class_type"] == "SteadyDancerLoraLoader"
    guard = api[_ids(api, "SteadyDancerColourGuard")[0]]["inputs"]
    assert guard["context"] == [ctx_id, 0]
