import os
from pathlib import Path

import pytest
import torch

# Set before anything imports huggingface_hub, which reads it once: mimir is imported inside the fixtures below.
os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pack():
    """The node pack imported the way ComfyUI does it: the repo folder as a package (not by the name `mimir`)."""
    from mimir.testing import import_pack

    return import_pack(ROOT)


@pytest.fixture
def one_thread():
    """Tiny models on shared cores: one thread avoids OpenMP spinning against the other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run() -> dict:
    """TrainConfig fields the training tests share (unpack it, do not change it): tiny models on the CPU,
    9 frames at 16 x 16, data read in the main process, no TensorBoard and no export (a test that checks those
    turns them on)."""
    return dict(model="", device="cpu", num_frames=9, height=16, width=16, num_workers=0, tensorboard=False,
                export=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """tiny_train_components saved as a Mimir pipeline folder, for commands that load `model=` themselves."""
    from mimir.loading import save_pipeline
    from mimir.pipeline import MimirPipeline
    from mimir.testing import tiny_train_components

    folder = tmp_path_factory.mktemp("tiny-model")
    save_pipeline(MimirPipeline(**tiny_train_components()), folder)
    return folder


@pytest.fixture(scope="module")
def tiny_cache(world_clips, tiny_run, tmp_path_factory) -> Path:
    """A feature cache of 4 demo-world clips made with tiny_train_components, one per test module (a run may add
    its validation prompts to it)."""
    from mimir.testing import tiny_train_components
    from mimir.train import TrainConfig, build_cache

    folder = tmp_path_factory.mktemp("tiny-cache") / "cache"
    build_cache(TrainConfig(data=str(world_clips(4)), cache=str(folder), **tiny_run), tiny_train_components(),
                progress=False)
    return folder


@pytest.fixture(scope="session")
def world_clips(tmp_path_factory):
    """world_clips(count) -> a folder of `count` demo-world clips (9 frames, 16 x 16) with same-name .txt
    captions (mimir.testing.write_world_clips). Written once per session and count: tests only read it."""
    from mimir.testing import write_world_clips

    folders = {}

    def folder(count: int) -> Path:
        if count not in folders:
            folders[count] = tmp_path_factory.mktemp(f"world_clips_{count}")
            write_world_clips(folders[count], count, frames=9, size=16)
        return folders[count]

    return folder
