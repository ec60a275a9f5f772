"""Speed options for the CogVideoX transformer (DiT) that come from diffusers: the attention backend and step
caching. Both only select and configure what diffusers has; neither changes weights.

- attention backend: diffusers' attention dispatcher (`diffusers.models.attention_dispatch`) runs attention
  with torch's SDPA ("native"), flash-attn, SageAttention or xFormers. diffusers' own CogVideoX attention
  processor calls `F.scaled_dot_product_attention` directly, so `set_attention_backend` passes it by; here the
  processor is swapped for the same computation with its one attention call going through the dispatcher.
- step caching: diffusers' cache hooks (`transformer.enable_cache`), which reuse what the transformer computed
  at earlier denoising steps instead of recomputing all of it: first-block cache ("fbc", skips the remaining
  blocks while the first block's output barely changes), pyramid attention broadcast ("pab", reuses attention
  outputs), FasterCache ("faster": reused attention plus an unconditional branch extrapolated from the
  conditional one), TaylorSeer ("taylorseer", extrapolates the transformer's output between full steps) and
  MagCache ("mag", skips steps by the model's residual-magnitude curve). One setting each: see STEP_CACHES.
  Hooks are attached for one denoising run and removed after it, so a shared transformer stays unchanged.
  MagCache needs that curve per checkpoint (diffusers ships Flux's only): the first "mag" run of a transformer
  at a step count is diffusers' calibration run (nothing skipped), and later runs use what it measured.
"""

from __future__ import annotations

import ast
import contextlib
import io
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0

# "native": torch's scaled_dot_product_attention; the others need flash-attn, sageattention or xformers
ATTENTION_BACKENDS = ("native", "flash", "sage", "xformers")


def check_attention_backend(name: str) -> None:
    """Raise ValueError, naming the package to install, unless this machine can run attention backend `name`.
    Needs no model, so callers check before loading anything."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {list(ATTENTION_BACKENDS)}, got {name!r}")
    try:
        from diffusers.models.attention_dispatch import attention_backend
    except ImportError as exc:
        raise ValueError("this diffusers has no attention dispatcher (diffusers.models.attention_dispatch); "
                         "upgrade diffusers to choose an attention backend") from exc
    try:
        with attention_backend(name):  # diffusers' own check of the package and its version
            pass
    except (RuntimeError, ValueError) as exc:  # diffusers' message names the package and version to install
        raise ValueError(f"attention backend {name!r}: {exc}") from exc


class DispatchCogVideoXAttnProcessor(CogVideoXAttnProcessor2_0):
    """diffusers' CogVideoXAttnProcessor2_0, line for line, except that attention goes through diffusers'
    dispatcher with this processor's `_attention_backend` (the attribute set_attention_backend sets). The
    "native" backend runs the same SDPA call on the same tensors, so it gives the default's results exactly."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)
        # the dispatcher takes [B, S, H, D]; native permutes back to these very [B, H, S, D] tensors
        hidden_states = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                              attn_mask=attention_mask, backend=self._attention_backend)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1)
        return hidden_states, encoder_hidden_states


