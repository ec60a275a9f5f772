"""Training never loses work and never trains on garbage (issue 14): resume points, kills before the export,
non-finite values, changed or damaged caches, undecodable captions, a full disk. Kills are real SIGKILLs of a
child process at a chosen call (mimir.testing.kill_at), and every resume is compared with an uninterrupted run."""

import itertools
import json
import logging
import math
import shutil
import signal

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mimir.loading import save_pipeline
from mimir.pipeline import MimirPipeline
from mimir.testing import run_killed, tiny_train_components
from mimir.train import TrainConfig, build_cache, load_config, main_train, train
from mimir.train import loop as train_loop
from mimir.train.cache import CachedDataset, shard_name
from mimir.train.checkpoint import STATE, WEIGHTS, list_checkpoints, prune
from mimir.train.data import read_clips
from mimir.train.metrics import read_metrics
from mimir.train.storage import RunFailed

pytestmark = pytest.mark.usefixtures("one_thread")
KILLED = -signal.SIGKILL
# the reference run: 6 steps from a cache, checkpoints at 2, 4, 6, EMA and accumulation (what a resume must restore)
RUN = dict(batch_size=2, grad_accum=2, max_steps=6, lr=1e-3, lr_schedule="cosine", warmup_steps=2, text_dropout=0.5,
           ema_decay=0.9, weight_decay=0.0, checkpoint_every=2, keep_checkpoints=10, export=True)
# what torch raises when its zip writer hits a full disk (measured on a full 200 KiB tmpfs)
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


@pytest.fixture
def values(tiny_cache, tiny_run):
    """values(run_dir, **changes) -> TrainConfig fields of the reference run, in `run_dir`."""
    return lambda run, **changes: {**tiny_run, **RUN, "cache": str(tiny_cache), "output_dir": str(run), **changes}


@pytest.fixture(scope="module")
def reference(tiny_cache, tiny_run, tmp_path_factory):
    """The uninterrupted reference run's folder, on one thread like the tests (one_thread) and the killed
    children: the float results depend on the thread count."""
    run, threads = tmp_path_factory.mktemp("reference") / "run", torch.get_num_threads()
    torch.set_num_threads(1)
    train(TrainConfig(**{**tiny_run, **RUN, "cache": str(tiny_cache), "output_dir": str(run)}), tiny_train_components(),
          progress=False)
    torch.set_num_threads(threads)
    return run


def weights(run, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / WEIGHTS))


def max_difference(a: dict, b: dict) -> float:
    assert a and a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def resume(values, run, **changes) -> dict:
    return train(TrainConfig(**values(run, resume="latest", **changes)), tiny_train_components(), progress=False)


# ---- 1. resuming an older checkpoint ----------------------------------------------------------------------

def test_resuming_an_older_checkpoint_is_refused_in_place_and_branches_elsewhere(values, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    config_before = (run / "config.yaml").read_bytes()
    older = run / "checkpoints" / "step-00000002"
    with pytest.raises(ValueError, match=r"holds the newer checkpoints \['step-00000004', 'step-00000006'\]"):
        train(TrainConfig(**values(run, resume=str(older), keep_checkpoints=1)), tiny_train_components(),
              progress=False)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004", "step-00000006"]
    assert (run / "config.yaml").read_bytes() == config_before
    # the same resume into another folder is a branch: killed after its step 5, resumed, it ends where the
    # uninterrupted run ended, and the original run is left whole
    branch = tmp_path / "branch"
    ended = run_killed("train", values(branch, resume=str(older), keep_checkpoints=1), "mimir.train.loop:optimizer_step",
                       call=3)
    assert ended.returncode == KILLED, ended.stderr[-2000:]
    assert [p.name for p in list_checkpoints(branch)] == ["step-00000004"]
    summary = resume(values, branch, keep_checkpoints=1)
    assert summary["start_step"] == 4 and [p.name for p in list_checkpoints(branch)] == ["step-00000006"]
    diff = max_difference(weights(branch, 6), weights(reference, 6))
    print(f"branch from step 2, killed at step 5, resumed: max |weight difference| at step 6 = {diff:g}")
    assert diff <= 1e-6
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004", "step-00000006"]
    assert max_difference(weights(run, 2), weights(reference, 2)) == 0


def test_checkpoints_are_ordered_and_pruned_by_step(tmp_path):
    """Names sort like steps only up to 8 digits: step 100,000,000 is newer than step 99,999,999."""
    for name in ("step-99999999", "step-100000000", "step-00000005"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / STATE).write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005", "step-99999999", "step-100000000"]
    prune(tmp_path, 1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-100000000"]


# ---- 2. a kill between the last checkpoint and the export -------------------------------------------------

def test_kill_before_export_then_resume_completes_the_export_and_summary(values, reference, tmp_path):
    run = tmp_path / "run"
    ended = run_killed("train", values(run), "mimir.train.loop:export", when="before")
    assert ended.returncode == KILLED, ended.stderr[-2000:]
    assert list_checkpoints(run)[-1].name == "step-00000006" and not (run / "export").exists()
    summary = resume(values, run)
    assert summary["start_step"] == 6 and set(summary["export"]) == {"fuser", "transformer", "pipeline"}
    for name in ("fuser.safetensors", "transformer.safetensors"):
        assert max_difference(load_file(str(run / "export" / name)), load_file(str(reference / "export" / name))) == 0
    logged = [[int(r["step"]), r["loss"]] for r in read_metrics(run / "metrics.csv")]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "summary.json").read_text())["losses"] == logged
    # resumed again with nothing missing: the export stays as written, the summary keeps the run's losses
    stamp = (run / "export" / "fuser.safetensors").stat().st_mtime_ns
    again = resume(values, run)
    assert (run / "export" / "fuser.safetensors").stat().st_mtime_ns == stamp
    assert again["export"] == summary["export"] and again["final_loss"] == logged[-1][1]
    assert json.loads((run / "summary.json").read_text())["losses"] == logged


