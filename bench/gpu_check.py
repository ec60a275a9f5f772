"""One GPU check: every speed and memory setting on real-width models, one table of wall time and peak memory.

    python bench/gpu_check.py           # CUDA, bf16, real widths, 1-2 layers per model (under 8 minutes)
    python bench/gpu_check.py --smoke   # the same code on the CPU at test size, fp32 (the test suite runs it)

Models, random weights in the published layouts (no download), 2 layers each where they have layers:
- CogVideoX-5B, -2B and 1.5-5B transformers: mimir.variants.TRANSFORMER_CONFIGS (THUDM/CogVideoX-2b and -5b
  transformer/config.json; CogVideoX1.5-5B from diffusers' scripts/convert_cogvideox_to_diffusers.py), with
  num_layers 2. The 2B's sin-cos positions are laid out for 226 + 4 text tokens by the pipeline.
- the CogVideoX VAE, whole: mimir.variants.VAE_CONFIG (THUDM/CogVideoX-5b vae/config.json).
- T5 v1.1 XXL encoder (google/t5-v1_1-xxl config.json: d_model 4096, 64 heads x 64, d_ff 10240, gated-gelu,
  vocab 32128) and Phi-3.5-mini-instruct (microsoft/Phi-3.5-mini-instruct config.json: hidden 3072, 32 heads,
  intermediate 8192, vocab 32064, longrope with original 4096 / max 131072 positions; its 48 long / short rope
  factors are set to 1.0 here: the values do not change shapes or cost), word-level tokenizers.
- the token fuser at its real size: FuserConfig() (3072 -> 4096, 226 + 4 tokens, 32 answer tokens).

Settings: text encode; bf16 denoising of each transformer against diffusers' CogVideoXPipeline on the same text
streams (latents max abs diff); VAE decode whole and tiled; fp8 storage; block swap; torch.compile; every
attention backend this machine has; every step cache (mimir.speed); one training step with accelerate in bf16
with gradient checkpointing. Peak memory is torch.cuda.max_memory_allocated during the setting (resident
weights included); on the CPU it is not measured. The check column compares each setting with its reference.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel
from transformers import Phi3Config, Phi3ForCausalLM, T5Config, T5EncoderModel

from mimir.codec import tiles_fit
from mimir.fuser import FuserConfig, TokenFuser
from mimir.memory import compile_blocks, enable_block_swap, enable_fp8_storage
from mimir.offload import Placement
from mimir.pipeline import MimirPipeline
from mimir.sampler import fit_text_positions
from mimir.speed import ATTENTION_BACKENDS, STEP_CACHES, StepCache, check_attention_backend, set_attention_backend
from mimir.testing import real_scheduler, tiny_components, word_tokenizer
from mimir.variants import TRANSFORMER_CONFIGS, VAE_CONFIG, VAE_SCALING_FACTORS

PROMPT = "a red circle moves to the left"
GIB = 2 ** 30
REAL_FUSER_PARAMS = 41_971_713  # docs/MIMIR.md section 7


@dataclass
class Size:
    device: str
    dtype: torch.dtype
    video: dict  # frames, height, width for 5B and 2B
    video_15: dict  # for 1.5
    steps: int
    cache_steps: int  # long enough for every step cache to skip work
    compile_backend: str


REAL = Size("cuda", torch.bfloat16, dict(num_frames=49, height=480, width=720),
            dict(num_frames=17, height=768, width=1360), steps=4, cache_steps=12, compile_backend="inductor")
SMOKE = Size("cpu", torch.float32, dict(num_frames=9, height=32, width=32), dict(num_frames=17, height=32, width=32),
             steps=2, cache_steps=8, compile_backend="eager")


def real_text_parts() -> dict:
    """T5-XXL, Phi-3.5-mini and the fuser at real widths, 2 layers each, random weights (sources: module doc)."""
    torch.manual_seed(0)
    t5_tok, llm_tok = word_tokenizer(kind="t5"), word_tokenizer(kind="llm")
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                 relative_attention_max_distance=128, pad_token_id=t5_tok.pad_token_id,
                                 eos_token_id=t5_tok.eos_token_id))
    factors = [1.0] * 48  # head dim 96 / 2
    llm = Phi3ForCausalLM(Phi3Config(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=131072, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5, sliding_window=262144, tie_word_embeddings=False, bos_token_id=llm_tok.bos_token_id,
        eos_token_id=llm_tok.eos_token_id, pad_token_id=llm_tok.pad_token_id,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, factor=32.0, long_factor=factors,
                             short_factor=factors)))
    return dict(tokenizer=t5_tok, text_encoder=t5.eval(), llm_tokenizer=llm_tok, llm=llm.eval(),
                fuser=TokenFuser(FuserConfig()).eval())


def real_video_parts(variant: str) -> dict:
    """The transformer (2 layers) and the whole VAE of a variant, random weights."""
    torch.manual_seed(1)
    transformer = CogVideoXTransformer3DModel(**{**TRANSFORMER_CONFIGS[variant], "num_layers": 2})
    vae = AutoencoderKLCogVideoX(**{**VAE_CONFIG, "scaling_factor": VAE_SCALING_FACTORS[variant]})
    return dict(transformer=transformer.eval(), vae=vae.eval(),
                scheduler=real_scheduler("ddim", snr_shift_scale=3.0 if variant == "2b" else 1.0))


def pipeline(size: Size, variant: str, text_parts: dict | None = None) -> MimirPipeline:
    """Real widths (the text models shared between variants) or, for --smoke, mimir.testing's tiny models."""
    if size is REAL:
        parts = {**(text_parts or real_text_parts()), **real_video_parts(variant)}
    else:
        parts = tiny_components(variant=variant)
    for name, part in parts.items():
        if isinstance(part, torch.nn.Module):
            parts[name] = part.to(size.device, size.dtype if name != "fuser" else torch.float32)
    return MimirPipeline(**parts, placement=Placement(size.device, size.device))


