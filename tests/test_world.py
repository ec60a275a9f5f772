import itertools
import json

import numpy as np
import pytest
import torch

from mimir.demo import world
from mimir.demo.analysis import analyse, label_components, nearest_colour, parse_caption
from mimir.video import read_video


def blur(frames: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [F, H, W, 3] frames, edges replicated (numpy: one thread on a busy CPU)."""
    taps = np.arange(-3, 4)
    kernel = np.exp(-(taps**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    x = frames.numpy()
    for axis in (1, 2):
        padded = np.pad(x, [(3, 3) if a == axis else (0, 0) for a in range(4)], mode="edge")
        x = sum(k * np.take(padded, range(i, i + x.shape[axis]), axis=axis) for i, k in enumerate(kernel))
    return torch.from_numpy(x.astype(np.float32))


def test_generator_is_deterministic_per_seed():
    a, b = world.make_dataset(30, seed=3), world.make_dataset(30, seed=3)
    assert a == b
    assert all(torch.equal(world.render(x), world.render(y)) for x, y in zip(a[:5], b[:5]))
    assert world.make_dataset(30, seed=4) != a
    assert world.make_dataset(30, seed=3, split="heldout") != a


def test_rendered_clip_shape_range_border_and_travel():
    specs = world.make_dataset(60, seed=0)
    for spec in specs:
        clip = world.render(spec, frames=9, size=32)
        assert clip.shape == (9, 32, 32, 3) and clip.dtype == torch.float32
        assert 0 <= clip.min() and clip.max() <= 1
        border = torch.cat([clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]], dim=1)
        assert border.abs().max() == 0  # objects stay clear of the border: it is pure background
        mass = clip.sum(-1)
        xs = (mass * torch.arange(32.0)).sum(dim=(1, 2)) / mass.sum(dim=(1, 2))
        ys = (mass * torch.arange(32.0)[:, None]).sum(dim=(1, 2)) / mass.sum(dim=(1, 2))
        travel = float(torch.hypot(xs[-1] - xs[0], ys[-1] - ys[0]))
        assert travel >= 10 if spec.motion != "still" else travel < 1e-3
    assert world.render(specs[0], frames=17, size=64).shape == (17, 64, 64, 3)


def test_analysis_recovers_every_caption_attribute_on_rendered_clips():
    specs = world.make_dataset(170, seed=11) + world.make_dataset(30, seed=11, split="heldout")
    found = [analyse(world.render(s)) for s in specs]
    wrong = [(s.caption, f) for s, f in zip(specs, found) if f != parse_caption(s.caption)]
    assert wrong == []
    assert {s.count for s in specs} == {1, 2, 3} and {s.motion for s in specs} == set(world.MOTIONS)


def test_analysis_survives_blur_noise_and_dimming():
    torch.manual_seed(0)
    specs = world.make_dataset(60, seed=5)
    for spec in specs:
        clip = 0.05 + 0.75 * blur(world.render(spec), sigma=1.0) + 0.04 * torch.randn(9, 32, 32, 3)
        assert analyse(clip.clamp(0, 1)) == spec.attributes(), spec.caption


def test_analysis_of_mp4_dataset_matches_captions(tmp_path):
    captions = world.write_dataset(tmp_path, n=8, seed=2)
    lines = [json.loads(line) for line in captions.read_text().splitlines()]
    assert [line["video"] for line in lines] == [f"clip_{i:04d}.mp4" for i in range(8)]
    for line in lines:
        frames = read_video(tmp_path / line["video"])
        assert frames.shape == (9, 32, 32, 3)
        assert analyse(frames) == parse_caption(line["caption"])


def test_analysis_of_an_empty_clip_finds_nothing():
    assert analyse(torch.zeros(9, 32, 32, 3)) == {"colour": None, "direction": None, "count": None, "shape": None}


def test_components_are_four_connected():
    mask = np.zeros((2, 6, 9), dtype=bool)
    mask[0, 1:5, 1] = mask[0, 4, 1:5] = mask[0, 1:5, 4] = True  # a U: one component
    mask[0, 0, 8] = mask[0, 1, 7] = True  # touching only diagonally: two components
    mask[1] = mask[0]
    labels = label_components(mask)
    for frame in labels:
        assert len(np.unique(frame[frame > 0])) == 3
        assert frame[1, 1] == frame[1, 4] and frame[0, 8] != frame[1, 7]
        assert (frame == 0).sum() == (~mask[0]).sum()


def test_nearest_colour_tolerates_dimming():
    for name, rgb in world.PALETTE.items():
        for brightness in (0.6, 1.0):
            assert nearest_colour(np.array(rgb) * brightness) == name


def test_heldout_triples_never_appear_in_training():
    train = world.make_dataset(1500, seed=0)
    heldout = world.make_dataset(200, seed=0, split="heldout")
    held = set(world.HELDOUT_TRIPLES)
    assert not any(s.triple in held for s in train)
    assert {s.triple for s in heldout} == held
    assert {s.triple for s in train} == set(world.TRAIN_TRIPLES)  # all training triples are sampled
    assert 0.10 <= len(held) / len(world.ALL_TRIPLES) <= 0.15
    # Every pair of attributes of a held-out triple still appears in training, so each is learnable.
    for colour, shape, motion in held:
        assert any(t[:2] == (colour, shape) for t in world.TRAIN_TRIPLES)
        assert any(t[0] == colour and t[2] == motion for t in world.TRAIN_TRIPLES)
        assert any(t[1:] == (shape, motion) for t in world.TRAIN_TRIPLES)


def test_heldout_prompts_parse_to_their_attributes():
    prompts = world.heldout_prompts()
    assert len(prompts) == 3 * len(world.HELDOUT_TRIPLES)
    for item in prompts:
        assert parse_caption(item["prompt"]) == {k: item[k] for k in ("colour", "direction", "count", "shape")}
    assert world.heldout_prompts(counts=(1,))[0]["prompt"] == "a red circle moves to the left"


def all_captions():
    for shape, colour, motion, count in itertools.product(world.SHAPES, world.COLOURS, world.MOTIONS, (1, 2, 3)):
        for wording in itertools.product(range(len(world.PHRASES[motion])), range(len(world.DETERMINERS[count]))):
            yield world.make_caption(shape, colour, motion, count, wording), (shape, colour, motion, count)


def test_caption_parsing_round_trip_for_every_wording():
    captions = list(all_captions())
    assert len({c for c, _ in captions}) == len(captions)  # no two wordings collide
    for caption, (shape, colour, motion, count) in captions:
        assert parse_caption(caption) == {"colour": colour, "direction": motion, "count": count, "shape": shape}


def test_vocabulary_is_exactly_the_words_captions_use():
    used = {word for caption, _ in all_captions() for word in caption.split()}
    assert set(world.caption_vocabulary()) == used
    assert world.caption_vocabulary() == sorted(used)
    sampled = {word for spec in world.make_dataset(300, seed=1) for word in spec.caption.split()}
    assert sampled <= used


def test_bad_inputs_are_refused_with_names():
    with pytest.raises(ValueError, match="'pink'"):
        world.ClipSpec("circle", "pink", "left", 1, ((0.5, 0.5),))
    with pytest.raises(ValueError, match="count must be 1-3"):
        world.ClipSpec("circle", "red", "left", 2, ((0.5, 0.5),))
    with pytest.raises(ValueError, match="split"):
        world.make_dataset(3, seed=0, split="test")
    with pytest.raises(ValueError, match="colour, direction"):
        parse_caption("a dog running")
