"""Model files for bench/comfy_e2e.py: every file the shipped UI workflows list in ``properties.models``, written
with random weights in the real format and the real key set, into a ComfyUI models tree ``DIR/<directory>/<name>``,
plus the driving video and the reference image in ``DIR/input``.

Full size (``make_full``), random values small enough that nothing overflows:
* SteadyDancer DiT (``diffusion_models``): bench/loader_formats.py's streaming writer over the pack's own 14B
  shapes: Kijai's fp8 e4m3fn scaled layout (block Linear weights fp8 + a float32 ``scale_weight`` each, the rest
  bf16, 16.4 GB) and, with ``--dit bf16`` / ``both``, an all-bf16 file (32.8 GB) under ``BF16_DIT_NAME``.
* umt5-xxl (``text_encoders``): the key set of ComfyUI's own ``comfy.text_encoders.t5.T5`` built on the meta device
  from its ``umt5_config_xxl.json``; the block Linear weights fp8 e4m3fn with a float32 ``scale_weight`` each, the
  rest bf16, the top-level ``scaled_fp8`` marker (an empty fp8 tensor: ``comfy.utils.convert_old_quants`` turns
  that layout into its mixed fp8 ops) and the ``spiece_model`` tokenizer tensor that Comfy-Org's file carries
  (``comfy.text_encoders.wan`` reads the tokenizer from it). The tokenizer is a small SentencePiece model trained
  here (no network): tokenization cost is negligible; the 512-token padded encode has the real cost.
* clip_vision_h (``clip_vision``): ``comfy.clip_model.CLIPVisionModelProjection`` with ComfyUI's
  ``clip_vision_config_h.json``, fp16 (as Comfy-Org's file).
* Wan 2.1 VAE (``vae``): ``comfy.ldm.wan.vae.WanVAE`` at the real width (dim 96), bf16.
* lightx2v rank-64 step-distill LoRA (``loras``): ``diffusion_model.<module>.lora_down/lora_up/alpha`` over every
  block Linear of the DiT, ``diff_b`` for their biases, ``diff`` for the blocks' norm weights, ``diff_m`` for their
  modulation (the layout tests/test_loader_lora.py calls 'kijai'); up ~ N(0, 0.002) so
  the merged delta is ~1e-4 (finite outputs).
* DWPose (``dwpose``): bench/dwpose_speed.py's YOLOX-L / DWPose-L sized ONNX stand-ins (the real graph cost), each
  with a planted output (one person box; one whole-body skeleton) so every frame has a person.

Tiny (``make_tiny``, CPU): the real-ComfyUI tests' tiny models (tests/integration/comfyui_harness.ModelShelf); umt5
and CLIP vision are empty placeholders (the tiny runs swap their encode nodes for the test fixture pack's).
"""
from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys
import time

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent
UI_DIR = ROOT / "example_workflows"
WORKFLOWS = ("steadydancer-turbo", "steadydancer-dance")
BF16_DIT_NAME = "SteadyDancer_14B_bf16_random.safetensors"     # bench-only: no shipped workflow names a bf16 DiT
LORA_RANK = 64
VIDEO = dict(width=832, height=480, frames=81, fps=16)
INPUTS = ("reference.png", "dance.mp4")           # the cold queue's inputs; the warm queue uploads *_warm copies


