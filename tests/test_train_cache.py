"""`mimir cache`: training from the cache equals training from the videos; the cache resumes shard by shard."""

import os
from types import SimpleNamespace

import pytest
import torch

from mimir.testing import tiny_train_components
from mimir.train import TrainConfig, build_cache, main_cache, train
from mimir.train.cache import CachedDataset, cached_prompts, describe_cache, shard_name
from mimir.train.loop import batch_inputs, sample_generator

pytestmark = pytest.mark.usefixtures("one_thread")


def seed_with_one_dropped_caption(batch_size: int, dropout: float) -> int:
    """A seed whose first batch drops some captions but not all, so both feature paths are exercised."""
    for seed in range(100):
        dropped = [torch.rand((), generator=sample_generator(seed, p)) < dropout for p in range(batch_size)]
        if 0 < sum(dropped) < batch_size:
            return seed
    raise AssertionError("no such seed")


def test_first_step_loss_from_cache_equals_raw_video(world_clips, tiny_run, tmp_path):
    clips = world_clips(5)
    seed = seed_with_one_dropped_caption(3, 0.5)
    common = dict(batch_size=3, max_steps=1, text_dropout=0.5, seed=seed, lr=1e-3, **tiny_run)
    cached = TrainConfig(data=str(clips), cache=str(tmp_path / "cache"), output_dir=str(tmp_path / "from_cache"), **common)
    build_cache(cached, tiny_train_components(), progress=False)
    raw = TrainConfig(data=str(clips), output_dir=str(tmp_path / "from_video"), **common)
    from_video = train(raw, tiny_train_components(), progress=False)["first_loss"]
    from_cache = train(cached, tiny_train_components(), progress=False)["first_loss"]
    print(f"first-step loss: from video {from_video:.8f}, from cache {from_cache:.8f}")
    assert from_cache == pytest.approx(from_video, rel=1e-5)


def test_t5_dropout_empties_t5_alone_and_is_the_same_from_cache_and_video(world_clips, tiny_run, tmp_path):
    """t5_dropout (each encoder dropped on its own, as SD3 trains): a caption's T5 features become the empty
    prompt's while its LLM features stay; the cached and the raw-video paths agree."""
    clips = world_clips(5)
    common = dict(batch_size=3, max_steps=1, text_dropout=0.0, t5_dropout=0.5, seed=0, lr=1e-3, **tiny_run)
    cached = TrainConfig(data=str(clips), cache=str(tmp_path / "cache"), output_dir=str(tmp_path / "c"), **common)
    build_cache(cached, tiny_train_components(), progress=False)
    dataset = CachedDataset(tmp_path / "cache")
    rows, empty = [dataset[(i, 0)] for i in range(2)], dataset.empty_prompt()
    batch = {"latent_params": torch.stack([r["latent_params"] for r in rows]), "features": [r["features"] for r in rows]}
    pipe = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(patch_size_t=None)))
    _, features = batch_inputs(pipe, batch, [False, False], [True, False], [torch.Generator()] * 2, empty, 1.0,
                               cached, "cpu")
    assert torch.equal(features.t5[0], empty["t5"]) and torch.equal(features.t5[1], rows[1]["features"]["t5"])
    for i in range(2):
        length = rows[i]["features"]["llm"].shape[0]
        assert torch.equal(features.llm[i, :length], rows[i]["features"]["llm"])
    from_cache = train(cached, tiny_train_components(), progress=False)["first_loss"]
    raw = TrainConfig(data=str(clips), output_dir=str(tmp_path / "v"), **common)
    assert train(raw, tiny_train_components(), progress=False)["first_loss"] == pytest.approx(from_cache, rel=1e-5)


def test_cache_resumes_missing_shards_only(world_clips, tiny_model_dir, tmp_path, capsys):
    clips = world_clips(5)
    folder = tmp_path / "cache"
    argv = [f"data={clips}", f"cache={folder}", f"model={tiny_model_dir}", "device=cpu", "cache_shard_size=2",
            "validation_prompts=[a red square moves up]", "num_frames=9", "height=16", "width=16"]
    assert main_cache(argv) == 0
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert [s.name for s in shards] == [shard_name(k) for k in range(3)]  # 5 clips, 2 per shard
    first = CachedDataset(folder)
    assert len(first) == 5 and (folder / "empty.safetensors").is_file()
    assert first.prompt_rows(["a red square moves up"])[0]["t5"].shape == (16, 32)
    os.utime(shards[0], (1, 1))  # an old time stamp, kept if the shard is not rewritten
    shards[1].unlink()  # as if the run had been killed before this shard was renamed into place
    (folder / (shard_name(1) + ".tmp")).write_bytes(b"half a shard")
    assert main_cache(argv) == 0
    assert shards[1].is_file() and shards[0].stat().st_mtime == 1
    again = CachedDataset(folder)
    for i in range(5):
        a, b = first[(i, 0)], again[(i, 0)]
        assert torch.equal(a["latent_params"], b["latent_params"]) and torch.equal(a["features"]["llm"], b["features"]["llm"])
    assert describe_cache(folder)["clips"] == 5
    assert '"clips": 5' in capsys.readouterr().out


def test_cache_refuses_other_settings(world_clips, tiny_run, tmp_path):
    config = TrainConfig(data=str(world_clips(5)), cache=str(tmp_path / "cache"), cache_shard_size=8, **tiny_run)
    build_cache(config, tiny_train_components(), progress=False)
    other = TrainConfig(**{**config.to_dict(), "num_frames": 17})
    with pytest.raises(ValueError, match="num_frames: cache has 9, this run 17"):
        build_cache(other, tiny_train_components(), progress=False)
    with pytest.raises(ValueError, match="num_frames: cache has 9, this run 17"):
        train(TrainConfig(**{**other.to_dict(), "output_dir": str(tmp_path / "run")}), tiny_train_components(),
              progress=False)


def test_validation_prompts_are_not_added_to_a_cache_from_other_encoders(world_clips, tiny_model_dir, tmp_path,
                                                                          capsys):
    import shutil

    from mimir.train import main_train

    cache = tmp_path / "cache"
    common = [f"data={world_clips(2)}", f"cache={cache}", "device=cpu", "num_frames=9", "height=16", "width=16",
              "validation_prompts=[a red square moves up]", "num_workers=0", "tensorboard=false"]
    assert main_cache([f"model={tiny_model_dir}", *common]) == 0
    other = shutil.copytree(tiny_model_dir, tmp_path / "other-model")  # same weights, other files
    code = main_train([f"model={other}", *common[1:], "validation_prompts=[a new prompt]", "validate_every=1",
                       "max_steps=1", f"output_dir={tmp_path / 'run'}", "export=false"])
    assert code == 2 and "was built from other encoder files" in capsys.readouterr().err
    assert cached_prompts(cache) == ["a red square moves up"]  # nothing was added
