import json
import re

import pytest
import torch

from mimir.cli import main
from mimir.fuser import FuserConfig, TokenFuser, save_fuser
from mimir.loading import save_pipeline
from mimir.pipeline import MimirPipeline
from mimir.testing import tiny_components
from mimir.video import read_video


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-mimir")
    save_pipeline(MimirPipeline(**tiny_components(variant="5b")), folder)
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_writes_a_video_that_plays(model_dir, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    code, stdout, _ = run(capsys, "generate", "a red circle moves to the left", "--model", model_dir, "--frames", 9,
                          "--height", 32, "--width", 48, "--steps", 2, "--scheduler", "dpm", "-o", out)
    assert code == 0, stdout
    frames = read_video(out)
    assert tuple(frames.shape) == (9, 32, 48, 3)
    assert "wrote" in stdout and "9 frames, 48x32" in stdout


def test_generate_webp_uses_model_default_size(model_dir, tmp_path, capsys):
    out = tmp_path / "v.webp"
    code, stdout, _ = run(capsys, "generate", "two blue squares", "--model", model_dir, "--steps", 1, "-o", out)
    assert code == 0
    assert tuple(read_video(out).shape) == (9, 32, 32, 3)  # tiny 5b: sample_frames 9, sample 4x4 latents


@pytest.mark.parametrize("args,message", [
    (["--frames", 10], "frames must be 4k\\+1"),
    (["--height", 40], "height must be a positive multiple of 16"),
    (["--width", 30], "width must be a positive multiple of 16"),
])
def test_bad_sizes_are_clear_errors(model_dir, tmp_path, capsys, args, message):
    code, _, err = run(capsys, "generate", "x", "--model", model_dir, "--steps", 1, "-o", tmp_path / "v.mp4", *args)
    assert code == 2
    assert re.search(message, err), err
    assert not (tmp_path / "v.mp4").exists()


def test_missing_model_folder_is_named(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "x", "--model", tmp_path / "nope", "-o", tmp_path / "v.mp4")
    assert code == 2 and "nope" in err


def test_fuser_for_another_llm_is_refused(model_dir, tmp_path, capsys):
    wrong = tmp_path / "wrong.safetensors"
    save_fuser(TokenFuser(FuserConfig(t5_dim=32, llm_dim=64, text_len=16)), wrong)
    code, _, err = run(capsys, "generate", "x", "--model", model_dir, "--fuser", wrong, "-o", tmp_path / "v.mp4")
    assert code == 2
    assert "64" in err and "48" in err and "hidden size" in err


def test_inspect_reports_the_fuser_config(model_dir, capsys):
    code, stdout, _ = run(capsys, "inspect", model_dir / "fuser.safetensors")
    assert code == 0
    report = json.loads(stdout)
    assert "48" in json.dumps(report) and "stabilizer_tokens" in json.dumps(report)


def test_prompt_cache_second_run_loads_neither_t5_nor_llm(model_dir, tmp_path, capsys, monkeypatch):
    import mimir.loading

    args = ["generate", "a red circle moves to the left", "--model", model_dir, "--steps", 1,
            "--prompt-cache", tmp_path / "cache"]
    assert run(capsys, *args, "-o", tmp_path / "a.mp4")[0] == 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # the prompt and the empty negative

    def refuse(*a, **k):
        raise AssertionError("a cached prompt must not load text encoders")

    monkeypatch.setattr(mimir.loading, "load_llm", refuse)
    monkeypatch.setattr(mimir.loading, "load_t5", refuse)
    code, stdout, err = run(capsys, *args, "-o", tmp_path / "b.mp4")
    assert code == 0, err
    assert torch.equal(read_video(tmp_path / "a.mp4"), read_video(tmp_path / "b.mp4"))


def test_memory_flags(model_dir, tmp_path, capsys):
    common = ["generate", "two blue squares", "--model", model_dir, "--steps", 2]
    assert run(capsys, *common, "-o", tmp_path / "plain.webp")[0] == 0
    assert run(capsys, *common, "--blocks-to-swap", 1, "-o", tmp_path / "swap.webp")[0] == 0
    assert torch.equal(read_video(tmp_path / "plain.webp"), read_video(tmp_path / "swap.webp"))  # exact on CPU
    assert run(capsys, *common, "--fp8", "-o", tmp_path / "fp8.webp")[0] == 0
    assert read_video(tmp_path / "fp8.webp").shape == read_video(tmp_path / "plain.webp").shape
    code, _, err = run(capsys, *common, "--blocks-to-swap", 9, "-o", tmp_path / "x.webp")
    assert code == 2 and "blocks_to_swap must be in 1..2" in err


def test_attention_and_step_cache_flags_reach_the_pipeline(model_dir, tmp_path, capsys, monkeypatch):
    import mimir.loading
    from mimir.speed import StepCache

    loaded = []
    load = mimir.loading.load_pipeline
    monkeypatch.setattr(mimir.loading, "load_pipeline", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    code, _, err = run(capsys, "generate", "a red circle", "--model", model_dir, "--steps", 2, "--attention", "native",
                       "--step-cache", "fbc:0.2", "-o", tmp_path / "v.mp4")
    assert code == 0, err
    (pipe,) = loaded
    assert pipe.step_cache == StepCache("fbc", 0.2)
    assert {b.attn1.processor._attention_backend for b in pipe.transformer.transformer_blocks} == {"native"}


@pytest.mark.parametrize("flags,message", [(["--attention", "sage"], "sageattention"),
                                           (["--attention", "sdpa"], "must be one of"),
                                           (["--step-cache", "teacache"], "step cache must be one of")])
def test_bad_speed_flags_fail_before_any_model_loads(model_dir, tmp_path, capsys, monkeypatch, flags, message):
    import importlib.util

    import mimir.loading

    if flags[1] == "sage" and importlib.util.find_spec("sageattention") is not None:
        pytest.skip("sageattention is installed here")
    monkeypatch.setattr(mimir.loading, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    code, _, err = run(capsys, "generate", "a red circle", "--model", model_dir, *flags, "-o", tmp_path / "v.mp4")
    assert code == 2 and message in err and not (tmp_path / "v.mp4").exists()
