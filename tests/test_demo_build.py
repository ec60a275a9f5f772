"""The demo-model recipe (mimir/demo/build.py, corpus.py): the text corpus and both encoders' objectives, and a
shortened build of every stage end to end, both arms."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimir.demo import corpus
from mimir.demo.analysis import parse_caption
from mimir.demo.build import STAGES, Recipe, build, llm_example, main, make_tokenizers, span_corruption
from mimir.demo.world import caption_vocabulary
from mimir.fuser import DEFAULT_INSTRUCTIONS
from mimir.loading import DEMO_MODEL_DIR, load_pipeline
from mimir.text import chat_template_parts

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("colour", "direction", "count", "shape")


def test_understanding_prompts_name_every_attribute_in_corpus_words_only():
    """No attribute word of an understanding prompt is a caption word ("a" is a determiner both use), and their
    restatements, which the LLM learns from the corpus, name the prompt's attributes."""
    prompts = corpus.understanding_prompts()
    assert len(prompts) == 72 and {p["split"] for p in prompts} == {"heldout", "seen"}
    shared = {w for p in prompts for w in p["prompt"].split()} & set(caption_vocabulary())
    assert shared == {"a"}, shared
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    for item in prompts:
        restated = corpus.instruction_answers(item["colour"], item["shape"], item["direction"], item["count"])[-1]
        assert parse_caption(restated) == {k: item[k] for k in KEYS}


def test_corpus_relates_every_synonym_and_leaves_the_test_prompts_out():
    docs = corpus.documents(3000, seed=0)
    texts = [corpus.plain_text(d) for d in docs]
    assert not {p["prompt"] for p in corpus.understanding_prompts()} & {d.get("prompt", d.get("text")) for d in docs}
    facts = set(corpus.facts())
    assert "crimson is a shade of red" in facts and "a lemon is yellow" in facts and "to sink means to move down" in facts
    assert "a pair of means two" in facts and "a wedge looks like a triangle" in facts
    kinds = {("instruction" in d, d.get("instruction")) for d in docs}
    assert {(True, i) for i in (*DEFAULT_INSTRUCTIONS, "")} <= kinds and (False, None) in kinds
    words = {w for t in texts for w in t.lower().replace(".", " . ").split()}
    assert words <= set(corpus.corpus_vocabulary()) | set(caption_vocabulary())


def test_tokenizers_cover_the_corpus_and_the_captions():
    t5, llm = make_tokenizers(Recipe())
    words = sorted(set(corpus.corpus_vocabulary()) | set(caption_vocabulary()))
    for tokenizer in (t5, llm):
        ids = tokenizer(" ".join(words), add_special_tokens=False).input_ids
        assert len(ids) == len(words) and tokenizer.unk_token_id not in ids
    assert t5.convert_tokens_to_ids("<extra_id_7>") != t5.unk_token_id


def test_span_corruption_hides_spans_behind_sentinels_and_the_target_restores_them():
    ids, sentinels, eos = list(range(10, 30)), [1, 2, 3, 4, 5, 6, 7, 8], 0
    for seed in range(20):
        inputs, target = span_corruption(ids, sentinels, eos, random.Random(seed))
        assert inputs[-1] == eos and target[-1] == eos
        hidden = [t for t in target[:-1] if t not in sentinels]
        assert 0 < len(hidden) < len(ids)
        # filling each sentinel of the input with the tokens after it in the target gives the text back
        spans, current = {}, None
        for t in target[:-1]:
            current = t if t in sentinels else current
            spans.setdefault(current, []).extend([] if t in sentinels else [t])
        restored = [x for t in inputs[:-1] for x in (spans[t] if t in sentinels else [t])]
        assert restored == ids


def test_llm_examples_train_answers_in_the_text_encoders_layout_and_the_corpus_as_text():
    """An instruction answer reads chat prefix + prompt + suffix (+ instruction), as LLMTextEncoder feeds the LLM,
    with loss on the answer only; a text document is next-token prediction over all of it."""
    _, tokenizer = make_tokenizers(Recipe())
    template = chat_template_parts(tokenizer)
    doc = {"prompt": "a couple of ruby dots head west", "instruction": DEFAULT_INSTRUCTIONS[1], "answer": "red"}
    ids, labels = llm_example(tokenizer, template, doc)
    context = len(ids) - sum(label != -100 for label in labels)
    assert ids[:len(template[0])] == template[0] and labels[:context] == [-100] * context
    assert tokenizer.decode(labels[context:], skip_special_tokens=True).strip() == "red"
    ids, labels = llm_example(tokenizer, template, {"text": "crimson is a shade of red"})
    assert ids == labels and tokenizer.decode(ids, skip_special_tokens=True).strip() == "crimson is a shade of red"


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    """The --quick recipe (a few steps of every stage) -> (model folder, build info, work folder)."""
    root = tmp_path_factory.mktemp("quick")
    info = build(Recipe.quick(), out=root / "model", work=root / "work", log=lambda message: None)
    return root / "model", info, root / "work"


