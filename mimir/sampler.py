"""The denoiser: CogVideoX's DiT and scheduler run over the text streams (CFG, N steps), step for step as
diffusers' CogVideoXPipeline runs them, so with a fresh fuser and no stabilizer tokens both give the same latents
(tests/test_pipeline.py). Latents are in diffusers' order [B, T, C, h, w] and in diffusion space (VAE latents
times the VAE scaling factor); mimir.codec turns them into frames or ComfyUI LATENTs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import CogVideoXDPMScheduler
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from diffusers.utils.torch_utils import randn_tensor

from .offload import Placement, module_dtype
from .speed import StepCache, step_caching
from .variants import SCHEDULERS

logger = logging.getLogger(__name__)

# (step index, number of steps, latents) -> None; may raise to interrupt
StepCallback = Callable[[int, int, torch.Tensor], None]
# the published CogVideoX VAE's factors: what sizes are checked against before any VAE is loaded (a loaded VAE's
# own factors come from its config: mimir.codec.VideoCodec)
VAE_TEMPORAL, VAE_SPATIAL = 4, 8


def check_video_size(num_frames: int, height: int, width: int) -> None:
    """CogVideoX's VAE compresses 4 frames and 8x8 pixels, and the DiT patches 2x2 latents. Its decoder reads
    latent frames in pairs after the first, so only an odd latent count decodes to 4(T-1)+1 frames: an even
    one gives 3 frames more (5 -> 8, 13 -> 16), hence 8k+1."""
    if num_frames < 1 or (num_frames - 1) % (2 * VAE_TEMPORAL):
        raise ValueError(f"frames must be 8k+1 (1, 9, 17, ..., 49, ..., 81), got {num_frames}: CogVideoX's VAE "
                         f"decodes other counts to 3 frames more")
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {size}")


def check_steps(steps: int, strength: float = 1.0) -> None:
    """Denoising steps and the strength of a video-to-video run, checked before any model runs."""
    if isinstance(steps, bool) or steps != int(steps) or steps < 1:
        raise ValueError(f"steps must be a whole number of at least 1, got {steps!r}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"denoise strength must be in (0, 1], got {strength}")


@dataclass(eq=False)
class TextStream:
    """One text conditioning entry as ComfyUI's samplers read one: a stream [B, n, D], its weight among the
    entries active at a step, and the part of sampling it is active in, in ComfyUI's start_percent /
    end_percent (0 is the start of sampling, the most noise; 1 its end)."""
    tokens: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"strength must be a finite number >= 0, got {self.strength}")
        for name in ("start", "end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} percent must be in [0, 1], got {getattr(self, name)}")

    def active(self, timestep: float, last_timestep: int) -> bool:
        """As ComfyUI's get_area_and_mult: active from `start` to `end`, both ends included."""
        return _percent_timestep(self.end, last_timestep) <= timestep <= _percent_timestep(self.start, last_timestep)


def _percent_timestep(percent: float, last_timestep: int) -> float:
    """ComfyUI's percent_to_sigma for discrete-time models, as a timestep (sigma grows with the timestep, so the
    order is the same): percent p is timestep (1 - p) x last; 0 lies above every step and 1 below every step."""
    if percent <= 0.0:
        return math.inf
    if percent >= 1.0:
        return -math.inf
    return (1.0 - percent) * last_timestep


def text_streams(text: torch.Tensor | Sequence[TextStream]) -> list[TextStream]:
    """A plain tensor is one entry of strength 1 over the whole of sampling."""
    return [TextStream(text)] if torch.is_tensor(text) else list(text)


def rotary_embeddings(cfg, height: int, width: int, latent_frames: int, device, spatial: int = VAE_SPATIAL):
    """CogVideoX 5B / 1.5 rotary embeddings for a video (None for sin-cos 2B); shared by sampling and training."""
    if not cfg.use_rotary_positional_embeddings:
        return None
    grid_h, grid_w = height // (spatial * cfg.patch_size), width // (spatial * cfg.patch_size)
    base_w, base_h = cfg.sample_width // cfg.patch_size, cfg.sample_height // cfg.patch_size
    if cfg.patch_size_t is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops,
                                       grid_size=(grid_h, grid_w), temporal_size=latent_frames, device=device)
    frames = (latent_frames + cfg.patch_size_t - 1) // cfg.patch_size_t
    return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
                                   temporal_size=frames, grid_type="slice", max_size=(base_h, base_w), device=device)

