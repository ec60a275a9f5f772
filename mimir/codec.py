"""The VAE codec: frames <-> latents, and the two layouts a latent travels in. The denoiser works in diffusers'
order [B, T, C, h, w] and diffusion space (VAE latents times the scaling factor); ComfyUI's LATENT holds
[B, C, T, h, w] in VAE space, as the VAE itself reads it. Factors come from the VAE's config, as diffusers reads
them (vae_scale_factor_spatial / _temporal).
"""

from __future__ import annotations

import torch
from einops import rearrange

from .offload import Placement, module_dtype
from .sampler import check_video_size


def comfy_latent(latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Diffusion-space [B, T, C, h, w] -> a ComfyUI LATENT's samples: VAE space, [B, C, T, h, w], CPU."""
    return rearrange(latents.float() / scaling_factor, "b t c h w -> b c t h w").contiguous().cpu()


def diffusion_latent(samples: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """A ComfyUI LATENT's samples -> diffusion-space [B, T, C, h, w] (float32)."""
    return rearrange(samples.float(), "b c t h w -> b t c h w") * scaling_factor


def spatial_factor(vae_config) -> int:
    """A CogVideoX VAE (its config, or a dict of it) halves the frame size in every down block but the last."""
    channels = vae_config["block_out_channels"] if isinstance(vae_config, dict) else vae_config.block_out_channels
    return 2 ** (len(channels) - 1)


class VideoCodec:
    """A CogVideoX VAE on a placement: encode frames, decode latents, in either layout."""

    def __init__(self, vae, placement: Placement | None = None):
        self.vae, self.placement = vae, placement or Placement()

    @property
    def spatial(self) -> int:
        return spatial_factor(self.vae.config)

    @property
    def temporal(self) -> int:
        return self.vae.config.temporal_compression_ratio

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiling: bool = False, slicing: bool = False) -> torch.Tensor:
        """Diffusion-space latents [B, T, C, h, w] -> frames [B, F, H, W, 3] in 0..1 (float32, CPU)."""
        return self.decode_vae_space(rearrange(latents, "b t c h w -> b c t h w") / self.scaling_factor, tiling,
                                     slicing)

    @torch.no_grad()
    def decode_vae_space(self, z: torch.Tensor, tiling: bool = False, slicing: bool = False) -> torch.Tensor:
        """VAE-space latents [B, C, T, h, w] (a ComfyUI LATENT) -> frames [B, F, H, W, 3] in 0..1. Tiling is
        skipped for VAEs whose tiles do not fit diffusers' tiling scheme (see tiles_fit)."""
        self.vae.enable_tiling() if tiling and tiles_fit(self.vae) else self.vae.disable_tiling()
        self.vae.enable_slicing() if slicing else self.vae.disable_slicing()
        with self.placement.stage(self.vae) as device:
            video = self.vae.decode(z.to(device=device, dtype=module_dtype(self.vae))).sample
        return rearrange((video.float() / 2 + 0.5).clamp(0, 1), "b c f h w -> b f h w c").cpu()

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [B, F, H, W, 3] in 0..1 -> diffusion-space latents [B, T, C, h, w] (the posterior's mode)."""
        return rearrange(self.encode_vae_space(frames) * self.scaling_factor, "b c t h w -> b t c h w")

    @torch.no_grad()
    def encode_vae_space(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [B, F, H, W, 3] in 0..1 -> VAE-space latents [B, C, T, h, w] (float32, CPU)."""
        check_video_size(*frames.shape[1:4])
        with self.placement.stage(self.vae) as device:
            video = rearrange(frames[..., :3], "b f h w c -> b c f h w").to(device=device, dtype=module_dtype(self.vae))
            z = self.vae.encode(video * 2 - 1).latent_dist.mode()
        return z.float().cpu()


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
