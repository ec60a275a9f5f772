"""Loading and saving: given a folder or a file, return the component and say what it is.

Layouts read here (safetensors only, never a download, never remote code unless asked):
- diffusers CogVideoX folder: model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/; a Mimir
  pipeline folder adds llm/ (a transformers folder with its tokenizer) and fuser.safetensors. A component path may
  be the root or the component's own subfolder.
- ComfyUI-style single files with diffusers/transformers key names: the CogVideoX transformer (variant told from
  weight shapes), the VAE, T5 (without the tied `encoder.embed_tokens.weight`; ComfyUI's "scaled fp8" files load
  as weight x scale). Files written by `save_single_file` carry their config in the safetensors metadata and load
  at any size; a VAE file without it loads at the published size only (its norm groups leave no trace in the
  weights), and `inspect` reports the channels of any other.
- a transformers folder (T5 encoder or causal LM), and Mimir token-fuser files.

Weights are read into models built with their parameters on the meta device, so a model never exists twice in
memory; every tensor name and shape is checked first and mismatches are named. Every bad file is named with its
fault before its model is built: config JSON that does not parse (line, column), truncated or corrupt
safetensors, a tokenizer that cannot load; a config field the model class does not know is a warning that names
the nearest known field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect as pyinspect
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece
import torch
import transformers
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, T5Config, T5EncoderModel

from .fuser import TokenFuser, load_fuser, read_fuser_config, save_fuser
from .offload import Placement
from .pipeline import MimirPipeline

logger = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"
FUSER_FILE = "fuser.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
T5_TEXT_LEN = 226  # CogVideoX's T5 length: the text stream of a pipeline without fuser

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
    temporal_compression_ratio=4, max_text_seq_length=226, activation_fn="gelu-approximate",
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

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass
class ComponentInfo:
    """What was loaded (or, for `inspect`, what is on disk)."""

    kind: str  # "transformer" | "vae" | "t5" | "llm" | "fuser" | "pipeline"
    layout: str  # "diffusers-folder" | "single-file" | "transformers-folder" | "mimir-fuser"
    variant: str | None  # transformer: "2b" | "5b" | "5b-i2v" | "1.5" | "1.5-i2v" | "custom"
    dims: dict
    dtype: str
    path: str
    vae_scaling_factor: float | None = None  # transformer: of the VAE it was trained with; vae: its own

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- dtypes ----------------------------------------------------------------------------------------------

def resolve_dtype(dtype) -> torch.dtype | None:
    """Map "fp32" / "fp16" / "bf16" (or long names, or a torch dtype) to a torch dtype; None or "auto" -> None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() == "auto":
        return None
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)} or a torch dtype")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- reading files ---------------------------------------------------------------------------------------

_JSON_TYPES = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false",
               type(None): "null"}


def parse_json_object(text: str, where) -> dict:
    """A JSON object ({...}) from text, else a ValueError naming `where` and the fault (line and column)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object ({{...}}), found {_JSON_TYPES.get(type(data), 'JSON')}")
    return data


def read_json(file: Path) -> dict:
    """A config file's JSON object; every fault (not UTF-8, invalid JSON, not an object) names the file."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return parse_json_object(text, file)


# Fields published configs carry besides their class's own: bookkeeping (as are all keys starting with "_", such
# as _class_name and _name_or_path), transformers' older names (torch_dtype became dtype; rope_theta and
# rope_scaling became rope_parameters in v5), and T5's output_past and Phi-3's attention_bias, which only the
# models' original code read.
_BOOKKEEPING_FIELDS = frozenset({"architectures", "auto_map", "model_type", "transformers_version", "torch_dtype",
                                 "rope_theta", "rope_scaling", "output_past", "attention_bias"})


def config_fields(cls) -> set[str]:
    """The fields a config of `cls` may hold: a diffusers class's __init__ parameters; for a transformers
    config class its fields, their aliases and the generation settings older configs carry."""
    if issubclass(cls, transformers.PretrainedConfig):
        fields = set(cls().to_dict()) | set(cls.attribute_map) | set(transformers.GenerationConfig().to_dict())
    else:
        fields = set(pyinspect.signature(cls.__init__).parameters) - {"self"}
    return fields | _BOOKKEEPING_FIELDS


def warn_unknown_fields(config: dict, cls, where) -> list[str]:
    """Log each field `cls` does not know, naming the nearest known one: a typo such as
    use_rotary_positional_embedding would otherwise build another architecture from the defaults.
    Returns the unknown fields."""
    known = config_fields(cls)
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    for name in unknown:
        near = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; the nearest known field is {near[0]!r}" if near else ""
        logger.warning("%s: unknown field %r (%s has no such field, so it is ignored)%s", where, name,
                       cls.__name__, hint)
    return unknown


