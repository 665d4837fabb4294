"""SteadyDancer conditioning from native ComfyUI parts.

Facts this node relies on (checked in ComfyUI 0.33.0 source):
- ``CLIPTextEncode`` with a ``CLIPLoader(type=wan)`` umt5-xxl returns ``[[cond, extras]]`` with ``cond``
  [1, max(512, n_tokens), 4096]: the real tokens (incl. the end token) then zeros (``zero_out_masked``,
  tokenizer ``min_length=512``, pad id 0, attention-masked encoder). That is exactly the official Wan text input
  (real tokens zero-padded to 512 inside the model), so we take the real rows and cut to 512 like the official
  tokenizer does.
- ``CLIPVisionEncode`` (crop none) returns an object whose ``penultimate_hidden_states`` [B,257,1280] for
  clip_vision_h is the output of block 31 of 32 with no post-norm; the official code uses ``use_31_block=True``,
  the same tensor. Native ``WanImageToVideo`` feeds the same field to ``clip_fea``.
- Native ``VAE.encode`` takes IMAGE [B,H,W,C] in 0..1 (a batch is the frames of one video for the Wan VAE) and
  returns the *raw* latent [1,16,T,H/8,W/8]; ComfyUI normalizes it later (latent_formats.Wan21.process_in).
  The official pipeline works on normalized latents, so we normalize with steadydancer/sampling/latents.py.
- Negative pose latents are needed only by pose guidance, whose scale and step window live on the guider /
  sampler. The node therefore hands them on as a ``DeferredLatent``: the SteadyDancer guider VAE-encodes them
  (once; the result is kept) just before sampling when its schedule has a pose-guidance step, and never when
  pose guidance is off (scale 0, an empty window, a core guider / KSampler, the turbo BasicGuider).
- The official "image + 80 zero frames" clip is in [-1,1]; zero there is 0.5 in ComfyUI's 0..1 IMAGE space
  (WanImageToVideo uses the same 0.5 fill).
"""
from __future__ import annotations

import torch

from ..steadydancer.sampling.conditioning import CLIP_DIM, CLIP_TOKENS, TEXT_DIM, TEXT_LEN
from ..steadydancer.sampling.latents import LATENT_CHANNELS
from . import comfy_bridge as cb
from .frames import (CATEGORY, FIT_MODES, adjust_length, adjust_size, latent_shape, resize_images,
                     tooltip)


class DeferredLatent:
    """A VAE encode done on first use: ``latent()`` encodes ``frames`` with ``vae`` (``vae_encode``) the first
    time and keeps the result (ComfyUI's cache keeps this object with the node's outputs, so later runs reuse
    it); the frames and the VAE reference are dropped then. ``shape`` is the latent's shape, known beforehand."""

    def __init__(self, vae, frames: torch.Tensor, shape: tuple, what: str):
        self._vae, self._frames, self._latent = vae, frames, None
        self.shape, self.what = tuple(shape), what

    @property
    def encoded(self) -> bool:
        return self._latent is not None

    def latent(self) -> torch.Tensor:
        if self._latent is None:
            z = vae_encode(self._vae, self._frames)
            if tuple(z.shape) != self.shape:
                raise ValueError(f"{self.what}: VAE latent shape {tuple(z.shape)} does not match the expected "
                                 f"{self.shape}; is this the Wan2.1 VAE?")
            self._latent, self._vae, self._frames = z, None, None
        return self._latent


def resolve_latent(value):
    """A conditioning value as a tensor: a ``DeferredLatent`` is encoded (once), anything else is returned."""
    return value.latent() if isinstance(value, DeferredLatent) else value


class ClipFeatures:
    """A CLIP_VISION_OUTPUT stand-in holding only the validated ``penultimate_hidden_states`` (what WAN21 reads)."""

    def __init__(self, h: torch.Tensor):
        self.penultimate_hidden_states = h


def native_conditioning(cond, positive, negative, cond_neg=None):
    """(positive, negative) CONDITIONING carrying SteadyDancer's inputs, as WanImageToVideo's carry its image:
    every entry gets the text (zero-padded to 512 tokens, as the DiT pads it) and, under the keys of
    nodes/native_model.py, the normalized image latent + mask (``y``), both pose latents, ``ref_x``, ``ref_c`` and
    both CLIP features. ``cond``: the validated core ``SteadyDancerConditioning``; ``cond_neg``: the negative
    pose latents (a tensor or a ``DeferredLatent``) or None."""
    from . import native_model as nm

    shared = {nm.KEY_Y: cond.y, nm.KEY_POSE: cond.cond_pos, nm.KEY_REF_X: cond.ref_x, nm.KEY_REF_C: cond.ref_c,
              "clip_vision_output": ClipFeatures(cond.clip_fea), nm.KEY_CLIP_POSE: ClipFeatures(cond.clip_fea_c)}
    cond_neg = cond.cond_neg if cond_neg is None else cond_neg
    if cond_neg is not None:
        shared[nm.KEY_POSE_NEG] = cond_neg

    def entries(src, text):
        text = torch.nn.functional.pad(text, (0, 0, 0, TEXT_LEN - text.shape[1]))
        return [[text, {**src[0][1], **shared}]]

    return entries(positive, cond.context), entries(negative, cond.context_null)


