"""Video nodes: the Mimir sampler (CogVideoX denoising with CFG), the VAE decoder and encoder.

LATENT holds `{"samples": [B, C, T, H/8, W/8]}` in ComfyUI's video order and in VAE space (unscaled); the
library works in diffusers order [B, T, C, H, W] and diffusion space (VAE latent x scaling factor), and these
nodes convert between the two. IMAGE is `[F, H, W, 3]` in 0..1.
"""

from __future__ import annotations

import dataclasses

import torch

from ..mimir.codec import VideoCodec, comfy_latent, diffusion_latent
from ..mimir.sampler import VAE_TEMPORAL, Sampler, TextStream, check_video_size
from ..mimir.speed import STEP_CACHES, StepCache
from ..mimir.variants import SCHEDULERS
from . import comfy_services as services

CATEGORY = "Mimir/sampling"


# Conditioning options the Mimir Sampler honours, as ComfyUI's samplers read them (strength: ConditioningSet-
# AreaStrength; start_percent / end_percent: ConditioningSetTimestepRange); any other option is refused.
HONOURED_OPTIONS = {"mimir_encoder", "strength", "start_percent", "end_percent"}


def _text_streams(cond, input_name: str, model) -> list[TextStream]:
    """CONDITIONING (one entry, or several from ConditioningCombine) -> the library's TextStreams."""
    if not isinstance(cond, (list, tuple)) or not cond or not all(
            isinstance(e, (list, tuple)) and len(e) == 2 and torch.is_tensor(e[0]) and isinstance(e[1], dict)
            for e in cond):
        raise ValueError(f"{input_name}: expected CONDITIONING ([[tensor, dict], ...]), got {type(cond).__name__}")
    streams = []
    for i, (tensor, options) in enumerate(cond):
        where = input_name if len(cond) == 1 else f"{input_name} entry {i + 1}"
        refused = sorted(set(options) - HONOURED_OPTIONS)
        if refused:
            raise ValueError(f"{where}: the conditioning option {refused[0]!r} is not supported; the Mimir Sampler "
                             f"honours strength and timestep ranges (start_percent, end_percent) only")
        _check_stream(tensor, where, model)
        try:
            streams.append(TextStream(tensor, options.get("strength", 1.0), options.get("start_percent", 0.0),
                                      options.get("end_percent", 1.0)))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return streams


def _check_stream(stream: torch.Tensor, where: str, model) -> None:
    """A [1, tokens, width] text stream, checked against what the transformer reads."""
    config = model.transformer.config
    if stream.ndim != 3 or stream.shape[0] != 1 or stream.shape[-1] != config.text_embed_dim:
        raise ValueError(f"{where}: conditioning of shape {list(stream.shape)}, but this model reads "
                         f"[1, tokens, {config.text_embed_dim}]; connect Mimir Text Encode or Mimir T5 Text Encode "
                         f"made with this model's T5 (CLIP Text Encode does not fit)")
    if model.info.dims["positional_embeddings"] == "learned" and stream.shape[1] != config.max_text_seq_length:
        raise ValueError(f"{where}: {stream.shape[1]} text tokens, but this model has learned positions for "
                         f"exactly {config.max_text_seq_length} text tokens; use the encoder it was trained with")


def _batched(streams: list[TextStream] | None, batch: int) -> list[TextStream] | None:
    """Streams for a batch of input latents (ComfyUI's CONDITIONING holds one prompt)."""
    if streams is None:
        return None
    return [dataclasses.replace(s, tokens=s.tokens.expand(batch, -1, -1)) for s in streams]