def safetensors_fault(file: Path) -> str:
    """What is wrong with a file safetensors cannot open, told from its header: truncated (an interrupted
    download or copy) or not a safetensors file at all."""
    if not file.is_file():
        return "no such file"
    size = file.stat().st_size
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if size < 8 or header_len > 100_000_000:  # safetensors refuses larger headers
            return "corrupt: not a .safetensors file"
        if size < 8 + header_len:
            return f"truncated: {size} bytes, cut inside its {header_len}-byte header"
        header = f.read(header_len)
    try:
        ends = [e["data_offsets"][1] for k, e in json.loads(header).items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "corrupt: not a .safetensors file (its header is not a safetensors header)"
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"truncated: {size} bytes, but its header describes {expected} (an incomplete download or copy?)"
    return "corrupt: not a readable .safetensors file"


# ---- safetensors weights ---------------------------------------------------------------------------------

@dataclass
class _Weights:
    """The tensors of one component across its safetensors file(s), known from the headers until `load`."""

    sources: dict[str, tuple[Path, str]]  # model key -> (file, key in that file)
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors dtype names: "F32", "BF16", ...
    metadata: dict[str, str] = field(default_factory=dict)  # of the first file
    scales: dict[str, tuple[Path, str]] = field(default_factory=dict)  # scaled-fp8 weight key -> its scale

    @classmethod
    def read(cls, files: list[Path]) -> _Weights:
        weights = cls({}, {}, {})
        for i, file in enumerate(files):
            try:
                with safe_open(str(file), framework="pt") as f:
                    if i == 0:
                        weights.metadata = f.metadata() or {}
                    for key in f.keys():
                        tensor = f.get_slice(key)
                        weights.sources[key] = (file, key)
                        weights.shapes[key] = tuple(tensor.get_shape())
                        weights.dtypes[key] = tensor.get_dtype()
            except Exception as exc:  # safetensors raises its own error types for corrupt and truncated files
                raise ValueError(f"{file}: {safetensors_fault(file)} ({exc})") from exc
        weights.read_scaled_fp8()
        return weights

    def read_scaled_fp8(self) -> None:
        """ComfyUI's "scaled fp8" files (a `scaled_fp8` marker; fp8 Linear weights, each with a `scale_weight`
        and a `scale_input`) hold weight / scale_weight: they load as weight * scale_weight, as ComfyUI computes
        them. scale_input only serves ComfyUI's fp8 matrix products."""
        if "scaled_fp8" not in self.sources:
            return
        self.pop("scaled_fp8")
        for key in [k for k in self.sources if k.endswith((".scale_weight", ".scale_input"))]:
            source = self.pop(key)
            if key.endswith(".scale_weight"):
                self.scales[key.removesuffix("scale_weight") + "weight"] = source

    def pop(self, key: str) -> tuple[Path, str]:
        del self.shapes[key], self.dtypes[key]
        return self.sources.pop(key)

    def alias(self, key: str, source_key: str) -> None:
        """Make `key` read the same tensor as `source_key` (a tied weight the file stores once)."""
        self.sources[key], self.shapes[key], self.dtypes[key] = (
            self.sources[source_key], self.shapes[source_key], self.dtypes[source_key])

    def drop(self, prefixes: tuple[str, ...]) -> None:
        for key in [k for k in self.sources if k.startswith(prefixes)]:
            self.pop(key)

    def stored_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the weights; float8 storage computes in bfloat16."""
        counts: dict[str, int] = {}
        for key, name in self.dtypes.items():
            if name in _SAFETENSORS_DTYPES:
                counts[name] = counts.get(name, 0) + _numel(self.shapes[key])
        if not counts:
            return torch.float32
        dtype = _SAFETENSORS_DTYPES[max(counts, key=counts.get)]
        return torch.bfloat16 if dtype.itemsize == 1 else dtype

    def load(self) -> dict[str, torch.Tensor]:
        by_file: dict[Path, set[str]] = {}
        for file, name in [*self.sources.values(), *self.scales.values()]:
            by_file.setdefault(file, set()).add(name)
        tensors = {}
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                tensors.update({(file, name): f.get_tensor(name) for name in names})
        for key, scale in self.scales.items():  # in fp32: the caller casts to the dtype the model computes in
            tensors[self.sources[key]] = tensors[self.sources[key]].float() * tensors[scale].float()
        return {key: tensors[source] for key, source in self.sources.items()}  # aliases share one tensor


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _existing(path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return path


def _single_file(path: Path) -> _Weights:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: {path.suffix} files are pickled PyTorch checkpoints; Mimir loads .safetensors "
                         f"only (they cannot run code when loaded)")
    return _Weights.read([path])


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors file of a diffusers/transformers component folder, or the shards its index names."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = read_json(indexes[0]).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{indexes[0]}: no weight_map (tensor name -> shard file) in this index")
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files
    if files:
        raise ValueError(f"{folder}: several .safetensors files ({', '.join(f.name for f in files)}) and no "
                         f"*.safetensors.index.json saying which belong together")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder}: only pickled PyTorch weights ({', '.join(pickles)}); Mimir loads .safetensors "
                         f"only: convert them (e.g. load and `save_pretrained(..., safe_serialization=True)`)")
    raise ValueError(f"{folder}: no .safetensors weights in this folder")


def _few(names: list[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" (and {len(names) - n} more)" if len(names) > n else "")


def _check_keys(expected: dict[str, tuple], found: dict[str, tuple], where: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {list(found[k])} (expected {list(expected[k])})"
             for k in sorted(expected) if k in found and tuple(found[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with other shapes: {_few(wrong)}")
    if problems:
        raise ValueError(f"{where}: the weights do not match the model config: " + "; ".join(problems))


# ---- building models -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _params_on_meta():
    """Create parameters on the meta device (no memory, no init cost) but buffers for real: buffers that are not
    saved in checkpoints (CogVideoX's sin-cos positions) are computed at init and must survive loading."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build(make, weights: _Weights, dtype, device, where: str) -> nn.Module:
    with _params_on_meta():
        model = make()
    _check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, weights.shapes, where)
    dtype = resolve_dtype(dtype) or weights.stored_dtype()
    # casts the buffers computed at init; nn.Module.to because diffusers' ModelMixin.to warns on any dtype cast
    nn.Module.to(model, dtype)
    keep = _fp32_modules(model, dtype)
    state = {k: v.to(torch.float32 if keep & set(k.split(".")[:-1]) else dtype) if v.is_floating_point() else v
             for k, v in weights.load().items()}
    model.load_state_dict(state, assign=True)
    return model.to(device).eval()


def _fp32_modules(model: nn.Module, dtype: torch.dtype) -> set[str]:
    """Module names transformers' from_pretrained keeps in fp32 for this dtype (T5's `wo` in fp16)."""
    keep = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return keep


def _full_config(cls, config: dict) -> dict:
    """A diffusers config with the class defaults filled in and private keys dropped."""
    params = pyinspect.signature(cls.__init__).parameters
    full = {n: p.default for n, p in params.items() if n != "self" and p.default is not pyinspect.Parameter.empty}
    full.update({k: v for k, v in config.items() if k in full})
    return full


def _single_file_kind(weights: _Weights) -> str | None:
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


def _expect_kind(weights: _Weights, path: Path, kind: str) -> None:
    found = _single_file_kind(weights)
    if found != kind:
        what = f"a {found}" if found else f"no known component (keys such as {_few(sorted(weights.shapes), 4)})"
        raise ValueError(f"{path}: expected a {kind} single file, but it holds {what}")


def _metadata_config(weights: _Weights, path: Path, cls) -> dict | None:
    """The config a file written by save_single_file carries in its safetensors metadata (None without)."""
    text = weights.metadata.get("config")
    if text is None:
        return None
    where = f"{path} (the config in its safetensors metadata)"
    config = parse_json_object(text, where)
    warn_unknown_fields(config, cls, where)
    return config


def _component_folder(path: Path, subfolder: str, accepts, what: str, config_name: str = "config.json"):
    """(folder, config) for a component given a pipeline root or the component's own folder."""
    for folder in (path / subfolder, path):
        file = folder / config_name
        if file.is_file():
            config = read_json(file)
            if accepts(config):
                return folder, config
    raise ValueError(f"{path}: not a {what}: expected a .safetensors file, a diffusers pipeline folder with "
                     f"{subfolder}/, or a folder holding the {what}'s {config_name}")


def _is_class(name: str):
    return lambda config: config.get("_class_name") == name


# ---- transformer -----------------------------------------------------------------------------------------

def _patch_shape(config: dict) -> tuple[int, ...]:
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    p, pt = config["patch_size"], config["patch_size_t"]
    if pt is None:
        return (inner, config["in_channels"], p, p)
    return (inner, config["in_channels"] * p * p * pt)


def match_variant(config: dict) -> str:
    """The published variant whose architecture a transformer config has, else "custom"."""
    for variant, known in TRANSFORMER_CONFIGS.items():
        if all(config.get(f) == known[f] for f in _VARIANT_FIELDS):
            return variant
    return "custom"


def transformer_config_from_shapes(shapes: dict[str, tuple], where: str = "checkpoint") -> tuple[str, dict]:
    """(variant, config) of a published CogVideoX transformer told from its weight shapes; depth from its keys."""
    proj = tuple(shapes.get("patch_embed.proj.weight", ()))
    for variant, config in TRANSFORMER_CONFIGS.items():
        if proj == _patch_shape(config):
            layers = {k.split(".")[1] for k in shapes if k.startswith("transformer_blocks.")}
            return variant, {**config, "num_layers": len(layers)}
    known = "; ".join(f"{v} {list(_patch_shape(c))}" for v, c in TRANSFORMER_CONFIGS.items())
    raise ValueError(f"{where}: unknown CogVideoX transformer: patch_embed.proj.weight has shape {list(proj)}; "
                     f"known shapes: {known}. Files written by mimir's save_single_file carry their own config.")


def _find_transformer(path: Path):
    """-> (layout, folder or file, full config, weights, vae scaling factor or None)."""
    if path.is_file():
        weights = _single_file(path)
        _expect_kind(weights, path, "transformer")
        config = _metadata_config(weights, path, CogVideoXTransformer3DModel)
        if config is None:
            config = transformer_config_from_shapes(weights.shapes, str(path))[1]
        config = _full_config(CogVideoXTransformer3DModel, config)
        scaling = weights.metadata.get("vae_scaling_factor")
        scaling = float(scaling) if scaling else VAE_SCALING_FACTORS.get(match_variant(config))
        return "single-file", path, config, weights, scaling
    folder, config = _component_folder(path, "transformer", _is_class("CogVideoXTransformer3DModel"),
                                       "CogVideoX transformer")
    warn_unknown_fields(config, CogVideoXTransformer3DModel, folder / "config.json")
    config = _full_config(CogVideoXTransformer3DModel, config)
    vae_config = folder.parent / "vae" / "config.json"
    if folder.name == "transformer" and vae_config.is_file():
        scaling = _full_config(AutoencoderKLCogVideoX, read_json(vae_config))["scaling_factor"]
    else:
        scaling = VAE_SCALING_FACTORS.get(match_variant(config))
    return "diffusers-folder", folder, config, _Weights.read(_weight_files(folder)), scaling


def _with_text_len(config: dict, text_len: int | None, where) -> dict:
    """Sin-cos models size their text positions at init; rotary models read the text length at run time."""
    if text_len is None or (config["use_rotary_positional_embeddings"]
                            and not config["use_learned_positional_embeddings"]):
        return config
    if text_len <= 0:
        raise ValueError(f"text_len must be positive, got {text_len}")
    if config["use_learned_positional_embeddings"]:
        if text_len != config["max_text_seq_length"]:
            raise ValueError(f"{where}: this transformer has learned positional embeddings for "
                             f"{config['max_text_seq_length']} text tokens; it cannot take {text_len}")
        return config
    return {**config, "max_text_seq_length": text_len}


def _positions(config: dict) -> str:
    if config["use_learned_positional_embeddings"]:
        return "learned"
    return "rotary" if config["use_rotary_positional_embeddings"] else "sincos"


def _transformer_info(layout, path, config, dtype, scaling) -> ComponentInfo:
    dims = dict(inner_dim=config["num_attention_heads"] * config["attention_head_dim"],
                text_embed_dim=config["text_embed_dim"], num_layers=config["num_layers"],
                num_attention_heads=config["num_attention_heads"], attention_head_dim=config["attention_head_dim"],
                in_channels=config["in_channels"], patch_size=config["patch_size"],
                patch_size_t=config["patch_size_t"], max_text_seq_length=config["max_text_seq_length"],
                positional_embeddings=_positions(config))
    return ComponentInfo("transformer", layout, match_variant(config), dims, _dtype_name(dtype), str(path),
                         None if scaling is None else float(scaling))


def load_transformer(path, dtype=None, device="cpu", text_len: int | None = None):
    """-> (CogVideoXTransformer3DModel, ComponentInfo). `text_len`: the number of text tokens the model will see
    (T5 length + stabilizer tokens, e.g. 226 + 4); sin-cos (2B-style) models have their text positions sized to it.
    dtype None keeps the stored dtype (float8 storage computes in bfloat16)."""
    layout, where, config, weights, scaling = _find_transformer(_existing(path))
    config = _with_text_len(config, text_len, where)
    model = _build(lambda: CogVideoXTransformer3DModel.from_config(config), weights, dtype, device, str(where))
    return model, _transformer_info(layout, where, config, model.dtype, scaling)


# ---- VAE -------------------------------------------------------------------------------------------------

def _find_vae(path: Path):
    if path.is_file():
        weights = _single_file(path)
        _expect_kind(weights, path, "vae")
        config = _metadata_config(weights, path, AutoencoderKLCogVideoX)
        if config is None:
            config = _vae_config_of_file(weights.shapes, path)
        return "single-file", path, _full_config(AutoencoderKLCogVideoX, config), weights
    folder, config = _component_folder(path, "vae", _is_class("AutoencoderKLCogVideoX"), "CogVideoX VAE")
    warn_unknown_fields(config, AutoencoderKLCogVideoX, folder / "config.json")
    return "diffusers-folder", folder, _full_config(AutoencoderKLCogVideoX, config), \
        _Weights.read(_weight_files(folder))


def vae_config_from_shapes(shapes: dict[str, tuple], where: str = "checkpoint") -> dict:
    """The config fields a CogVideoX VAE's weight shapes tell: its channels and depth."""
    blocks = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks.")})
    widths = [f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight" for i in blocks]
    ends = ["encoder.conv_in.conv.weight", "decoder.conv_in.conv.weight", "decoder.conv_out.conv.weight"]
    missing = [k for k in ends + widths if k not in shapes]
    if missing:
        raise ValueError(f"{where}: cannot tell this VAE's size from its weights: it has no {_few(missing, 3)}")
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


def _vae_info(layout, path, config, dtype) -> ComponentInfo:
    dims = dict(latent_channels=config["latent_channels"], block_out_channels=list(config["block_out_channels"]),
                layers_per_block=config["layers_per_block"],
                temporal_compression_ratio=config["temporal_compression_ratio"])
    scaling = config["scaling_factor"]
    return ComponentInfo("vae", layout, None, dims, _dtype_name(dtype), str(path),
                         None if scaling is None else float(scaling))


def load_vae(path, dtype=None, device="cpu", scaling_factor: float | None = None):
    """-> (AutoencoderKLCogVideoX, ComponentInfo). A single file without config metadata is read as the CogVideoX
    VAE, whose scaling factor the weights do not tell (2B 1.15258426, 5B/1.5 0.7): pass `scaling_factor` (the
    transformer's ComponentInfo.vae_scaling_factor), else diffusers' default 1.15258426 is used."""
    layout, where, config, weights = _find_vae(_existing(path))
    if config["norm_num_groups"] is None:
        raise ValueError(f"{where}: a CogVideoX VAE of other size than the published one (block_out_channels "
                         f"{list(config['block_out_channels'])}, latent_channels {config['latent_channels']}): its "
                         f"norm groups and temporal compression are not in its weights, so this file alone cannot "
                         f"build it. Load its diffusers folder (config.json beside the weights), or a file written "
                         f"by mimir's save_single_file, which carries its config")
    if scaling_factor is not None:
        config = {**config, "scaling_factor": float(scaling_factor)}
    model = _build(lambda: AutoencoderKLCogVideoX.from_config(config), weights, dtype, device, str(where))
    return model, _vae_info(layout, where, config, model.dtype)


# ---- T5 --------------------------------------------------------------------------------------------------

def t5_config_from_shapes(shapes: dict[str, tuple]) -> T5Config:
    """The T5 encoder config a ComfyUI-style T5 file implies (T5 v1.1 XXL: 4096 wide, 24 layers, gated-gelu)."""
    vocab, d_model = shapes["shared.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = shapes["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    layers = {k.split(".")[2] for k in shapes if k.startswith("encoder.block.")}
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=len(layers),
                    num_heads=heads, relative_attention_num_buckets=buckets,
                    feed_forward_proj="gated-gelu" if gated else "relu")


def _t5_weights(weights: _Weights) -> _Weights:
    """T5 files store the shared embedding once (ComfyUI: without `encoder.embed_tokens.weight`); full T5
    checkpoints also hold a decoder, which the encoder does not use."""
    weights.drop(("decoder.", "lm_head."))
    if "shared.weight" not in weights.shapes and "encoder.embed_tokens.weight" in weights.shapes:
        weights.alias("shared.weight", "encoder.embed_tokens.weight")
    if "encoder.embed_tokens.weight" not in weights.shapes and "shared.weight" in weights.shapes:
        weights.alias("encoder.embed_tokens.weight", "shared.weight")
    return weights


def _find_t5(path: Path):
    """-> (layout, folder or file, T5Config, weights, tokenizer folder or None)."""
    if path.is_file():
        weights = _single_file(path)
        _expect_kind(weights, path, "t5")
        weights = _t5_weights(weights)
        config = _metadata_config(weights, path, T5Config)
        if config is not None:
            config = T5Config.from_dict(config)
        elif "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in weights.shapes:
            config = t5_config_from_shapes(weights.shapes)
        else:
            raise ValueError(f"{path}: a T5 file without config metadata must hold the first block's "
                             f"relative_attention_bias to tell its size")
        return "single-file", path, config, weights, None
    folder, config = _component_folder(path, "text_encoder", lambda c: c.get("model_type") == "t5", "T5 encoder")
    warn_unknown_fields(config, T5Config, folder / "config.json")
    tokenizer_dir = next((d for d in (folder.parent / "tokenizer", folder) if _has_tokenizer(d)), None)
    return "transformers-folder", folder, T5Config.from_dict(config), \
        _t5_weights(_Weights.read(_weight_files(folder))), tokenizer_dir


def _has_tokenizer(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", *_SENTENCEPIECE_FILES)
    return any((folder / name).is_file() for name in names)


def _t5_info(layout, path, config: T5Config, dtype) -> ComponentInfo:
    dims = dict(d_model=config.d_model, num_layers=config.num_layers, num_heads=config.num_heads, d_ff=config.d_ff,
                vocab_size=config.vocab_size)
    return ComponentInfo("t5", layout, None, dims, _dtype_name(dtype), str(path))


def load_t5(path, tokenizer_path=None, dtype=None, device="cpu"):
    """-> (T5EncoderModel, tokenizer, ComponentInfo). A single file holds no tokenizer: pass `tokenizer_path`."""
    layout, where, config, weights, tokenizer_dir = _find_t5(_existing(path))
    tokenizer_dir = _existing(tokenizer_path) if tokenizer_path is not None else tokenizer_dir
    if tokenizer_dir is None:
        raise ValueError(f"{where}: no T5 tokenizer found beside it: pass tokenizer_path (a tokenizer folder)")
    if not _has_tokenizer(tokenizer_dir):
        raise ValueError(f"{tokenizer_dir}: no tokenizer here (no tokenizer.json, tokenizer_config.json or spiece.model)")
    tokenizer = load_tokenizer(tokenizer_dir, model_type="t5")
    model = _build(lambda: T5EncoderModel(config), weights, dtype, device, str(where))
    model.set_input_embeddings(model.shared)  # the encoder reads the shared table; keep them one tensor
    return model, tokenizer, _t5_info(layout, where, config, model.dtype)


# ---- LLM -------------------------------------------------------------------------------------------------

# transformers renamed from_pretrained's `torch_dtype` to `dtype` in 4.56 and warns about the old name since
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _find_llm(path: Path) -> tuple[Path, dict, _Weights]:
    if path.is_file():
        raise ValueError(f"{path}: an LLM must be a transformers folder (config.json, tokenizer, *.safetensors), "
                         f"not a single file")
    for folder in (path / "llm", path):
        if (folder / "config.json").is_file():
            # refuses pickle-only folders and truncated weights before transformers looks at them
            weights = _Weights.read(_weight_files(folder))
            return folder, read_json(folder / "config.json"), weights
    raise ValueError(f"{path}: not an LLM folder: expected a transformers folder with config.json (or a Mimir "
                     f"pipeline folder with llm/)")


def _warn_unknown_llm_fields(folder: Path, config: dict) -> None:
    model_type = config.get("model_type")
    if model_type in transformers.CONFIG_MAPPING:  # a remote-code model's fields are its code's
        warn_unknown_fields(config, transformers.CONFIG_MAPPING[model_type], folder / "config.json")


def _llm_dims(config: dict) -> dict:
    text = config.get("text_config") or config  # multimodal configs nest the language model's
    return dict(hidden_size=text.get("hidden_size"), num_hidden_layers=text.get("num_hidden_layers"),
                vocab_size=text.get("vocab_size"), model_type=config.get("model_type"))


def load_llm(path, dtype=None, device="cpu", trust_remote_code: bool = False):
    """-> (causal LM, tokenizer, ComponentInfo) from a transformers folder. dtype None keeps the stored dtype."""
    folder, config, _ = _find_llm(_existing(path))
    _warn_unknown_llm_fields(folder, config)
    dtype = resolve_dtype(dtype)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)  # fails before the weights load
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), **{_DTYPE_KWARG: dtype or "auto"}, use_safetensors=True, local_files_only=True,
        trust_remote_code=trust_remote_code)
    model = model.to(device).eval()
    info = ComponentInfo("llm", "transformers-folder", None, _llm_dims(config), _dtype_name(model.dtype), str(folder))
    return model, tokenizer, info