def text_from_conditioning(conditioning, what: str, node_id=None) -> torch.Tensor:
    """[1, L<=512, 4096] real-token embeddings from a native CONDITIONING list."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning or not isinstance(conditioning[0], (list, tuple)):
        raise ValueError(f"{what}: expected a CONDITIONING from CLIPTextEncode, got {type(conditioning).__name__}")
    if len(conditioning) > 1:
        cb.node_message(node_id, f"{what}: {len(conditioning)} conditionings combined; only the first is used.")
    t = conditioning[0][0]
    if t.ndim == 2:
        t = t[None]
    if t.shape[-1] != TEXT_DIM:
        raise ValueError(f"{what}: text embedding width is {t.shape[-1]}, SteadyDancer needs umt5-xxl ({TEXT_DIM}). "
                         "Load the text encoder with CLIPLoader type 'wan' (umt5_xxl_fp8_e4m3fn_scaled.safetensors).")
    t = t[:1, :TEXT_LEN].float()
    nonzero = (t[0].abs().amax(dim=-1) > 0).nonzero()
    n = int(nonzero[-1]) + 1 if len(nonzero) else 1
    return t[:, :n].contiguous()


def clip_features(clip_output, what: str) -> torch.Tensor:
    if clip_output is None:
        raise ValueError(f"{what}: CLIP_VISION_OUTPUT is missing")
    try:
        h = clip_output["penultimate_hidden_states"]
    except (KeyError, AttributeError, TypeError):
        h = getattr(clip_output, "penultimate_hidden_states", None)
    if h is None:
        raise ValueError(f"{what}: the CLIP vision output has no penultimate_hidden_states (use CLIPVisionEncode).")
    if h.ndim == 2:
        h = h[None]
    if tuple(h.shape[-2:]) != (CLIP_TOKENS, CLIP_DIM):
        raise ValueError(f"{what}: CLIP features are {tuple(h.shape[-2:])}, SteadyDancer needs {CLIP_TOKENS}x{CLIP_DIM} "
                         "(clip_vision_h.safetensors, ViT-H/14 at 224).")
    return h[:1].float()


def vae_encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Native VAE -> normalized latent [1,16,T,h,w] float32 (the official convention)."""
    from ..steadydancer.sampling import latents
    raw = vae.encode(images[..., :3])
    if raw.ndim == 4:  # an image VAE would give [B,C,H,W]; Wan gives [1,C,T,H,W]
        raise ValueError("the VAE returned image latents; connect the Wan2.1 VAE (wan_2.1_vae.safetensors).")
    if raw.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"the VAE latent has {raw.shape[1]} channels; SteadyDancer needs the Wan2.1 VAE "
                         f"({LATENT_CHANNELS}).")
    return latents.normalize(raw.float().to(cb.intermediate_device()))


