"""Export a trained model in the layouts the pipeline, the CLI and the ComfyUI nodes load (mimir.loading):

    fuser.safetensors         the token fuser (config in its metadata)
    transformer.safetensors   the DiT as one ComfyUI-style file (diffusers key names), when the DiT was trained
    pipeline/                 a diffusers CogVideoX folder + llm/ + fuser.safetensors, when the frozen
                              components (T5, LLM, VAE) are at hand (a run from a cache has none of them)
"""

from __future__ import annotations

from pathlib import Path

from ..fuser import save_fuser
from ..pipeline import MimirPipeline
from .config import TrainConfig
from .model import merged_transformer


def export_model(pipe: MimirPipeline, config: TrainConfig, folder) -> dict[str, str]:
    """Write `pipe`'s fuser and DiT (LoRA merged in, in place) to `folder`. -> {what: path}."""
    from ..loading import save_pipeline, save_single_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"fuser": folder / "fuser.safetensors"}
    save_fuser(pipe.fuser, written["fuser"])
    transformer = merged_transformer(pipe.transformer, config)
    scaling = pipe.vae.config.scaling_factor if pipe.vae is not None else None
    if config.trains_dit:
        written["transformer"] = folder / "transformer.safetensors"
        save_single_file(transformer, written["transformer"], vae_scaling_factor=scaling)
    frozen = (pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.llm, pipe.llm_tokenizer)
    if all(part is not None for part in frozen):
        written["pipeline"] = folder / "pipeline"
        save_pipeline(pipe, written["pipeline"])
    return {k: str(v) for k, v in written.items()}