# ---- tokenizers ------------------------------------------------------------------------------------------

_SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")
# A tokenizer's vocabulary is in one of these (transformers builds an empty tokenizer from a config alone).
_VOCABULARY_FILES = ("tokenizer.json", "tekken.json", "*.model", "*.tiktoken", "*.spm", "vocab.*", "merges.txt")


def load_tokenizer(folder: Path, model_type: str | None = None, trust_remote_code: bool = False):
    """A folder's tokenizer, or a ValueError naming the folder and the cause. `model_type` ("t5") tells the
    class of a folder that does not name it: the published CogVideoX tokenizer/ may hold only spiece.model."""
    if not any(any(folder.glob(pattern)) for pattern in _VOCABULARY_FILES):
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise ValueError(f"{folder}: the tokenizer cannot be loaded: it has no vocabulary file (tokenizer.json, "
                         f"spiece.model, tokenizer.model, ...); it holds {present}")
    named = any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json", "config.json"))
    hint = {"tokenizer_type": model_type} if model_type and not named else {}
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code,
                                             **hint)
    except Exception as exc:  # transformers' messages name neither the folder nor the file at fault
        raise ValueError(f"{folder}: the tokenizer cannot be loaded: {_tokenizer_fault(folder) or exc}") from exc


def _tokenizer_fault(folder: Path) -> str | None:
    """The broken file of a tokenizer folder (a JSON file, a SentencePiece model), if one is."""
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json"):
        if (folder / name).is_file():
            try:
                read_json(folder / name)
            except ValueError as exc:
                return str(exc)
    for name in _SENTENCEPIECE_FILES:
        if (folder / name).is_file():
            try:
                sentencepiece.SentencePieceProcessor(model_file=str(folder / name))
            except Exception as exc:  # sentencepiece raises RuntimeError or OSError by version
                return f"{folder / name} is not a SentencePiece model ({exc})"
    return None


