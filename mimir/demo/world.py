"""A procedural world of short captioned clips: the training data of the bundled demo model.

A clip shows 1-3 objects of one shape and one colour on a black background, all making the same motion
(left, right, up, down, or staying still), so one caption describes it fully:
"two blue circles moving up", "a red square moves to the left".

Geometry is in fractions of the frame side, so a spec renders at any square size; the default clip is 9 frames
of 32 x 32. Every object fills a square box of half-side `radius` (square: the whole box, circle: the
inscribed disc, triangle: apex at the top centre, base along the bottom). With one motion for all objects
their relative positions never change, so objects apart in the first frame stay apart (GAP between boxes).

Objects are smaller when there are more of them: at 32 px, three 12 px boxes with gaps cannot fit beside a
10 px path; half-sides are 6.1 / 5.1 / 4 px for 1 / 2 / 3 objects at 32 px.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..video import write_video

SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# RGB in 0..1: at least 0.6 apart (0.5 after the best brightness scaling, see analysis.nearest_colour), 0.8 from black.
PALETTE = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.80, 0.20, 0.90),
    "white": (0.92, 0.92, 0.92),
}
COLOURS = tuple(PALETTE)
BACKGROUND = (0.0, 0.0, 0.0)
# Unit step per motion in image axes (x to the right, y downwards).
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}

RADIUS = {1: 0.19, 2: 0.16, 3: 0.125}  # half-side of an object's box, by object count
TRAVEL = 0.32  # distance every object moves over the clip (10 px at 32 px)
MARGIN = 0.03  # free border, so the frame border is pure background
GAP = 0.07  # minimum free space between two object boxes (2.2 px at 32 px), so blur does not join them

# Held out of training: no two share a colour-shape, colour-motion or shape-motion pair, so every pair
# (and so every single attribute) still appears in training.
HELDOUT_TRIPLES = (
    ("red", "circle", "left"), ("red", "triangle", "up"),
    ("green", "square", "left"), ("green", "circle", "down"),
    ("blue", "triangle", "still"), ("blue", "square", "right"),
    ("yellow", "circle", "up"), ("yellow", "triangle", "left"),
    ("purple", "square", "down"), ("purple", "circle", "still"),
    ("white", "triangle", "right"), ("white", "square", "up"),
)
ALL_TRIPLES = tuple((c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS)
TRAIN_TRIPLES = tuple(t for t in ALL_TRIPLES if t not in HELDOUT_TRIPLES)

# Caption wording: "<determiner> <colour> <noun> <phrase>". A phrase is (singular, plural) or one form for both.
# The video captions are narrow on purpose (issue 11): two plain phrasings per motion. Every other way to say
# an attribute (crimson, ball, rises, a pair of, lemon coloured) lives only in the text corpus (corpus.py), which
# the text encoders learn from and the DiT never sees.
DETERMINERS = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
COUNT_WORDS = {"a": 1, "one": 1, "two": 2, "three": 3}
PHRASES = {
    "left": (("moves to the left", "move to the left"), "moving left"),
    "right": (("moves to the right", "move to the right"), "moving right"),
    "up": (("moves up", "move up"), "moving up"),
    "down": (("moves down", "move down"), "moving down"),
    "still": (("stays still", "stay still"), "standing still"),
}


@dataclass(frozen=True)
class ClipSpec:
    """Everything that defines one clip. positions: start centres (x, y) as fractions of the frame side.

    wording: (phrase index, determiner index) choosing the caption's words; (0, 0) is the canonical caption.
    """

    shape: str
    colour: str
    motion: str
    count: int
    positions: tuple[tuple[float, float], ...]
    wording: tuple[int, int] = (0, 0)

    def __post_init__(self):
        if self.shape not in SHAPES or self.colour not in PALETTE or self.motion not in MOTIONS:
            raise ValueError(f"unknown shape/colour/motion {self.shape!r}/{self.colour!r}/{self.motion!r}; "
                             f"expected one of {SHAPES} / {COLOURS} / {tuple(MOTIONS)}")
        if self.count not in RADIUS or len(self.positions) != self.count:
            raise ValueError(f"count must be 1-3 with one position per object, got {self.count} and "
                             f"{len(self.positions)} positions")

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.motion)

    @property
    def radius(self) -> float:
        return RADIUS[self.count]

    @property
    def caption(self) -> str:
        return make_caption(self.shape, self.colour, self.motion, self.count, self.wording)

    def attributes(self) -> dict:
        """The keys and values `analysis.analyse` and `analysis.parse_caption` return."""
        return {"colour": self.colour, "direction": self.motion, "count": self.count, "shape": self.shape}


def make_caption(shape: str, colour: str, motion: str, count: int, wording: tuple[int, int] = (0, 0)) -> str:
    phrase = PHRASES[motion][wording[0] % len(PHRASES[motion])]
    if isinstance(phrase, tuple):
        phrase = phrase[0] if count == 1 else phrase[1]
    determiner = DETERMINERS[count][wording[1] % len(DETERMINERS[count])]
    noun = shape if count == 1 else PLURALS[shape]
    return f"{determiner} {colour} {noun} {phrase}"


def motion_phrases(motion: str) -> list[str]:
    """Every phrase (singular and plural forms) a caption can use for a motion."""
    return [form for phrase in PHRASES[motion] for form in (phrase if isinstance(phrase, tuple) else (phrase,))]


def caption_vocabulary() -> list[str]:
    """Every word any caption can use, sorted (the demo tokenizers are built from it)."""
    words = set(COLOURS) | set(SHAPES) | set(PLURALS.values())
    words.update(word for determiners in DETERMINERS.values() for d in determiners for word in d.split())
    words.update(word for motion in MOTIONS for phrase in motion_phrases(motion) for word in phrase.split())
    return sorted(words)


def _start_ranges(motion: str, radius: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(low, high) of the start centre along x and y, keeping the whole trajectory inside the margin."""
    ranges = []
    for step in MOTIONS[motion]:
        low = MARGIN + radius + max(0.0, -step * TRAVEL)
        high = 1.0 - MARGIN - radius - max(0.0, step * TRAVEL)
        ranges.append((low, high))
    return ranges[0], ranges[1]


