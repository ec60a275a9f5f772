"""Export in the precision of the source files (or the one asked for), with the frozen parts of the exported
pipeline byte for byte their source files."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimir.loading import load_pipeline, save_pipeline
from mimir.pipeline import MimirPipeline
from mimir.testing import tiny_train_components
from mimir.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def file_bytes(folder: Path, part: str) -> dict[str, bytes]:
    path = folder / part
    found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): p.read_bytes() for p in found}


def dtypes(path) -> set[torch.dtype]:
    return {v.dtype for v in load_file(str(path)).values()}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A Mimir folder stored as published checkpoints are: DiT, T5 and LLM bf16, the VAE fp16 (as CogVideoX-2B's),
    the fuser fp32."""
    parts = tiny_train_components()
    for name in ("transformer", "text_encoder", "llm"):
        parts[name].to(torch.bfloat16)
    parts["vae"].to(torch.float16)
    folder = tmp_path_factory.mktemp("export") / "mimir"
    save_pipeline(MimirPipeline(**parts), folder)
    return folder


FROZEN = ("vae", "text_encoder", "tokenizer", "scheduler", "llm", "model_index.json")


def test_full_dit_exports_as_its_source_bf16_and_frozen_parts_unchanged(model, world_clips, tiny_run, tmp_path):
    config = TrainConfig(**{**tiny_run, "export": True, "model": str(model)}, data=str(world_clips(2)), max_steps=1,
                         batch_size=2, lr=1e-3, mixed_precision="bf16", output_dir=str(tmp_path / "run"))
    exported = train(config, progress=False)["export"]
    pipeline = Path(exported["pipeline"])
    # trained in fp32 under bf16 autocast: written as the source DiT (bf16) and the source fuser (fp32)
    assert dtypes(exported["transformer"]) == {torch.bfloat16}
    assert dtypes(pipeline / "transformer" / "diffusion_pytorch_model.safetensors") == {torch.bfloat16}
    assert dtypes(exported["fuser"]) == dtypes(pipeline / "fuser.safetensors") == {torch.float32}
    for part in FROZEN:  # not recast to the run's bf16: the fp16 VAE is the source's, byte for byte
        assert file_bytes(pipeline, part) == file_bytes(model, part), part
    size = sum(len(b) for part in FROZEN for b in file_bytes(pipeline, part).values())
    print(f"exported pipeline: {size} bytes of frozen parts identical to the source")
    frames = load_pipeline(pipeline)("a red square moves right", num_frames=9, height=16, width=16, steps=2)
    assert frames.shape == (1, 9, 16, 16, 3) and torch.isfinite(frames).all()


def test_frozen_dit_is_copied_and_export_dtype_applies_to_the_fuser(model, world_clips, tiny_run, tmp_path):
    config = TrainConfig(**{**tiny_run, "export": True, "model": str(model)}, data=str(world_clips(2)), max_steps=1,
                         batch_size=2, lr=1e-3, dit="frozen", export_dtype="fp16", output_dir=str(tmp_path / "run"))
    exported = train(config, progress=False)["export"]
    pipeline = Path(exported["pipeline"])
    assert "transformer" not in exported  # nothing of the DiT trained
    for part in (*FROZEN, "transformer"):
        assert file_bytes(pipeline, part) == file_bytes(model, part), part
    assert dtypes(exported["fuser"]) == {torch.float16}
    assert load_file(exported["fuser"])["z_theta.weight"].abs().max() > 0  # trained off its zero init
    assert load_pipeline(pipeline).fuser.config == load_pipeline(model).fuser.config