# ---- fuser -----------------------------------------------------------------------------------------------

def _fuser_info(path: Path, weights: _Weights) -> ComponentInfo:
    config = read_fuser_config(path)
    dims = dict(t5_dim=config.t5_dim, llm_dim=config.llm_dim, text_len=config.text_len,
                stabilizer_tokens=config.stabilizer_tokens, out_len=config.out_len)
    return ComponentInfo("fuser", "mimir-fuser", None, dims, _dtype_name(weights.stored_dtype()), str(path))


def load_token_fuser(path, dtype=None, device="cpu") -> tuple[TokenFuser, ComponentInfo]:
    """-> (TokenFuser, ComponentInfo) from a Mimir fuser file. dtype None keeps the stored dtype."""
    path = _existing(path)
    weights = _single_file(path)
    info = _fuser_info(path, weights)
    fuser = load_fuser(path, device=device, dtype=resolve_dtype(dtype) or weights.stored_dtype())
    return fuser, dataclasses.replace(info, dtype=_dtype_name(next(fuser.parameters()).dtype))


# ---- scheduler -------------------------------------------------------------------------------------------

def load_scheduler(path_or_kind, variant: str = "5b", kind: str | None = None):
    """A scheduler from a folder with scheduler_config.json (or a pipeline root), or "ddim"/"dpm" with the
    settings of the published `variant`. `kind` loads a folder's settings into that scheduler class instead."""
    if isinstance(path_or_kind, str) and path_or_kind.lower() in SCHEDULERS:
        if variant not in SNR_SHIFT_SCALE:
            raise ValueError(f"no published scheduler settings for variant {variant!r}; known: {list(SNR_SHIFT_SCALE)}")
        return SCHEDULERS[path_or_kind.lower()](**SCHEDULER_SETTINGS, snr_shift_scale=SNR_SHIFT_SCALE[variant])
    if not Path(path_or_kind).exists():
        raise FileNotFoundError(f"{path_or_kind}: neither a scheduler kind ({', '.join(SCHEDULERS)}) nor an existing folder")
    classes = {cls.__name__: cls for cls in SCHEDULERS.values()}
    folder, config = _component_folder(Path(path_or_kind), "scheduler", lambda c: True, "scheduler",
                                       config_name="scheduler_config.json")
    if kind is not None:
        if kind.lower() not in SCHEDULERS:
            raise ValueError(f"unknown scheduler kind {kind!r}; expected one of {list(SCHEDULERS)}")
        cls = SCHEDULERS[kind.lower()]
    elif config.get("_class_name") in classes:
        cls = classes[config["_class_name"]]
    else:
        raise ValueError(f"{folder}: scheduler class {config.get('_class_name')!r} is not supported; "
                         f"expected one of {list(classes)}")
    unknown = warn_unknown_fields(config, cls, folder / "scheduler_config.json")
    return cls.from_config({k: v for k, v in config.items() if k not in unknown})  # diffusers would warn again