class Table:
    def __init__(self, size: Size):
        self.size, self.rows = size, []

    def measure(self, name: str, fn):
        """Run fn() -> (result, check text); a row of wall time and peak memory."""
        cuda = self.size.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result, check = fn()
        if cuda:
            torch.cuda.synchronize()
        peak = f"{torch.cuda.max_memory_allocated() / GIB:.2f}" if cuda else "-"
        self.rows.append((name, time.perf_counter() - start, peak, check))
        return result

    def __str__(self) -> str:
        lines = ["| setting | wall s | peak GiB | check |", "|---|---|---|---|"]
        lines += [f"| {name} | {seconds:.2f} | {peak} | {check} |" for name, seconds, peak, check in self.rows]
        return "\n".join(lines)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"max abs diff {(a.float() - b.float()).abs().max().item():.3g}"


def generation(table: Table, variant: str, text_parts: dict | None = None):
    """Encode, Mimir's denoising and diffusers' on the same streams. -> (pipe, cond, uncond, latents)."""
    size = table.size
    video = size.video_15 if variant == "1.5" else size.video
    pipe = pipeline(size, variant, text_parts)
    if variant == "5b":
        cond, uncond = table.measure("text encode: T5 + LLM + fuser, prompt and empty negative",
                                     lambda: (pipe.encode_prompt(PROMPT, ""), _fuser_check(pipe)))
    else:
        cond, uncond = pipe.encode_prompt(PROMPT, "")
    fit_text_positions(pipe.transformer, cond.shape[1])  # 2B: what diffusers' pipeline then reads too
    latents = table.measure(f"{variant} denoise, Mimir ({size.steps} steps, CFG, {_video(video)})",
                            lambda: (_denoise(pipe, cond, uncond, video, size.steps), ""))
    ref = CogVideoXPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                            transformer=pipe.transformer, scheduler=pipe.scheduler)
    ref.set_progress_bar_config(disable=True)

    def diffusers_run():
        out = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, **video, num_inference_steps=size.steps,
                  guidance_scale=6.0, generator=torch.Generator().manual_seed(0), output_type="latent").frames
        out = out[:, out.shape[1] - latents.shape[1]:]  # diffusers keeps 1.5's padding frame in its latents
        return out, max_diff(out, latents) + " vs Mimir"

    table.measure(f"{variant} denoise, diffusers CogVideoXPipeline, same streams", diffusers_run)
    return pipe, cond, uncond, latents


def _fuser_check(pipe) -> str:
    params = sum(p.numel() for p in pipe.fuser.parameters())
    if pipe.fuser.config == FuserConfig():
        return f"fuser {params:,} parameters ({'as' if params == REAL_FUSER_PARAMS else 'NOT as'} published)"
    return f"fuser {params:,} parameters"


def _video(video: dict) -> str:
    return f"{video['num_frames']} frames {video['width']}x{video['height']}"


def _denoise(pipe, cond, uncond, video, steps):
    return pipe.denoise(cond, uncond, **video, steps=steps, guidance=6.0, seed=0)


def decoding(table: Table, pipe, latents):
    frames = table.measure("VAE decode, whole", lambda: (pipe.decode(latents), ""))
    fits = tiles_fit(pipe.vae)
    table.measure("VAE decode, tiled", lambda: (None, max_diff(pipe.decode(latents, tiling=True), frames)
                                                + " vs whole" if fits else "tiles do not fit: decoded whole"))


def memory_options(table: Table, pipe, cond, uncond, latents):
    """fp8 storage, block swap and compile, each on its own copy of the 5B transformer."""
    size, video = table.size, table.size.video

    def run_copy(change):
        other = copy.copy(pipe)
        other.transformer = copy.deepcopy(pipe.transformer)
        change(other)
        return _denoise(other, cond, uncond, video, size.steps)

    table.measure("5b fp8 weight storage (e4m3fn, blocks)", lambda: (None, max_diff(
        run_copy(lambda p: enable_fp8_storage(p.transformer, size.dtype)), latents) + " vs bf16"))

    def swapped(p):
        p.transformer.to("cpu")
        p.placement = Placement(size.device, "cpu")
        enable_block_swap(p.transformer, 1, size.device, "cpu")

    table.measure("5b block swap (1 of 2 blocks, offload device cpu)",
                  lambda: (None, max_diff(run_copy(swapped), latents) + " vs resident"))
    compiled = copy.copy(pipe)
    compiled.transformer = copy.deepcopy(pipe.transformer)
    compile_blocks(compiled.transformer, backend=size.compile_backend)
    table.measure(f"5b compile ({size.compile_backend}), first run (compiles)",
                  lambda: (_denoise(compiled, cond, uncond, video, size.steps), ""))
    table.measure(f"5b compile ({size.compile_backend}), second run",
                  lambda: (None, max_diff(_denoise(compiled, cond, uncond, video, size.steps), latents) + " vs eager"))


