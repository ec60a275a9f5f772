"""Simple, documented image analysis of clips of the synthetic world (rendered or generated).

`analyse(frames)` reads four attributes off frames [F, H, W, 3] in 0..1:
1. Background: the per-channel median of the one-pixel frame border over all frames.
2. Object mask: pixels whose RGB distance from the background exceeds half the clip's peak distance (its
   99th percentile), and at least MIN_CONTRAST. Half-peak puts the mask edge where an anti-aliased or blurred
   edge is half covered, so blur does not inflate the shapes.
3. Components: 4-connected components of the mask in each frame; those smaller than MIN_AREA pixels or than
   MIN_RELATIVE_AREA of the frame's largest component are noise and dropped.
4. colour: the mean colour of the "core" mask pixels (distance >= CORE * peak, away from blurred edges),
   matched to the nearest palette colour in RGB after the best brightness scaling of each palette colour
   (within BRIGHTNESS), so a dim or washed-out white is still white and not purple.
5. direction: a least-squares line through the mask centroid over frames gives the displacement over the
   clip; below STILL_FRACTION of the frame side it is "still", else the dominant axis and sign.
6. count: the most common number of components over the frames.
7. shape, from medians over components and frames. A triangle (apex up, base down) has its mass low: the
   skewness of its pixels' y coordinates is about -0.57, against 0 for a circle or a square; below
   TRIANGLE_SKEW it is a triangle (blur keeps it clearly negative: blur leaves the third cumulant unchanged).
   Otherwise the squareness tells a square from a circle: with soft weights w = distance / peak (clipped
   to 0..1) over the component grown by one pixel, squareness = 240 * (M4 along the diagonals - M4 along
   the axes) / mass^3, where M4 is the fourth moment about the centroid. It is 1 for a square, 0 for a
   circle (isotropic), and Gaussian blur changes neither fourth-moment term relative to the other, so it
   survives blur far better than a fill ratio of the bounding box. At or above SQUARENESS it is a square.

`steady(frames)` says whether the objects keep their number and size over the clip: in every frame the number
of components equals the median frame's, and the total component area is within +-35% of the median frame's
(a clip whose objects split, merge, fade or grow is not steady).

`parse_caption(caption)` returns the same keys from a caption of the world, so a benchmark compares the two.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .world import COUNT_WORDS, MOTIONS, PALETTE, PLURALS, SHAPES, motion_phrases

MIN_CONTRAST = 0.15  # RGB distance (0..sqrt(3)) below which nothing counts as an object
CORE = 0.75  # share of the peak distance above which a mask pixel is an object's core, used for colour
MIN_AREA = 3  # pixels; smaller components are noise
MIN_RELATIVE_AREA = 0.2  # of the frame's largest component; smaller ones are noise or blur debris
STILL_FRACTION = 0.1  # of the frame side; the world moves objects 0.32 of it
BRIGHTNESS = (0.5, 1.5)  # range of the brightness scaling allowed when matching a palette colour
TRIANGLE_SKEW = -0.12  # between triangle -0.57 (-0.2 after strong blur) and circle or square 0
SQUARENESS = 0.15  # between circle 0 and square 1, nearer the circle: blur rounds a square's corners
STEADY_AREA = 0.35  # steady(): largest change of the total object area from its median frame, as a share


def _as_array(frames) -> np.ndarray:
    """Frames [F, H, W, 3] (tensor or array; float 0..1 or uint8) -> float32 numpy."""
    frames = torch.as_tensor(frames).detach().cpu()
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape [F, H, W, 3], got {list(frames.shape)}")
    frames = frames.float() / 255 if frames.dtype == torch.uint8 else frames.float()
    return frames.numpy()


def background_colour(frames: np.ndarray) -> np.ndarray:
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    return np.median(border.reshape(-1, 3), axis=0)


def object_mask(frames: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(mask [F, H, W] bool, distance from background [F, H, W], peak distance) for float frames."""
    distance = np.linalg.norm(frames - background, axis=-1)
    peak = float(np.percentile(distance, 99))
    return distance > max(MIN_CONTRAST, 0.5 * peak), distance, peak


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of each frame of mask [F, H, W]: 0 outside, equal ids inside one component.

    Each pixel takes the smallest id among itself and its neighbours until nothing changes (vectorised; the
    number of rounds is the longest path inside a component).
    """
    frames, height, width = mask.shape
    none = frames * height * width + 1
    padded = np.full((frames, height + 2, width + 2), none)  # a border of "no label" around every frame
    padded[:, 1:-1, 1:-1] = np.where(mask, np.arange(1, none).reshape(mask.shape), none)
    while True:
        labels = padded[:, 1:-1, 1:-1]
        neighbours = np.minimum.reduce([padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2],
                                        padded[:, 1:-1, 2:], labels])
        updated = np.where(mask, neighbours, none)
        if np.array_equal(updated, labels):
            return np.where(mask, labels, 0)
        padded[:, 1:-1, 1:-1] = updated


def frame_components(labels: np.ndarray) -> list[list[np.ndarray]]:
    """Per frame, the boolean masks [H, W] of the components that are not noise."""
    result = []
    for frame_labels in labels:
        ids, areas = np.unique(frame_labels[frame_labels > 0], return_counts=True)
        keep = ids[areas >= max(MIN_AREA, MIN_RELATIVE_AREA * areas.max())] if len(ids) else ids
        result.append([frame_labels == i for i in keep])
    return result


def nearest_colour(rgb, background=(0.0, 0.0, 0.0)) -> str:
    """The palette colour p whose brightness-scaled version background + a * (p - background) is nearest."""
    names = list(PALETTE)
    offsets = np.array([PALETTE[n] for n in names]) - np.asarray(background)  # [colours, 3]
    target = np.asarray(rgb) - np.asarray(background)
    scale = np.clip(offsets @ target / (offsets * offsets).sum(axis=1), *BRIGHTNESS)
    distances = np.linalg.norm(scale[:, None] * offsets - target, axis=1)
    return names[int(np.argmin(distances))]


def squareness(component: np.ndarray, weights: np.ndarray) -> float:
    """1 for a square, 0 for a circle (see the module docstring); weights [H, W] in 0..1."""
    padded = np.pad(component, 1)
    grown = padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    w = weights * grown
    ys, xs = np.mgrid[:w.shape[0], :w.shape[1]]
    mass = w.sum()
    dx, dy = xs - (w * xs).sum() / mass, ys - (w * ys).sum() / mass
    axes = (w * (dx**4 + dy**4)).sum() / 2
    diagonals = (w * ((dx + dy) ** 4 + (dx - dy) ** 4)).sum() / 8  # projections on (1, +-1) / sqrt(2)
    return float(240 * (diagonals - axes) / mass**3)


def vertical_skewness(component: np.ndarray) -> float:
    rows = np.nonzero(component)[0].astype(np.float64)
    centred = rows - rows.mean()
    variance = (centred**2).mean()
    return float((centred**3).mean() / variance**1.5) if variance > 0 else 0.0


def shape_of(components: list[list[np.ndarray]], weights: np.ndarray) -> str:
    """Shape name from per-frame component masks and per-frame soft weights [F, H, W]."""
    pairs = [(c, weights[t]) for t, frame in enumerate(components) for c in frame]
    if np.median([vertical_skewness(c) for c, _ in pairs]) < TRIANGLE_SKEW:
        return "triangle"
    return "square" if np.median([squareness(c, w) for c, w in pairs]) >= SQUARENESS else "circle"


def direction_of(centroids: np.ndarray, times: np.ndarray, side: int) -> str:
    """Direction name from the least-squares displacement of centroids (x, y) observed at frame indices."""
    if len(times) < 2:
        return "still"
    span = times.max() - times.min()
    slopes = np.polyfit(times, centroids, 1)[0]  # pixels per frame, for x and y
    dx, dy = slopes * span
    if max(abs(dx), abs(dy)) < STILL_FRACTION * side:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _objects(frames) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, list[list[np.ndarray]]]:
    """Steps 1-3 of the module docstring: (float frames, background, distance, peak, per-frame components)."""
    frames = _as_array(frames)
    background = background_colour(frames)
    mask, distance, peak = object_mask(frames, background)
    return frames, background, distance, peak, frame_components(label_components(mask))


def analyse(frames) -> dict:
    """{"colour", "direction", "count", "shape"} read off frames [F, H, W, 3]; all None if no object is seen."""
    frames, background, distance, peak, components = _objects(frames)
    if not any(components):
        return {"colour": None, "direction": None, "count": None, "shape": None}
    kept = np.stack([np.any(c, axis=0) if c else np.zeros(frames.shape[1:3], bool) for c in components])
    core = kept & (distance >= CORE * peak)
    colour = nearest_colour(frames[core if core.any() else kept].mean(axis=0), background)

    times = np.nonzero(kept.any(axis=(1, 2)))[0]
    rows, cols = np.indices(kept.shape[1:])
    seen = kept[times]
    centroids = np.stack([(seen * cols).sum(axis=(1, 2)), (seen * rows).sum(axis=(1, 2))], axis=1)
    centroids = centroids / seen.sum(axis=(1, 2))[:, None]
    direction = direction_of(centroids, times.astype(np.float64), min(frames.shape[1:3]))

    counts = np.bincount([len(c) for c in components])
    count = int(np.argmax(counts[1:]) + 1)  # most common non-zero count

    shape = shape_of(components, np.clip(distance / peak, 0, 1))
    return {"colour": colour, "direction": direction, "count": count, "shape": shape}


def steady(frames, tolerance: float = STEADY_AREA) -> bool:
    """Whether objects neither split, merge, fade nor grow: every frame shows the same number of components as
    the median frame, and a total component area within +-tolerance of the median frame's."""
    components = _objects(frames)[4]
    counts = np.array([len(c) for c in components])
    areas = np.array([sum(int(c.sum()) for c in frame) for frame in components], dtype=np.float64)
    median_area = np.median(areas)
    return bool(median_area > 0 and (counts == np.median(counts)).all()
                and (np.abs(areas - median_area) <= tolerance * median_area).all())


