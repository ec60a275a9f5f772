"""The bundled demo model: built by its recipe, loads through the ordinary loaders, follows prompts, and
`mimir generate` with no model arguments uses it."""

import dataclasses
import json

import pytest
import torch

from mimir.cli import main
from mimir.components import load_transformer
from mimir.demo import DEMO_GUIDANCE, DEMO_STEPS
from mimir.demo.analysis import analyse, parse_caption
from mimir.demo.build import Recipe, model_card
from mimir.loading import DEMO_MODEL_DIR, DEMO_T5_ONLY_DIR, load_pipeline
from mimir.video import read_video

# Fixed before the model was trained. Canonical captions, and prompts in words only the text corpus uses.
PROMPTS = ("a red circle moves to the right", "two blue squares moving up", "a crimson ball rises",
           "a pair of golden wedges sink")
MEANING = {"a crimson ball rises": {"colour": "red", "direction": "up"},
           "a pair of golden wedges sink": {"colour": "yellow", "direction": "down"}}


@pytest.fixture(scope="module")
def demo():
    assert DEMO_MODEL_DIR.is_dir(), f"the bundled demo model is missing: {DEMO_MODEL_DIR}"
    torch.set_num_threads(1)  # steady on shared cores; the model is tiny
    return load_pipeline(DEMO_MODEL_DIR)


def test_bundled_model_is_small_and_a_full_mimir_pipeline(demo):
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.rglob("*") if p.is_file())  # both arms
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
    frames = demo(prompt, num_frames=9, height=48, width=48, steps=DEMO_STEPS, guidance=DEMO_GUIDANCE,
                  seed=0)[0]
    assert frames.shape == (9, 48, 48, 3)
    found, wanted = analyse(frames), MEANING.get(prompt) or parse_caption(prompt)
    assert (found["colour"], found["direction"]) == (wanted["colour"], wanted["direction"]), found


def test_generate_without_model_arguments_uses_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert main(["generate", "a yellow square moves to the left", "-o", str(out)]) == 0
    assert "model: demo" in capsys.readouterr().out
    frames = read_video(out)
    assert tuple(frames.shape) == (9, 48, 48, 3)
    assert analyse(frames.float() / 255)["colour"] == "yellow"


def test_bundled_t5_only_arm_is_a_plain_cogvideox_dit_on_the_demos_parts():
    """The T5-only arm (t5_only/transformer) with the demo's VAE, T5 and scheduler: it reads the T5 length it was
    trained on (its config's max_text_seq_length, the fuser's text_len), and its own weights."""
    arm = DEMO_T5_ONLY_DIR / "transformer"
    assert arm.is_dir(), f"the bundled T5-only arm is missing: {arm}"
    pipe = load_pipeline(DEMO_MODEL_DIR, transformer_path=arm, with_fuser=False)
    text_len = json.loads((arm / "config.json").read_text())["max_text_seq_length"]
    fuser_text_len = json.loads((DEMO_MODEL_DIR / "build.json").read_text())["recipe"]["text_len"]
    assert pipe.fuser is None and pipe.llm is None and pipe.text_len == text_len == fuser_text_len == 24
    reference, _ = load_transformer(arm)
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.state_dict().values(),
                                                   reference.state_dict().values()))
    cond, uncond = pipe.encode_prompt("a red circle moves up")
    assert cond.shape == uncond.shape == (1, 24, pipe.transformer.config.text_embed_dim)


def test_generate_no_fuser_without_a_model_uses_the_bundled_t5_only_arm(tmp_path, capsys):
    out = tmp_path / "v.webp"
    assert main(["generate", "a red circle moves up", "--no-fuser", "--steps", "2", "-o", str(out)]) == 0
    assert "model: demo, T5-only arm" in capsys.readouterr().out
    assert tuple(read_video(out).shape) == (9, 48, 48, 3)