def _apart(a, b, radius: float) -> bool:
    """Object boxes are at least GAP apart along x or along y."""
    return max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2 * radius + GAP


def sample_spec(rng: np.random.Generator, triples=ALL_TRIPLES) -> ClipSpec:
    """A random clip: a colour-shape-motion triple from `triples`, 1-3 objects, start positions, wording."""
    colour, shape, motion = triples[rng.integers(len(triples))]
    count = int(rng.integers(1, 4))
    radius = RADIUS[count]
    (x_low, x_high), (y_low, y_high) = _start_ranges(motion, radius)
    for _ in range(100):  # random sequential placement from a batch of candidates; start again if stuck
        candidates = rng.uniform((x_low, y_low), (x_high, y_high), size=(64, 2)).tolist()
        points = []
        for point in candidates:
            if all(_apart(point, other, radius) for other in points):
                points.append(tuple(point))
                if len(points) == count:
                    break
        if len(points) == count:
            break
    else:
        raise RuntimeError(f"could not place {count} {shape}s moving {motion}: the world's geometry is too tight")
    wording = (int(rng.integers(len(PHRASES[motion]))), int(rng.integers(len(DETERMINERS[count]))))
    return ClipSpec(shape, colour, motion, count, tuple(points), wording)


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Whether points at offset (dx, dy) from an object's centre are inside it (offsets in frame fractions)."""
    in_box = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "square":
        return in_box
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    # Triangle: apex (0, -r), base from (-r, r) to (r, r); its half-width grows linearly from apex to base.
    return in_box & (np.abs(dx) <= (dy + radius) / 2)


def render(spec: ClipSpec, frames: int = 9, size: int = 32, supersample: int = 4) -> torch.Tensor:
    """The clip as float [frames, size, size, 3] in 0..1, anti-aliased by supersampling each pixel."""
    # numpy rather than torch: single-threaded, so it stays fast on a CPU shared with training jobs.
    fine = size * supersample
    coords = (np.arange(fine, dtype=np.float32) + 0.5) / fine  # sample centres in frame fractions
    progress = np.linspace(0, 1, frames, dtype=np.float32) if frames > 1 else np.zeros(1, np.float32)
    step_x, step_y = MOTIONS[spec.motion]
    coverage = np.zeros((frames, fine, fine), dtype=bool)
    for x0, y0 in spec.positions:
        centre_x = x0 + step_x * TRAVEL * progress  # [frames]
        centre_y = y0 + step_y * TRAVEL * progress
        dx = coords[None, None, :] - centre_x[:, None, None]
        dy = coords[None, :, None] - centre_y[:, None, None]
        coverage |= _inside(spec.shape, dx, dy, spec.radius)
    alpha = coverage.reshape(frames, size, supersample, size, supersample).mean(axis=(2, 4), dtype=np.float32)
    background = np.array(BACKGROUND, dtype=np.float32)
    colour = np.array(PALETTE[spec.colour], dtype=np.float32)
    return torch.from_numpy(background + alpha[..., None] * (colour - background))


def make_dataset(n: int, seed: int, split: str = "train") -> list[ClipSpec]:
    """n clip specs, the same for the same seed. split "train" never uses HELDOUT_TRIPLES; "heldout" only them."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    triples = TRAIN_TRIPLES if split == "train" else HELDOUT_TRIPLES
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    return [sample_spec(rng, triples) for _ in range(n)]


def heldout_prompts(counts=(1, 2, 3)) -> list[dict]:
    """Canonical prompts for the held-out triples, one per count, with the attributes a clip should show.

    Each item: {"prompt", "colour", "direction", "count", "shape"} (the keys of `analysis.analyse`).
    """
    prompts = []
    for colour, shape, motion in HELDOUT_TRIPLES:
        for count in counts:
            prompts.append({"prompt": make_caption(shape, colour, motion, count), "colour": colour,
                            "direction": motion, "count": count, "shape": shape})
    return prompts


def write_dataset(folder, n: int, seed: int, split: str = "train", frames: int = 9, size: int = 32,
                  fps: int = 8) -> Path:
    """Render make_dataset(n, seed, split) to folder/clip_0000.mp4 ... plus folder/captions.jsonl.

    Each JSONL line is {"video": "clip_0000.mp4", "caption": "..."}, the video path relative to the JSONL file.
    Returns the path of captions.jsonl.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, spec in enumerate(make_dataset(n, seed, split)):
        name = f"clip_{index:04d}.mp4"
        write_video(render(spec, frames, size), folder / name, fps=fps)
        lines.append(json.dumps({"video": name, "caption": spec.caption}))
    captions = folder / "captions.jsonl"
    captions.write_text("\n".join(lines) + "\n")
    return captions
