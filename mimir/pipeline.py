"""MimirPipeline: prompt -> T5 + LLM -> token fuser -> CogVideoX DiT + scheduler (CFG) -> VAE -> frames.

The denoising loop mirrors diffusers' `CogVideoXPipeline` step for step, so with a fresh fuser and no
stabilizer tokens both give the same latents (tests/test_pipeline_parity.py). Latents are in diffusers'
order [B, T, C, H, W] and in diffusion space (VAE latents times the VAE scaling factor).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from diffusers.utils.torch_utils import randn_tensor

from .fuser import FuserConfig
from .offload import Placement, module_dtype
from .prompt_cache import PromptCache, encode_features_cached
from .speed import StepCache, step_caching
from .text import LLMTextEncoder, TextFeatures, encode_t5

# (step index, number of steps, latents) -> None; may raise to interrupt
StepCallback = Callable[[int, int, torch.Tensor], None]
VAE_TEMPORAL, VAE_SPATIAL = 4, 8
SCHEDULERS = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}


def check_video_size(num_frames: int, height: int, width: int) -> None:
    """CogVideoX's VAE compresses 4 frames and 8x8 pixels, and the DiT patches 2x2 latents."""
    if num_frames < 1 or (num_frames - 1) % VAE_TEMPORAL:
        raise ValueError(f"frames must be 4k+1 (1, 5, 9, ..., 49), got {num_frames}")
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {size}")


def rotary_embeddings(cfg, height: int, width: int, latent_frames: int, device):
    """CogVideoX 5B / 1.5 rotary embeddings for a video (None for sin-cos 2B); shared by sampling and training."""
    if not cfg.use_rotary_positional_embeddings:
        return None
    grid_h, grid_w = height // (VAE_SPATIAL * cfg.patch_size), width // (VAE_SPATIAL * cfg.patch_size)
    base_w, base_h = cfg.sample_width // cfg.patch_size, cfg.sample_height // cfg.patch_size
    if cfg.patch_size_t is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops,
                                       grid_size=(grid_h, grid_w), temporal_size=latent_frames, device=device)
    frames = (latent_frames + cfg.patch_size_t - 1) // cfg.patch_size_t
    return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
                                   temporal_size=frames, grid_type="slice", max_size=(base_h, base_w), device=device)


