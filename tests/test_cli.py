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


NO_CUDA_DEVICE = "cuda:99" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("args,message", [
    (["--frames", 10], "frames must be 8k\\+1"),
    (["--frames", 5], "frames must be 8k\\+1 .* got 5"),  # the VAE would decode 8
    (["--frames", 0], "frames must be 8k\\+1"),
    (["--height", 40], "height must be a positive multiple of 16"),
    (["--height", 0], "height must be a positive multiple of 16, got 0"),
    (["--width", 30], "width must be a positive multiple of 16"),
    (["--steps", 0], "--steps must be at least 1, got 0"),
    (["--steps", -3], "--steps must be at least 1, got -3"),
    (["--guidance", -1], "--guidance must be a finite number >= 1"),
    (["--guidance", "inf"], "--guidance must be a finite number >= 1 .* got inf"),
    (["--guidance", "nan"], "--guidance must be a finite number >= 1 .* got nan"),
    (["--seed", 2 ** 64], "--seed must be in 0 .. 2\\*\\*64 - 1"),
    (["--seed", -1], "--seed must be in 0 .. 2\\*\\*64 - 1"),
    (["--fps", 0], "--fps must be at least 1"),
    (["--device", NO_CUDA_DEVICE], f"--device {NO_CUDA_DEVICE}: th"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device name"),
    (["--no-fuser", "--fuser", "f.safetensors"], "--no-fuser reads T5 alone"),
    (["-o", "OUT/v.avi"], "unknown extension '.avi', supported: .mp4, .webp, .gif"),
    (["-o", "OUT/missing/v.mp4"], "the folder .*missing does not exist"),
    (["-o", "/proc/v.mp4"], "cannot write into /proc"),
])
def test_bad_values_are_refused_before_any_model_loads(model_dir, tmp_path, capsys, monkeypatch, args, message):
    import mimir.loading

    monkeypatch.setattr(mimir.loading, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    args = [str(a).replace("OUT", str(tmp_path)) for a in args]
    out = ["-o", tmp_path / "v.mp4"] if "-o" not in args else []
    code, _, err = run(capsys, "generate", "x", "--model", model_dir, "--steps", 1, *out, *args)
    assert code == 2
    assert re.search(message, err), err
    assert not list(tmp_path.rglob("v.*"))


def test_a_prompt_that_is_not_utf8_is_named(model_dir, tmp_path, capsys):
    undecodable = b"a red \xff circle".decode("utf-8", "surrogateescape")  # how Python hands over such argv
    code, _, err = run(capsys, "generate", undecodable, "--model", model_dir, "-o", tmp_path / "v.mp4")
    assert code == 2 and "is not valid UTF-8 text" in err


def test_an_empty_prompt_warns_and_runs(model_dir, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "", "--model", model_dir, "--steps", 1, "-o", tmp_path / "v.webp")
    assert code == 0 and "the prompt is empty" in err


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
    import mimir.components

    args = ["generate", "a red circle moves to the left", "--model", model_dir, "--steps", 1,
            "--prompt-cache", tmp_path / "cache"]
    assert run(capsys, *args, "-o", tmp_path / "a.mp4")[0] == 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # the prompt and the empty negative

    def refuse(*a, **k):
        raise AssertionError("a cached prompt must not load text encoders")

    monkeypatch.setattr(mimir.components, "load_llm", refuse)
    monkeypatch.setattr(mimir.components, "load_t5", refuse)
    code, stdout, err = run(capsys, *args, "-o", tmp_path / "b.mp4")
    assert code == 0, err
    assert torch.equal(read_video(tmp_path / "a.mp4"), read_video(tmp_path / "b.mp4"))


def test_prompt_cache_keys_on_the_dtype(model_dir, tmp_path, capsys, monkeypatch):
    import mimir.components

    args = ["generate", "a red circle", "--model", model_dir, "--steps", 1, "--prompt-cache", tmp_path / "cache"]
    assert run(capsys, *args, "-o", tmp_path / "a.webp")[0] == 0
    loaded = []
    real = mimir.components.load_t5
    monkeypatch.setattr(mimir.components, "load_t5", lambda *a, **k: loaded.append(k["dtype"]) or real(*a, **k))
    assert run(capsys, *args, "--dtype", "bf16", "-o", tmp_path / "b.webp")[0] == 0
    assert loaded == ["bf16"]  # fp32 features were not reused for a bf16 run
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4


def test_no_fuser_reads_neither_the_fuser_nor_the_llm(model_dir, tmp_path, capsys, monkeypatch):
    import mimir.components

    monkeypatch.setattr(mimir.components, "load_llm", lambda *a, **k: pytest.fail("the LLM was loaded"))
    monkeypatch.setattr(mimir.components, "load_token_fuser", lambda *a, **k: pytest.fail("the fuser was loaded"))
    code, _, err = run(capsys, "generate", "x", "--model", model_dir, "--no-fuser", "--steps", 1,
                       "-o", tmp_path / "v.webp")
    assert code == 0, err


@pytest.fixture
def demo_with_t5_only_arm(model_dir, tmp_path, monkeypatch):
    """A tiny stand-in for the bundled demo and its T5-only arm (a DiT reading 12 T5 tokens), in their layout."""
    import shutil

    import mimir.loading
    from mimir.testing import tiny_transformer

    demo = shutil.copytree(model_dir, tmp_path / "demo")
    tiny_transformer("5b", text_len=12, seed=7).save_pretrained(str(demo / "t5_only" / "transformer"))
    monkeypatch.setattr(mimir.loading, "DEMO_MODEL_DIR", demo)
    monkeypatch.setattr(mimir.loading, "DEMO_T5_ONLY_DIR", demo / "t5_only")
    return demo


def test_no_fuser_without_a_model_runs_the_demos_t5_only_arm(demo_with_t5_only_arm, tmp_path, capsys, monkeypatch):
    from mimir.demo import DEMO_GUIDANCE, DEMO_STEPS

    seen = {}
    real = MimirPipeline.denoise

    def denoise(pipe, cond, uncond, frames, height, width, steps, guidance, *args, **kwargs):
        seen.update(fuser=pipe.fuser, cond=cond.shape, steps=steps, guidance=guidance, size=(frames, height, width))
        return real(pipe, cond, uncond, frames, height, width, 1, guidance, *args, **kwargs)

    monkeypatch.setattr(MimirPipeline, "denoise", denoise)
    code, stdout, err = run(capsys, "generate", "a red circle", "--no-fuser", "-o", tmp_path / "v.webp")
    assert code == 0, err
    assert "model: demo, T5-only arm" in stdout
    # the arm's DiT, its 12 T5 tokens, the demo's steps and guidance, its training size (tiny: 9 x 32 x 32)
    assert seen == dict(fuser=None, cond=(1, 12, 32), steps=DEMO_STEPS, guidance=DEMO_GUIDANCE, size=(9, 32, 32))


def test_no_fuser_without_a_model_names_a_missing_t5_only_arm(model_dir, tmp_path, capsys, monkeypatch):
    import mimir.loading

    monkeypatch.setattr(mimir.loading, "DEMO_MODEL_DIR", model_dir)
    monkeypatch.setattr(mimir.loading, "DEMO_T5_ONLY_DIR", tmp_path / "t5_only")
    monkeypatch.setattr(mimir.loading, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    code, _, err = run(capsys, "generate", "x", "--no-fuser", "-o", tmp_path / "v.mp4")
    assert code == 2 and "T5-only arm, which is not installed" in err and str(tmp_path / "t5_only") in err
    code, _, err = run(capsys, "generate", "x", "--no-fuser", "--llm", model_dir / "llm", "-o", tmp_path / "v.mp4")
    assert code == 2 and "--no-fuser reads T5 alone" in err


def test_vae_override_takes_the_transformers_scaling_factor(model_dir, tmp_path, capsys, monkeypatch):
    """A single-file VAE without metadata does not tell its scaling factor; a 5B transformer needs 0.7."""
    import shutil

    import mimir.components

    five_b = shutil.copytree(model_dir, tmp_path / "5b")
    config = json.loads((five_b / "vae" / "config.json").read_text())
    (five_b / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.7}))
    seen = []
    real = mimir.components.load_vae
    monkeypatch.setattr(mimir.components, "load_vae",
                        lambda *a, **k: seen.append(k.get("scaling_factor")) or real(*a, **k))
    code, _, err = run(capsys, "generate", "x", "--model", five_b, "--vae", model_dir / "vae", "--steps", 1,
                       "-o", tmp_path / "v.webp")
    assert code == 0, err
    assert seen[-1] == pytest.approx(0.7)  # not the 1.15258426 of the override's own config


def test_unset_sizes_follow_the_variant_not_the_sample_size():
    """CogVideoX 1.5's transformer has sample size 300 x 300 latents (2400 px); it is used at 1360 x 768, 81 frames."""
    from types import SimpleNamespace

    from diffusers.configuration_utils import FrozenDict

    from mimir.cli import _defaults
    from mimir.variants import TRANSFORMER_CONFIGS

    for variant, expected in (("1.5", (81, 768, 1360)), ("5b", (49, 480, 720)), ("2b", (49, 480, 720))):
        pipe = SimpleNamespace(transformer=SimpleNamespace(config=FrozenDict(TRANSFORMER_CONFIGS[variant])),
                               codec=SimpleNamespace(spatial=8))
        args = SimpleNamespace(frames=None, height=None, width=None, steps=None)
        _defaults(args, pipe, demo=False)
        assert (args.frames, args.height, args.width, args.steps) == (*expected, 50), variant
    args = SimpleNamespace(frames=17, height=None, width=640, steps=None)
    _defaults(args, pipe, demo=False)
    assert (args.frames, args.height, args.width) == (17, 480, 640)


def test_train_without_the_train_extra_names_it_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    """matplotlib (loss.png) and peft (LoRA) are imported late in a run: a missing one must stop it up front."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("matplotlib", "peft")
                        else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        main(["train", f"model={model_dir}", f"data={tmp_path}", f"output_dir={tmp_path / 'run'}", "dit=lora"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "matplotlib, peft not installed" in err and "mimir-video[train]" in err
    assert not (tmp_path / "run").exists()


def test_memory_flags(model_dir, tmp_path, capsys):
    common = ["generate", "two blue squares", "--model", model_dir, "--steps", 2]
    assert run(capsys, *common, "-o", tmp_path / "plain.webp")[0] == 0
    assert run(capsys, *common, "--blocks-to-swap", 1, "-o", tmp_path / "swap.webp")[0] == 0
    assert torch.equal(read_video(tmp_path / "plain.webp"), read_video(tmp_path / "swap.webp"))  # exact on CPU
    assert run(capsys, *common, "--fp8", "-o", tmp_path / "fp8.webp")[0] == 0
    assert read_video(tmp_path / "fp8.webp").shape == read_video(tmp_path / "plain.webp").shape
    code, _, err = run(capsys, *common, "--blocks-to-swap", 9, "-o", tmp_path / "x.webp")
    assert code == 2 and "blocks_to_swap must be in 0..2" in err


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