def _init_latents(latent, model, frames: int, height: int, width: int) -> torch.Tensor:
    """LATENT (VAE space, [B, C, T, h, w]) -> diffusion-space latents [B, T, C, h, w] for the requested video."""
    samples = latent["samples"] if isinstance(latent, dict) and "samples" in latent else None
    spatial = model.info.vae_spatial_factor
    want = [model.transformer.config.in_channels, (frames - 1) // VAE_TEMPORAL + 1, height // spatial,
            width // spatial]
    if not torch.is_tensor(samples) or samples.ndim != 5 or list(samples.shape[1:]) != want:
        got = list(samples.shape) if torch.is_tensor(samples) else type(latent).__name__
        raise ValueError(f"latent: got {got} but width {width}, height {height}, frames {frames} need video latents "
                         f"[B, {', '.join(map(str, want))}] ([B, C, T, H/{spatial}, W/{spatial}]); set the size to the "
                         f"input video's")
    return diffusion_latent(samples, model.info.vae_scaling_factor)


def _queue_time_video_check(node, frames, height, width) -> bool | str:
    """VALIDATE_INPUTS for the frames / height / width widgets: True, or what is wrong. ComfyUI passes only the
    inputs VALIDATE_INPUTS names, a linked one as None (its value exists only at run time, where the node checks
    it), and skips its own min/max check for them, so that is done here too."""
    spec = node.INPUT_TYPES()["required"]
    given = {"frames": frames, "height": height, "width": width}
    for name, value in given.items():
        low, high = spec[name][1]["min"], spec[name][1]["max"]
        if value is not None and not low <= value <= high:
            return f"{name} must be in {low}..{high}, got {value}"
    known = {name: spec[name][1]["default"] if value is None else value for name, value in given.items()}
    try:  # an unknown value stands in as the widget's default, which is valid
        check_video_size(known["frames"], known["height"], known["width"])
    except ValueError as exc:
        return str(exc)
    return True


def _step_cache(method: str, setting: float) -> StepCache | None:
    if method == "off":
        return None
    try:
        return StepCache(method, setting or None)
    except ValueError as exc:
        raise ValueError(f"step_cache: {exc}") from exc


class MimirSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MIMIR_MODEL", {"tooltip": "The CogVideoX transformer, from Mimir Model Loader."}),
                "positive": ("CONDITIONING", {"tooltip": "What the video should show (Mimir Text Encode or Mimir T5 "
                                                         "Text Encode)."}),
                "negative": ("CONDITIONING", {"tooltip": "What it should not show; encode it with the same kind of "
                                                         "node as positive (an empty prompt is usual)."}),
                "width": ("INT", {"default": 720, "min": 16, "max": 4096, "step": 16,
                                  "tooltip": "Video width in pixels, a multiple of 16 (CogVideoX: 720)."}),
                "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16,
                                   "tooltip": "Video height in pixels, a multiple of 16 (CogVideoX: 480)."}),
                "frames": ("INT", {"default": 49, "min": 1, "max": 1025, "step": 8,
                                   "tooltip": "Number of frames, 8k+1 (CogVideoX: 49, CogVideoX 1.5: 81): the VAE decodes other counts to 3 frames more."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
                "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale; 1 or less skips the negative pass."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed of the initial noise (drawn on the CPU, so the same on every device)."}),
                "scheduler": (list(SCHEDULERS), {"default": "ddim",
                                                 "tooltip": "CogVideoX's DDIM or DPM scheduler, with the model's own "
                                                            "noise settings."}),
                "dynamic_cfg": ("BOOLEAN", {"default": False,
                                            "tooltip": "Raise the guidance scale over the steps (CogVideoX's "
                                                       "use_dynamic_cfg; its demos use it with dpm)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "With an input latent: how much of it to re-generate (1.0 ignores "
                                                 "it). Without one it has no effect."}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "Optional video latent to start from (video-to-video), e.g. from "
                                                 "Mimir VAE Encode; its size must match width, height and frames."}),
                "step_cache": (["off", *STEP_CACHES], {
                    "default": "off",
                    "tooltip": "Reuse work of earlier steps (diffusers' cache hooks): faster, slightly different "
                               "video. fbc: first-block cache; pab: pyramid attention broadcast; faster: FasterCache; "
                               "taylorseer: TaylorSeer; mag: MagCache (its first run calibrates and is not faster). "
                               "The README's table measures each."}),
                "step_cache_setting": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                    "tooltip": "The method's main setting; 0 uses its default. fbc and mag: threshold (larger "
                               "skips more, defaults 0.05 and 0.06); pab and faster: recompute every N-th step "
                               "(default 2); taylorseer: full step every N steps (default 5)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        """ComfyUI calls this when a graph is queued and refuses the graph with a 400 when it returns a message."""
        return _queue_time_video_check(cls, frames=frames, height=height, width=width)

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Video latents [B, C, T, H/8, W/8] in VAE space, for Mimir Decode.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = "Generates a video latent with the CogVideoX transformer from Mimir (or plain T5) conditioning."

    def sample(self, model, positive, negative, width, height, frames, steps, cfg, seed, scheduler, dynamic_cfg,
               denoise, latent=None, step_cache="off", step_cache_setting=0.0):
        check_video_size(frames, height, width)  # its messages name frames / height / width
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: must be one of {list(SCHEDULERS)}, got {scheduler!r}")
        cond = _text_streams(positive, "positive", model)
        uncond = _text_streams(negative, "negative", model) if cfg > 1.0 else None
        init = None if latent is None else _init_latents(latent, model, frames, height, width)
        if init is not None:
            cond, uncond = _batched(cond, init.shape[0]), _batched(uncond, init.shape[0])
        sampler = Sampler(model.transformer, model.scheduler, services.placement(),
                          spatial=model.info.vae_spatial_factor)
        sampler.use_scheduler(scheduler)
        sampler.step_cache = _step_cache(step_cache, step_cache_setting)
        bar = services.progress_bar(steps)

        def on_step(done, total, _latents):
            services.check_interrupted()
            bar.update_absolute(done, total)

        services.check_interrupted()
        latents = sampler.denoise(cond, uncond, frames, height, width, steps, cfg, seed, dynamic_cfg, latents=init,
                                  strength=denoise if init is not None else 1.0, callback=on_step)
        return ({"samples": comfy_latent(latents, model.info.vae_scaling_factor)},)


def _vae_space_latents(latent, vae) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    channels = vae.config.latent_channels
    if not torch.is_tensor(samples) or samples.ndim != 5 or samples.shape[1] != channels:
        got = list(samples.shape) if torch.is_tensor(samples) else type(latent).__name__
        raise ValueError(f"samples: expected a CogVideoX video latent [B, {channels}, T, H, W] (from the Mimir "
                         f"Sampler), got {got}")
    return samples


class MimirDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("MIMIR_VAE", {"tooltip": "The CogVideoX VAE, from Mimir VAE Loader."}),
            "samples": ("LATENT", {"tooltip": "Video latents from the Mimir Sampler."}),
            "tiling": ("BOOLEAN", {"default": True,
                                   "tooltip": "Decode in overlapping, blended tiles: much less memory at 720x480. "
                                              "VAEs whose tiles do not fit the tiling scheme (small demo VAEs) "
                                              "decode whole anyway."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The frames [F, H, W, 3] in 0..1, for Create Video / Save Video or Save Animated WEBP.",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Decodes video latents into frames with the CogVideoX VAE."

    def decode(self, vae, samples, tiling):
        z = _vae_space_latents(samples, vae).float()
        services.check_interrupted()
        bar = services.progress_bar(1)
        frames = VideoCodec(vae, services.placement()).decode_vae_space(z, tiling=tiling)
        bar.update_absolute(1, 1)
        return (frames.reshape(-1, *frames.shape[2:]),)


class MimirVAEEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("MIMIR_VAE", {"tooltip": "The CogVideoX VAE, from Mimir VAE Loader."}),
            "images": ("IMAGE", {"tooltip": "Video frames [F, H, W, C] in 0..1: 8k+1 frames, sides multiples of 16."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Video latents [1, C, T, H/8, W/8] in VAE space, for the Mimir Sampler's latent input.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Encodes frames into CogVideoX video latents (the VAE's mean), for video-to-video sampling."

    @torch.no_grad()
    def encode(self, vae, images):
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[-1] < 3:
            raise ValueError(f"images: expected IMAGE frames [F, H, W, 3], got "
                             f"{list(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        try:
            check_video_size(*images.shape[:3])
        except ValueError as exc:
            raise ValueError(f"images: {exc}") from exc
        return ({"samples": VideoCodec(vae, services.placement()).encode_vae_space(images.unsqueeze(0))},)


NODE_CLASS_MAPPINGS = {
    "MimirSampler": MimirSampler,
    "MimirDecode": MimirDecode,
    "MimirVAEEncode": MimirVAEEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MimirSampler": "Mimir Sampler",
    "MimirDecode": "Mimir Decode",
    "MimirVAEEncode": "Mimir VAE Encode",
}
