"""The demo-model recipe (mimir/demo/build.py): its LLM lessons, and a shortened build of every stage end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimir.demo.analysis import parse_caption
from mimir.demo.build import Recipe, build, lesson_ids, llm_lessons, main, make_tokenizers
from mimir.demo.world import make_dataset
from mimir.fuser import DEFAULT_INSTRUCTIONS
from mimir.loading import DEMO_MODEL_DIR, load_pipeline
from mimir.text import chat_template_parts

ROOT = Path(__file__).resolve().parents[1]


def test_llm_lessons_teach_the_attributes_in_the_text_encoders_layout():
    """Each lesson reads chat prefix + caption + suffix (+ instruction), as LLMTextEncoder feeds the LLM, and
    answers with the canonical caption or one attribute word; every word is in the LLM's vocabulary."""
    _, tokenizer = make_tokenizers()
    template = chat_template_parts(tokenizer)
    spec = make_dataset(1, seed=3)[0]
    lessons = llm_lessons(spec)
    assert [(caption, instruction) for caption, instruction, _ in lessons] == [(spec.caption, "")] + [
        (spec.caption, text) for text in DEFAULT_INSTRUCTIONS]
    answers = []
    for lesson in lessons:
        ids, labels = lesson_ids(tokenizer, template, *lesson)
        assert tokenizer.unk_token_id not in ids
        context = len(ids) - sum(label != -100 for label in labels)
        assert ids[:len(template[0])] == template[0] and labels[:context] == [-100] * context
        answers.append(tokenizer.decode([i for i in labels if i != -100], skip_special_tokens=True))
    assert parse_caption(answers[0]) == spec.attributes()  # the canonical restatement
    assert answers[1:3] == [spec.motion, spec.colour]


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    """The --quick recipe (a few steps of every stage) -> (model folder, build info, work folder)."""
    root = tmp_path_factory.mktemp("quick")
    info = build(Recipe.quick(), out=root / "model", work=root / "work", log=lambda message: None)
    return root / "model", info, root / "work"


def test_quick_build_runs_end_to_end_and_loads(quick_build):
    out, info, work = quick_build
    assert set(info["seconds"]) == {"world", "vae+text", "cache+dit"}
    assert json.loads((work / "run" / "summary.json").read_text())["steps"] == Recipe.quick().dit_steps
    pipe = load_pipeline(out)
    assert pipe.fuser.config.stabilizer_tokens == 4 and pipe.fuser.config.text_len == Recipe().text_len
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == Recipe().latent_channels
    frames = pipe("a red circle moves to the right", num_frames=9, height=64, width=64, steps=2, seed=0)
    assert frames.shape == (1, 9, 64, 64, 3) and torch.isfinite(frames).all()


def test_quick_build_is_reproducible(quick_build, tmp_path):
    """Same recipe, same seed: the same weights in every part (same machine and thread count)."""
    build(Recipe.quick(), out=tmp_path / "again", log=lambda message: None)
    first, again = load_pipeline(quick_build[0]), load_pipeline(tmp_path / "again")
    for name in ("vae", "text_encoder", "llm", "transformer", "fuser"):
        a, b = getattr(first, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.fixture(scope="module")
def quick_arm(quick_build):
    """The --quick no-fuser ablation arm, reusing the quick build's VAE, tokenizers, T5 and LLM."""
    arm = quick_build[0].parent / "no-fuser"
    main(["--quick", "--no-fuser", "--reuse", str(quick_build[0]), "--out", str(arm)])
    return arm


def test_quick_no_fuser_arm_reads_exactly_the_t5_stream(quick_build, quick_arm):
    """The ablation arm reuses the frozen parts; its fuser stays at identity, so the DiT trained on T5 alone."""
    base, arm = load_pipeline(quick_build[0]), load_pipeline(quick_arm)
    assert arm.fuser.config.stabilizer_tokens == 0 and arm.fuser.config.answer_tokens == 0
    for name in ("vae", "text_encoder", "llm"):
        for a, b in zip(getattr(base, name).state_dict().values(), getattr(arm, name).state_dict().values()):
            assert torch.equal(a, b), name
    features = arm.encode_features(["two blue squares moving up"])
    assert torch.equal(arm.fuse(features), features.t5)


def test_alignment_benchmark_prints_both_arms_and_writes_gifs(quick_build, quick_arm, tmp_path):
    """bench/alignment.py end to end on the quick arms (2 prompts): the table, the targets, the pictures."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "alignment.py"), "--model", str(quick_build[0]), "--ablation",
         str(quick_arm), "--limit", "2", "--repeats", "1", "--gif", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| fuser |", "| no-fuser |"))]
    assert len(rows) == 4 and all(line.count("%") == 5 for line in rows), result.stdout  # 2 arms x 2 guidance
    assert "held-out prompts: 2 x seeds [0]" in result.stdout and "target colour >= 90%: fuser @ 2 " in result.stdout
    assert len(list(tmp_path.glob("*.gif"))) == 2 and len(list(tmp_path.glob("*.png"))) == 1


@pytest.mark.parametrize("argv", [[], ["--out", str(DEMO_MODEL_DIR)], ["--quick", "--out", str(DEMO_MODEL_DIR)],
                                  ["--quick", "--out", str(DEMO_MODEL_DIR), "--overwrite-bundled"]])
def test_build_never_replaces_the_bundled_model_unasked(argv, capsys):
    before = {p: p.stat().st_mtime_ns for p in DEMO_MODEL_DIR.rglob("*")}
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and ("--out" in capsys.readouterr().err)
    assert {p: p.stat().st_mtime_ns for p in DEMO_MODEL_DIR.rglob("*")} == before
