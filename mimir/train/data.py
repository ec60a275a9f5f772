"""Training data: (video, caption) lists, clip decoding, and the sample order shared by every process.

A dataset is a folder of videos with same-name `.txt` captions, a `.csv` with `video` and `caption` columns, or
a `.jsonl` of {"video": path, "caption": text}; relative paths are relative to the list file. A clip is F = 8k+1
frames from the start of the video, every `frame_stride`-th, resized and centre-cropped to height x width.

A video that is missing, broken or too short, or whose caption is not UTF-8 text, is skipped with a warning and
reported in the run summary; its sample slot is filled by the next readable video, so every batch stays full and
the order stays deterministic. Empty captions are kept (they train like dropped ones) with a warning.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from ..video import VideoReadError, read_video, resize_center_crop

logger = logging.getLogger(__name__)
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".webp", ".gif")


@dataclass
class Clip:
    video: Path
    caption: str


def read_clips(source) -> tuple[list[Clip], dict[str, str]]:
    """-> (clips, skipped {path: reason}) for a folder, a .csv or a .jsonl."""
    clips, skipped = _read_listing(Path(source))
    for where, reason in skipped.items():
        logger.warning("skipping %s: %s", where, reason)
    empty = [str(c.video) for c in clips if not c.caption.strip()]
    if empty:
        logger.warning("%d clip(s) have an empty caption and train as unconditional samples: %s", len(empty),
                       ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""))
    return clips, skipped


def _read_listing(source: Path):
    # CSV and JSONL are read with undecodable bytes kept as surrogates, so one bad row is skipped, not the file
    if source.is_dir():
        return _folder_clips(source)
    if source.suffix.lower() == ".csv":
        with source.open(newline="", errors="surrogateescape") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"video", "caption"} <= set(rows[0]):
            raise ValueError(f"{source}: a CSV dataset needs the columns 'video' and 'caption', has {list(rows[0])}")
        return _listed_clips(source, [(i + 2, row) for i, row in enumerate(rows)])
    if source.suffix.lower() == ".jsonl":
        rows, skipped = [], {}
        for number, line in enumerate(source.read_text(errors="surrogateescape").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    skipped[f"{source}:{number}"] = f"not JSON ({error})"
        clips, more = _listed_clips(source, rows)
        return clips, {**skipped, **more}
    raise ValueError(f"dataset {source}: expected a folder, a .csv or a .jsonl file")


def _folder_clips(folder: Path):
    clips, skipped = [], {}
    for video in sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS):
        caption = video.with_suffix(".txt")
        if not caption.is_file():
            skipped[str(video)] = f"no caption file {caption.name}"
            continue
        try:
            clips.append(Clip(video, caption.read_bytes().decode("utf-8").strip()))
        except UnicodeDecodeError as error:
            skipped[str(video)] = f"caption file {caption} is not UTF-8 text ({error})"
    return clips, skipped


def _listed_clips(source: Path, rows):
    clips, skipped = [], {}
    for number, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("video"), str) or not isinstance(row.get("caption"), str):
            skipped[f"{source}:{number}"] = 'needs a "video" path and a "caption" text'
            continue
        if not (_utf8(row["video"]) and _utf8(row["caption"])):
            skipped[f"{source}:{number}"] = "video or caption is not UTF-8 text"
            continue
        clips.append(Clip(source.parent / row["video"], row["caption"]))
    return clips, skipped


def _utf8(text: str) -> bool:
    """False for text read with errors="surrogateescape" from bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_clip(clip: Clip, num_frames: int, height: int, width: int, stride: int) -> torch.Tensor:
    """-> uint8 [F, H, W, 3]; raises VideoReadError for a missing, broken or too-short video."""
    frames = read_video(clip.video, num_frames=num_frames, stride=stride)
    return resize_center_crop(frames, height, width)


def pixels_to_vae_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> float [B, 3, F, H, W] in -1..1, the VAE's input."""
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


class VideoDataset(Dataset):
    """Decodes clips on the fly. Items are addressed by (index, position); see GlobalOrder."""

    def __init__(self, clips: list[Clip], num_frames: int, height: int, width: int, stride: int = 1):
        if not clips:
            raise ValueError("the dataset has no usable (video, caption) pairs")
        self.clips, self.size = clips, (num_frames, height, width, stride)
        self.unreadable: set[int] = set()  # indices known bad (per loader worker): not decoded again

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        skipped = {}
        for attempt in range(len(self.clips)):
            i = (index + attempt) % len(self.clips)
            if i in self.unreadable:
                continue
            clip = self.clips[i]
            try:
                pixels = load_clip(clip, *self.size)
            except VideoReadError as error:
                logger.warning("skipping video %s: %s", clip.video, error)
                skipped[str(clip.video)] = str(error)
                self.unreadable.add(i)
                continue
            return {"position": position, "pixels": pixels, "caption": clip.caption, "skipped": skipped}
        raise ValueError(f"none of the {len(self.clips)} videos of the dataset could be read: {skipped}")


class GlobalOrder(Sampler):
    """The order in which samples are drawn, identical for any number of processes.

    Sample positions 0, 1, 2, ... run through a fresh seeded permutation of the dataset each epoch. Global
    micro-batch m holds positions [m*G, (m+1)*G) with G = batch_size * num_processes; process r reads its
    batch_size consecutive slots of it. A run with P processes therefore sees the same samples per optimizer
    step as a run with one process and P times the batch, and resuming only needs the micro-batch count.
    Yields (index, position): the position also seeds the sample's noise, timestep and text dropout.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, start: int = 0):
        self.size, self.batch_size, self.rank, self.world, self.seed = size, batch_size, rank, world, seed
        self.start = start  # micro-batches already consumed

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self):
        global_batch = self.batch_size * self.world
        micro_batch, epoch, order = self.start, -1, None
        while True:
            first = micro_batch * global_batch + self.rank * self.batch_size
            for position in range(first, first + self.batch_size):
                if position // self.size != epoch:
                    epoch = position // self.size
                    order = self._permutation(epoch)
                yield int(order[position % self.size]), position
            micro_batch += 1


def collate(samples: list[dict]) -> dict:
    """Stack what has one shape; keep per-sample text features (their lengths differ) as lists."""
    batch = {"position": [s["position"] for s in samples], "caption": [s["caption"] for s in samples],
             "skipped": {k: v for s in samples for k, v in s.get("skipped", {}).items()}}
    for key in ("pixels", "latent_params"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    if "features" in samples[0]:
        batch["features"] = [s["features"] for s in samples]
    return batch
