"""Whole pipelines: load a Mimir / CogVideoX pipeline folder, check its paths before any weights are read, save
one as a diffusers folder (plus llm/ and fuser.safetensors), and write a component as a ComfyUI-style single file.

A pipeline folder is a diffusers CogVideoX folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
scheduler/); a Mimir pipeline adds llm/ (a transformers folder with its tokenizer) and fuser.safetensors. Each
component is built by components.py; describe.py says what a folder or file is without loading it.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel
from safetensors.torch import save_file
from transformers import T5EncoderModel

from . import components  # used as components.load_*, so that replacing one loader replaces it here too
from .fuser import TokenFuser, read_fuser_config, save_fuser
from .offload import Placement
from .pipeline import MimirPipeline
from .variants import FUSER_FILE
from .weights import existing, read_file

DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"
# The demo's T5-only arm: a DiT trained on the T5 stream alone (plain CogVideoX conditioning), in
# t5_only/transformer/, sharing the VAE, T5, tokenizer and scheduler of DEMO_MODEL_DIR.
DEMO_T5_ONLY_DIR = DEMO_MODEL_DIR / "t5_only"


def load_pipeline(folder, dtype=None, device="cpu", placement: Placement | None = None, fuser_path=None,
                  llm_path=None, trust_remote_code: bool = False, text_encoders: bool = True,
                  with_fuser: bool = True, transformer_path=None) -> MimirPipeline:
    """A MimirPipeline from a diffusers CogVideoX folder, plus llm/ and fuser.safetensors when present (or the
    paths given). Without a fuser it is plain CogVideoX, prompts encoded to the T5 length the transformer was
    trained on (its max_text_seq_length); with_fuser=False reads neither the fuser nor the LLM of a Mimir folder
    (T5 only). `transformer_path`: a diffusers transformer folder used instead of the folder's transformer/
    (e.g. DEMO_T5_ONLY_DIR / "transformer"), with the folder's VAE and scheduler. Models wait on the
    placement's offload device (default: `device`). text_encoders=False skips T5 and the LLM (for prompts
    already encoded, e.g. cached)."""
    root, fuser_path, llm_folder = pipeline_paths(folder, fuser_path, llm_path, with_fuser, transformer_path)
    placement = placement or Placement(device, device)
    where = placement.offload_device
    fuser = llm = llm_tokenizer = text_encoder = tokenizer = None
    if fuser_path is not None:
        fuser, _ = components.load_token_fuser(fuser_path, dtype, where)
        if text_encoders:
            llm, llm_tokenizer, _ = components.load_llm(llm_folder, dtype, where, trust_remote_code=trust_remote_code)
    # without a fuser the transformer keeps its own text length, which the pipeline's T5 encoding then follows
    transformer, _ = components.load_transformer(transformer_path or root, dtype, where, pipeline_root=root,
                                                 text_len=fuser.config.out_len if fuser is not None else None)
    vae, _ = components.load_vae(root, dtype, where)
    if text_encoders:
        text_encoder, tokenizer, _ = components.load_t5(root, dtype=dtype, device=where)
    _check_text_dims(fuser, text_encoder, transformer)
    scheduler = components.load_scheduler(root)
    pipe = MimirPipeline(transformer, vae, scheduler, tokenizer, text_encoder, llm, llm_tokenizer, fuser, placement)
    if fuser is not None:
        pipe.text_sources = text_sources(root, llm_folder)
    return pipe


def text_sources(root: Path, llm_folder: Path) -> tuple[list[Path], list[Path]]:
    """(T5 files, LLM files) of a Mimir folder: what the prompt cache keys on (prompt_cache.files_identity),
    the same whether the CLI, a node or a loaded pipeline asks."""
    return [root / "text_encoder", root / "tokenizer"], [llm_folder]


def pipeline_paths(folder, fuser_path=None, llm_path=None, with_fuser: bool = True,
                   transformer_path=None) -> tuple[Path, Path | None, Path | None]:
    """-> (pipeline root, fuser file or None, LLM folder or None), checked without loading any weights.
    with_fuser=False: the T5-only reading of the folder (no fuser, no LLM). A `transformer_path` must be a
    diffusers transformer folder; the root then needs no transformer/ of its own."""
    root = existing(folder)
    # a transformer_path stands in for the root's transformer/
    parts = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")[transformer_path is not None:]
    missing = [name for name in parts if not (root / name).is_dir()]
    if missing:
        raise ValueError(f"{root}: not a CogVideoX pipeline folder: it lacks {', '.join(s + '/' for s in missing)}")
    if transformer_path is not None:
        _check_transformer_folder(transformer_path)
    if not with_fuser:
        return root, None, None
    fuser_path = existing(fuser_path) if fuser_path is not None else root / FUSER_FILE
    fuser_path = fuser_path if fuser_path.exists() else None
    return root, fuser_path, _mimir_llm(root, fuser_path, llm_path)


def _check_transformer_folder(path) -> None:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"transformer_path {path}: no such folder (a diffusers transformer folder: "
                                f"config.json and diffusion_pytorch_model*.safetensors)")
    try:
        components.transformer_folder(path)
    except ValueError as exc:
        raise ValueError(f"transformer_path: {exc}") from None


def _mimir_llm(root: Path, fuser_path: Path | None, llm_path) -> Path | None:
    """The LLM folder a fuser needs, checked against the fuser's llm_dim before any weights are read."""
    if fuser_path is None:
        if llm_path is not None:
            raise ValueError(f"an LLM was given ({llm_path}) but there is no fuser: {root / FUSER_FILE} is absent "
                             f"and no fuser_path was given")
        return None
    llm_folder, config, _ = components.find_llm(existing(llm_path) if llm_path is not None else root)
    read_file(fuser_path)  # names a truncated or corrupt fuser file as such
    fuser_config, dims = read_fuser_config(fuser_path), components.llm_dims(config)
    if fuser_config.llm_dim != dims["hidden_size"]:
        raise ValueError(f"{fuser_path}: the fuser was made for an LLM of hidden size {fuser_config.llm_dim} "
                         f"(llm_dim), but {llm_folder} has hidden size {dims['hidden_size']}")
    if dims["num_hidden_layers"] is not None:
        fuser_config.check_llm_depth(dims["num_hidden_layers"], f"{fuser_path} (with the LLM {llm_folder})")
    return llm_folder