def test_quick_build_writes_both_arms_sharing_the_frozen_parts(quick_build):
    out, info, work = quick_build
    assert set(info["seconds"]) == {"vae", "text", "mimir", "t5-only"} and set(info["checks"]) == {
        "vae_round_trip_heldout", "llm_restates_understanding_prompts", "llm_restates_heldout_captions"}
    for arm in ("mimir", "t5-only"):
        assert json.loads((work / arm / "run" / "summary.json").read_text())["steps"] == Recipe.quick().dit_steps
    pipe = load_pipeline(out)
    assert pipe.fuser.config.stabilizer_tokens == 4 and pipe.fuser.config.text_len == Recipe().text_len
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == Recipe().latent_channels
    assert pipe.codec.spatial == 4 and pipe.transformer.config.sample_height == Recipe().size // 4
    frames = pipe("a red circle moves to the right", num_frames=9, height=48, width=48, steps=2, seed=0)
    assert frames.shape == (1, 9, 48, 48, 3) and torch.isfinite(frames).all()
    t5_only = sorted(p.relative_to(out).as_posix() for p in (out / "t5_only").rglob("*") if p.is_file())
    assert t5_only == ["t5_only/transformer/config.json", "t5_only/transformer/diffusion_pytorch_model.safetensors"]
    trained = json.loads((out / "t5_only" / "transformer" / "config.json").read_text())
    assert trained["max_text_seq_length"] == Recipe().text_len


def test_quick_t5_only_arm_read_exactly_the_t5_stream(quick_build):
    """The T5-only arm trained through a fuser that stayed at its zero init: what it read is the T5 stream."""
    arm = load_pipeline(quick_build[2] / "t5-only" / "run" / "export" / "pipeline")
    assert arm.fuser.config.stabilizer_tokens == 0 and arm.fuser.config.answer_tokens == 0
    assert all(torch.count_nonzero(p) == 0 for name, p in arm.fuser.named_parameters() if name.startswith("z_"))
    features = arm.encode_features(["two blue squares moving up"])
    assert torch.equal(arm.fuse(features), features.t5)


def test_quick_build_is_reproducible(quick_build, tmp_path):
    """Same recipe, same seed: the same weights in every part (same machine and thread count)."""
    build(Recipe.quick(), out=tmp_path / "again", log=lambda message: None)
    first, again = load_pipeline(quick_build[0]), load_pipeline(tmp_path / "again")
    for name in ("vae", "text_encoder", "llm", "transformer", "fuser"):
        a, b = getattr(first, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for path in (quick_build[0] / "t5_only").rglob("*.safetensors"):
        assert path.read_bytes() == (tmp_path / "again" / path.relative_to(quick_build[0])).read_bytes()


def test_stages_run_one_at_a_time_and_the_arms_in_parallel(quick_build, tmp_path):
    """--stage vae, text, then both arms at once (--jobs 2), then write: the same frozen parts as the one-shot
    build."""
    work, out = tmp_path / "work", tmp_path / "model"
    main(["--quick", "--work", str(work), "--out", str(out), "--stage", "vae"])
    assert (work / "vae" / "config.json").is_file() and not (work / "init-mimir").exists()
    main(["--quick", "--work", str(work), "--out", str(out), "--stage", "text"])
    assert not out.exists() and (work / "init-mimir" / "model_index.json").is_file()
    main(["--quick", "--work", str(work), "--out", str(out), "--stage", "mimir", "--stage", "t5-only", "--jobs", "2"])
    main(["--quick", "--work", str(work), "--out", str(out), "--stage", "write"])
    staged, first = load_pipeline(out), load_pipeline(quick_build[0])
    for name in ("vae", "text_encoder", "llm"):
        a, b = getattr(first, name).state_dict(), getattr(staged, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert set(json.loads((out / "build.json").read_text())["seconds"]) == set(STAGES) - {"write"}


def test_alignment_benchmark_prints_both_arms_on_both_sets_and_writes_gifs(quick_build, tmp_path):
    """bench/alignment.py end to end on the quick arms: the tables, the targets, the pictures."""
    t5_only = quick_build[2] / "t5-only" / "run" / "export" / "pipeline"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "alignment.py"), "--model", str(quick_build[0]), "--t5-only",
         str(t5_only), "--limit", "1", "--repeats", "1", "--gif", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| canonical |", "| understanding"))]
    assert len(rows) == 8 and all(line.count("%") == 6 for line in rows), result.stdout  # 4 sets x 2 arms
    assert "seeds [0]" in result.stdout and "understanding colour: mimir 30+ points above t5-only" in result.stdout
    assert len(list(tmp_path.glob("*.gif"))) == 3 and len(list(tmp_path.glob("*.png"))) == 2


@pytest.mark.parametrize("argv", [[], ["--out", str(DEMO_MODEL_DIR)], ["--quick", "--out", str(DEMO_MODEL_DIR)],
                                  ["--quick", "--out", str(DEMO_MODEL_DIR), "--overwrite-bundled"],
                                  ["--quick", "--out", "x", "--stage", "vae"]])
def test_build_never_replaces_the_bundled_model_unasked(argv, capsys):
    before = {p: p.stat().st_mtime_ns for p in DEMO_MODEL_DIR.rglob("*")}
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and ("--out" in err or "--work" in err)
    assert {p: p.stat().st_mtime_ns for p in DEMO_MODEL_DIR.rglob("*")} == before
