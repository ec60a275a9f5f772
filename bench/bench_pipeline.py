"""MimirPipeline vs diffusers' CogVideoXPipeline on identical components (issue 2 section 7, issue 6).

Config: tiny T5 (d_model 32) and Phi-3 LLM (hidden 48) from mimir.testing, a fresh fuser with no stabilizer
tokens (so Mimir's text stream equals plain CogVideoX's), a CogVideoX-2B-style transformer with 2 layers of
4 heads x 32 (sin-cos positions), the tiny VAE, DDIM with the 2B checkpoint's settings; 9 frames at 32 x 32,
8 steps, CFG 6, batch 1, fp32.

Two comparisons, timed interleaved in one run:
- "denoise + decode": both pipelines get the same prompt embeddings (diffusers through prompt_embeds), so the
  work is the same DiT + scheduler loop and VAE decode: this is the parity figure (target <= 1.05).
- "whole call": prompt in, frames out (prompt cache off). Mimir also runs the LLM (query, answer and instruction
  tokens) and the fuser, which diffusers does not have: that extra cost is what this ratio shows (target <= 1.10).
- "encode stage": Mimir's encode of [negative "", prompt] (T5 + LLM + fuser) against the same encode done the
  straightforward way, as before issue 13 (`mimir.testing.uncached_llm_features`: a second forward over prompt +
  answer, instruction rows re-reading the prompt, the empty prompt encoded every call); target >= 1.5x faster.
  The empty prompt is encoded once per loaded LLM, so after the warm-up call it is reused, as in a session.
"""

from __future__ import annotations

import torch
from common import DEVICE, MIB, Row, check, interleaved, median, median_ratio, peak_memory, ratio_spread, table
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

from mimir.offload import Placement
from mimir.pipeline import MimirPipeline
from mimir.testing import tiny_components, uncached_llm_features
from mimir.text import TextFeatures, encode_t5

PROMPT = "a red circle moves to the left and a blue square spins"
FRAMES, SIZE, STEPS, GUIDANCE = 9, 32, 8, 6.0


def components() -> dict:
    c = tiny_components(variant="2b", stabilizer_tokens=0)
    config = dict(c["transformer"].config)
    config.update(num_attention_heads=4, attention_head_dim=32, sample_height=SIZE // 8, sample_width=SIZE // 8,
                  sample_frames=FRAMES)
    torch.manual_seed(3)
    c["transformer"] = CogVideoXTransformer3DModel(**config).eval()
    for value in c.values():
        if isinstance(value, torch.nn.Module):
            value.to(DEVICE)
    return c


def run(repeats: int = 31) -> list[Row]:
    c = components()
    mimir = MimirPipeline(**c, placement=Placement(DEVICE, DEVICE))
    ref = CogVideoXPipeline(tokenizer=c["tokenizer"], text_encoder=c["text_encoder"], vae=c["vae"],
                            transformer=c["transformer"], scheduler=c["scheduler"])
    ref.set_progress_bar_config(disable=True)
    cond, uncond = mimir.encode_prompt(PROMPT, "")
    video = dict(num_frames=FRAMES, height=SIZE, width=SIZE)

    def ref_call(embeds: bool, output_type="pt"):
        text = dict(prompt_embeds=cond, negative_prompt_embeds=uncond) if embeds else dict(prompt=PROMPT, negative_prompt="")
        return ref(**text, **video, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type=output_type,
                   generator=torch.Generator().manual_seed(0), max_sequence_length=mimir.text_len).frames

    def mimir_denoise_decode(output_type="frames"):
        latents = mimir.denoise(cond, uncond, **video, steps=STEPS, guidance=GUIDANCE, seed=0)
        return latents if output_type == "latent" else mimir.decode(latents)

    def mimir_call():
        return mimir(PROMPT, "", **video, steps=STEPS, guidance=GUIDANCE, seed=0)

    def uncached_encode():  # encode_prompt's work, the LLM part done as before issue 13
        prompts = ["", PROMPT]
        t5 = encode_t5(c["tokenizer"], c["text_encoder"], prompts, max_length=mimir.text_len)
        return mimir.fuse(TextFeatures(t5, *uncached_llm_features(mimir.llm_encoder(), prompts)))

    with torch.no_grad():
        diff = (mimir_denoise_decode("latent") - ref_call(True, "latent")).abs().max().item()
        times = interleaved({"mimir_dd": mimir_denoise_decode, "diffusers_dd": lambda: ref_call(True),
                             "mimir_all": mimir_call, "diffusers_all": lambda: ref_call(False),
                             "encode": lambda: mimir.encode_prompt(PROMPT, ""), "encode_uncached": uncached_encode},
                            repeats)
        features = mimir.llm_encoder()(["", PROMPT])[0], uncached_llm_features(mimir.llm_encoder(), ["", PROMPT])[0]
        encode_diff = (features[0] - features[1]).abs().max().item()
        memory = {"mimir_dd": peak_memory(mimir_denoise_decode), "diffusers_dd": peak_memory(lambda: ref_call(True)),
                  "mimir_all": peak_memory(mimir_call), "diffusers_all": peak_memory(lambda: ref_call(False))}
    where = f"{DEVICE.type.upper()}; {FRAMES} frames {SIZE}x{SIZE}, {STEPS} steps, CFG"
    rows = []
    for part, label in (("dd", "denoise + decode, same embeds"), ("all", "whole call (Mimir adds LLM + fuser)")):
        ratio = median_ratio(times, f"mimir_{part}", f"diffusers_{part}")
        target, met = check(ratio, "<=", 1.05 if part == "dd" else 1.10)
        detail = f"median {median(times[f'mimir_{part}']) * 1e3:.1f} ms vs " \
                 f"{median(times[f'diffusers_{part}']) * 1e3:.1f} ms, {repeats} interleaved repeats " \
                 f"({ratio_spread(times, f'mimir_{part}', f'diffusers_{part}')}); {where}"
        if part == "dd":
            detail += f"; latents max abs diff {diff:g}"
        rows.append(Row(f"Mimir / diffusers wall time, {label}", ratio, target, met, detail))
        peak_m, peak_d = memory[f"mimir_{part}"], memory[f"diffusers_{part}"]
        rows.append(Row(f"Mimir / diffusers peak memory, {label}", peak_m / peak_d, "", None,
                        f"{peak_m / MIB:.2f} MiB vs {peak_d / MIB:.2f} MiB peak tensor memory"))
    speedup = median_ratio(times, "encode_uncached", "encode")
    rows.append(Row("encode stage speed-up, cached LLM encode vs uncached (T5 + LLM + fuser, prompt and empty "
                    "negative)", speedup, *check(speedup, ">=", 1.5),
                    f"median {median(times['encode']) * 1e3:.1f} ms vs {median(times['encode_uncached']) * 1e3:.1f} ms "
                    f"uncached, {repeats} interleaved repeats ({ratio_spread(times, 'encode_uncached', 'encode')}); "
                    f"LLM features max abs diff {encode_diff:g}; {where}"))
    return rows


if __name__ == "__main__":
    print(table(run()))