def _load(name, path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def workflow_models(workflows=WORKFLOWS):
    """[(directory, name)] of every ``properties.models`` entry of the shipped UI workflows, in order, once each."""
    out = []
    for wf in workflows:
        data = json.loads((UI_DIR / f"{wf}.json").read_text())
        for node in data.get("nodes", []):
            for m in (node.get("properties") or {}).get("models", []) or []:
                if (m["directory"], m["name"]) not in out:
                    out.append((m["directory"], m["name"]))
    return out


def kind_of(directory, name):
    n = name.lower()
    if n.endswith(".onnx"):
        return "det" if ("yolo" in n or "det" in n) else "pose"
    return {"diffusion_models": "dit", "unet": "dit", "loras": "lora", "vae": "vae", "text_encoders": "umt5",
            "clip": "umt5", "clip_vision": "clip_vision"}.get(directory)


def dit_name(models):
    names = [n for d, n in models if kind_of(d, n) == "dit"]
    if len(names) != 1:
        raise SystemExit(f"the shipped workflows list {len(names)} DiT files ({names}); expected one")
    return names[0]


# ------------------------------------------------------------------------------------------------ media
def person_frame(width, height, t=0.0):
    """RGB uint8 frame: a person-like figure (head, torso, arms, legs) on a dim background; ``t`` in [0, 1) moves
    the arms and sways the body."""
    import numpy as np
    import cv2

    img = np.full((height, width, 3), (40, 45, 55), np.uint8)
    s = height / 480.0
    cx = int(width / 2 + 0.08 * width * math.sin(2 * math.pi * t))
    col, skin = (200, 80, 60), (235, 200, 175)
    head_y, neck_y, hip_y, foot_y = int(70 * s), int(120 * s), int(290 * s), int(450 * s)
    cv2.circle(img, (cx, head_y), int(32 * s), skin, -1)
    cv2.rectangle(img, (cx - int(45 * s), neck_y), (cx + int(45 * s), hip_y), col, -1)
    a = 0.9 * math.sin(2 * math.pi * t)
    for side in (-1, 1):
        sh = (cx + side * int(45 * s), neck_y + int(10 * s))
        el = (sh[0] + side * int(60 * s * math.cos(a)), sh[1] + int(60 * s * math.sin(side * a) + 40 * s))
        wr = (el[0] + side * int(50 * s), el[1] - int(40 * s * math.sin(a)))
        cv2.line(img, sh, el, skin, max(2, int(18 * s)))
        cv2.line(img, el, wr, skin, max(2, int(16 * s)))
        hp = (cx + side * int(25 * s), hip_y)
        kn = (hp[0] + side * int(15 * s), hip_y + int(80 * s))
        cv2.line(img, hp, kn, (50, 60, 150), max(2, int(24 * s)))
        cv2.line(img, kn, (kn[0] + side * int(10 * s), foot_y), (50, 60, 150), max(2, int(22 * s)))
    return img


def write_media(input_dir, width=VIDEO["width"], height=VIDEO["height"], frames=VIDEO["frames"], fps=VIDEO["fps"]):
    """reference.png and an H.264 dance.mp4 (PyAV), plus byte-identical *_warm copies for the warm queue."""
    import shutil

    import av
    from PIL import Image

    input_dir = pathlib.Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    img, vid = input_dir / INPUTS[0], input_dir / INPUTS[1]
    Image.fromarray(person_frame(width, height, 0.0)).save(img)
    with av.open(str(vid), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            for pkt in s.encode(av.VideoFrame.from_ndarray(person_frame(width, height, i / 24.0), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    for p in (img, vid):
        shutil.copyfile(p, warm_name(p))
    return img, vid


def warm_name(path):
    p = pathlib.Path(path)
    return p.with_name(f"{p.stem}_warm{p.suffix}")


# ------------------------------------------------------------------------------------------------ tiny
def make_tiny(models_dir, comfyui, python):
    """The integration tests' tiny models under the workflows' names; returns {relative path: note}."""
    _load("sd_e2e_loader_formats", BENCH / "loader_formats.py")._import_pack()    # steadydancer_turbo.*
    harness = _load("sd_e2e_harness", ROOT / "tests" / "integration" / "comfyui_harness.py")
    root = pathlib.Path(models_dir)
    shelf = harness.ModelShelf(root, comfyui, python, cache=root / ".tiny_cache")
    done = {}
    for directory, name in workflow_models():
        dst = shelf.place(directory, name)
        if dst is None:
            if shelf.kind_of(directory, name) is not None:
                raise SystemExit(f"building the tiny model for {directory}/{name} failed: {shelf.errors}")
            (root / directory).mkdir(parents=True, exist_ok=True)
            (root / directory / name).write_bytes(b"")
            done[f"{directory}/{name}"] = "empty placeholder (tiny runs use the fixture encoder nodes)"
        else:
            done[f"{directory}/{name}"] = "tiny"
    import shutil
    shutil.rmtree(shelf.cache, ignore_errors=True)
    (root / "input").mkdir(parents=True, exist_ok=True)
    harness.models.build_media(root / "input" / INPUTS[0], root / "input" / INPUTS[1])
    for p in INPUTS:
        shutil.copyfile(root / "input" / p, warm_name(root / "input" / p))
    return done


# ------------------------------------------------------------------------------------------------ full size
def _gen_device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _rand_like_param(name, shape, dev, gen):
    """Small random values: >= 2-D ~ N(0, 1/fan_in); norm weights ~ 1; other 1-D (biases, embeddings) N(0, 0.02)."""
    import torch
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, device=dev, generator=gen) / math.sqrt(fan_in)
    low = name.lower()
    if any(w in low for w in ("norm", "gamma", "layer_norm", "ln_")) and name.endswith(("weight", "gamma")):
        return 1.0 + 0.02 * torch.randn(shape, device=dev, generator=gen)
    return 0.02 * torch.randn(shape, device=dev, generator=gen)


def _fp8_scaled(w):
    import torch
    scale = (w.abs().amax().float() / 448.0).clamp_min(1e-12)
    return (w / scale).to(torch.float8_e4m3fn), scale.reshape(()).float()


def _save(sd, path, metadata=None):
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    save_file({k: v.contiguous().cpu() for k, v in sd.items()}, str(tmp), metadata=metadata or {"format": "pt"})
    tmp.replace(path)


def _comfy(comfyui):
    if str(comfyui) not in sys.path:
        sys.path.insert(0, str(comfyui))
    import torch
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.ops
    return comfy


def meta_shapes(make):
    import torch
    with torch.device("meta"):
        m = make()
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def umt5_shapes(comfyui):
    comfy = _comfy(comfyui)
    import torch
    import comfy.text_encoders.t5 as t5
    cfg = json.loads((pathlib.Path(comfyui) / "comfy" / "text_encoders" / "umt5_config_xxl.json").read_text())
    return meta_shapes(lambda: t5.T5(cfg, torch.bfloat16, torch.device("meta"), comfy.ops.disable_weight_init))


def clip_vision_shapes(comfyui):
    comfy = _comfy(comfyui)
    import torch
    import comfy.clip_model
    cfg = json.loads((pathlib.Path(comfyui) / "comfy" / "clip_vision_config_h.json").read_text())
    return meta_shapes(lambda: comfy.clip_model.CLIPVisionModelProjection(cfg, torch.float16, torch.device("meta"),
                                                                           comfy.ops.disable_weight_init))


def vae_shapes(comfyui):
    _comfy(comfyui)
    import comfy.ldm.wan.vae as wan_vae
    return meta_shapes(lambda: wan_vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                              attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0))


def spiece_model_bytes(vocab=4000):
    """A SentencePiece model trained on generated text (stands in for umt5's 256k-piece tokenizer)."""
    import io
    import random

    import sentencepiece as spm
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(6000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(4000)]
    for wf in WORKFLOWS:                          # the workflows' own prompts, so they tokenize naturally
        for node in json.loads((ROOT / "workflows_api" / f"{wf}.json").read_text()).values():
            t = node.get("inputs", {}).get("text")
            if isinstance(t, str):
                lines += [t] * 20
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab,
                                   character_coverage=1.0, hard_vocab_limit=False, model_type="unigram",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return out.getvalue()


UMT5_FP8 = (".SelfAttention.q.weight", ".SelfAttention.k.weight", ".SelfAttention.v.weight", ".SelfAttention.o.weight",
            ".DenseReluDense.wi_0.weight", ".DenseReluDense.wi_1.weight", ".DenseReluDense.wo.weight")


def write_umt5(path, comfyui, seed=11):
    import numpy as np
    import torch
    dev = _gen_device()
    gen = torch.Generator(device=dev).manual_seed(seed)
    sd = {}
    for k, shape in umt5_shapes(comfyui).items():
        w = _rand_like_param(k, shape, dev, gen)
        if k.startswith("encoder.block.") and k.endswith(UMT5_FP8):
            sd[k], sd[k[: -len(".weight")] + ".scale_weight"] = _fp8_scaled(w)
        else:
            sd[k] = w.to(torch.bfloat16)
        del w
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    sd["spiece_model"] = torch.from_numpy(np.frombuffer(spiece_model_bytes(), dtype=np.uint8).copy())
    _save(sd, path)


def write_plain(path, shapes, dtype, seed):
    import torch
    dev = _gen_device()
    gen = torch.Generator(device=dev).manual_seed(seed)
    _save({k: _rand_like_param(k, s, dev, gen).to(dtype) for k, s in shapes.items()}, path)


def dit_shapes():
    lf = _load("sd_e2e_loader_formats", BENCH / "loader_formats.py")
    lf._import_pack()
    from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
    return lf, lf.shapes(SteadyDancerConfig.full_14b())


def write_dit(path, fp8):
    lf, shp = dit_shapes()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    lf.write_safetensors_stream(tmp, shp, _gen_device(), fp8=fp8)
    tmp.replace(path)


def write_lora(path, seed=12):
    import torch
    _, shp = dit_shapes()
    dev = _gen_device()
    gen = torch.Generator(device=dev).manual_seed(seed)
    sd = {}
    for k, s in shp.items():
        if not (k.startswith("blocks.") and k.endswith(".weight")):
            continue
        mod = "diffusion_model." + k[: -len(".weight")]
        if len(s) == 2:
            sd[mod + ".lora_down.weight"] = (torch.randn(LORA_RANK, s[1], device=dev, generator=gen) / math.sqrt(s[1])
                                             ).to(torch.bfloat16)
            sd[mod + ".lora_up.weight"] = (0.002 * torch.randn(s[0], LORA_RANK, device=dev, generator=gen)
                                           ).to(torch.bfloat16)
            sd[mod + ".alpha"] = torch.tensor(float(LORA_RANK), dtype=torch.bfloat16)
            if k[: -len(".weight")] + ".bias" in shp:
                sd[mod + ".diff_b"] = (1e-3 * torch.randn(s[0], device=dev, generator=gen)).to(torch.bfloat16)
        elif len(s) == 1 and "norm" in k:
            sd[mod + ".diff"] = (1e-3 * torch.randn(s[0], device=dev, generator=gen)).to(torch.bfloat16)
    for k, s in shp.items():                      # the blocks' modulation deltas (Kijai's lightx2v files carry them)
        if k.startswith("blocks.") and k.endswith(".modulation"):
            sd["diffusion_model." + k[: -len(".modulation")] + ".diff_m"] = (
                1e-3 * torch.randn(s, device=dev, generator=gen)).to(torch.bfloat16)
    _save(sd, path)


def write_dwpose(path, kind):
    import numpy as np
    if importlib.util.find_spec("onnx") is None:
        raise SystemExit(f"writing {path.name} needs the onnx package, which {sys.executable} lacks: pip install onnx, "
                         f"or write the DWPose files with another Python: --only dwpose")
    ds = _load("sd_e2e_dwpose_speed", BENCH / "dwpose_speed.py")
    if kind == "det":
        model, _, _ = ds.build_detector(planted=ds.planted_person((VIDEO["height"], VIDEO["width"])))
    else:
        fx = _load("sd_e2e_fixture_models", ROOT / "tests" / "integration" / "fixtures" / "models.py")
        sx, sy = np.zeros((133, 576), np.float32), np.zeros((133, 768), np.float32)
        for k, (x, y) in enumerate(fx._wholebody_points()):
            sx[k, int(round(2 * x))] = 1.0
            sy[k, int(round(2 * y))] = 1.0
        model, _, _ = ds.build_pose(planted=(sx, sy))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model)


KINDS = ("dit", "umt5", "clip_vision", "vae", "lora", "dwpose", "input")


def make_full(models_dir, comfyui, dits=("fp8",), log=print, only=KINDS):
    """Write every workflow model file (skipping ones already there) and the inputs; returns {path: seconds}.
    ``only``: the kinds to write (``dwpose`` = both ONNX files), e.g. to write the DWPose files with a Python that
    has ``onnx``."""
    root = pathlib.Path(models_dir)
    models = workflow_models()
    dit_name(models)  # exactly one DiT file in the workflows, or stop
    plan = []
    for directory, name in models:
        kind = kind_of(directory, name)
        if kind is None:
            raise SystemExit(f"no random-weight writer for {directory}/{name} (folder {directory!r})")
        if (kind if kind not in ("det", "pose") else "dwpose") not in only:
            continue
        if kind == "dit":
            if "fp8" in dits:
                plan.append((root / directory / name, lambda p: write_dit(p, fp8=True)))
            if "bf16" in dits:
                plan.append((root / directory / BF16_DIT_NAME, lambda p: write_dit(p, fp8=False)))
        elif kind == "umt5":
            plan.append((root / directory / name, lambda p: write_umt5(p, comfyui)))
        elif kind == "clip_vision":
            import torch
            plan.append((root / directory / name,
                         lambda p: write_plain(p, clip_vision_shapes(comfyui), torch.float16, seed=13)))
        elif kind == "vae":
            import torch
            plan.append((root / directory / name, lambda p: write_plain(p, vae_shapes(comfyui), torch.bfloat16, 14)))
        elif kind == "lora":
            plan.append((root / directory / name, write_lora))
        else:
            plan.append((root / directory / name, lambda p, k=kind: write_dwpose(p, k)))
    times = {}
    for path, write in plan:
        if path.exists() and path.stat().st_size > 0:
            log(f"exists  {path} ({path.stat().st_size / 1e9:.2f} GB)")
            continue
        t = time.perf_counter()
        write(path)
        times[str(path)] = time.perf_counter() - t
        log(f"wrote   {path} ({path.stat().st_size / 1e9:.2f} GB) in {times[str(path)]:.1f} s")
    if "input" not in only:
        return times
    t = time.perf_counter()
    write_media(root / "input")
    times["input"] = time.perf_counter() - t
    log(f"wrote   {root / 'input'}: {', '.join(INPUTS)} ({VIDEO['frames']} frames {VIDEO['width']}x{VIDEO['height']} "
        f"@ {VIDEO['fps']} fps) and *_warm copies")
    return times


# ------------------------------------------------------------------------------------------------ check
def check_files(models_dir, comfyui, log=print):
    """Load the umt5 / CLIP vision / VAE files with ComfyUI's own loaders (as CLIPLoader type wan, CLIPVisionLoader
    and VAELoader do), run one encode each and report: missing keys (the loaders only warn), output finiteness.
    Returns a list of problems (empty = fine)."""
    import logging

    import torch
    comfy = _comfy(comfyui)
    import comfy.clip_vision
    import comfy.sd
    import comfy.utils

    class Grab(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.lines = []

        def emit(self, r):
            self.lines.append(r.getMessage())
    grab = Grab()
    logging.getLogger().addHandler(grab)          # ComfyUI's loaders log "clip missing: [...]" as warnings
    root, problems = pathlib.Path(models_dir), []
    for directory, name in workflow_models():
        kind, path = kind_of(directory, name), root / directory / name
        grab.lines.clear()
        t = time.perf_counter()
        if kind == "umt5":
            clip = comfy.sd.load_clip([str(path)], clip_type=comfy.sd.CLIPType.WAN)
            out = clip.encode_from_tokens(clip.tokenize("a person dances in a bright room"), return_pooled=False)
            what = f"cond {tuple(out.shape)} {out.dtype}"
        elif kind == "clip_vision":
            cv = comfy.clip_vision.load(str(path))
            out = cv.encode_image(torch.rand(1, 224, 224, 3)).penultimate_hidden_states
            what = f"penultimate {tuple(out.shape)}"
        elif kind == "vae":
            vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
            lat = vae.encode(torch.rand(5, 64, 64, 3))
            out = vae.decode(lat)
            what = f"latent {tuple(lat.shape)}, decoded {tuple(out.shape)}"
        else:
            continue
        bad = [ln for ln in grab.lines if "missing" in ln.lower()
               or ("unexpected" in ln.lower() and "spiece_model" not in ln)]   # the tokenizer rides in the file
        finite = bool(torch.isfinite(out.float()).all())
        log(f"{directory}/{name}: {what}, finite {finite}, {time.perf_counter() - t:.1f} s"
            + (f"; loader said: {bad[:3]}" if bad else ""))
        if bad or not finite:
            problems.append(f"{directory}/{name}: " + ("; ".join(bad[:3]) if bad else "non-finite output"))
    logging.getLogger().removeHandler(grab)
    return problems
