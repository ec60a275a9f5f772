"""Training models loaded from disk through mimir.loading: a Mimir folder (with and without a cache) and a plain
CogVideoX folder plus an LLM, which starts a fresh fuser."""

import json

import pytest
import torch

from mimir.fuser import load_fuser
from mimir.loading import load_pipeline, save_pipeline
from mimir.pipeline import MimirPipeline
from mimir.testing import tiny_train_components
from mimir.train import main_cache, main_train

SIZE = ["num_frames=9", "height=16", "width=16", "device=cpu", "num_workers=0", "tensorboard=false", "batch_size=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mimir_folder_from_cache_and_plain_cogvideox_with_fresh_fuser(world_clips, tmp_path, capsys):
    clips = world_clips(2)
    parts = tiny_train_components()
    save_pipeline(MimirPipeline(**parts), tmp_path / "mimir")
    assert main_cache([f"model={tmp_path / 'mimir'}", f"data={clips}", f"cache={tmp_path / 'cache'}",
                       *SIZE]) == 0
    assert main_train([f"model={tmp_path / 'mimir'}", f"cache={tmp_path / 'cache'}", "max_steps=2", "lr=1e-3",
                       f"output_dir={tmp_path / 'from_cache'}", *SIZE]) == 0
    summary = json.loads((tmp_path / "from_cache" / "summary.json").read_text())
    assert summary["final_loss"] > 0 and set(summary["export"]) == {"fuser", "transformer", "pipeline"}
    assert load_pipeline(summary["export"]["pipeline"]).fuser is not None  # its frozen parts copied from the folder

    save_pipeline(MimirPipeline(**{**parts, "llm": None, "llm_tokenizer": None, "fuser": None}), tmp_path / "plain")
    parts["llm"].save_pretrained(tmp_path / "llm")
    parts["llm_tokenizer"].save_pretrained(tmp_path / "llm")
    with pytest.raises(SystemExit):  # no fuser anywhere and no LLM to start one: refused before training
        main_train([f"model={tmp_path / 'plain'}", f"data={clips}", "max_steps=1",
                    f"output_dir={tmp_path / 'no_llm'}", *SIZE])
    assert "give fuser= (a fuser file) or llm=" in capsys.readouterr().err
    assert main_train([f"model={tmp_path / 'plain'}", f"llm={tmp_path / 'llm'}", f"data={clips}",
                       "max_steps=1", "export=false", f"output_dir={tmp_path / 'fresh'}", *SIZE]) == 0
    fresh = load_fuser(tmp_path / "fresh" / "fuser-init.safetensors")
    assert (fresh.config.t5_dim, fresh.config.llm_dim, fresh.config.text_len) == (32, 48, 226)
    assert torch.count_nonzero(fresh.z_theta.weight) == 0 and torch.count_nonzero(fresh.z_beta.weight) == 0
