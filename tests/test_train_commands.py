"""The README's training commands, as written, on tiny stand-ins for CogVideoX-5B and Phi-3.5 at the shipped
configs' paths: `mimir cache --config mimir_5b.yaml`, then `mimir train --config mimir_5b_lora.yaml` from that
cache. Only what a CPU cannot run at the real size is overridden (frames, size, steps, workers)."""

import json
from pathlib import Path

import pytest
import torch

import mimir.train.model as train_model
from mimir.demo.world import write_dataset
from mimir.loading import DEMO_MODEL_DIR, load_pipeline, save_pipeline
from mimir.pipeline import MimirPipeline
from mimir.testing import tiny_train_components
from mimir.train import TrainConfig, main_cache, main_train
from mimir.train.cache import cached_prompts
from mimir.train.model import frozen_placement
from mimir.video import read_video

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "mimir" / "train" / "configs"
# 17 frames read every 2nd (the configs' frame_stride) give 9; checkpoints and validation at step 2
SMALL = ["num_frames=9", "height=16", "width=16", "device=cpu", "num_workers=0", "tensorboard=false", "max_steps=2",
         "checkpoint_every=2", "validate_every=2", "validation_steps=2"]


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """How often training loads a DiT and a T5 encoder from disk."""
    counts = {"load_transformer": 0, "load_t5": 0}
    for name in counts:
        real = getattr(train_model, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(train_model, name, counted)
    return counts


def test_readme_cache_then_lora_from_that_cache(tmp_path, monkeypatch, calls):
    monkeypatch.chdir(tmp_path)
    parts = tiny_train_components("5b")
    save_pipeline(MimirPipeline(**{**parts, "llm": None, "llm_tokenizer": None, "fuser": None}),
                  Path("checkpoints/CogVideoX-5b"))  # a plain CogVideoX folder: the fuser starts fresh
    parts["llm"].save_pretrained("checkpoints/Phi-3.5-mini-instruct")
    parts["llm_tokenizer"].save_pretrained("checkpoints/Phi-3.5-mini-instruct")
    write_dataset("data", 3, seed=0, frames=17, size=16).rename("data/videos.jsonl")

    assert main_cache(["--config", str(CONFIGS / "mimir_5b.yaml"), *SMALL]) == 0
    assert calls == {"load_transformer": 0, "load_t5": 1}  # caching loads no DiT
    assert main_train(["--config", str(CONFIGS / "mimir_5b_lora.yaml"), *SMALL]) == 0
    assert calls == {"load_transformer": 1, "load_t5": 1}  # the cache held the LoRA config's prompts: no T5 load
    summary = json.loads(Path("runs/mimir_5b_lora/summary.json").read_text())
    assert summary["steps"] == 2 and summary["trainable"]["dit"] > 0
    assert set(summary["export"]) == {"fuser", "transformer", "pipeline"}  # from a cache: frozen parts copied
    exported = load_pipeline(summary["export"]["pipeline"])
    assert exported.llm is not None and exported.fuser.config.llm_dim == parts["llm"].config.hidden_size
    for i in range(2):
        assert read_video(f"runs/mimir_5b_lora/validation/step-00000002-{i}.mp4").shape == (9, 16, 16, 3)

    new = "a blue circle moves up"  # a prompt the cache lacks: encoded into it, then used
    assert main_train(["--config", str(CONFIGS / "mimir_5b_lora.yaml"), *SMALL, f"validation_prompts=[{new}]",
                       "output_dir=runs/other_prompt"]) == 0
    assert calls["load_t5"] == 2 and cached_prompts(Path("cache/mimir_5b"))[-1] == new
    assert read_video("runs/other_prompt/validation/step-00000002-0.mp4").shape == (9, 16, 16, 3)


@pytest.mark.parametrize("offload", [False, True])
def test_frozen_encoders_wait_where_their_stages_run(offload):
    """Caching and training place T5, the LLM and the VAE alike: on the compute device (here the meta device,
    standing for a GPU), or on the CPU with offload; in the autocast dtype. The fuser is not theirs to move."""
    parts = tiny_train_components()
    config = TrainConfig(mixed_precision="bf16", offload=offload)
    placement = frozen_placement(parts, config, torch.device("meta"))
    assert placement.device == torch.device("meta")
    for name in ("text_encoder", "llm", "vae"):
        p = next(parts[name].parameters())
        assert (p.device.type, p.dtype, p.requires_grad) == ("cpu" if offload else "meta", torch.bfloat16, False), name
    assert next(parts["fuser"].parameters()).device.type == "cpu"


def test_the_demo_smoke_config_fine_tunes_the_bundled_model(world_clips, tmp_path):
    """mimir/train/configs/demo_cpu.yaml, as the training README runs it (shortened): real files, no test models."""
    config = Path(__file__).resolve().parents[1] / "mimir" / "train" / "configs" / "demo_cpu.yaml"
    before = {p: p.stat().st_mtime_ns for p in DEMO_MODEL_DIR.rglob("*")}
    assert main_train(["--config", str(config), f"data={world_clips(4)}", f"output_dir={tmp_path / 'run'}",
                       "max_steps=2", "checkpoint_every=0", "validate_every=0", "tensorboard=false"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["export"]["pipeline"]
    pipe = load_pipeline(summary["export"]["pipeline"])
    assert pipe("a red circle moves to the right", num_frames=9, height=48, width=48, steps=1).shape == (1, 9, 48, 48, 3)
    assert {p: p.stat().st_mtime_ns for p in DEMO_MODEL_DIR.rglob("*")} == before  # the bundled model is untouched