def _motion_keywords() -> dict[str, str]:
    """Word -> motion for words that occur in the phrases of exactly one motion."""
    words = {motion: {word for phrase in motion_phrases(motion) for word in phrase.split()} for motion in MOTIONS}
    return {w: m for m in MOTIONS for w in words[m] if not any(w in words[o] for o in MOTIONS if o != m)}


MOTION_KEYWORDS = _motion_keywords()
NOUNS = {**{s: s for s in SHAPES}, **{plural: s for s, plural in PLURALS.items()}}


def parse_caption(caption: str) -> dict:
    """{"colour", "direction", "count", "shape"} named by a caption of the world (ValueError if one is missing)."""
    words = re.findall(r"[a-z]+", caption.lower())
    colour = next((w for w in words if w in PALETTE), None)
    shape = next((NOUNS[w] for w in words if w in NOUNS), None)
    count = next((COUNT_WORDS[w] for w in words if w in COUNT_WORDS), None)
    motions = {MOTION_KEYWORDS[w] for w in words if w in MOTION_KEYWORDS}
    result = {"colour": colour, "direction": motions.pop() if len(motions) == 1 else None, "count": count,
              "shape": shape}
    missing = [key for key, value in result.items() if value is None]
    if missing:
        raise ValueError(f"caption {caption!r} names no single {', '.join(missing)} of the world")
    return result
