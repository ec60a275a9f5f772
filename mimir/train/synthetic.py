"""Tiny synthetic clips (a coloured square sliding over black) with captions, and tiny models to train on them,
for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

from ..testing import tiny_components
from ..video import write_video

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
MOTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}


def square_clip(colour: str, motion: str, frames: int, size: int) -> torch.Tensor:
    """uint8 [frames, size, size, 3]: a size/4 square crossing the frame in direction `motion`."""
    side = max(2, size // 4)
    dy, dx = MOTIONS[motion]
    video = torch.zeros(frames, size, size, 3, dtype=torch.uint8)
    span = size - side
    for f in range(frames):
        offset = round(span * f / max(1, frames - 1))
        y = offset if dy > 0 else span - offset if dy < 0 else span // 2
        x = offset if dx > 0 else span - offset if dx < 0 else span // 2
        video[f, y:y + side, x:x + side] = torch.tensor(COLOURS[colour], dtype=torch.uint8)
    return video


def write_square_clips(folder, count: int = 4, frames: int = 9, size: int = 32) -> list[tuple[Path, str]]:
    """Write `count` .mp4 clips with same-name .txt captions into `folder`. -> [(video, caption)]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(c, m) for m in MOTIONS for c in COLOURS]
    out = []
    for i in range(count):
        colour, motion = pairs[i % len(pairs)]
        caption = f"a {colour} square moves {motion}"
        path = write_video(square_clip(colour, motion, frames, size), folder / f"clip{i:03d}.mp4")
        path.with_suffix(".txt").write_text(caption)
        out.append((path, caption))
    return out


def tiny_train_components(variant: str = "2b", latent_gain: float = 3.0) -> dict:
    """mimir.testing.tiny_components with a VAE whose latents look like a trained one's: about unit variance
    after the scaling factor, and a sharp posterior (logvar -14). A randomly initialised VAE has logvar ~ 0, so
    its sampled latents are mostly noise that no model can learn, and a loss could not fall far."""
    parts = tiny_components(variant=variant)
    conv = parts["vae"].encoder.conv_out.conv  # outputs [mean, logvar] channels
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[:half] *= latent_gain
        conv.bias[:half] *= latent_gain
        conv.weight[half:] = 0.0
        conv.bias[half:] = -14.0
    return parts
