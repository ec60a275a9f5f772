"""Export a trained model in the layouts the pipeline, the CLI and the ComfyUI nodes load (mimir.loading):

    fuser.safetensors         the token fuser (config in its metadata)
    transformer.safetensors   the DiT as one ComfyUI-style file (diffusers key names), when the DiT was trained
    pipeline/                 a diffusers CogVideoX folder + llm/ + fuser.safetensors: when `model` is a pipeline
                              folder, its frozen parts byte for byte (hard links where the file system allows)
                              and the trained ones written; else from the frozen models in memory, if at hand

The trained fuser and DiT are written in `export_dtype`: by default the dtype of the files they started from.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..describe import describe
from ..fuser import save_fuser
from ..pipeline import MimirPipeline
from ..variants import FUSER_FILE
from ..weights import resolve_dtype
from .config import TrainConfig
from .model import merged_transformer


def export_model(pipe: MimirPipeline, config: TrainConfig, folder, fuser_source: Path | None = None) -> dict[str, str]:
    """Write `pipe`'s fuser and DiT (LoRA merged in, both cast to the export dtype: in place, called once at the
    end) to `folder`. `fuser_source`: the fuser file the run started from. -> {what: path}."""
    from ..loading import save_pipeline, save_single_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(config.model) if (Path(config.model) / "model_index.json").is_file() else None
    fuser = pipe.fuser.to(export_dtype(config, fuser_source))
    transformer = merged_transformer(pipe.transformer, config)
    written = {"fuser": folder / "fuser.safetensors"}
    save_fuser(fuser, written["fuser"])
    scaling = pipe.vae.config.scaling_factor if pipe.vae is not None else None
    spatial = pipe.codec.spatial if pipe.vae is not None else 8
    if config.trains_dit:
        transformer.to(export_dtype(config, source, "transformer"))
        written["transformer"] = folder / "transformer.safetensors"
        save_single_file(transformer, written["transformer"], vae_scaling_factor=scaling,
                         vae_spatial_factor=spatial)
    written["pipeline"] = folder / "pipeline"
    shutil.rmtree(written["pipeline"], ignore_errors=True)  # never write into a file linked to a source file
    if source is not None:
        copy_frozen(source, config, written["pipeline"])
        if config.trains_dit:
            transformer.save_pretrained(str(written["pipeline"] / "transformer"), safe_serialization=True)
        save_fuser(fuser, written["pipeline"] / FUSER_FILE)
    elif all(part is not None for part in (pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.llm, pipe.llm_tokenizer)):
        save_pipeline(pipe, written["pipeline"])
    else:
        del written["pipeline"]
    return {k: str(v) for k, v in written.items()}


def export_dtype(config: TrainConfig, source: Path | None, component: str | None = None) -> torch.dtype:
    """config.export_dtype; "source": the dtype the file `source` (a pipeline folder's `component`) stores,
    float32 where there is none (the tiny test models, a fuser made in memory)."""
    if config.export_dtype != "source":
        return resolve_dtype(config.export_dtype)
    if source is None:
        return torch.float32
    info = describe(source)
    return resolve_dtype((info["components"][component] if component else info)["dtype"])


def copy_frozen(source: Path, config: TrainConfig, pipeline: Path) -> None:
    """Everything of the pipeline folder `source` but the fuser, the LLM (taken from `config.llm` when given)
    and the DiT when it trained, unchanged."""
    skip = {FUSER_FILE, "llm"} | ({"transformer"} if config.trains_dit else set())
    pipeline.mkdir(parents=True, exist_ok=True)
    parts = [(item, pipeline / item.name) for item in source.iterdir() if item.name not in skip]
    for src, dst in parts + [(Path(config.llm) if config.llm else source / "llm", pipeline / "llm")]:
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    """A hard link costs no disk (a 5B pipeline's frozen parts are ~17 GB); across file systems, a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
