"""Text alignment of the bundled demo model's two arms, measured: prompts -> videos -> frame analysis.

    python bench/alignment.py                         # both arms, both test sets, 3 seeds (about 10 minutes)
    python bench/alignment.py --gif docs/images/alignment   # also labelled side-by-side GIFs and a PNG sheet
    python bench/alignment.py --model DIR --t5-only DIR2    # other builds (DIR2: a folder holding transformer/)

Arms (mimir/demo/build.py: same VAE, tokenizers, T5 and LLM, same DiT init, steps and seed):
- mimir: the bundled Mimir pipeline: DiT + token fuser (T5 + Phi-3 query/answer tokens + 4 instruction tokens).
- t5-only: the bundled T5-only DiT (mimir/demo/model/t5_only), which reads the T5 stream alone (plain CogVideoX).

Test sets:
- canonical: `world.heldout_prompts()`: the canonical caption of each colour-shape-motion triple held out of video
  training, once per count (1, 2, 3): 36 prompts whose combinations no training clip shows.
- understanding: `corpus.understanding_prompts()`: the same held-out triples and 12 seen ones, once per count, in
  words only the text corpus uses ("a couple of ruby dots head west"): 72 prompts. The DiTs never saw these words
  in a caption; the text encoders learned them from the corpus.

Each prompt is generated at the model's own size and frame count with DDIM, the demo's steps and guidance,
--repeats times (seed = --seed + 1000 r + prompt index; the pictures show r = 0). `mimir.demo.analysis` reads
colour, direction, count and shape off the frames, and whether the clip is steady (objects keep their number and
total area within +-35% in every frame). A prompt scores on an attribute when the analysis equals its value.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from mimir.demo import DEMO_GUIDANCE, DEMO_STEPS
from mimir.demo.analysis import analyse, steady
from mimir.demo.corpus import understanding_prompts
from mimir.demo.world import heldout_prompts
from mimir.loading import DEMO_MODEL_DIR, DEMO_T5_ONLY_DIR, load_pipeline
from mimir.video import write_video

ATTRIBUTES = ("colour", "direction", "count", "shape")
COLUMNS = ATTRIBUTES + ("all", "steady")
# issue 11: canonical held-out prompts (Mimir arm), and the understanding set (Mimir arm, and its lead over T5-only)
CANONICAL_TARGETS = {"colour": 0.95, "direction": 0.90, "count": 0.85, "shape": 0.80, "all": 0.65, "steady": 0.90}
UNDERSTANDING_TARGETS = {"colour": 0.85, "direction": 0.85}
UNDERSTANDING_LEAD = 0.30


def load_arm(arm: str, folder: Path | None):
    """mimir: a Mimir pipeline folder. t5-only: a folder holding the T5-only transformer/, read with the bundled
    VAE and T5, or a whole pipeline folder (read with its own pass-through fuser, if it has one)."""
    if arm == "mimir":
        return load_pipeline(folder or DEMO_MODEL_DIR)
    folder = folder or DEMO_T5_ONLY_DIR
    if (folder / "model_index.json").is_file():
        return load_pipeline(folder)
    return load_pipeline(DEMO_MODEL_DIR, with_fuser=False, transformer_path=folder / "transformer")


def evaluate(pipe, prompts: list[dict], seed: int, guidance: float) -> list[tuple[dict, dict, torch.Tensor]]:
    """-> [(prompt item, {attribute or "all" or "steady": scored}, frames)]; prompt i is generated with seed + i."""
    cfg, spatial = pipe.transformer.config, pipe.codec.spatial
    results = []
    for index, item in enumerate(prompts):
        frames = pipe(item["prompt"], num_frames=cfg.sample_frames, height=cfg.sample_height * spatial,
                      width=cfg.sample_width * spatial, steps=DEMO_STEPS, guidance=guidance, seed=seed + index)[0]
        results.append((item, judge(item, frames), frames))
    return results


def judge(item: dict, frames) -> dict[str, bool]:
    found = analyse(frames)
    right = {name: found[name] == item[name] for name in ATTRIBUTES}
    return {**right, "all": all(right.values()), "steady": steady(frames)}


def accuracy(results: list) -> dict[str, float]:
    return {name: sum(scored[name] for _, scored, _ in results) / len(results) for name in COLUMNS}


def print_tables(scores: dict, sets: dict, seeds: list[int], guidance: float) -> None:
    """scores: {(set name, arm): accuracies}."""
    print(f"\n{DEMO_STEPS} DDIM steps, guidance {guidance:g}, seeds {seeds} (+ prompt index)")
    print("| test set | arm | videos | " + " | ".join(COLUMNS[:-2]) + " | all four | steady |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for (name, arm), score in scores.items():
        cells = " | ".join(f"{100 * score[c]:.1f}%" for c in COLUMNS)
        print(f"| {name} | {arm} | {len(sets[name]) * len(seeds)} | {cells} |")
    verdicts = []
    if ("canonical", "mimir") in scores:
        got = scores["canonical", "mimir"]
        verdicts += [f"canonical {c} >= {100 * t:.0f}%: {verdict(got[c] >= t, got[c] - t)}"
                     for c, t in CANONICAL_TARGETS.items()]
        if ("canonical", "t5-only") in scores:
            worst = min(got[c] - scores["canonical", "t5-only"][c] for c in COLUMNS[:-1])
            verdicts.append(f"canonical: mimir within 3 points of t5-only or better on every attribute: "
                            f"{verdict(worst >= -0.03, worst + 0.03)}")
    if ("understanding", "mimir") in scores:
        got = scores["understanding", "mimir"]
        for c, t in UNDERSTANDING_TARGETS.items():
            verdicts.append(f"understanding {c} >= {100 * t:.0f}%: {verdict(got[c] >= t, got[c] - t)}")
            if ("understanding", "t5-only") in scores:
                lead = got[c] - scores["understanding", "t5-only"][c]
                verdicts.append(f"understanding {c}: mimir {100 * UNDERSTANDING_LEAD:.0f}+ points above t5-only "
                                f"({100 * lead:+.1f}): {verdict(lead >= UNDERSTANDING_LEAD, lead - UNDERSTANDING_LEAD)}")
    print("\n".join(verdicts))


def verdict(met: bool, margin: float) -> str:
    return "met" if met else f"NOT met ({100 * margin:+.1f} points)"


def write_gifs(folder: Path, results: dict, picks: int = 4) -> None:
    """For `picks` prompts of each test set: a GIF with the arms side by side (upscaled 2x, one labelled column
    per arm) and one PNG sheet per test set (per prompt a title line, then one row of frames per arm)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    sets = sorted({name for name, _ in results})
    for name in sets:
        arms = [arm for set_name, arm in results if set_name == name]
        total = len(results[name, arms[0]])
        blocks = []
        for index in range(0, total, total // picks + 1)[:picks]:  # spread over triples and counts
            prompt = results[name, arms[0]][index][0]["prompt"]
            videos = [results[name, arm][index][2].clamp(0, 1).repeat_interleave(2, 1).repeat_interleave(2, 2)
                      for arm in arms]
            labelled = [label(video, arm) for video, arm in zip(videos, arms)]
            write_video(torch.cat(labelled, dim=2), folder / f"{name}_{prompt.replace(' ', '_')}.gif", fps=4)
            rows = [torch.cat(list(video), dim=1) for video in videos]  # [2H, F * 2W, 3] per arm
            block = Image.fromarray((torch.cat(rows, dim=0) * 255).round().byte().numpy())
            canvas = Image.new("RGB", (block.width + 60, block.height + 16), (255, 255, 255))
            canvas.paste(block, (60, 16))
            draw = ImageDraw.Draw(canvas)
            draw.text((60, 2), f'"{prompt}"', fill=(0, 0, 0))
            for row, arm in enumerate(arms):
                draw.text((4, 16 + row * block.height // len(arms) + 4), arm, fill=(0, 0, 0))
            blocks.append(canvas)
        sheet = Image.new("RGB", (blocks[0].width, sum(b.height for b in blocks)), (255, 255, 255))
        for k, block in enumerate(blocks):
            sheet.paste(block, (0, k * blocks[0].height))
        sheet.save(folder / f"{name}_{'_vs_'.join(arms)}.png")
    print(f"wrote side-by-side GIFs and contact sheets ({', '.join(sets)}) to {folder}")


def label(video: torch.Tensor, text: str) -> torch.Tensor:
    """Frames [F, H, W, 3] with a 12-pixel caption strip on top naming the arm."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (video.shape[2], 12), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 0), text, fill=(0, 0, 0))
    strip = torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255)
    return torch.cat([strip.expand(video.shape[0], -1, -1, -1), video], dim=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="the Mimir arm (default: the bundled model)")
    parser.add_argument("--t5-only", type=Path, help="the T5-only arm (default: the bundled one)")
    parser.add_argument("--arms", nargs="+", choices=("mimir", "t5-only"), default=["mimir", "t5-only"])
    parser.add_argument("--sets", nargs="+", choices=("canonical", "understanding"),
                        default=["canonical", "understanding"])
    parser.add_argument("--guidance", type=float, default=DEMO_GUIDANCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="each prompt with this many seeds (seed + 1000 r + i)")
    parser.add_argument("--gif", type=Path, help="write side-by-side GIFs + PNG sheets into this folder")
    parser.add_argument("--limit", type=int, help="only the first N prompts of each set (of each split of the "
                                                   "understanding set): a smoke run")
    parser.add_argument("--list", action="store_true", help="also print every prompt with what each arm got")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # steady on shared cores; the models are tiny
    start = time.perf_counter()
    by_split = {split: [p for p in understanding_prompts() if p["split"] == split] for split in ("heldout", "seen")}
    sets = {"canonical": heldout_prompts()[:args.limit],
            "understanding": [p for prompts in by_split.values() for p in prompts[:args.limit]]}
    sets = {name: sets[name] for name in args.sets}
    seeds = [args.seed + 1000 * r for r in range(args.repeats)]
    scores, pictures = {}, {}
    for arm in args.arms:
        pipe = load_arm(arm, args.model if arm == "mimir" else args.t5_only)
        for name, prompts in sets.items():
            arm_start = time.perf_counter()
            runs = [evaluate(pipe, prompts, seed, args.guidance) for seed in seeds]
            scores[name, arm] = accuracy([r for run in runs for r in run])
            pictures[name, arm] = runs[0]
            if name == "understanding":
                for split in ("heldout", "seen"):
                    scores[f"understanding ({split} triples)", arm] = accuracy(
                        [r for run in runs for r in run if r[0]["split"] == split])
            print(f"{arm} on {name}: {len(prompts) * len(seeds)} videos in {time.perf_counter() - arm_start:.0f} s")
    shown = {**sets, **{f"understanding ({s} triples)": [p for p in sets.get("understanding", []) if p["split"] == s]
                        for s in ("heldout", "seen")}}
    print_tables(scores, shown, seeds, args.guidance)
    if args.list:
        for (name, arm), results in pictures.items():
            for item, scored, _ in results:
                wrong = [c for c in ATTRIBUTES if not scored[c]]
                print(f"{name} | {arm} | {item['prompt']} | {'ok' if not wrong else 'wrong: ' + ', '.join(wrong)}")
    if args.gif:
        write_gifs(args.gif, pictures)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