class MimirPipeline:
    def __init__(self, transformer, vae, scheduler, tokenizer=None, text_encoder=None, llm=None, llm_tokenizer=None,
                 fuser=None, placement: Placement | None = None, prompt_cache: PromptCache | None = None):
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.llm, self.llm_tokenizer, self.fuser = llm, llm_tokenizer, fuser
        self.placement = placement or Placement()
        self.prompt_cache = prompt_cache  # a repeated prompt then runs neither T5 nor the LLM
        self._llm_encoder = None
        self.step_cache: StepCache | None = None  # diffusers' step caching during denoise (speed.py)
        self.current_timestep = None  # the step's timestep while denoising, as diffusers' pipelines have it

    # ---- text ------------------------------------------------------------------------------------------
    @property
    def text_len(self) -> int:
        return self.fuser.config.text_len if self.fuser is not None else 226

    def llm_encoder(self) -> LLMTextEncoder:
        if self.llm is None:
            raise ValueError("this pipeline has no LLM (it was released or never loaded): pass encoded prompts instead")
        if self._llm_encoder is None:
            self._llm_encoder = LLMTextEncoder(self.llm, self.llm_tokenizer, self.fuser.config)
        return self._llm_encoder

    @torch.no_grad()
    def encode_features(self, prompts: list[str], seed: int | None = None, callback=None,
                        config: FuserConfig | None = None) -> TextFeatures | torch.Tensor:
        """Frozen-encoder features; T5 alone (a tensor) when there is no fuser (plain CogVideoX). `config`
        overrides the fuser's encoding settings (answer tokens, instructions) for this call."""
        config = config or (self.fuser.config if self.fuser is not None else None)
        text_len = config.text_len if config is not None else self.text_len
        with self.placement.stage(self.text_encoder) as device:
            t5 = encode_t5(self.tokenizer, self.text_encoder, prompts, max_length=text_len, device=device)
        if self.fuser is None:
            return t5
        with self.placement.stage(self.llm):
            encoder = self.llm_encoder() if config == self.fuser.config else LLMTextEncoder(self.llm, self.llm_tokenizer,
                                                                                           config)
            llm, mask, instructions = encoder(prompts, seed=seed, callback=callback)
        return TextFeatures(t5, llm, mask, instructions).to("cpu")

    @torch.no_grad()
    def fuse(self, features: TextFeatures | torch.Tensor) -> torch.Tensor:
        """Features -> the DiT's text stream [B, n (+K), D], in the transformer's dtype (fp32 without one)."""
        dtype = module_dtype(self.transformer) if self.transformer is not None else torch.float32
        if isinstance(features, torch.Tensor):
            return features.to(dtype)
        with self.placement.stage(self.fuser) as device:
            fused = self.fuser(*_fuser_args(features.to(device)))
        return fused.to(dtype)

    def encode_prompt(self, prompt, negative_prompt: str | list[str] | None = "", seed: int | None = None,
                      callback=None):
        """-> (cond, uncond) text streams; the negative prompt goes through the whole fuser too.
        negative_prompt=None skips it (no guidance) and returns uncond=None."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            return self.fuse(self._features(prompts, seed, callback)), None
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        fused = self.fuse(self._features(negatives + prompts, seed, callback))
        return fused[len(negatives):], fused[:len(negatives)]

    def _features(self, prompts: list[str], seed: int | None, callback):
        if self.prompt_cache is None or self.fuser is None:
            return self.encode_features(prompts, seed=seed, callback=callback)
        return encode_features_cached(self, prompts, self.prompt_cache, seed=seed, callback=callback)

    def release_llm(self) -> None:
        """Drop the LLM once prompts are encoded; it is the largest text model."""
        self.llm = self._llm_encoder = None

    def use_scheduler(self, kind: str) -> None:
        """Switch between CogVideoX's DDIM and DPM schedulers, keeping the checkpoint's noise settings."""
        if kind not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {kind!r}")
        if type(self.scheduler) is not SCHEDULERS[kind]:  # from_config costs ~10 ms: the sampler node calls this per run
            self.scheduler = SCHEDULERS[kind].from_config(self.scheduler.config)

    # ---- denoising -------------------------------------------------------------------------------------
    def _rotary(self, height: int, width: int, latent_frames: int, device):
        return rotary_embeddings(self.transformer.config, height, width, latent_frames, device)

    def _timesteps(self, steps: int, strength: float, device):
        self.scheduler.set_timesteps(steps, device=device)
        timesteps = self.scheduler.timesteps
        start = steps - min(int(round(steps * strength)), steps)
        return timesteps[start * self.scheduler.order:]

    @torch.no_grad()
    def denoise(self, cond: torch.Tensor, uncond: torch.Tensor | None, num_frames: int = 49, height: int = 480,
                width: int = 720, steps: int = 50, guidance: float = 6.0, seed: int = 0, dynamic_cfg: bool = False,
                latents: torch.Tensor | None = None, strength: float = 1.0,
                callback: StepCallback | None = None) -> torch.Tensor:
        """Text streams -> latents [B, T, C, H/8, W/8]. `latents` (diffusion space) with `strength` < 1
        starts part-way from a noised version of them instead of pure noise."""
        check_video_size(num_frames, height, width)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"denoise strength must be in (0, 1], got {strength}")
        cfg = self.transformer.config
        use_cfg = guidance > 1.0 and uncond is not None
        with self.placement.stage(self.transformer) as device:
            dtype = module_dtype(self.transformer)
            text = torch.cat([uncond, cond]) if use_cfg else cond
            text = text.to(device=device, dtype=dtype)
            fit_text_positions(self.transformer, text.shape[1])
            timesteps = self._timesteps(steps, strength if latents is not None else 1.0, device)
            latent_frames = (num_frames - 1) // VAE_TEMPORAL + 1
            extra = 0 if cfg.patch_size_t is None else (-latent_frames) % cfg.patch_size_t  # 1.5: pad to patch_size_t
            shape = (cond.shape[0], latent_frames + extra, cfg.in_channels, height // VAE_SPATIAL, width // VAE_SPATIAL)
            generator = torch.Generator("cpu").manual_seed(seed)
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if latents is None:
                x = noise * self.scheduler.init_noise_sigma
            else:
                x = self._noised_input(latents, noise, timesteps[:1], extra, device, dtype)
            rotary = self._rotary(height, width, x.shape[1], device)
            with step_caching(self.transformer, self.step_cache, lambda: self.current_timestep, len(timesteps),
                              use_cfg):
                x = self._loop(x, text, timesteps, guidance if use_cfg else None, dynamic_cfg, steps, rotary,
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

    def _loop(self, x, text, timesteps, guidance, dynamic_cfg, steps, rotary, generator, callback):
        dpm = isinstance(self.scheduler, CogVideoXDPMScheduler)
        cached = getattr(self.transformer, "is_cache_enabled", False)  # cache hooks keep their state per context
        old_pred = None
        for i, t in enumerate(timesteps):
            self.current_timestep = t
            model_in = torch.cat([x] * 2) if guidance is not None else x
            model_in = self.scheduler.scale_model_input(model_in, t)
            with self.transformer.cache_context("cond_uncond") if cached else contextlib.nullcontext():
                pred = self.transformer(hidden_states=model_in, encoder_hidden_states=text,
                                        timestep=t.expand(model_in.shape[0]), image_rotary_emb=rotary,
                                        return_dict=False)[0].float()
            if guidance is not None:
                scale = guidance
                if dynamic_cfg:
                    scale = 1 + guidance * ((1 - math.cos(math.pi * ((steps - t.item()) / steps) ** 5.0)) / 2)
                uncond_pred, cond_pred = pred.chunk(2)
                pred = uncond_pred + scale * (cond_pred - uncond_pred)
            if dpm:
                prev_t = timesteps[i - 1] if i > 0 else None
                x_next, old_pred = self.scheduler.step(pred, old_pred, t, prev_t, x, eta=0.0, generator=generator,
                                                       return_dict=False)
            else:
                x_next = self.scheduler.step(pred, t, x, eta=0.0, generator=generator, return_dict=False)[0]
            x = x_next.to(text.dtype)
            if callback is not None:
                callback(i + 1, len(timesteps), x)
        self.current_timestep = None
        return x

    # ---- decoding ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiling: bool = False, slicing: bool = False) -> torch.Tensor:
        """Latents [B, T, C, h, w] (diffusion space) -> frames [B, F, H, W, 3] in 0..1 (float32, CPU).
        Tiling is skipped for VAEs whose tiles do not fit diffusers' tiling scheme (see tiles_fit)."""
        self.vae.enable_tiling() if tiling and tiles_fit(self.vae) else self.vae.disable_tiling()
        self.vae.enable_slicing() if slicing else self.vae.disable_slicing()
        with self.placement.stage(self.vae) as device:
            z = latents.permute(0, 2, 1, 3, 4).to(device=device, dtype=module_dtype(self.vae))
            video = self.vae.decode(z / self.vae.config.scaling_factor).sample
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).cpu()

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [B, F, H, W, 3] in 0..1 -> latents [B, T, C, h, w] in diffusion space (the VAE posterior's mode)."""
        check_video_size(*frames.shape[1:4])
        with self.placement.stage(self.vae) as device:
            video = frames[..., :3].permute(0, 4, 1, 2, 3).to(device=device, dtype=module_dtype(self.vae)) * 2 - 1
            z = self.vae.encode(video).latent_dist.mode()
        return (z.float() * self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4).cpu()

    def __call__(self, prompt, negative_prompt: str = "", num_frames: int = 49, height: int = 480, width: int = 720,
                 steps: int = 50, guidance: float = 6.0, seed: int = 0, dynamic_cfg: bool = False,
                 callback: StepCallback | None = None, tiling: bool = False, slicing: bool = False,
                 output_type: str = "frames") -> torch.Tensor:
        check_video_size(num_frames, height, width)
        cond, uncond = self.encode_prompt(prompt, negative_prompt if guidance > 1.0 else None, seed=seed)
        latents = self.denoise(cond, uncond, num_frames, height, width, steps, guidance, seed, dynamic_cfg,
                               callback=callback)
        return latents if output_type == "latent" else self.decode(latents, tiling=tiling, slicing=slicing)


def fit_text_positions(transformer, text_len: int) -> None:
    """Sin-cos (CogVideoX-2B style) transformers lay out positions for a fixed text length; resize them (a
    buffer, not weights) so a stream of any length fits. Rotary transformers read the length at run time."""
    embed = transformer.patch_embed
    if not embed.use_positional_embeddings or embed.use_learned_positional_embeddings:
        return
    if embed.max_text_seq_length != text_len:
        embed.max_text_seq_length = text_len
        positions = embed._get_positional_embeddings(embed.sample_height, embed.sample_width, embed.sample_frames,
                                                     device=embed.pos_embedding.device)
        embed.register_buffer("pos_embedding", positions, persistent=False)
        transformer.register_to_config(max_text_seq_length=text_len)


def tiles_fit(vae) -> bool:
    """diffusers' tiled CogVideoX decode is exact only when its latent tile stride, in pixels, equals the pixel
    rows each tile keeps. The published VAE's tiles (240 x 360 px) fit; small VAEs (sample size 32 gives 16 px
    tiles) do not, and tiled decoding would return frames of the wrong size, so those decode whole."""
    up = 2 ** (len(vae.config.block_out_channels) - 1)
    for latent_tile, pixel_tile, overlap in ((vae.tile_latent_min_height, vae.tile_sample_min_height,
                                              vae.tile_overlap_factor_height),
                                             (vae.tile_latent_min_width, vae.tile_sample_min_width,
                                              vae.tile_overlap_factor_width)):
        if int(latent_tile * (1 - overlap)) * up != pixel_tile - int(pixel_tile * overlap):
            return False
    return True


def _fuser_args(features: TextFeatures):
    return features.t5, features.llm, features.llm_mask, features.instructions
