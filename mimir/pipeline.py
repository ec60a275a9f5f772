"""MimirPipeline: prompt -> T5 + LLM -> token fuser -> CogVideoX DiT + scheduler (CFG) -> VAE -> frames.

It composes three parts, each usable on its own (the ComfyUI nodes call them directly):
- `PromptEncoder` (mimir/encoder.py): prompts -> text streams;
- `Sampler` (mimir/sampler.py): the sampler loop, text streams -> latents, as diffusers' CogVideoXPipeline;
- `VideoCodec` (mimir/codec.py): latents <-> frames, and the latent layouts.
"""

from __future__ import annotations

import copy

import torch

from .codec import VideoCodec
from .encoder import PromptEncoder, t5_only_text_len
from .offload import Placement, module_dtype
from .prompt_cache import PromptCache
from .sampler import Sampler, StepCallback, check_steps, check_video_size


def _part(part: str, name: str) -> property:
    """A model or setting of one of the parts, read and set through the pipeline (as a diffusers pipeline's
    components are)."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value))


class MimirPipeline:
    def __init__(self, transformer, vae, scheduler, tokenizer=None, text_encoder=None, llm=None, llm_tokenizer=None,
                 fuser=None, placement: Placement | None = None, prompt_cache: PromptCache | None = None):
        placement = placement or Placement()
        self.text = PromptEncoder(tokenizer, text_encoder, llm, llm_tokenizer, fuser, placement, prompt_cache)
        self.sampler = Sampler(None, scheduler, placement)
        self.codec = VideoCodec(vae, placement)
        self.transformer = transformer

    tokenizer, text_encoder = _part("text", "tokenizer"), _part("text", "text_encoder")
    llm, llm_tokenizer, fuser = _part("text", "llm"), _part("text", "llm_tokenizer"), _part("text", "fuser")
    prompt_cache, text_sources = _part("text", "prompt_cache"), _part("text", "text_sources")
    scheduler = _part("sampler", "scheduler")
    step_cache = _part("sampler", "step_cache")
    vae = _part("codec", "vae")

    @property
    def transformer(self):
        return self.sampler.transformer

    @transformer.setter
    def transformer(self, transformer) -> None:
        self.sampler.transformer = transformer
        if transformer is not None:  # without a fuser, prompts are encoded to the length this DiT was trained on
            self.text.t5_len = t5_only_text_len(transformer)

    def __copy__(self) -> MimirPipeline:
        """The same models in parts of its own: setting a model or option on the copy leaves this one as it is."""
        other = object.__new__(type(self))
        other.text, other.sampler, other.codec = (copy.copy(part) for part in (self.text, self.sampler, self.codec))
        return other

    @property
    def placement(self) -> Placement:
        return self.sampler.placement

    @placement.setter
    def placement(self, placement: Placement) -> None:
        self.text.placement = self.sampler.placement = self.codec.placement = placement

    # ---- text ------------------------------------------------------------------------------------------
    @property
    def text_len(self) -> int:
        return self.text.text_len

    def llm_encoder(self):
        return self.text.llm_encoder()

    def encode_features(self, prompts: list[str], seed: int | None = None, callback=None, config=None):
        return self.text.encode_features(prompts, seed=seed, callback=callback, config=config)

    def fuse(self, features) -> torch.Tensor:
        """Features -> the DiT's text stream, in the transformer's dtype (fp32 without one)."""
        return self.text.fuse(features, self._stream_dtype())

    def encode_prompt(self, prompt, negative_prompt: str | list[str] | None = "", seed: int | None = None,
                      callback=None):
        return self.text.encode_prompt(prompt, negative_prompt, seed, callback, self._stream_dtype())

    def release_llm(self) -> None:
        self.text.release_llm()

    def _stream_dtype(self) -> torch.dtype:
        return module_dtype(self.transformer) if self.transformer is not None else torch.float32

    # ---- denoising and decoding --------------------------------------------------------------------------
    def use_scheduler(self, kind: str) -> None:
        self.sampler.use_scheduler(kind)

    def denoise(self, *args, **kwargs) -> torch.Tensor:
        """Sampler.denoise with this pipeline's VAE factors (diffusers reads them from the VAE config)."""
        if self.vae is not None:
            self.sampler.temporal, self.sampler.spatial = self.codec.temporal, self.codec.spatial
        return self.sampler.denoise(*args, **kwargs)

    def decode(self, latents: torch.Tensor, tiling: bool = False, slicing: bool = False) -> torch.Tensor:
        return self.codec.decode(latents, tiling=tiling, slicing=slicing)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(frames)

    def __call__(self, prompt, negative_prompt: str = "", num_frames: int = 49, height: int = 480, width: int = 720,
                 steps: int = 50, guidance: float = 6.0, seed: int = 0, dynamic_cfg: bool = False,
                 callback: StepCallback | None = None, tiling: bool = False, slicing: bool = False,
                 output_type: str = "frames") -> torch.Tensor:
        check_video_size(num_frames, height, width)
        check_steps(steps)
        cond, uncond = self.encode_prompt(prompt, negative_prompt if guidance > 1.0 else None, seed=seed)
        latents = self.denoise(cond, uncond, num_frames, height, width, steps, guidance, seed, dynamic_cfg,
                               callback=callback)
        return latents if output_type == "latent" else self.decode(latents, tiling=tiling, slicing=slicing)
