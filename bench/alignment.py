"""Text alignment of the bundled demo model, measured: held-out prompts -> videos -> frame analysis.

    python bench/alignment.py                       # both arms; trains the no-fuser arm first (see below)
    python bench/alignment.py --ablation DIR        # use (or keep) the no-fuser arm in DIR
    python bench/alignment.py --arms fuser          # the bundled model only (about four minutes)
    python bench/alignment.py --gif docs/images/alignment   # also side-by-side GIFs and a PNG contact sheet

Prompts: `mimir.demo.world.heldout_prompts()`: the canonical caption of each colour-shape-motion triple held
out of training, once per count (1, 2, 3): 36 prompts whose combinations no training clip shows. Each is
generated at the model's own size (9 frames, 64 x 64) with DDIM, 25 steps, --repeats times (seed = --seed +
1000 r + prompt index; accuracies are over all of them; the pictures show r = 0), at each
guidance scale of --guidance (default: the demo's 2, chosen on seed 100, and CogVideoX's usual 6), then
`mimir.demo.analysis.analyse` reads colour, direction, count and shape off the frames (documented there:
object mask, mean colour -> nearest palette colour, centroid track -> direction, connected components ->
count, fill ratio -> shape). A prompt scores on an attribute when the analysis equals the prompt's value.

Ablation arms, same recipe (mimir/demo/build.py), same seed, same VAE / tokenizers / T5 / LLM:
- fuser: the bundled model: DiT + token fuser (T5 + Phi-3 query/answer tokens + 4 instruction tokens).
- no-fuser: the DiT trained on the T5 stream alone: `python -m mimir.demo.build --no-fuser --reuse
  mimir/demo/model` (the fuser stays at its zero init, no stabilizer tokens: plain CogVideoX conditioning).
  Without --ablation it is built into a temporary folder first: that is the cache + DiT training again
  (about 25 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from mimir.demo import DEMO_GUIDANCE, DEMO_STEPS
from mimir.demo.analysis import analyse
from mimir.demo.world import heldout_prompts
from mimir.loading import DEMO_MODEL_DIR, load_pipeline
from mimir.video import write_video

ATTRIBUTES = ("colour", "direction", "shape", "count")
TARGETS = {"colour": 0.90, "direction": 0.85}


def evaluate(pipe, prompts: list[dict], seed: int, guidance: float) -> tuple[dict, list]:
    """-> (accuracy per attribute and for all four at once, [(prompt item, analysis, frames)]).
    Prompt i is generated with seed + i."""
    cfg = pipe.transformer.config
    hits = {name: 0 for name in ATTRIBUTES + ("all",)}
    results = []
    for index, item in enumerate(prompts):
        frames = pipe(item["prompt"], num_frames=cfg.sample_frames, height=cfg.sample_height * 8,
                      width=cfg.sample_width * 8, steps=DEMO_STEPS, guidance=guidance, seed=seed + index)[0]
        found, right = judge(item, frames)
        for name, ok in right.items():
            hits[name] += ok
        results.append((item, found, frames))
    return {name: count / len(prompts) for name, count in hits.items()}, results


def judge(item: dict, frames) -> tuple[dict, dict[str, bool]]:
    """-> (what the analysis reads off the frames, {attribute or "all": whether it is the prompt's})."""
    found = analyse(frames)
    right = {name: found[name] == item[name] for name in ATTRIBUTES}
    return found, {**right, "all": all(right.values())}


def no_fuser_arm(folder: Path | None, model: Path) -> Path:
    """The ablation model: `folder` when it holds one, else built there (or in a temporary folder)."""
    if folder is not None and (folder / "transformer").is_dir():
        return folder
    from mimir.demo.build import Recipe, build

    folder = folder or Path(tempfile.mkdtemp(prefix="mimir-no-fuser-")) / "model"
    print(f"building the no-fuser arm into {folder} (the recipe's cache + DiT training, reusing {model}) ...")
    start = time.perf_counter()
    build(Recipe(fuser=False), out=folder, reuse=model)
    print(f"built in {time.perf_counter() - start:.0f} s")
    return folder


def print_table(scores: dict, count: int, seeds: list[int]) -> None:
    """scores: {(arm, guidance): accuracies}."""
    print(f"\nheld-out prompts: {count} x seeds {seeds} (+ prompt index) = {count * len(seeds)} videos per row, "
          f"{DEMO_STEPS} DDIM steps")
    print("| arm | guidance | " + " | ".join(ATTRIBUTES) + " | all four |")
    print("|---|---|" + "---|" * (len(ATTRIBUTES) + 1))
    for (arm, guidance), score in scores.items():
        cells = " | ".join(f"{100 * score[n]:.1f}%" for n in ATTRIBUTES + ("all",))
        print(f"| {arm} | {guidance:g} | {cells} |")
    for name, target in TARGETS.items():
        verdicts = [f"{arm} @ {guidance:g} {'met' if score[name] >= target else 'NOT met'}"
                    for (arm, guidance), score in scores.items()]
        print(f"target {name} >= {100 * target:.0f}%: " + ", ".join(verdicts))


def write_gifs(folder: Path, results: dict, picks: int = 6) -> None:
    """Per prompt a GIF with the arms side by side (upscaled 2x), and one PNG sheet: per prompt a title line,
    then one row of frames per arm."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    arms = list(results)
    total = len(results[arms[0]])
    blocks = []
    for index in range(0, total, total // picks + 1)[:picks]:  # spread over triples and counts
        prompt = results[arms[0]][index][0]["prompt"]
        videos = [results[arm][index][2].clamp(0, 1).repeat_interleave(2, 1).repeat_interleave(2, 2) for arm in arms]
        write_video(torch.cat(videos, dim=2), folder / f"{prompt.replace(' ', '_')}.gif", fps=4)
        rows = [torch.cat(list(video), dim=1) for video in videos]  # [2H, F * 2W, 3] per arm
        block = Image.fromarray((torch.cat(rows, dim=0) * 255).round().byte().numpy())
        canvas = Image.new("RGB", (block.width + 70, block.height + 16), (255, 255, 255))
        canvas.paste(block, (70, 16))
        draw = ImageDraw.Draw(canvas)
        draw.text((70, 2), prompt, fill=(0, 0, 0))
        for row, arm in enumerate(arms):
            draw.text((4, 16 + row * block.height // len(arms) + 4), arm, fill=(0, 0, 0))
        blocks.append(canvas)
    sheet = Image.new("RGB", (blocks[0].width, sum(b.height for b in blocks)), (255, 255, 255))
    for k, block in enumerate(blocks):
        sheet.paste(block, (0, k * blocks[0].height))
    sheet.save(folder / f"heldout_{'_vs_'.join(arms)}.png")
    print(f"wrote {len(blocks)} GIFs ({' | '.join(arms)}) and a contact sheet to {folder}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR, help="the fuser arm (default: bundled)")
    parser.add_argument("--ablation", type=Path, help="no-fuser arm folder: used if present, else built there")
    parser.add_argument("--arms", choices=("both", "fuser"), default="both")
    parser.add_argument("--guidance", type=float, nargs="+", default=[DEMO_GUIDANCE, 6.0],
                        help="guidance scales to measure; the GIFs use the first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="each prompt with this many seeds (seed + 1000 r + i)")
    parser.add_argument("--gif", type=Path, help="write side-by-side GIFs + a PNG sheet into this folder")
    parser.add_argument("--limit", type=int, help="only the first N prompts (a smoke run; not the benchmark)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # steady on shared cores; the models are tiny
    start = time.perf_counter()
    folders = {"fuser": args.model}
    if args.arms == "both":
        folders["no-fuser"] = no_fuser_arm(args.ablation, args.model)
    prompts = heldout_prompts()[:args.limit]
    seeds = [args.seed + 1000 * r for r in range(args.repeats)]
    scores, pictures = {}, {}
    for arm, folder in folders.items():
        pipe = load_pipeline(folder)
        for guidance in args.guidance:
            arm_start = time.perf_counter()
            runs = [evaluate(pipe, prompts, seed, guidance) for seed in seeds]
            scores[arm, guidance] = {name: sum(acc[name] for acc, _ in runs) / len(runs) for name in runs[0][0]}
            pictures.setdefault(arm, runs[0][1])
            print(f"{arm} @ guidance {guidance:g}: {len(prompts) * len(seeds)} videos in "
                  f"{time.perf_counter() - arm_start:.0f} s")
    print_table(scores, len(prompts), seeds)
    if args.gif:
        write_gifs(args.gif, pictures)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
