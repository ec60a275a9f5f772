"""DiT forward throughput against this machine's fp32 matmul speed, measured in the same run.

Config: CogVideoX-2B-style transformer, 4 layers of 8 heads x 64 (width 512, MLP 2048), 480 video tokens
(latents of 5 x 16 x 24 -> 5 frames of 8 x 12 patches, i.e. 17 frames at 128 x 192 px) + 230 text tokens
(226 + 4 stabilizer tokens), batch 2 (the CFG batch), fp32, inference.

FLOPs are counted analytically over the blocks' matrix products only, per layer and sample with N = 710
tokens and width D: Q, K, V and output projections 4 * 2ND^2, QK^T and attention x V 2 * 2N^2D, MLP
2 * 2N(4D)D. Norms, modulation, GELU, softmax, patch embedding and output projection are real work not counted,
so the achieved figure is a lower bound. The reference is a 2048^3 fp32 matmul (torch.mm), timed interleaved.
"""

from __future__ import annotations

import torch
from common import DEVICE, Row, check, interleaved, matmul_gflops, median, median_ratio, table
from diffusers import CogVideoXTransformer3DModel

LAYERS, HEADS, HEAD_DIM, TEXT, BATCH = 4, 8, 64, 230, 2
LATENT = (5, 16, 16, 24)  # T, C, H, W


def transformer() -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    t, c, h, w = LATENT
    return CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=c, out_channels=c, time_embed_dim=512,
        text_embed_dim=4096, num_layers=LAYERS, sample_width=w, sample_height=h, sample_frames=(t - 1) * 4 + 1,
        patch_size=2, max_text_seq_length=TEXT, use_rotary_positional_embeddings=False,
    ).eval().to(DEVICE)


def block_flops() -> float:
    t, _, h, w = LATENT
    n, d = t * (h // 2) * (w // 2) + TEXT, HEADS * HEAD_DIM
    per_layer = 4 * 2 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * 4 * d * d
    return BATCH * LAYERS * per_layer


def run(repeats: int = 7) -> list[Row]:
    model = transformer()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *LATENT, generator=g).to(DEVICE)
    text = torch.randn(BATCH, TEXT, 4096, generator=g).to(DEVICE)
    step = torch.full((BATCH,), 500, device=DEVICE)
    matmul, matmul_flops = matmul_gflops()

    def forward():
        model(hidden_states=x, encoder_hidden_states=text, timestep=step, return_dict=False)

    with torch.no_grad():
        times = interleaved({"dit": forward, "matmul": matmul}, repeats)
    achieved, peak = block_flops() / median(times["dit"]) / 1e9, matmul_flops / median(times["matmul"]) / 1e9
    ratio = block_flops() / matmul_flops / median_ratio(times, "dit", "matmul")
    target, met = check(ratio, ">=", 0.5)
    detail = (f"{achieved:.1f} GFLOP/s ({block_flops() / 1e9:.1f} GFLOP in {median(times['dit']) * 1e3:.0f} ms) vs fp32 "
              f"matmul {peak:.1f} GFLOP/s; {DEVICE.type.upper()}; {LAYERS} layers, {HEADS} heads x {HEAD_DIM}, "
              f"480 video + {TEXT} text tokens, batch {BATCH}, fp32")
    return [Row("DiT forward throughput / fp32 matmul throughput", ratio, target, met, detail)]


if __name__ == "__main__":
    print(table(run()))
