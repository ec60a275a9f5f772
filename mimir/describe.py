"""`describe(path)`: what a checkpoint file or folder is (kind, layout, variant, sizes, dtype), read from configs
and file headers only, no weights loaded. The `mimir inspect` command prints it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .components import (
    ComponentInfo,
    find_llm,
    find_t5,
    find_transformer,
    find_vae,
    fuser_info,
    has_tokenizer,
    llm_dims,
    t5_info,
    transformer_info,
    vae_info,
    warn_unknown_llm_fields,
)
from .configs import component_folder, read_json
from .fuser import read_fuser_config
from .single_file import file_kind
from .variants import FUSER_FILE
from .weights import dtype_name, existing, few, read_file


def describe(path) -> dict:
    """What a checkpoint file or folder is, read from configs and file headers only (no weights loaded)."""
    path = existing(path)
    if path.is_file():
        return _describe_file(path)
    if (path / "model_index.json").is_file() or (path / "transformer").is_dir():
        return _describe_pipeline(path)
    if (path / "scheduler_config.json").is_file():
        return _describe_scheduler(path)
    config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    if config.get("_class_name") == "CogVideoXTransformer3DModel":
        return _describe_transformer(path)
    if config.get("_class_name") == "AutoencoderKLCogVideoX":
        return _describe_vae(path)
    if config.get("model_type") == "t5":
        return _describe_t5(path)
    if "model_type" in config:
        return _describe_llm(path)
    raise ValueError(f"{path}: not a known checkpoint folder (diffusers pipeline or component, transformers T5 or "
                     f"LLM folder)")


def _describe_file(path: Path) -> dict:
    weights = read_file(path)
    kind = file_kind(weights)
    if kind == "fuser":
        out = fuser_info(path, weights).to_dict()
        out["config"] = dataclasses.asdict(read_fuser_config(path))
        return out
    describe_kind = {"transformer": _describe_transformer, "vae": _describe_vae, "t5": _describe_t5}.get(kind)
    if describe_kind is None:
        raise ValueError(f"{path}: not a known checkpoint: keys such as {few(sorted(weights.shapes), 4)}")
    return describe_kind(path)


def _describe_transformer(path: Path) -> dict:
    layout, where, config, weights, vae = find_transformer(path)
    return transformer_info(layout, where, config, weights.stored_dtype(), vae).to_dict()


def _describe_vae(path: Path) -> dict:
    layout, where, config, weights = find_vae(path)
    return vae_info(layout, where, config, weights.stored_dtype()).to_dict()


def _describe_t5(path: Path) -> dict:
    layout, where, config, weights, tokenizer_dir = find_t5(path)
    out = t5_info(layout, where, config, weights.stored_dtype()).to_dict()
    out["tokenizer"] = None if tokenizer_dir is None else str(tokenizer_dir)
    return out


def _describe_llm(path: Path) -> dict:
    folder, config, weights = find_llm(path)
    warn_unknown_llm_fields(folder, config)
    dims, dtype = llm_dims(config), dtype_name(weights.stored_dtype())
    out = ComponentInfo("llm", "transformers-folder", None, dims, dtype, str(folder))
    return {**out.to_dict(), "tokenizer": str(folder) if has_tokenizer(folder) else None}


def _describe_scheduler(path: Path) -> dict:
    folder, config = component_folder(path, "scheduler", lambda c: True, "scheduler", "scheduler_config.json")
    settings = {k: config.get(k) for k in ("prediction_type", "snr_shift_scale", "timestep_spacing",
                                           "rescale_betas_zero_snr")}
    return {"kind": "scheduler", "layout": "diffusers-folder", "path": str(folder),
            "class": config.get("_class_name"), **settings}


def _describe_pipeline(root: Path) -> dict:
    parts = {"transformer": _describe_transformer, "vae": _describe_vae, "text_encoder": _describe_t5,
             "scheduler": _describe_scheduler}
    components = {name: describe_part(root / name) for name, describe_part in parts.items() if (root / name).is_dir()}
    if (root / "llm").is_dir():
        components["llm"] = _describe_llm(root / "llm")
    if (root / FUSER_FILE).is_file():
        components["fuser"] = _describe_file(root / FUSER_FILE)
    return {"kind": "pipeline", "layout": "diffusers-folder", "path": str(root), "mimir": "fuser" in components,
            "components": components}