def test_resume_past_max_steps_is_refused(values, reference):
    with pytest.raises(ValueError, match="at step 6, past max_steps=4"):
        train(TrainConfig(**values(reference, resume="latest", max_steps=4)), tiny_train_components(), progress=False)


# ---- 3. a failed resume, a resume without checkpoint ------------------------------------------------------

def test_failed_resume_keeps_config_yaml_and_resume_without_checkpoint_warns(values, tmp_path, caplog):
    run = tmp_path / "run"
    train(TrainConfig(**values(run, max_steps=2, export=False)), tiny_train_components(), progress=False)
    before = (run / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match="does not hold this run's trained weights"):  # fails after loading
        resume(values, run, max_steps=4, dit="lora", lora_rank=4)
    assert (run / "config.yaml").read_bytes() == before
    assert load_config(run / "config.yaml").dit == "full"
    with caplog.at_level(logging.WARNING):
        summary = resume(values, tmp_path / "empty", max_steps=1, export=False)
    assert summary["start_step"] == 0
    assert f"{tmp_path / 'empty'} holds no complete checkpoint; starting a new run at step 0" in caplog.text


# ---- 4. non-finite values -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, value", [("lr", "nan"), ("lr", "inf"), ("fuser_lr", "nan"), ("weight_decay", "nan"),
                                         ("lora_alpha", "-inf"), ("max_grad_norm", "nan"), ("ema_decay", "nan")])
def test_non_finite_config_values_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number, got {value}"):
        load_config(None, {name: value})