class SteadyDancerConditioning:
    DESCRIPTION = ("Builds every tensor SteadyDancer needs (image latent + mask, pose latents, the two reference "
                   "latents, CLIP features, text) from native ComfyUI text/CLIP-vision/VAE outputs, with the "
                   "official semantics.")
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT", "INT", "INT", "INT")
    RETURN_NAMES = ("positive", "negative", "latent", "width", "height", "length")
    OUTPUT_TOOLTIPS = ("Prompt + every SteadyDancer input, for KSampler / the SteadyDancer guider and samplers.",
                       "Negative prompt + the same SteadyDancer inputs.",
                       "Empty Wan2.1 video latent of the generation size, for the sampler.",
                       "Width used (multiple of 16).", "Height used (multiple of 16).", "Frame count used (4n+1).")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", tooltip("Prompt from CLIPTextEncode with the umt5-xxl text encoder (CLIPLoader type wan).")),
                "negative": ("CONDITIONING", tooltip("Negative prompt from CLIPTextEncode with the same encoder.")),
                "vae": ("VAE", tooltip("The Wan2.1 VAE (wan_2.1_vae.safetensors via VAELoader).")),
                "clip_vision_reference": ("CLIP_VISION_OUTPUT", tooltip("CLIPVisionEncode (crop none) of the (fitted) reference image.")),
                "clip_vision_pose": ("CLIP_VISION_OUTPUT", tooltip("CLIPVisionEncode (crop none) of the first aligned pose frame.")),
                "reference_image": ("IMAGE", tooltip("The person to animate, fitted to the generation size (Retarget Poses output; "
                                                     "first image of the batch is used).")),
                "pose_frames": ("IMAGE", tooltip("Aligned pose frames (from Retarget Poses), one per output frame.")),
                "width": ("INT", tooltip("Output width in pixels, rounded to a multiple of 16; 0 = the reference image's "
                                         "width (as prepared by Retarget Poses).", default=0, min=0, max=4096, step=16)),
                "height": ("INT", tooltip("Output height in pixels, rounded to a multiple of 16; 0 = the reference image's "
                                          "height.", default=0, min=0, max=4096, step=16)),
                "length": ("INT", tooltip("Output frames. 0 = all the pose frames given (so Resample Frames alone sets "
                                          "the length), rounded down to 4n+1. Any other value is rounded down to 4n+1 "
                                          "(81 = 5 s at 16 fps) and capped by the number of pose frames, with a note.",
                                          default=0, min=0, max=1025, step=1)),
                "fit": (FIT_MODES, tooltip("Used only when the images are not already width x height: crop (keep aspect, "
                                           "center-crop), pad (keep aspect, black bars), stretch.", default="crop")),
            },
            "optional": {
                "negative_pose_frames": ("IMAGE", tooltip("Randomly perturbed pose frames for pose guidance (from Retarget "
                                                          "Poses). Without them pose guidance is skipped.")),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def build(self, positive, negative, vae, clip_vision_reference, clip_vision_pose, reference_image, pose_frames,
              width, height, length, fit, negative_pose_frames=None, unique_id=None):
        from ..steadydancer.sampling import conditioning as sdc

        width = int(width) or int(reference_image.shape[2])
        height = int(height) or int(reference_image.shape[1])
        w, h, msg = adjust_size(width, height)
        if msg:
            cb.node_message(unique_id, msg)
        n_pose = int(pose_frames.shape[0])
        if n_pose < 1:
            raise ValueError("pose_frames is empty: no frames to generate")
        want = int(length)
        if want <= 0:  # all pose frames (Resample Frames decides the length)
            want = n_pose
            if negative_pose_frames is not None:
                want = min(want, int(negative_pose_frames.shape[0]))
            n, _ = adjust_length(want)
            if n != want:
                cb.node_message(unique_id, f"{want} pose frames is not 4n+1; using the first {n}.")
        else:
            if n_pose < want:
                cb.node_message(unique_id, f"only {n_pose} pose frames for length {want}; using {n_pose}.")
                want = n_pose
            if negative_pose_frames is not None and negative_pose_frames.shape[0] < want:
                cb.node_message(unique_id, f"only {negative_pose_frames.shape[0]} negative pose frames; length "
                                           "reduced to match.")
                want = int(negative_pose_frames.shape[0])
            n, msg = adjust_length(want)
            if msg:
                cb.node_message(unique_id, msg)

        ref = resize_images(reference_image[:1], w, h, fit)
        poses = resize_images(pose_frames[:n], w, h, fit)
        cb.check_interrupt()
        pbar = cb.Progress(4)

        clip_img = torch.cat([ref, torch.full((n - 1, h, w, 3), 0.5, dtype=ref.dtype)], 0)
        image_latent = vae_encode(vae, clip_img); pbar.update(1); cb.check_interrupt()
        z_ref = vae_encode(vae, ref)
        z_pose0 = vae_encode(vae, poses[:1]); pbar.update(1); cb.check_interrupt()
        cond_pos = vae_encode(vae, poses); pbar.update(1); cb.check_interrupt()

        _, lat_t, lat_h, lat_w = latent_shape(w, h, n)
        if tuple(image_latent.shape[2:]) != (lat_t, lat_h, lat_w):
            raise ValueError(f"VAE latent shape {tuple(image_latent.shape)} does not match the expected "
                             f"{(lat_t, lat_h, lat_w)} for {w}x{h}x{n}; is this the Wan2.1 VAE?")
        cond_neg = None
        if negative_pose_frames is not None:  # encoded by the guider, only if pose guidance runs (module doc)
            cond_neg = DeferredLatent(vae, resize_images(negative_pose_frames[:n], w, h, fit), cond_pos.shape,
                                      "negative_pose_frames")
        mask = sdc.build_i2v_mask(n, lat_h, lat_w)
        cond = sdc.SteadyDancerConditioning(
            context=text_from_conditioning(positive, "positive", unique_id),
            context_null=text_from_conditioning(negative, "negative", unique_id),
            clip_fea=clip_features(clip_vision_reference, "clip_vision_reference"),
            clip_fea_c=clip_features(clip_vision_pose, "clip_vision_pose"),
            y=sdc.build_y(mask, image_latent),
            cond_pos=cond_pos,
            ref_x=sdc.build_ref_x(z_ref),
            ref_c=sdc.build_ref_c(z_pose0),
        )
        pbar.update(1)
        pos, neg = native_conditioning(cond, positive, negative, cond_neg)
        latent = {"samples": torch.zeros((1, *latent_shape(w, h, n)), dtype=torch.float32,
                                         device=cb.intermediate_device())}
        return (pos, neg, latent, w, h, n)
