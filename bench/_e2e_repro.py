"""Is a queue reproducible? ``bench/comfy_e2e.py --queues cold,warm,again --save-intermediates``: the ``again``
queue uploads warm's input files once more under new names (same bytes, so every node fed by them runs again;
the model loaders and the text encodes stay cached) with warm's seed, and three core savers in every queue keep
what the graph made on the way:

- ``poses``: the retargeted pose frames (the pose preview's input) as core SaveImage PNGs;
- ``negative_poses``: the negative pose frames the Conditioning node takes (official workflow only), as PNGs;
- ``latent``: the sampler's output LATENT (VAE Decode's input) through core SaveLatent (safetensors);
- ``frames``: VAE Decode's output as core SaveImage PNGs (what Create Video encodes).

``compare`` then says, stage by stage, whether warm and again are bit-identical and by how much they differ, so a
difference of two saved videos is pinned to the stage where it starts (pose extraction, the encodes + sampler,
the VAE decode, or the video encoder, which sees identical frames when the others are identical). Stage files
are matched by name: ``poses_*`` does not take ``negative_poses_*``.
"""
from __future__ import annotations

import math
import pathlib
import shutil

import numpy as np

STAGES = ("poses", "negative_poses", "latent", "frames")
POSE_PREVIEW = "PreviewImage"


def _node_id(prompt):
    return str(max(int(k) for k in prompt if k.isdigit()) + 1)


def insert_savers(prompt, tag):
    """Add (in place) core SaveImage / SaveLatent nodes writing under ``output/<tag>/``; returns {stage: node id}.
    The pose preview (core PreviewImage) becomes a SaveImage of the same frames; the latent saver takes VAE
    Decode's ``samples`` and the frame saver VAE Decode's output. A workflow without one of them is refused."""
    decodes = [nid for nid, n in prompt.items() if n["class_type"] == "VAEDecode"]
    previews = [nid for nid, n in prompt.items() if n["class_type"] == POSE_PREVIEW]
    if len(decodes) != 1 or len(previews) != 1:
        raise ValueError(f"--save-intermediates needs one VAEDecode and one {POSE_PREVIEW} (the pose preview); "
                         f"found {len(decodes)} and {len(previews)}")
    (dec,), (prev,) = decodes, previews
    prompt[prev] = {"class_type": "SaveImage",
                    "inputs": {"images": list(prompt[prev]["inputs"]["images"]), "filename_prefix": f"{tag}/poses"}}
    ids = {"poses": prev}
    negs = {tuple(n["inputs"]["negative_pose_frames"]) for n in prompt.values()
            if isinstance(n["inputs"].get("negative_pose_frames"), list)}
    if len(negs) == 1:
        neg = ids["negative_poses"] = _node_id(prompt)
        prompt[neg] = {"class_type": "SaveImage",
                       "inputs": {"images": list(next(iter(negs))), "filename_prefix": f"{tag}/negative_poses"}}
    lat = ids["latent"] = _node_id(prompt)
    prompt[lat] = {"class_type": "SaveLatent",
                   "inputs": {"samples": list(prompt[dec]["inputs"]["samples"]), "filename_prefix": f"{tag}/latent"}}
    fr = ids["frames"] = _node_id(prompt)
    prompt[fr] = {"class_type": "SaveImage", "inputs": {"images": [dec, 0], "filename_prefix": f"{tag}/frames"}}
    return ids


def collect(output_dir, tag, dest):
    """Move ``output/<tag>/`` (what insert_savers' nodes wrote) to ``dest``; returns {stage: [file names]}."""
    src, dest = pathlib.Path(output_dir) / tag, pathlib.Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not src.is_dir():
        return {s: [] for s in STAGES}
    shutil.move(str(src), str(dest))
    return {s: sorted(p.name for p in dest.glob(f"{s}_*")) for s in STAGES}


def _load(stage, paths):
    if stage == "latent":
        from safetensors.numpy import load_file

        return [load_file(str(p))["latent_tensor"].astype(np.float64) for p in paths]
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255.0 for p in paths]


def diff_arrays(a, b):
    """Stage difference of two lists of arrays (same count, same shapes): bit-identical?, rel. L2 (b is the
    reference), max |d|, PSNR for pixel stages, and how many items (frames / latents) differ at all."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return {"comparable": False, "items": [len(a), len(b)]}
    num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b))
    den = sum(float(np.sum(y * y)) for y in b)
    n = sum(x.size for x in a)
    return {"comparable": True, "items": len(a), "identical": num == 0.0,
            "items_differing": sum(bool(np.any(x != y)) for x, y in zip(a, b)),
            "rel_l2": math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else float("inf")),
            "max_abs": max((float(np.max(np.abs(x - y))) for x, y in zip(a, b)), default=0.0),
            "psnr_db": (10 * math.log10(n / num)) if num > 0 else float("inf")}


def compare(dir_a, dir_b, video_a=None, video_b=None):
    """{stage: diff} of two collected queues (``dir_b`` is the reference; None: the queues saved no stages),
    plus the saved videos: byte-identical? and their decoded difference (bench/video_diff.py)."""
    out = {}
    for stage in STAGES if dir_a and dir_b else ():
        pa = sorted(pathlib.Path(dir_a).glob(f"{stage}_*"))
        pb = sorted(pathlib.Path(dir_b).glob(f"{stage}_*"))
        if not pa and not pb:
            continue  # a stage this workflow has no saver for (negative poses in the turbo workflow)
        if not pa or not pb:
            out[stage] = {"comparable": False, "items": [len(pa), len(pb)]}
            continue
        out[stage] = diff_arrays(_load(stage, pa), _load(stage, pb))
    if video_a and video_b:
        import video_diff

        va, vb = pathlib.Path(video_a).read_bytes(), pathlib.Path(video_b).read_bytes()
        d = video_diff.diff(video_diff.frames(video_a), video_diff.frames(video_b))
        out["video"] = {"comparable": True, "bytes_identical": va == vb, "identical": d["rel_l2"] == 0.0,
                        "rel_l2": d["rel_l2"], "max_abs": d["max_abs"], "psnr_db": d["psnr_db"]}
    return out


def first_difference(cmp):
    """The first stage (in graph order) whose outputs differ, or None when all compared stages are identical."""
    for stage in STAGES + ("video",):
        c = cmp.get(stage)
        if c and c.get("comparable") and not c.get("identical"):
            return stage
    return None


def table_lines(cmp, a="again", b="warm"):
    lines = [f"| stage ({a} vs {b}) | bit-identical | items differing | rel. L2 | max abs | PSNR dB |",
             "|---|---|---:|---:|---:|---:|"]
    for stage in STAGES + ("video",):
        c = cmp.get(stage)
        if not c:
            continue
        if not c.get("comparable"):
            lines.append(f"| {stage} | not comparable ({c.get('items')}) | | | | |")
            continue
        ident = "yes" if c["identical"] else "no"
        if stage == "video":
            ident += ", file bytes " + ("identical" if c["bytes_identical"] else "differ")
        psnr = "inf" if math.isinf(c["psnr_db"]) else f"{c['psnr_db']:.1f}"
        lines.append(f"| {stage} | {ident} | {c.get('items_differing', '')} | {c['rel_l2']:.3g} | "
                     f"{c['max_abs']:.3g} | {psnr} |")
    return lines