def poison_loss(monkeypatch, call: int, poison) -> None:
    """Replace the loss of the `call`-th micro-batch by poison(loss)."""
    original, calls = train_loop.diffusion_loss, itertools.count(1)

    def loss(*args, **kwargs):
        value = original(*args, **kwargs)
        return poison(value) if next(calls) == call else value

    monkeypatch.setattr(train_loop, "diffusion_loss", loss)


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient norm is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_non_finite_loss_stops_the_run_keeping_the_last_good_checkpoint(values, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison_loss(monkeypatch, 9, lambda loss: loss * float("nan"))  # micro-batch 9 of 2 per step: step 5
    with pytest.raises(RunFailed, match=r"step 5: loss nan.*stopped \(nonfinite=stop\).*step-00000004"):
        train(TrainConfig(**values(run)), tiny_train_components(), progress=False)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    assert max_difference(weights(run, 4), weights(reference, 4)) == 0
    assert not (run / "export").exists() and not (run / "summary.json").exists()
    rows = read_metrics(run / "metrics.csv")
    assert rows[-1]["step"] == 5 and math.isnan(rows[-1]["loss"])  # the bad step is in the record


def test_non_finite_gradient_step_is_skipped_and_counted(values, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison_loss(monkeypatch, 6, InfiniteGradient.apply)  # step 3's second micro-batch
    summary = train(TrainConfig(**values(run, max_steps=4, checkpoint_every=1, nonfinite="skip", export=False)),
                    tiny_train_components(), progress=False)
    assert summary["skipped_steps"] == [3] and [s for s, _ in summary["losses"]] == [1, 2, 4]
    assert not math.isfinite(read_metrics(run / "metrics.csv")[2]["grad_norm"])
    assert max_difference(weights(run, 3), weights(run, 2)) == 0  # step 3 left the weights as they were
    assert max_difference(weights(run, 4), weights(run, 3)) > 0
    assert all(torch.isfinite(t).all() for t in weights(run, 4).values())
    assert json.loads((list_checkpoints(run)[-1] / "state.json").read_text())["skipped_steps"] == [3]


# ---- 5. a cache resumed with another clip list or other encoder files ---------------------------------------

def test_resumed_cache_refuses_a_changed_clip_list(world_clips, tiny_run, tmp_path):
    data, folder = tmp_path / "clips", tmp_path / "cache"
    shutil.copytree(world_clips(5), data)
    config = dict(tiny_run, data=str(data), cache=str(folder), cache_shard_size=2)
    ended = run_killed("cache", config, "mimir.train.cache:save_file", call=2)  # shard 1 written, not renamed
    assert ended.returncode == KILLED, ended.stderr[-2000:]
    assert [p.name for p in folder.glob("shard-*.safetensors")] == [shard_name(0)]
    shutil.copy(data / "clip000.mp4", data / "clip005.mp4")
    (data / "clip005.txt").write_text("a new clip")
    (data / "clip001.mp4").unlink()
    (data / "clip002.txt").write_text("another caption")
    with pytest.raises(ValueError, match=r"the clip list \(video: caption\): 1 added \(.*clip005.mp4\), "
                                         r"1 removed \(.*clip001.mp4\), 1 changed \(.*clip002.mp4\)"):
        build_cache(TrainConfig(**config), tiny_train_components(), progress=False)
    assert [p.name for p in folder.glob("shard-*.safetensors")] == [shard_name(0)]
    shutil.rmtree(data)
    shutil.copytree(world_clips(5), data)  # the clip list it was started from: the resume finishes the cache
    build_cache(TrainConfig(**config), tiny_train_components(), progress=False)
    whole = tmp_path / "whole"
    build_cache(TrainConfig(**{**config, "cache": str(whole)}), tiny_train_components(), progress=False)
    resumed, uninterrupted = CachedDataset(folder), CachedDataset(whole)
    assert len(resumed) == 5
    for i in range(5):
        assert torch.equal(resumed[(i, 0)]["latent_params"], uninterrupted[(i, 0)]["latent_params"])


def test_resumed_cache_refuses_changed_encoder_files(world_clips, tiny_run, tmp_path):
    model = tmp_path / "model"
    save_pipeline(MimirPipeline(**tiny_train_components()), model)
    config = TrainConfig(**{**tiny_run, "model": str(model)}, data=str(world_clips(4)), cache=str(tmp_path / "cache"))
    build_cache(config, progress=False)
    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(vae))
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1.0  # another VAE, the same size
    save_file(tensors, str(vae), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"the encoder files: 1 changed \(model/vae/diffusion_pytorch_model"):
        build_cache(config, progress=False)


# ---- 6. damaged shards ------------------------------------------------------------------------------------

def test_damaged_shards_are_named_in_training_and_rebuilt_by_a_rerun(world_clips, tiny_run, tmp_path, caplog):
    folder = tmp_path / "cache"
    config = TrainConfig(**tiny_run, data=str(world_clips(5)), cache=str(folder), cache_shard_size=2,
                         output_dir=str(tmp_path / "run"), max_steps=1)
    build_cache(config, tiny_train_components(), progress=False)
    before = CachedDataset(folder)
    originals = [before[(i, 0)]["latent_params"].clone() for i in range(5)]  # not views of the files changed below
    shard = [folder / shard_name(k) for k in range(3)]
    data = shard[1].read_bytes()
    shard[1].write_bytes(data[:len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=f"the cache shard {shard[1]} is damaged"):
        train(config, tiny_train_components(), progress=False)
    shutil.copy(shard[0], shard[2])  # whole, but another shard's clips
    with caplog.at_level(logging.WARNING):
        build_cache(config, tiny_train_components(), progress=False)
    assert f"rebuilding the cache shard {shard[1]}: unreadable" in caplog.text
    assert f"rebuilding the cache shard {shard[2]}: it holds other clips" in caplog.text
    assert f"rebuilding the cache shard {shard[0]}" not in caplog.text
    after = CachedDataset(folder)
    assert all(torch.equal(after[(i, 0)]["latent_params"], originals[i]) for i in range(5))
    shard[2].unlink()
    with pytest.raises(ValueError, match=r"incomplete: 1 of 3 shards missing \(shard-00002.safetensors\)"):
        train(config, tiny_train_components(), progress=False)


# ---- 7. captions that are not UTF-8 or empty; a full disk -------------------------------------------------

def test_undecodable_captions_are_skipped_and_named_empty_ones_warned(world_clips, tiny_run, tmp_path, caplog):
    data = tmp_path / "clips"
    shutil.copytree(world_clips(4), data)
    (data / "clip001.txt").write_bytes(b"a caf\xe9 square")  # Latin-1
    (data / "clip002.txt").write_text("  \n")
    with caplog.at_level(logging.WARNING):
        clips, skipped = read_clips(data)
    assert [c.video.name for c in clips] == ["clip000.mp4", "clip002.mp4", "clip003.mp4"]
    assert list(skipped) == [str(data / "clip001.mp4")]
    assert f"caption file {data / 'clip001.txt'} is not UTF-8 text" in skipped[str(data / "clip001.mp4")]
    assert f"1 clip(s) have an empty caption and train as unconditional samples: {data / 'clip002.mp4'}" in caplog.text
    summary = train(TrainConfig(**tiny_run, data=str(data), output_dir=str(tmp_path / "run"), max_steps=1),
                    tiny_train_components(), progress=False)
    assert summary["skipped_videos"] == 1 and str(data / "clip001.mp4") in summary["skipped"]
    (tmp_path / "list.csv").write_bytes(b"video,caption\nclips/clip000.mp4,a red square\nclips/clip003.mp4,caf\xe9\n")
    csv_clips, csv_skipped = read_clips(tmp_path / "list.csv")
    assert [c.caption for c in csv_clips] == ["a red square"] and list(csv_skipped) == [f"{tmp_path / 'list.csv'}:3"]
    (tmp_path / "list.jsonl").write_bytes(b'{"video": "clips/clip000.mp4", "caption": "caf\xe9"}\n'
                                          b'{"video": "clips/clip003.mp4", "caption": "blue"}\n')
    jsonl_clips, jsonl_skipped = read_clips(tmp_path / "list.jsonl")
    assert [c.caption for c in jsonl_clips] == ["blue"] and list(jsonl_skipped) == [f"{tmp_path / 'list.jsonl'}:1"]


def test_full_disk_is_reported_and_loses_no_checkpoint(values, reference, tiny_model_dir, tmp_path, monkeypatch,
                                                      capsys):
    run = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "step-00000004" in str(f):
            raise RuntimeError(TORCH_FULL_DISK)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(RunFailed) as error:
        train(TrainConfig(**values(run)), tiny_train_components(), progress=False)
    message = str(error.value)
    assert f"writing the checkpoint {run / 'checkpoints' / 'step-00000004'} failed: RuntimeError: " in message
    assert "inline_container.cc" in message and "GiB free" in message
    assert f"No checkpoint was lost: the newest is {run / 'checkpoints' / 'step-00000002'}" in message
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # the partial one removed
    assert main_train([f"output_dir={tmp_path / 'cli'}", f"model={tiny_model_dir}", "device=cpu", f"cache={values(run)['cache']}",
                       "num_frames=9", "height=16", "width=16", "max_steps=4", "checkpoint_every=4",
                       "tensorboard=false", "num_workers=0"]) == 1
    assert "mimir train: stopped: writing the checkpoint" in capsys.readouterr().err
    monkeypatch.setattr(torch, "save", real_save)
    resume(values, run)
    assert max_difference(weights(run, 6), weights(reference, 6)) <= 1e-6


def test_full_disk_in_a_cache_shard_is_reported(world_clips, tiny_run, tmp_path, monkeypatch):
    from mimir.train import cache as train_cache

    folder, real_save = tmp_path / "cache", train_cache.save_file

    def save(tensors, path, metadata=None):
        if shard_name(1) in path:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(train_cache, "save_file", save)
    config = TrainConfig(**tiny_run, data=str(world_clips(5)), cache=str(folder), cache_shard_size=2)
    with pytest.raises(RunFailed, match=f"writing the cache file {folder / shard_name(1)} failed: SafetensorError: "
                                        r".*os error 28.*The shards written before it are whole"):
        build_cache(config, tiny_train_components(), progress=False)
    assert sorted(p.name for p in folder.glob("shard-*")) == [shard_name(0)]  # no partial .tmp left
