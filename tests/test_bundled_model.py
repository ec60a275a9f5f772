"""The bundled demo model: built by its recipe, loads through the ordinary loaders, follows prompts, and
`mimir generate` with no model arguments uses it."""

import dataclasses
import json

import pytest
import torch

from mimir.cli import main
from mimir.demo import DEMO_GUIDANCE, DEMO_STEPS
from mimir.demo.analysis import analyse, parse_caption
from mimir.demo.build import Recipe, model_card
from mimir.loading import DEMO_MODEL_DIR, load_pipeline
from mimir.video import read_video

# Fixed before the model was trained; the first is the README's command. Canonical and paraphrased wordings.
PROMPTS = ("a red circle moves to the right", "two blue squares moving up", "a single green triangle falls")


@pytest.fixture(scope="module")
def demo():
    assert DEMO_MODEL_DIR.is_dir(), f"the bundled demo model is missing: {DEMO_MODEL_DIR}"
    torch.set_num_threads(1)  # steady on shared cores; the model is tiny
    return load_pipeline(DEMO_MODEL_DIR)


def test_bundled_model_is_small_and_a_full_mimir_pipeline(demo):
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 25 * 2**20
    assert demo.fuser is not None and demo.llm is not None and demo.fuser.config.stabilizer_tokens == 4


def test_bundled_model_was_built_by_the_current_recipe():
    """build.json is written by `python -m mimir.demo.build`: the recipe in the code is the one that made it."""
    info = json.loads((DEMO_MODEL_DIR / "build.json").read_text())
    assert info["recipe"] == json.loads(json.dumps(dataclasses.asdict(Recipe())))
    assert info["reuse"] is None
    assert (DEMO_MODEL_DIR / "README.md").read_text() == model_card(Recipe())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_bundled_model_shows_the_prompted_colour_and_direction(demo, prompt):
    frames = demo(prompt, num_frames=9, height=64, width=64, steps=DEMO_STEPS, guidance=DEMO_GUIDANCE,
                  seed=0)[0]
    assert frames.shape == (9, 64, 64, 3)
    found, wanted = analyse(frames), parse_caption(prompt)
    assert (found["colour"], found["direction"]) == (wanted["colour"], wanted["direction"]), found


def test_generate_without_model_arguments_uses_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert main(["generate", "a yellow square moves to the left", "-o", str(out)]) == 0
    assert "model: demo" in capsys.readouterr().out
    frames = read_video(out)
    assert tuple(frames.shape) == (9, 64, 64, 3)
    assert analyse(frames.float() / 255)["colour"] == "yellow"
