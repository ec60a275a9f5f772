"""The catalogue of CogVideoX variants: what the published checkpoints are, and which one a config or a set of
weight shapes is.

Facts only (configs, sizes, factors, scheduler settings, file names), no file reading: every other module takes
these numbers from here, so each is written once.
"""

from __future__ import annotations

from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

T5_TEXT_LEN = 226  # CogVideoX's T5 length: the text stream of a pipeline without fuser
FUSER_FILE = "fuser.safetensors"  # the token fuser inside a Mimir pipeline folder

# Scheduler settings of the published CogVideoX checkpoints (the scheduler classes' defaults differ).
SCHEDULER_SETTINGS = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                          clip_sample=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          set_alpha_to_one=True)
SCHEDULERS = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
SNR_SHIFT_SCALE = {"2b": 3.0, "5b": 1.0, "5b-i2v": 1.0, "1.5": 1.0, "1.5-i2v": 1.0}

# The published transformer configs (THUDM/CogVideoX-2b, -5b, -5b-I2V, CogVideoX1.5-5B, -5B-I2V).
_COGVIDEOX_2B = dict(
    num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
    freq_shift=0, time_embed_dim=512, ofs_embed_dim=None, text_embed_dim=4096, num_layers=30, dropout=0.0,
    attention_bias=True, sample_width=90, sample_height=60, sample_frames=49, patch_size=2, patch_size_t=None,
    temporal_compression_ratio=4, max_text_seq_length=T5_TEXT_LEN, activation_fn="gelu-approximate",
    timestep_activation_fn="silu", norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False,
    patch_bias=True,
)
_COGVIDEOX_5B = {**_COGVIDEOX_2B, "num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True}
_COGVIDEOX_15 = {**_COGVIDEOX_5B, "patch_size_t": 2, "patch_bias": False, "sample_width": 300, "sample_height": 300,
                 "sample_frames": 81}
TRANSFORMER_CONFIGS = {
    "2b": _COGVIDEOX_2B,
    "5b": _COGVIDEOX_5B,
    "5b-i2v": {**_COGVIDEOX_5B, "in_channels": 32, "use_learned_positional_embeddings": True},
    "1.5": _COGVIDEOX_15,
    "1.5-i2v": {**_COGVIDEOX_15, "in_channels": 32, "ofs_embed_dim": 512},
}
# What a variant is used at: (frames, height, width). The transformer's sample size is not it for 1.5
# (300 x 300 latents = 2400 x 2400 px); the T2V 1.5 model is used at 1360 x 768 with 81 frames.
DEFAULT_VIDEO_SIZES = {"2b": (49, 480, 720), "5b": (49, 480, 720), "5b-i2v": (49, 480, 720), "1.5": (81, 768, 1360),
                       "1.5-i2v": (81, 768, 1360)}
VAE_SCALING_FACTORS = {"2b": 1.15258426, "5b": 0.7, "5b-i2v": 0.7, "1.5": 0.7, "1.5-i2v": 0.7}
# The CogVideoX VAE (all variants share its weights' shapes; only the scaling factor differs).
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(128, 256, 256, 512), latent_channels=16,
    layers_per_block=3, act_fn="silu", norm_eps=1e-6, norm_num_groups=32, temporal_compression_ratio=4,
    sample_height=480, sample_width=720, scaling_factor=VAE_SCALING_FACTORS["2b"],
)
# Fields that tell the architecture family apart (depth and sample sizes may differ within one family).
_VARIANT_FIELDS = ("num_attention_heads", "attention_head_dim", "in_channels", "text_embed_dim", "time_embed_dim",
                   "patch_size", "patch_size_t", "use_rotary_positional_embeddings",
                   "use_learned_positional_embeddings", "ofs_embed_dim")


def match_variant(config: dict) -> str:
    """The published variant whose architecture a transformer config has, else "custom"."""
    for variant, known in TRANSFORMER_CONFIGS.items():
        if all(config.get(f) == known[f] for f in _VARIANT_FIELDS):
            return variant
    return "custom"


def _patch_shape(config: dict) -> tuple[int, ...]:
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    p, pt = config["patch_size"], config["patch_size_t"]
    if pt is None:
        return (inner, config["in_channels"], p, p)
    return (inner, config["in_channels"] * p * p * pt)


def transformer_config_from_shapes(shapes: dict[str, tuple], where: str = "checkpoint") -> tuple[str, dict]:
    """(variant, config) of a published CogVideoX transformer told from its weight shapes; depth from its keys.
    The patch embedding's shape alone tells the variants apart (width, input channels, temporal patching)."""
    proj = tuple(shapes.get("patch_embed.proj.weight", ()))
    for variant, config in TRANSFORMER_CONFIGS.items():
        if proj == _patch_shape(config):
            layers = {k.split(".")[1] for k in shapes if k.startswith("transformer_blocks.")}
            return variant, {**config, "num_layers": len(layers)}
    known = "; ".join(f"{v} {list(_patch_shape(c))}" for v, c in TRANSFORMER_CONFIGS.items())
    raise ValueError(f"{where}: unknown CogVideoX transformer: patch_embed.proj.weight has shape {list(proj)}; "
                     f"known shapes: {known}. Files written by mimir's save_single_file carry their own config.")