class Sampler:
    """The sampler loop: a CogVideoX transformer and scheduler on the placement's device. `temporal` / `spatial`
    are the VAE's compression factors (the published VAE's unless a pipeline gives its own VAE's)."""

    def __init__(self, transformer, scheduler, placement: Placement | None = None, temporal: int = VAE_TEMPORAL,
                 spatial: int = VAE_SPATIAL):
        self.transformer, self.scheduler = transformer, scheduler
        self.placement = placement or Placement()
        self.temporal, self.spatial = temporal, spatial
        self.step_cache: StepCache | None = None  # diffusers' step caching during denoise (speed.py)
        self.current_timestep = None  # the step's timestep while denoising, as diffusers' pipelines have it

    def use_scheduler(self, kind: str) -> None:
        """Switch between CogVideoX's DDIM and DPM schedulers, keeping the checkpoint's noise settings."""
        if kind not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {kind!r}")
        if type(self.scheduler) is not SCHEDULERS[kind]:  # from_config costs ~10 ms: the sampler node calls this per run
            self.scheduler = SCHEDULERS[kind].from_config(self.scheduler.config)

    # ---- denoising -------------------------------------------------------------------------------------
    def _rotary(self, height: int, width: int, latent_frames: int, device):
        return rotary_embeddings(self.transformer.config, height, width, latent_frames, device, self.spatial)

    def _timesteps(self, steps: int, strength: float, device):
        self.scheduler.set_timesteps(steps, device=device)
        timesteps = self.scheduler.timesteps
        # at least one step: round(steps x strength) is 0 for e.g. 50 steps at strength 0.01
        start = steps - max(1, min(int(round(steps * strength)), steps))
        return timesteps[start * self.scheduler.order:]

    @torch.no_grad()
    def denoise(self, cond: torch.Tensor | Sequence[TextStream], uncond: torch.Tensor | Sequence[TextStream] | None,
                num_frames: int = 49, height: int = 480, width: int = 720, steps: int = 50, guidance: float = 6.0,
                seed: int = 0, dynamic_cfg: bool = False, latents: torch.Tensor | None = None, strength: float = 1.0,
                callback: StepCallback | None = None) -> torch.Tensor:
        """Text streams -> latents [B, T, C, H/8, W/8]. `latents` (diffusion space) with `strength` < 1
        starts part-way from a noised version of them instead of pure noise. `cond` and `uncond` are a stream
        [B, n, D] each, or several TextStreams combined as ComfyUI's samplers combine conditioning entries."""
        check_video_size(num_frames, height, width)
        check_steps(steps, strength)
        cfg = self.transformer.config
        use_cfg = guidance > 1.0 and uncond is not None
        sides = [text_streams(uncond), text_streams(cond)] if use_cfg else [text_streams(cond)]
        _check_sides(sides)
        if self.step_cache is not None and any(len(side) > 1 or (side[0].start, side[0].end) != (0.0, 1.0)
                                               for side in sides):
            # a cache compares each forward with the same forward a step before; streams that come and go
            # change what a forward computes
            raise ValueError("step caching needs one conditioning entry per side, active over all of sampling")
        with self.placement.stage(self.transformer) as device:
            dtype = module_dtype(self.transformer)
            sides = _on_device(sides, device, dtype)
            fit_text_positions(self.transformer, sides[0][0].tokens.shape[1])
            timesteps = self._timesteps(steps, strength if latents is not None else 1.0, device)
            schedule = self._text_schedule(sides, timesteps)
            latent_frames = (num_frames - 1) // self.temporal + 1
            extra = 0 if cfg.patch_size_t is None else (-latent_frames) % cfg.patch_size_t  # 1.5: pad to patch_size_t
            shape = (sides[0][0].tokens.shape[0], latent_frames + extra, cfg.in_channels, height // self.spatial,
                     width // self.spatial)
            generator = torch.Generator("cpu").manual_seed(seed)
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if latents is None:
                x = noise * self.scheduler.init_noise_sigma
            else:
                x = self._noised_input(latents, noise, timesteps[:1], extra, device, dtype)
            rotary = self._rotary(height, width, x.shape[1], device)
            with step_caching(self.transformer, self.step_cache, lambda: self.current_timestep, len(timesteps),
                              use_cfg):
                x = self._loop(x, schedule, timesteps, guidance if use_cfg else None, dynamic_cfg, steps, rotary,
                               generator, callback)
        return x[:, extra:]

    def _noised_input(self, latents, noise, first_t, extra, device, dtype):
        if list(latents.shape[:1]) + list(latents.shape[2:]) != [noise.shape[0]] + list(noise.shape[2:]) or \
                latents.shape[1] + extra != noise.shape[1]:
            raise ValueError(f"input latents {list(latents.shape)} do not match the requested video "
                             f"(latents of shape {[noise.shape[0], noise.shape[1] - extra] + list(noise.shape[2:])})")
        latents = latents.to(device=device, dtype=dtype)
        if extra:
            latents = torch.cat([latents[:, :extra], latents], dim=1)
        return self.scheduler.add_noise(latents, noise, first_t.expand(latents.shape[0])).to(dtype)

    def _text_schedule(self, sides: list[list[TextStream]], timesteps) -> list[list[list[TextStream]]]:
        """Per step, per side ([negative,] positive), the streams active at that step. A side with no active
        weight at a step is refused: ComfyUI's samplers would predict nothing there."""
        last = self.scheduler.config.num_train_timesteps - 1
        schedule = []
        for t in timesteps.tolist():
            schedule.append([[s for s in side if s.active(t, last)] for side in sides])
            for name, active in zip(["negative", "positive"][-len(sides):], schedule[-1]):
                if sum(s.strength for s in active) <= 0:
                    raise ValueError(f"{name}: no conditioning entry of strength > 0 is active at timestep {t} "
                                     f"({1 - t / last:.1%} of sampling); together the entries' timestep ranges "
                                     f"must cover the whole of sampling (0 to 1)")
        return schedule

    def _predictions(self, x, texts: list[torch.Tensor], t, rotary) -> list[torch.Tensor]:
        """The transformer's prediction for x under each text stream, two streams a forward: the batch guidance
        has always used, so one forward never needs more memory than a plain guided step."""
        cached = getattr(self.transformer, "is_cache_enabled", False)  # cache hooks keep their state per context
        preds = []
        for k in range(0, len(texts), 2):
            chunk = texts[k:k + 2]
            model_in = self.scheduler.scale_model_input(torch.cat([x] * len(chunk)), t)
            with self.transformer.cache_context(f"streams{k}") if cached else contextlib.nullcontext():
                pred = self.transformer(hidden_states=model_in, encoder_hidden_states=torch.cat(chunk),
                                        timestep=t.expand(model_in.shape[0]), image_rotary_emb=rotary,
                                        return_dict=False)[0].float()
            preds += pred.chunk(len(chunk))
        return preds

    def _side_predictions(self, x, active: list[list[TextStream]], t, rotary) -> list[torch.Tensor]:
        """One prediction per side: its active streams' predictions averaged by strength (ComfyUI's
        calc_cond_batch; it averages denoised images, an affine map of these predictions at a step, so the same)."""
        preds = self._predictions(x, [s.tokens for side in active for s in side], t, rotary)
        out = []
        for side in active:
            weighted = [p * s.strength for p, s in zip(preds, side)]
            out.append(sum(weighted[1:], weighted[0]) / sum(s.strength for s in side))
            preds = preds[len(side):]
        return out

    def _loop(self, x, schedule, timesteps, guidance, dynamic_cfg, steps, rotary, generator, callback):
        dpm = isinstance(self.scheduler, CogVideoXDPMScheduler)
        old_pred = None
        for i, t in enumerate(timesteps):
            self.current_timestep = t
            preds = self._side_predictions(x, schedule[i], t, rotary)
            pred = preds[-1]
            if guidance is not None:
                scale = guidance
                if dynamic_cfg:
                    scale = 1 + guidance * ((1 - math.cos(math.pi * ((steps - t.item()) / steps) ** 5.0)) / 2)
                uncond_pred, cond_pred = preds
                pred = uncond_pred + scale * (cond_pred - uncond_pred)
            if dpm:
                prev_t = timesteps[i - 1] if i > 0 else None
                x_next, old_pred = self.scheduler.step(pred, old_pred, t, prev_t, x, eta=0.0, generator=generator,
                                                       return_dict=False)
            else:
                x_next = self.scheduler.step(pred, t, x, eta=0.0, generator=generator, return_dict=False)[0]
            x = x_next.to(x.dtype)
            if callback is not None:
                callback(i + 1, len(timesteps), x)
        self.current_timestep = None
        return x

    # ---- decoding ----------------------------------------------------------------------------------------

def fit_text_positions(transformer, text_len: int) -> None:
    """Sin-cos (CogVideoX-2B style) transformers lay out positions for a fixed text length; resize them (a
    buffer, not weights) so a stream of any length fits. Rotary transformers read the length at run time.
    load_transformer(text_len=...) sizes them at load; denoise calls this for a stream whose length was first
    known there (a ComfyUI model loader does not know the fuser), once per length, and says so in the log."""
    embed = transformer.patch_embed
    if not embed.use_positional_embeddings or embed.use_learned_positional_embeddings:
        return
    if embed.max_text_seq_length != text_len:
        logger.info("sin-cos text positions of the transformer resized from %d to %d tokens (the text stream's "
                    "length; the weights are unchanged)", embed.max_text_seq_length, text_len)
        embed.max_text_seq_length = text_len
        positions = embed._get_positional_embeddings(embed.sample_height, embed.sample_width, embed.sample_frames,
                                                     device=embed.pos_embedding.device)
        embed.register_buffer("pos_embedding", positions, persistent=False)
        transformer.register_to_config(max_text_seq_length=text_len)

def _check_sides(sides: list[list[TextStream]]) -> None:
    """The streams of all sides ([negative,] positive) are batched together: all need the first positive's shape."""
    names = ["negative", "positive"][-len(sides):]
    for name, side in zip(names, sides):
        if not side:
            raise ValueError(f"{name}: the conditioning has no entries")
    shape = sides[-1][0].tokens.shape
    for name, side in zip(names, sides):
        for i, stream in enumerate(side):
            if stream.tokens.shape != shape:
                raise ValueError(f"{name}: entry {i + 1} has shape {list(stream.tokens.shape)} but positive entry 1 "
                                 f"has {list(shape)}; every entry must come from the same encoder and fuser")


def _on_device(sides: list[list[TextStream]], device, dtype) -> list[list[TextStream]]:
    return [[dataclasses.replace(s, tokens=s.tokens.to(device=device, dtype=dtype)) for s in side] for side in sides]
