"""Training models loaded from disk through mimir.loading: a Mimir folder (with and without a cache) and a plain
CogVideoX folder plus an LLM, which starts a fresh fuser."""

import json

import pytest
import torch

from mimir.fuser import load_fuser
from mimir.loading import save_pipeline
from mimir.pipeline import MimirPipeline
from mimir.train import main_cache, main_train
from mimir.train.synthetic import tiny_train_components, write_square_clips

SIZE = ["num_frames=9", "height=16", "width=16", "device=cpu", "num_workers=0", "tensorboard=false", "batch_size=2"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mimir_folder_from_cache_and_plain_cogvideox_with_fresh_fuser(tmp_path, capsys):
    write_square_clips(tmp_path / "clips", count=2, frames=9, size=16)
    parts = tiny_train_components()
    save_pipeline(MimirPipeline(**parts), tmp_path / "mimir")
    assert main_cache([f"model={tmp_path / 'mimir'}", f"data={tmp_path / 'clips'}", f"cache={tmp_path / 'cache'}",
                       *SIZE]) == 0
    assert main_train([f"model={tmp_path / 'mimir'}", f"cache={tmp_path / 'cache'}", "max_steps=2", "lr=1e-3",
                       f"output_dir={tmp_path / 'from_cache'}", *SIZE]) == 0
    summary = json.loads((tmp_path / "from_cache" / "summary.json").read_text())
    assert summary["final_loss"] > 0 and set(summary["export"]) == {"fuser", "transformer"}  # no encoders loaded

    save_pipeline(MimirPipeline(**{**parts, "llm": None, "llm_tokenizer": None, "fuser": None}), tmp_path / "plain")
    parts["llm"].save_pretrained(tmp_path / "llm")
    parts["llm_tokenizer"].save_pretrained(tmp_path / "llm")
    with pytest.raises(SystemExit):  # no fuser anywhere and no LLM to start one: refused before training
        main_train([f"model={tmp_path / 'plain'}", f"data={tmp_path / 'clips'}", "max_steps=1",
                    f"output_dir={tmp_path / 'no_llm'}", *SIZE])
    assert "give fuser= (a fuser file) or llm=" in capsys.readouterr().err
    assert main_train([f"model={tmp_path / 'plain'}", f"llm={tmp_path / 'llm'}", f"data={tmp_path / 'clips'}",
                       "max_steps=1", "export=false", f"output_dir={tmp_path / 'fresh'}", *SIZE]) == 0
    fresh = load_fuser(tmp_path / "fresh" / "fuser-init.safetensors")
    assert (fresh.config.t5_dim, fresh.config.llm_dim, fresh.config.text_len) == (32, 48, 226)
    assert torch.count_nonzero(fresh.z_theta.weight) == 0 and torch.count_nonzero(fresh.z_beta.weight) == 0
