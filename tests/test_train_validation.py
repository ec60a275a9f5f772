"""Validation on the main process, while the others wait in a collective: VAE slicing (and tiling where the
VAE's tiles fit), and denoising stopped once half of collective_timeout has passed."""

import re

import pytest

from mimir.testing import tiny_train_components
from mimir.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_validation_slices_the_decode_and_stops_in_time(world_clips, tiny_run, tmp_path, caplog):
    common = dict(data=str(world_clips(2)), max_steps=1, batch_size=2, validate_every=1,
                  validation_prompts=["a red square moves right"], **tiny_run)
    parts = tiny_train_components()
    with caplog.at_level("INFO", logger="mimir.train.loop"):
        train(TrainConfig(**common, validation_steps=2, output_dir=str(tmp_path / "in_time")), parts, progress=False)
    assert "1 process (NO, cpu); global batch 2 = batch_size 2 x 1 x grad_accum 1" in caplog.text
    assert (tmp_path / "in_time" / "validation" / "step-00000001-0.mp4").is_file()
    assert parts["vae"].use_slicing  # decoded a video at a time

    caplog.clear()
    with caplog.at_level("WARNING", logger="mimir.train.loop"):  # 0.5 s for 1000 denoising steps
        summary = train(TrainConfig(**common, validation_steps=1000, collective_timeout=1,
                                    output_dir=str(tmp_path / "late")), tiny_train_components(), progress=False)
    stopped = re.search(r"validation at step 1 skipped: half the collective timeout passed after (\d+) of 1000 "
                        r"denoising steps", caplog.text)
    print(caplog.text.strip())
    assert stopped and int(stopped[1]) < 1000
    assert summary["steps"] == 1 and not list((tmp_path / "late" / "validation").glob("*.mp4"))