# ---- pipeline --------------------------------------------------------------------------------------------

def load_pipeline(folder, dtype=None, device="cpu", placement: Placement | None = None, fuser_path=None,
                  llm_path=None, trust_remote_code: bool = False, text_encoders: bool = True,
                  with_fuser: bool = True) -> MimirPipeline:
    """A MimirPipeline from a diffusers CogVideoX folder, plus llm/ and fuser.safetensors when present (or the
    paths given). Without a fuser it is plain CogVideoX; with_fuser=False reads neither the fuser nor the LLM of
    a Mimir folder (T5 only). Models wait on the placement's offload device (default: `device`).
    text_encoders=False skips T5 and the LLM (for prompts already encoded, e.g. cached)."""
    root, fuser_path, llm_folder = pipeline_paths(folder, fuser_path, llm_path, with_fuser)
    placement = placement or Placement(device, device)
    where = placement.offload_device
    fuser = llm = llm_tokenizer = text_encoder = tokenizer = None
    if fuser_path is not None:
        fuser, _ = load_token_fuser(fuser_path, dtype, where)
        if text_encoders:
            llm, llm_tokenizer, _ = load_llm(llm_folder, dtype, where, trust_remote_code=trust_remote_code)
    text_len = fuser.config.out_len if fuser is not None else T5_TEXT_LEN
    transformer, _ = load_transformer(root, dtype, where, text_len=text_len)
    vae, _ = load_vae(root, dtype, where)
    if text_encoders:
        text_encoder, tokenizer, _ = load_t5(root, dtype=dtype, device=where)
    _check_text_dims(fuser, text_encoder, transformer)
    return MimirPipeline(transformer, vae, load_scheduler(root), tokenizer, text_encoder, llm, llm_tokenizer, fuser,
                         placement)


