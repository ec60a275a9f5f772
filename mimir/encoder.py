"""The text side: prompts -> the frozen encoders' features (T5, and the LLM's query, answer and instruction
tokens) -> the token fuser -> the DiT's text stream, through the prompt cache when one is given."""

from __future__ import annotations

import logging

import torch

from .fuser import FuserConfig
from .offload import Placement
from .prompt_cache import PromptCache, encode_features_cached
from .text import LLMTextEncoder, TextFeatures, encode_t5, unknown_words
from .variants import T5_TEXT_LEN

logger = logging.getLogger(__name__)


def t5_only_text_len(transformer) -> int:
    """The T5 length a DiT reads without a fuser (plain CogVideoX): the text length it was trained on, which its
    config keeps as max_text_seq_length (226 in every published CogVideoX; 24 in the demo's T5-only arm)."""
    return transformer.config.max_text_seq_length


class PromptEncoder:
    """T5 (+ the LLM and the fuser for Mimir; T5 alone is plain CogVideoX) on a placement."""

    def __init__(self, tokenizer=None, text_encoder=None, llm=None, llm_tokenizer=None, fuser=None,
                 placement: Placement | None = None, prompt_cache: PromptCache | None = None,
                 t5_len: int = T5_TEXT_LEN):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.llm, self.llm_tokenizer, self.fuser = llm, llm_tokenizer, fuser
        self.placement = placement or Placement()
        self.prompt_cache = prompt_cache  # a repeated prompt then runs neither T5 nor the LLM
        self._llm_encoder = None
        self.text_sources = None  # (T5 files, LLM files) when loaded from files (mimir.loading.text_sources)
        self.t5_len = t5_len  # the T5 length without a fuser: the DiT's, t5_only_text_len (MimirPipeline sets it)

    @property
    def text_len(self) -> int:
        return self.fuser.config.text_len if self.fuser is not None else self.t5_len

    def llm_encoder(self) -> LLMTextEncoder:
        if self.llm is None:
            raise ValueError("this pipeline has no LLM (it was released or never loaded): pass encoded prompts instead")
        if self._llm_encoder is None:
            self._llm_encoder = LLMTextEncoder(self.llm, self.llm_tokenizer, self.fuser.config)
        return self._llm_encoder

    @torch.no_grad()
    def encode_features(self, prompts: list[str], seed: int | None = None, callback=None,
                        config: FuserConfig | None = None) -> TextFeatures:
        """Frozen-encoder features; T5 alone (no LLM features) when there is no fuser (plain CogVideoX).
        `config` overrides the fuser's encoding settings (answer tokens, instructions) for this call."""
        config = config or (self.fuser.config if self.fuser is not None else None)
        text_len = config.text_len if config is not None else self.text_len
        self._warn_unknown_words(prompts)
        with self.placement.stage(self.text_encoder) as device:
            t5 = encode_t5(self.tokenizer, self.text_encoder, prompts, max_length=text_len, device=device)
        if self.fuser is None:
            return TextFeatures(t5).to("cpu")
        with self.placement.stage(self.llm):
            encoder = self.llm_encoder() if config == self.fuser.config else LLMTextEncoder(self.llm, self.llm_tokenizer,
                                                                                           config)
            llm, mask, instructions = encoder(prompts, seed=seed, callback=callback)
        return TextFeatures(t5, llm, mask, instructions).to("cpu")

    def _warn_unknown_words(self, prompts: list[str]) -> None:
        """Names each prompt word a tokenizer reads as its unknown token: the video cannot follow it."""
        tokenizers = {"T5": self.tokenizer, "LLM": self.llm_tokenizer if self.fuser is not None else None}
        for prompt in dict.fromkeys(prompts):
            for name, tokenizer in tokenizers.items():
                words = unknown_words(tokenizer, prompt) if tokenizer is not None else []
                if words:
                    logger.warning("prompt %r: the %s tokenizer does not know %s (each is read as its unknown "
                                   "token, so the video cannot follow it)", prompt, name,
                                   ", ".join(repr(w) for w in words))

    @torch.no_grad()
    def fuse(self, features: TextFeatures, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Features -> the DiT's text stream [B, n (+K), D] in `dtype` (the transformer's); T5-only features are
        the stream as they are (plain CogVideoX)."""
        if features.llm is None:
            return features.t5.to(dtype)
        with self.placement.stage(self.fuser) as device:
            fused = self.fuser(*_fuser_args(features.to(device)))
        return fused.to(dtype)

    def encode_prompt(self, prompt, negative_prompt: str | list[str] | None = "", seed: int | None = None,
                      callback=None, dtype: torch.dtype = torch.float32):
        """-> (cond, uncond) text streams; the negative prompt goes through the whole fuser too.
        negative_prompt=None skips it (no guidance) and returns uncond=None."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            return self.fuse(self._features(prompts, seed, callback), dtype), None
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        fused = self.fuse(self._features(negatives + prompts, seed, callback), dtype)
        return fused[len(negatives):], fused[:len(negatives)]

    def _features(self, prompts: list[str], seed: int | None, callback):
        if self.prompt_cache is None or self.fuser is None:
            return self.encode_features(prompts, seed=seed, callback=callback)
        return encode_features_cached(self, prompts, self.prompt_cache, seed=seed, callback=callback)

    def release_llm(self) -> None:
        """Drop the LLM once prompts are encoded; it is the largest text model."""
        self.llm = self._llm_encoder = None


def _fuser_args(features: TextFeatures):
    return features.t5, features.llm, features.llm_mask, features.instructions
