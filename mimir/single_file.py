"""Reading ComfyUI-style single files: one .safetensors per component, diffusers/transformers key names, and no
config beside it, so what it is and how big it is come from its tensors' names and shapes.

- the component is told from its keys (or from the `mimir_kind` metadata save_single_file writes);
- a transformer's variant from its patch embedding's shape (variants.transformer_config_from_shapes), its depth
  from its block keys;
- a VAE is the published CogVideoX VAE when its shapes are that one's: its norm groups leave no trace in the
  weights, so a VAE of another size needs its config (a folder, or a file from save_single_file);
- T5 files store the tied embedding once (ComfyUI leaves out `encoder.embed_tokens.weight`); full T5
  checkpoints also hold a decoder, which is dropped;
- ComfyUI's "scaled fp8" files are dequantised as they are read (weights.Weights.read_scaled_fp8).
Files written by save_single_file carry their config in the safetensors metadata and load at any size.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from transformers import T5Config

from .configs import full_config, parse_json_object, warn_unknown_fields
from .variants import VAE_CONFIG, VAE_SCALING_FACTORS, match_variant, transformer_config_from_shapes
from .weights import Weights, few, read_file

_T5_POSITION_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def file_kind(weights: Weights) -> str | None:
    """"transformer" | "vae" | "t5" | "fuser" from a file's metadata, else from keys only that component has."""
    if weights.metadata.get("mimir_kind"):
        return weights.metadata["mimir_kind"]
    if weights.metadata.get("format") == "mimir-token-fuser":
        return "fuser"
    keys = weights.shapes
    if "patch_embed.proj.weight" in keys:
        return "transformer"
    if "encoder.conv_in.conv.weight" in keys or "decoder.conv_in.conv.weight" in keys:
        return "vae"
    if "shared.weight" in keys or "encoder.block.0.layer.0.SelfAttention.q.weight" in keys:
        return "t5"
    return None


def _read_kind(path: Path, kind: str) -> Weights:
    weights = read_file(path)
    found = file_kind(weights)
    if found != kind:
        what = f"a {found}" if found else f"no known component (keys such as {few(sorted(weights.shapes), 4)})"
        raise ValueError(f"{path}: expected a {kind} single file, but it holds {what}")
    return weights


def _metadata_config(weights: Weights, path: Path, cls) -> dict | None:
    """The config a file written by save_single_file carries in its safetensors metadata (None without)."""
    text = weights.metadata.get("config")
    if text is None:
        return None
    where = f"{path} (the config in its safetensors metadata)"
    config = parse_json_object(text, where)
    warn_unknown_fields(config, cls, where)
    return config


def read_transformer(path: Path) -> tuple[dict, Weights, tuple[float | None, int]]:
    """-> (full config, weights, (scaling factor of the VAE it works with or None when unknown, its spatial
    factor: 8 unless the file records another))."""
    weights = _read_kind(path, "transformer")
    config = _metadata_config(weights, path, CogVideoXTransformer3DModel)
    if config is None:
        config = transformer_config_from_shapes(weights.shapes, str(path))[1]
    config = full_config(CogVideoXTransformer3DModel, config)
    scaling = weights.metadata.get("vae_scaling_factor")
    scaling = float(scaling) if scaling else VAE_SCALING_FACTORS.get(match_variant(config))
    return config, weights, (scaling, int(weights.metadata.get("vae_spatial_factor", 8)))


def vae_config_from_shapes(shapes: dict[str, tuple], where: str = "checkpoint") -> dict:
    """The config fields a CogVideoX VAE's weight shapes tell: its channels and depth."""
    blocks = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks.")})
    widths = [f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight" for i in blocks]
    ends = ["encoder.conv_in.conv.weight", "decoder.conv_in.conv.weight", "decoder.conv_out.conv.weight"]
    missing = [k for k in ends + widths if k not in shapes]
    if missing:
        raise ValueError(f"{where}: cannot tell this VAE's size from its weights: it has no {few(missing, 3)}")
    resnets = {k.split(".")[4] for k in shapes if k.startswith("encoder.down_blocks.0.resnets.")}
    return dict(in_channels=shapes[ends[0]][1], latent_channels=shapes[ends[1]][1], out_channels=shapes[ends[2]][0],
                block_out_channels=[shapes[k][0] for k in widths], layers_per_block=len(resnets))


def _vae_config_of_file(shapes: dict[str, tuple], path: Path) -> dict:
    """The published VAE's config when the shapes are its; else what the shapes tell, with None for what no
    shape depends on (norm groups, temporal compression, scaling factor)."""
    found = vae_config_from_shapes(shapes, str(path))
    published = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in VAE_CONFIG.items() if k in found}
    if found == published:
        return VAE_CONFIG
    return {**found, "norm_num_groups": None, "temporal_compression_ratio": None, "scaling_factor": None}


def read_vae(path: Path) -> tuple[dict, Weights]:
    """-> (full config, weights); norm_num_groups is None when the file is of another size than the published
    VAE and carries no config (load_vae refuses to build it, inspect still reports its channels)."""
    weights = _read_kind(path, "vae")
    config = _metadata_config(weights, path, AutoencoderKLCogVideoX)
    if config is None:
        config = _vae_config_of_file(weights.shapes, path)
    return full_config(AutoencoderKLCogVideoX, config), weights


def t5_config_from_shapes(shapes: dict[str, tuple]) -> T5Config:
    """The T5 encoder config a ComfyUI-style T5 file implies (T5 v1.1 XXL: 4096 wide, 24 layers, gated-gelu)."""
    vocab, d_model = shapes["shared.weight"]
    buckets, heads = shapes[_T5_POSITION_BIAS]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = shapes["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    layers = {k.split(".")[2] for k in shapes if k.startswith("encoder.block.")}
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=len(layers),
                    num_heads=heads, relative_attention_num_buckets=buckets,
                    feed_forward_proj="gated-gelu" if gated else "relu")


def t5_weights(weights: Weights) -> Weights:
    """T5 files store the shared embedding once (ComfyUI: without `encoder.embed_tokens.weight`); full T5
    checkpoints also hold a decoder, which the encoder does not use. Folders are read the same way."""
    weights.drop(("decoder.", "lm_head."))
    if "shared.weight" not in weights.shapes and "encoder.embed_tokens.weight" in weights.shapes:
        weights.alias("shared.weight", "encoder.embed_tokens.weight")
    if "encoder.embed_tokens.weight" not in weights.shapes and "shared.weight" in weights.shapes:
        weights.alias("encoder.embed_tokens.weight", "shared.weight")
    return weights


def read_t5(path: Path) -> tuple[T5Config, Weights]:
    """-> (T5Config, weights) of a T5 encoder single file (which holds no tokenizer)."""
    weights = t5_weights(_read_kind(path, "t5"))
    config = _metadata_config(weights, path, T5Config)
    if config is not None:
        return T5Config.from_dict(config), weights
    if _T5_POSITION_BIAS not in weights.shapes:
        raise ValueError(f"{path}: a T5 file without config metadata must hold the first block's "
                         f"relative_attention_bias to tell its size")
    return t5_config_from_shapes(weights.shapes), weights
