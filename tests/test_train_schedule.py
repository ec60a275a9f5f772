"""A resumed run follows its own config's LR schedule, not the one its checkpoint saved; metrics log the rate
the optimizer used."""

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mimir.testing import tiny_train_components
from mimir.train import TrainConfig, train
from mimir.train.checkpoint import WEIGHTS, checkpoint_name
from mimir.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def values(tiny_cache, tiny_run) -> dict:
    return dict(cache=str(tiny_cache), batch_size=2, weight_decay=0.0, text_dropout=0.0, checkpoint_every=1, lr=1e-3,
                fuser_lr=2e-3, **tiny_run)


def resumed(first, folder, values: dict) -> dict:
    """A copy of the run folder `first`, resumed with the config `values`. -> its metric rows."""
    shutil.copytree(first, folder)
    train(TrainConfig(**values, output_dir=str(folder), resume="latest"), tiny_train_components(), progress=False)
    return read_metrics(folder / "metrics.csv")


def step_change(run, step: int) -> dict[str, torch.Tensor]:
    """What optimizer step `step` of a run changed in each trained weight."""
    before = load_file(str(run / "checkpoints" / checkpoint_name(step - 1) / WEIGHTS))
    after = load_file(str(run / "checkpoints" / checkpoint_name(step) / WEIGHTS))
    return {k: after[k] - before[k] for k in before}


def test_resume_applies_the_new_rates_and_warmup(values, tmp_path, caplog):
    """Steps 1-2 warm up (warmup 10). Resumed with warmup 0 and the rates x2 (DiT) / x4 (fuser), step 3 moves
    every weight by 2x / 4x what it moves in the run resumed with the saved rates: Adam's step is the rate
    times a direction that does not depend on it (up to float32 rounding of weights near 1: 2e-6)."""
    train(TrainConfig(**values, max_steps=2, warmup_steps=10, output_dir=str(tmp_path / "first")),
          tiny_train_components(), progress=False)
    resumed(tmp_path / "first", tmp_path / "same", {**values, "max_steps": 3, "warmup_steps": 0})
    with caplog.at_level("WARNING", logger="mimir.train.loop"):
        rows = resumed(tmp_path / "first", tmp_path / "faster",
                       {**values, "max_steps": 3, "warmup_steps": 0, "lr": 2e-3, "fuser_lr": 8e-3})
    assert "lr 0.001 -> 0.002, fuser_lr 0.002 -> 0.008, warmup_steps 10 -> 0" in caplog.text
    same, faster = step_change(tmp_path / "same", 3), step_change(tmp_path / "faster", 3)
    for key in same:
        assert torch.allclose(faster[key], (4.0 if key.startswith("fuser.") else 2.0) * same[key], atol=2e-6), key
    moved = max(v.abs().max().item() for v in same.values())
    print(f"step 3 after resume: largest weight change {moved:.2e} at the saved rates; x2 / x4 at the new ones")
    assert moved > 1e-4
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 / 11, 2e-3 / 11, 2e-3], rel=1e-6)
    assert [r["fuser_lr"] for r in rows] == pytest.approx([2e-3 / 11, 4e-3 / 11, 8e-3], rel=1e-6)


def test_resumed_cosine_with_more_steps_keeps_training(values, tmp_path):
    """A 2-step cosine run ends at rate 0; resumed with max_steps 4, steps 3-4 follow the 4-step cosine."""
    cosine = {**values, "warmup_steps": 0, "lr_schedule": "cosine"}
    train(TrainConfig(**cosine, max_steps=2, output_dir=str(tmp_path / "first")), tiny_train_components(),
          progress=False)
    rows = resumed(tmp_path / "first", tmp_path / "longer", {**cosine, "max_steps": 4})
    half, quarter = 0.5, 0.5 * (1 + math.cos(math.pi * 3 / 4))
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 0.5e-3, half * 1e-3, quarter * 1e-3], rel=1e-6)
    assert max(v.abs().max().item() for v in step_change(tmp_path / "longer", 3).values()) > 1e-4


def test_checkpoint_from_before_the_scale_became_1d_resumes_the_same(values, tmp_path):
    """A checkpoint written while the fuser's scale was 0-dim (its weight and Adam moments) resumes, and ends as
    the same checkpoint written with today's [1] scale does."""
    train(TrainConfig(**values, max_steps=1, warmup_steps=0, output_dir=str(tmp_path / "first")),
          tiny_train_components(), progress=False)
    shutil.copytree(tmp_path / "first", tmp_path / "old")
    checkpoint = tmp_path / "old" / "checkpoints" / checkpoint_name(1)
    weights = load_file(str(checkpoint / WEIGHTS))
    weights["fuser.scale"] = weights["fuser.scale"].reshape(())
    save_file(weights, str(checkpoint / WEIGHTS))
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    scalar = [s for s in optimizer["state"].values() if s["exp_avg"].shape == (1,)]
    assert len(scalar) == 1  # the scale's moments
    scalar[0].update(exp_avg=scalar[0]["exp_avg"].reshape(()), exp_avg_sq=scalar[0]["exp_avg_sq"].reshape(()))
    torch.save(optimizer, checkpoint / "optimizer.bin")
    ends = {}
    for name in ("first", "old"):
        train(TrainConfig(**values, max_steps=2, warmup_steps=0, output_dir=str(tmp_path / name), resume="latest"),
              tiny_train_components(), progress=False)
        ends[name] = load_file(str(tmp_path / name / "checkpoints" / checkpoint_name(2) / WEIGHTS))
    assert all(torch.equal(ends["first"][k], ends["old"][k]) for k in ends["first"])