def pipeline_paths(folder, fuser_path=None, llm_path=None,
                   with_fuser: bool = True) -> tuple[Path, Path | None, Path | None]:
    """-> (pipeline root, fuser file or None, LLM folder or None), checked without loading any weights.
    with_fuser=False: the T5-only reading of the folder (no fuser, no LLM)."""
    root = _existing(folder)
    missing = [name for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
               if not (root / name).is_dir()]
    if missing:
        raise ValueError(f"{root}: not a CogVideoX pipeline folder: it lacks {', '.join(s + '/' for s in missing)}")
    if not with_fuser:
        return root, None, None
    fuser_path = _existing(fuser_path) if fuser_path is not None else root / FUSER_FILE
    fuser_path = fuser_path if fuser_path.exists() else None
    return root, fuser_path, _mimir_llm(root, fuser_path, llm_path)


def _mimir_llm(root: Path, fuser_path: Path | None, llm_path) -> Path | None:
    """The LLM folder a fuser needs, checked against the fuser's llm_dim before any weights are read."""
    if fuser_path is None:
        if llm_path is not None:
            raise ValueError(f"an LLM was given ({llm_path}) but there is no fuser: {root / FUSER_FILE} is absent "
                             f"and no fuser_path was given")
        return None
    llm_folder, config, _ = _find_llm(_existing(llm_path) if llm_path is not None else root)
    _single_file(fuser_path)  # names a truncated or corrupt fuser file as such
    fuser_config, dims = read_fuser_config(fuser_path), _llm_dims(config)
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