def set_attention_backend(transformer: torch.nn.Module, name: str) -> int:
    """Run the transformer's attention with backend `name` (ATTENTION_BACKENDS). Per model: diffusers' global
    default backend is left alone. Returns the number of attention layers set."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    check_attention_backend(name)
    layers = [m for m in transformer.modules() if isinstance(m, Attention)]
    for layer in layers:
        if type(layer.processor) is CogVideoXAttnProcessor2_0:
            layer.set_processor(DispatchCogVideoXAttnProcessor())
        elif not hasattr(layer.processor, "_attention_backend"):
            raise ValueError(f"attention backend: {type(layer.processor).__name__} does not go through diffusers' "
                             f"attention dispatcher (unfuse the QKV projections first)")
        layer.processor._attention_backend = AttentionBackendName(name)
    return len(layers)


# method -> (its main setting, the default, what a larger value does); every other setting is diffusers' default
# or, where diffusers asks for one, the value of its CogVideoX example
STEP_CACHES = {
    "fbc": ("threshold", 0.05, "skips more steps (first block's relative change below which the rest is reused)"),
    "pab": ("skip", 2, "reuses attention outputs for more steps (recompute every N-th step)"),
    "faster": ("skip", 2, "reuses attention outputs for more steps (recompute every N-th step)"),
    "taylorseer": ("interval", 5, "predicts more steps between full computations"),
    "mag": ("threshold", 0.06, "skips more steps (accumulated error allowed)"),
}


@dataclass(frozen=True)
class StepCache:
    """A step-caching method of diffusers and its main setting (None: the default in STEP_CACHES)."""

    method: str
    value: float | None = None

    def __post_init__(self):
        if self.method not in STEP_CACHES:
            raise ValueError(f"step cache must be one of {list(STEP_CACHES)}, got {self.method!r}")
        if self.value is not None and not self.value > 0:
            raise ValueError(f"step cache {self.method}: its {STEP_CACHES[self.method][0]} must be > 0, "
                             f"got {self.value}")
        if self.value is not None and self.method in ("pab", "faster", "taylorseer") and \
                (self.value != round(self.value) or self.value < 1):
            raise ValueError(f"step cache {self.method}: its {STEP_CACHES[self.method][0]} is a whole number of "
                             f"steps >= 1, got {self.value}")

    @classmethod
    def parse(cls, text: str) -> StepCache:
        """"fbc" or "fbc:0.1" (method[:setting])."""
        method, _, value = text.partition(":")
        try:
            return cls(method, float(value) if value else None)
        except ValueError as exc:
            raise ValueError(f"step cache {text!r}: {exc}") from exc

    @property
    def setting(self) -> float:
        return STEP_CACHES[self.method][1] if self.value is None else self.value

    def __str__(self) -> str:
        return f"{self.method} ({STEP_CACHES[self.method][0]} {self.setting:g})"

    def config(self, current_timestep: Callable[[], int], steps: int, guided: bool, mag_ratios=None):
        """The diffusers cache config for one run of `steps` steps; `current_timestep()` is the step's timestep.
        "mag" without `mag_ratios` is a calibration run."""
        from diffusers.hooks import (
            FasterCacheConfig,
            FirstBlockCacheConfig,
            MagCacheConfig,
            PyramidAttentionBroadcastConfig,
            TaylorSeerCacheConfig,
        )

        value = self.setting
        if self.method == "fbc":
            return FirstBlockCacheConfig(threshold=value)
        if self.method == "pab":
            return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=round(value),
                                                   current_timestep_callback=current_timestep)
        if self.method == "faster":  # diffusers' CogVideoX example (FasterCacheConfig docs)
            return FasterCacheConfig(spatial_attention_block_skip_range=round(value),
                                     spatial_attention_timestep_skip_range=(-1, 681),
                                     current_timestep_callback=current_timestep,
                                     attention_weight_callback=lambda _: 0.3, unconditional_batch_skip_range=5,
                                     unconditional_batch_timestep_skip_range=(-1, 781), tensor_format="BFCHW",
                                     is_guidance_distilled=not guided)
        if self.method == "taylorseer":  # lite: predicts the output projection; its default patterns miss CogVideoX
            return TaylorSeerCacheConfig(cache_interval=round(value), taylor_factors_dtype=torch.float32,
                                         use_lite_mode=True)
        return MagCacheConfig(threshold=value, num_inference_steps=steps, mag_ratios=mag_ratios,
                              calibrate=mag_ratios is None)


# transformer -> {(steps, guided): MagCache's residual-magnitude ratios, one per step}
_MAG_RATIOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def step_caching(transformer, cache: StepCache | None, current_timestep: Callable[[], int], steps: int, guided: bool):
    """diffusers' cache hooks on `transformer` for one denoising run (nothing when `cache` is None)."""
    if cache is None:
        yield
        return
    known = _MAG_RATIOS.setdefault(transformer, {})
    calibrating = cache.method == "mag" and (steps, guided) not in known
    transformer.enable_cache(cache.config(current_timestep, steps, guided, known.get((steps, guided))))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed) if calibrating else contextlib.nullcontext():
            yield
        if calibrating:
            known[steps, guided] = _calibrated_ratios(printed.getvalue())
    finally:
        transformer.disable_cache()


def _calibrated_ratios(printed: str) -> list[float]:
    """diffusers' MagCache calibration prints its ratios (a Python list, last) rather than returning them."""
    lines = [line for line in printed.splitlines() if line.startswith("[")]
    try:
        return [float(r) for r in ast.literal_eval(lines[-1])]
    except (IndexError, ValueError, SyntaxError) as exc:
        raise RuntimeError(f"could not read MagCache's calibration from diffusers' output {printed[-200:]!r}") from exc