def attention_backends(table: Table, pipe, cond, uncond, latents):
    size = table.size
    for name in ATTENTION_BACKENDS:
        try:
            check_attention_backend(name)
        except ValueError as exc:
            table.rows.append((f"5b attention {name}", 0.0, "-", f"skipped: {str(exc)[:80]}"))
            continue
        other = copy.copy(pipe)
        other.transformer = copy.deepcopy(pipe.transformer)
        set_attention_backend(other.transformer, name)
        table.measure(f"5b attention {name}", lambda other=other: (None, max_diff(
            _denoise(other, cond, uncond, size.video, size.steps), latents) + " vs default"))


def step_caches(table: Table, pipe, cond, uncond):
    size = table.size
    steps = size.cache_steps
    uncached = table.measure(f"5b uncached, {steps} steps", lambda: (_denoise(pipe, cond, uncond, size.video, steps), ""))
    for method in STEP_CACHES:
        pipe.step_cache = StepCache(method)
        if method == "mag":
            table.measure(f"5b step cache {pipe.step_cache}, calibration run", lambda: (
                _denoise(pipe, cond, uncond, size.video, steps), ""))
        table.measure(f"5b step cache {pipe.step_cache}, {steps} steps", lambda: (None, max_diff(
            _denoise(pipe, cond, uncond, size.video, steps), uncached) + " vs uncached"))
    pipe.step_cache = None


def training_step(table: Table, pipe, cond_features):
    """Two optimizer steps of fuser + 5B DiT (full), accelerate bf16 autocast, gradient checkpointing."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from mimir.sampler import rotary_embeddings
    from mimir.train.config import TrainConfig
    from mimir.train.model import Denoiser, make_optimizer, setup_trainable

    size = table.size
    video = size.video
    config = TrainConfig(mixed_precision="bf16", gradient_checkpointing=True, optimizer="adamw", **video)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(cpu=size.device == "cpu", mixed_precision="bf16")
    denoiser = Denoiser(copy.deepcopy(pipe.fuser), copy.deepcopy(pipe.transformer))
    setup_trainable(denoiser, config)
    model, optimizer = accelerator.prepare(denoiser.to(size.device), make_optimizer(denoiser, config))
    cfg = pipe.transformer.config
    shape = (1, (video["num_frames"] - 1) // 4 + 1, cfg.in_channels, video["height"] // 8, video["width"] // 8)
    latents, noise = torch.randn(shape, device=size.device), torch.randn(shape, device=size.device)
    t = torch.tensor([500], device=size.device)
    rotary = rotary_embeddings(cfg, video["height"], video["width"], shape[1], size.device)
    features = cond_features.to(size.device)

    def steps():
        losses = []
        for _ in range(2):
            noisy = pipe.scheduler.add_noise(latents, noise, t)
            pred = model(features.t5, features.llm, features.llm_mask, features.instructions, noisy, t, rotary)
            loss = torch.nn.functional.mse_loss(pred.float(), pipe.scheduler.get_velocity(latents, noise, t))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        finite = all(torch.isfinite(torch.tensor(losses)))
        return None, f"losses {losses[0]:.4g} -> {losses[1]:.4g}" + ("" if finite else " NOT FINITE")

    table.measure(f"training: 2 steps, fuser + 5b DiT, accelerate bf16, gradient checkpointing, {_video(video)}",
                  steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU at test size")
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else REAL
    if size.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU test-size run", file=sys.stderr)
        return 2
    start = time.perf_counter()
    table = Table(size)
    with torch.no_grad():
        pipe, cond, uncond, latents = generation(table, "5b")
        decoding(table, pipe, latents)
        memory_options(table, pipe, cond, uncond, latents)
        attention_backends(table, pipe, cond, uncond, latents)
        step_caches(table, pipe, cond, uncond)
        features = pipe.encode_features([PROMPT])
    training_step(table, pipe, features)
    text_parts = {name: getattr(pipe, name) for name in ("tokenizer", "text_encoder", "llm_tokenizer", "llm", "fuser")}
    del pipe
    with torch.no_grad():
        for variant in ("2b", "1.5"):
            generation(table, variant, text_parts if size is REAL else None)
    machine = torch.cuda.get_device_name() if size.device == "cuda" else f"CPU ({platform.machine()})"
    print(f"{machine}, torch {torch.__version__}, {'smoke (test size, fp32)' if args.smoke else 'real widths, bf16'}; "
          f"total {time.perf_counter() - start:.0f} s\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
