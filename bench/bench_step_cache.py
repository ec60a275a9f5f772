"""Step caching (diffusers' cache hooks, mimir.speed) on the bundled demo model: speed, fidelity, alignment.

Config: the bundled demo model (mimir/demo/model: 4-layer rotary DiT, 9 frames of 64 x 64), DDIM, the demo's
guidance 2, fp32, batch 1. Prompts: bench/alignment.py's held-out set (`heldout_prompts`), seed = --seed +
1000 r + prompt index. Each prompt is encoded once; the uncached run and every cached one then denoise from
the same noise and are decoded. Per method and step count:
- speed-up: summed denoising wall time, uncached / cached (the arms alternate per video, their order reversed
  every other video, so the machine's load falls on all alike); "whole call" adds the encode and decode that
  both do (measured per video) to each side.
- PSNR of the cached video's frames against the uncached video's: mean over the videos, and the worst one.
- accuracy: colour, direction, count, shape and steadiness read off the frames by bench/alignment.py's judge, cached minus
  uncached, in points.

    python bench/bench_step_cache.py              # the README table: 36 prompts x 3 seeds, 25 and 50 steps
    python bench/run.py --only step_cache         # the cheap version: 6 prompts x 1 seed, 25 steps, 5 methods

Before the measured videos every arm runs once on a training caption: a warm-up, and MagCache's calibration.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from alignment import ATTRIBUTES, COLUMNS, judge
from common import Row, check, table

from mimir.demo import DEMO_GUIDANCE
from mimir.demo.world import heldout_prompts, make_dataset
from mimir.loading import DEMO_MODEL_DIR, load_pipeline
from mimir.speed import StepCache

# the README table's settings: each method at its default and at a faster setting
FULL = ("fbc:0.1", "fbc:0.2", "pab", "pab:3", "faster", "faster:3", "taylorseer:3", "taylorseer", "mag:0.12",
        "mag:0.24")
CHEAP = ("fbc:0.2", "pab:3", "faster", "taylorseer:3", "mag:0.12")
TARGET = dict(speedup=1.6, points=2.0, psnr=30.0)  # for the best method at the demo's 25 steps


@dataclass
class Arm:
    denoise_s: float = 0.0
    shared_s: float = 0.0  # encode + decode
    psnr: list[float] = field(default_factory=list)
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COLUMNS, 0))
    videos: int = 0

    def speedup(self, base: Arm) -> tuple[float, float]:
        """-> (denoising, whole call) speed-up over `base`."""
        return base.denoise_s / self.denoise_s, (base.denoise_s + base.shared_s) / (self.denoise_s + self.shared_s)

    def points(self, base: Arm) -> dict[str, float]:
        return {name: 100 * (self.hits[name] - base.hits[name]) / self.videos for name in self.hits}


def psnr(frames: torch.Tensor, reference: torch.Tensor) -> float:
    mse = ((frames - reference) ** 2).mean().clamp(min=1e-12)
    return float(10 * torch.log10(1.0 / mse))


def measure(pipe, caches: list[StepCache], prompts: list[dict], seeds: list[int], steps: int) -> dict:
    """-> {cache or None (uncached): Arm}."""
    cfg = pipe.transformer.config
    spatial = pipe.codec.spatial
    size = dict(num_frames=cfg.sample_frames, height=cfg.sample_height * spatial, width=cfg.sample_width * spatial)
    arms = {cache: Arm() for cache in [None, *caches]}
    warm = pipe.encode_prompt(make_dataset(1, seed=1)[0].caption, "")  # a training caption, not a held-out one
    for cache in arms:  # warms every arm up; MagCache calibrates here
        pipe.step_cache = cache
        pipe.denoise(*warm, **size, steps=steps, guidance=DEMO_GUIDANCE, seed=0)
    for video, (seed, (index, item)) in enumerate((s, p) for s in seeds for p in enumerate(prompts)):
        start = time.perf_counter()
        cond, uncond = pipe.encode_prompt(item["prompt"], "")
        encode_s = time.perf_counter() - start
        frames = {}
        for cache in (list(arms) if video % 2 == 0 else list(arms)[::-1]):
            pipe.step_cache = cache
            start = time.perf_counter()
            latents = pipe.denoise(cond, uncond, **size, steps=steps, guidance=DEMO_GUIDANCE, seed=seed + index)
            middle = time.perf_counter()
            frames[cache] = pipe.decode(latents)[0]
            arms[cache].denoise_s += middle - start
            arms[cache].shared_s += time.perf_counter() - middle + encode_s
        for cache, arm in arms.items():
            arm.videos += 1
            arm.psnr.append(psnr(frames[cache], frames[None]))
            for name, ok in judge(item, frames[cache]).items():
                arm.hits[name] += ok
    pipe.step_cache = None
    return arms


def best(results: dict, steps: int):
    """The fastest (cache, arm) at `steps` that keeps PSNR and accuracy within TARGET, or None."""
    base = results[steps][None]
    fine = [(cache, arm) for cache, arm in results[steps].items() if cache is not None
            and sum(arm.psnr) / len(arm.psnr) >= TARGET["psnr"]
            and min(arm.points(base)[name] for name in ATTRIBUTES) >= -TARGET["points"]]
    return max(fine, key=lambda pair: pair[1].speedup(base)[0], default=None)


def markdown(results: dict) -> str:
    lines = ["| step cache | steps | speed-up, denoising | whole call | PSNR mean (worst) | colour | direction | "
             "count | shape | all four | steady |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for steps, arms in results.items():
        base = arms[None]
        cells = " | ".join(f"{100 * base.hits[n] / base.videos:.1f}%" for n in COLUMNS)
        lines.append(f"| none | {steps} | 1 | 1 | - | {cells} |")
        for cache, arm in arms.items():
            if cache is None:
                continue
            denoise, whole = arm.speedup(base)
            points = " | ".join(f"{arm.points(base)[n]:+.1f}" for n in COLUMNS)
            lines.append(f"| {cache} | {steps} | {denoise:.2f}x | {whole:.2f}x | "
                         f"{sum(arm.psnr) / len(arm.psnr):.1f} ({min(arm.psnr):.1f}) dB | {points} |")
    return "\n".join(lines)


def rows(results: dict, count: str) -> list[Row]:
    out = []
    for steps, arms in results.items():
        base = arms[None]
        for cache, arm in arms.items():
            if cache is None:
                continue
            denoise, whole = arm.speedup(base)
            points = ", ".join(f"{n} {arm.points(base)[n]:+.1f}" for n in ATTRIBUTES)
            out.append(Row(f"step cache {cache}, {steps} steps: denoising speed-up vs uncached", denoise, "", None,
                           f"whole call {whole:.2f}x; PSNR {sum(arm.psnr) / len(arm.psnr):.1f} dB (worst "
                           f"{min(arm.psnr):.1f}); accuracy points {points}; demo model, {count}"))
    found = best(results, 25) if 25 in results else None
    if found is not None:
        cache, arm = found
        speedup = arm.speedup(results[25][None])[0]
        out.append(Row(f"step cache, best at 25 steps within PSNR >= {TARGET['psnr']:g} dB and <= "
                       f"{TARGET['points']:g} points accuracy loss ({cache})", speedup,
                       *check(speedup, ">=", TARGET["speedup"]), f"demo model, {count}"))
    return out


def run(prompts: int = 6, seeds: int = 1, steps: tuple[int, ...] = (25,), caches=CHEAP) -> list[Row]:
    pipe = load_pipeline(DEMO_MODEL_DIR)
    items = heldout_prompts()[::len(heldout_prompts()) // prompts][:prompts]  # spread over triples and counts
    seed_list = [1000 * r for r in range(seeds)]
    results = {n: measure(pipe, [StepCache.parse(c) for c in caches], items, seed_list, n) for n in steps}
    return rows(results, f"{len(items)} held-out prompts x {seeds} seed(s)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", nargs="+", default=list(FULL), help="method[:setting] (mimir.speed.STEP_CACHES)")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--repeats", type=int, default=3, help="seeds per prompt (seed 1000 r + prompt index)")
    parser.add_argument("--limit", type=int, help="only the first N prompts (a smoke run; not the benchmark)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    pipe = load_pipeline(DEMO_MODEL_DIR)
    prompts = heldout_prompts()[:args.limit]
    seeds = [1000 * r for r in range(args.repeats)]
    caches = [StepCache.parse(c) for c in args.caches]
    results = {steps: measure(pipe, caches, prompts, seeds, steps) for steps in args.steps}
    print(f"{len(prompts)} held-out prompts x seeds {seeds} = {len(prompts) * len(seeds)} videos per row, demo "
          f"model, DDIM, guidance {DEMO_GUIDANCE:g}; accuracy: uncached in %, cached as points against it\n")
    print(markdown(results))
    print("\n" + table(rows(results, f"{len(prompts)} prompts x {len(seeds)} seeds")[-1:]))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