# ---- single files ----------------------------------------------------------------------------------------

def save_single_file(model, path, vae_scaling_factor: float | None = None) -> None:
    """A ComfyUI-style single file (diffusers / transformers key names) with the config in the safetensors
    metadata, written atomically. For a transformer, `vae_scaling_factor` records the VAE it works with."""
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
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# ---- inspect ---------------------------------------------------------------------------------------------

def inspect(path) -> dict:
    """What a checkpoint file or folder is, read from configs and file headers only (no weights loaded)."""
    path = _existing(path)
    if path.is_file():
        return _inspect_file(path)
    if (path / "model_index.json").is_file() or (path / "transformer").is_dir():
        return _inspect_pipeline(path)
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


def _inspect_file(path: Path) -> dict:
    weights = _single_file(path)
    kind = _single_file_kind(weights)
    if kind == "fuser":
        out = _fuser_info(path, weights).to_dict()
        out["config"] = dataclasses.asdict(read_fuser_config(path))
        return out
    describe = {"transformer": _describe_transformer, "vae": _describe_vae, "t5": _describe_t5}.get(kind)
    if describe is None:
        raise ValueError(f"{path}: not a known checkpoint: keys such as {_few(sorted(weights.shapes), 4)}")
    return describe(path)


def _describe_transformer(path: Path) -> dict:
    layout, where, config, weights, scaling = _find_transformer(path)
    return _transformer_info(layout, where, config, weights.stored_dtype(), scaling).to_dict()


