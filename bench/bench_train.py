"""Training steps/s from a feature cache vs computing T5 + LLM + VAE every step, interleaved in one run.

Config: mimir.testing's tiny real-architecture models (2B-style DiT, T5 and Phi-3 of width 32/48, 4 answer
tokens, 4 instruction tokens; the VAE calibrated by mimir.testing.tiny_train_components), 8 clips of the demo
world (mimir.demo.world) at 32x32, 9 frames, batch 2, 10 optimizer steps per run, text dropout 0.1, fp32, CPU.
Each repeat trains once from the videos (VAE encode + T5 + LLM every step) and once from the cache, in
alternating order; steps/s counts the loop only, not model set-up. The ratio is the median over repeats of
cache / videos steps/s. With real models (T5-XXL, Phi-3.5, a 5B DiT at 49x480x720) the DiT dominates a step
and the ratio will be smaller; the memory saving (no T5, LLM or VAE resident) is the other reason to cache.

    python bench/bench_train.py         (or: python bench/run.py --only train)
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from common import Row, interleaved, table

from mimir.testing import tiny_train_components, write_world_clips
from mimir.train import TrainConfig, build_cache, train


def run(repeats: int = 3, steps: int = 10, size: int = 32, frames: int = 9, batch: int = 2) -> list[Row]:
    speeds = {"videos": [], "cache": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_world_clips(tmp / "clips", count=8, frames=frames, size=size)
        common = dict(device="cpu", data=str(tmp / "clips"), num_frames=frames, height=size, width=size,
                      batch_size=batch, max_steps=steps, lr=1e-4, text_dropout=0.1, num_workers=0, tensorboard=False,
                      export=False)
        build_cache(TrainConfig(cache=str(tmp / "cache"), **common), tiny_train_components(), progress=False)
        runs = iter(range(10 ** 6))

        def train_from(name: str, extra: dict):
            config = TrainConfig(output_dir=str(tmp / f"run{next(runs)}"), **common, **extra)
            speeds[name].append(train(config, tiny_train_components(), progress=False)["steps_per_second"])

        interleaved({"videos": lambda: train_from("videos", {}),
                     "cache": lambda: train_from("cache", {"cache": str(tmp / "cache")})}, repeats, warmup=0)
    ratio = statistics.median(c / v for c, v in zip(speeds["cache"], speeds["videos"]))
    detail = (f"median {statistics.median(speeds['cache']):.2f} vs {statistics.median(speeds['videos']):.2f} steps/s, "
              f"{repeats} interleaved repeats; CPU; tiny models, {size}x{size}x{frames}, batch {batch}, {steps} steps")
    return [Row("training steps/s, from cache / from videos", ratio, "", None, detail)]


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    rows = run()
    print(table(rows))
    print(f"ratio cache / videos: {rows[0].value:.2f}x")