def _check_text_dims(fuser, text_encoder, transformer) -> None:
    width = transformer.config.text_embed_dim
    if text_encoder is not None and text_encoder.config.d_model != width:
        raise ValueError(f"the T5 encoder is {text_encoder.config.d_model} wide but the transformer reads "
                         f"{width}-wide text (text_embed_dim)")
    if fuser is not None and fuser.config.t5_dim != width:
        raise ValueError(f"the fuser's t5_dim is {fuser.config.t5_dim} but the transformer reads {width}-wide "
                         f"text (text_embed_dim)")


def save_pipeline(pipe: MimirPipeline, folder) -> None:
    """Write a diffusers CogVideoX folder (loadable by diffusers' CogVideoXPipeline) plus llm/ and
    fuser.safetensors when the pipeline has them."""
    folder = Path(folder)
    missing = [n for n in ("transformer", "vae", "scheduler", "tokenizer", "text_encoder") if getattr(pipe, n) is None]
    if missing:
        raise ValueError(f"save_pipeline: the pipeline has no {', '.join(missing)}")
    CogVideoXPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                      transformer=pipe.transformer, scheduler=pipe.scheduler).save_pretrained(
        str(folder), safe_serialization=True)
    if pipe.llm is not None:
        pipe.llm.save_pretrained(str(folder / "llm"))
        pipe.llm_tokenizer.save_pretrained(str(folder / "llm"))
    if pipe.fuser is not None:
        save_fuser(pipe.fuser, folder / FUSER_FILE)


def save_single_file(model, path, vae_scaling_factor: float | None = None, vae_spatial_factor: int = 8) -> None:
    """A ComfyUI-style single file (diffusers / transformers key names) with the config in the safetensors
    metadata, written atomically. For a transformer, `vae_scaling_factor` and `vae_spatial_factor` record the VAE
    it works with."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single files are written as .safetensors")
    if isinstance(model, TokenFuser):
        return save_fuser(model, path)
    state = model.state_dict()
    if isinstance(model, (CogVideoXTransformer3DModel, AutoencoderKLCogVideoX)):
        kind = "transformer" if isinstance(model, CogVideoXTransformer3DModel) else "vae"
        config = model.to_json_string()
    elif isinstance(model, T5EncoderModel):
        kind, config = "t5", model.config.to_json_string()
        state = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}  # tied to shared.weight
    else:
        raise TypeError(f"save_single_file: cannot save a {type(model).__name__}; expected a CogVideoX transformer "
                        f"or VAE, a T5EncoderModel or a TokenFuser")
    metadata = {"format": "pt", "mimir_kind": kind, "config": config}
    if vae_scaling_factor is not None:
        metadata["vae_scaling_factor"] = str(float(vae_scaling_factor))
    if vae_spatial_factor != 8:
        metadata["vae_spatial_factor"] = str(int(vae_spatial_factor))
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