def _describe_vae(path: Path) -> dict:
    layout, where, config, weights = _find_vae(path)
    return _vae_info(layout, where, config, weights.stored_dtype()).to_dict()


def _describe_t5(path: Path) -> dict:
    layout, where, config, weights, tokenizer_dir = _find_t5(path)
    out = _t5_info(layout, where, config, weights.stored_dtype()).to_dict()
    out["tokenizer"] = None if tokenizer_dir is None else str(tokenizer_dir)
    return out


def _describe_llm(path: Path) -> dict:
    folder, config, weights = _find_llm(path)
    _warn_unknown_llm_fields(folder, config)
    dims, dtype = _llm_dims(config), _dtype_name(weights.stored_dtype())
    out = ComponentInfo("llm", "transformers-folder", None, dims, dtype, str(folder))
    return {**out.to_dict(), "tokenizer": str(folder) if _has_tokenizer(folder) else None}


def _describe_scheduler(path: Path) -> dict:
    folder, config = _component_folder(path, "scheduler", lambda c: True, "scheduler", "scheduler_config.json")
    settings = {k: config.get(k) for k in ("prediction_type", "snr_shift_scale", "timestep_spacing",
                                           "rescale_betas_zero_snr")}
    return {"kind": "scheduler", "layout": "diffusers-folder", "path": str(folder),
            "class": config.get("_class_name"), **settings}


def _inspect_pipeline(root: Path) -> dict:
    parts = {"transformer": _describe_transformer, "vae": _describe_vae, "text_encoder": _describe_t5,
             "scheduler": _describe_scheduler}
    components = {name: describe(root / name) for name, describe in parts.items() if (root / name).is_dir()}
    if (root / "llm").is_dir():
        components["llm"] = _describe_llm(root / "llm")
    if (root / FUSER_FILE).is_file():
        components["fuser"] = _inspect_file(root / FUSER_FILE)
    return {"kind": "pipeline", "layout": "diffusers-folder", "path": str(root), "mimir": "fuser" in components,
            "components": components}
