"""Building one component from a folder or a single file: the CogVideoX transformer, the VAE, T5 with its
tokenizer, the LLM, the token fuser and the scheduler, each returned with a ComponentInfo saying what it is.

Layouts: a diffusers CogVideoX folder (a component path may be the pipeline root or the component's own
subfolder), a transformers folder (T5 encoder or causal LM), a ComfyUI-style single file (read by single_file.py),
a Mimir token-fuser file. Weights are read into models built with their parameters on the meta device, so a model
never exists twice in memory; every tensor name and shape is checked first and mismatches are named. A bad config
file or tokenizer is named with its fault before any model is built; a config field the model class does not know
is a warning that names the nearest known field. Never a download, never remote code unless asked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch
import transformers
from accelerate import init_empty_weights
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from packaging.version import Version
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, T5Config, T5EncoderModel

from . import single_file
from .codec import spatial_factor
from .configs import component_folder, full_config, is_class, read_json, warn_unknown_fields
from .fuser import TokenFuser, load_fuser, read_fuser_config
from .variants import SCHEDULER_SETTINGS, SCHEDULERS, SNR_SHIFT_SCALE, VAE_SCALING_FACTORS, match_variant
from .weights import Weights, check_keys, dtype_name, existing, read_file, read_folder, resolve_dtype


@dataclass
class ComponentInfo:
    """What was loaded (or, for `describe`, what is on disk)."""

    kind: str  # "transformer" | "vae" | "t5" | "llm" | "fuser" | "pipeline"
    layout: str  # "diffusers-folder" | "single-file" | "transformers-folder" | "mimir-fuser"
    variant: str | None  # transformer: "2b" | "5b" | "5b-i2v" | "1.5" | "1.5-i2v" | "custom"
    dims: dict
    dtype: str
    path: str
    vae_scaling_factor: float | None = None  # transformer: of the VAE it was trained with; vae: its own
    vae_spatial_factor: int = 8  # transformer: how much smaller than the frames its latents are (CogVideoX: 8)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- building models -------------------------------------------------------------------------------------

def _build(make, weights: Weights, dtype, device, where: str) -> nn.Module:
    # parameters on the meta device (no memory, no init cost), buffers for real: buffers that checkpoints do not
    # hold (CogVideoX's sin-cos positions) are computed at init and must survive loading
    with init_empty_weights(include_buffers=False):
        model = make()
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, weights.shapes, where)
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


# ---- transformer -----------------------------------------------------------------------------------------

def find_transformer(path: Path, pipeline_root: Path | None = None):
    """-> (layout, folder or file, full config, weights, (scaling factor or None, spatial factor) of its VAE).
    `pipeline_root`: the pipeline folder whose VAE a transformer folder goes with, when that is not its parent
    (an arm of a pipeline such as the demo's t5_only/transformer, which shares the demo's VAE)."""
    if path.is_file():
        return "single-file", path, *single_file.read_transformer(path)
    folder, config = transformer_folder(path)
    warn_unknown_fields(config, CogVideoXTransformer3DModel, folder / "config.json")
    config = full_config(CogVideoXTransformer3DModel, config)
    root = transformer_pipeline(folder, pipeline_root)
    vae_config = root / "vae" / "config.json" if root is not None else None
    if vae_config is not None and vae_config.is_file():
        vae = full_config(AutoencoderKLCogVideoX, read_json(vae_config))
        vae = vae["scaling_factor"], spatial_factor(vae)
    else:
        vae = VAE_SCALING_FACTORS.get(match_variant(config)), 8
    return "diffusers-folder", folder, config, read_folder(folder), vae


def transformer_pipeline(folder: Path, pipeline_root: Path | None = None) -> Path | None:
    """The pipeline folder whose VAE and scheduler a transformer folder goes with: `pipeline_root` when given
    (an arm sharing another pipeline's parts), else the folder's parent when it is a pipeline's transformer/."""
    return pipeline_root or (folder.parent if folder.name == "transformer" else None)


def transformer_folder(path: Path) -> tuple[Path, dict]:
    """-> (the diffusers transformer folder at `path`, a pipeline root or the folder itself; its config),
    reading the config only."""
    return component_folder(path, "transformer", is_class("CogVideoXTransformer3DModel"), "CogVideoX transformer")


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


def transformer_info(layout, path, config, dtype, vae: tuple[float | None, int]) -> ComponentInfo:
    dims = dict(inner_dim=config["num_attention_heads"] * config["attention_head_dim"],
                text_embed_dim=config["text_embed_dim"], num_layers=config["num_layers"],
                num_attention_heads=config["num_attention_heads"], attention_head_dim=config["attention_head_dim"],
                in_channels=config["in_channels"], patch_size=config["patch_size"],
                patch_size_t=config["patch_size_t"], max_text_seq_length=config["max_text_seq_length"],
                positional_embeddings=_positions(config))
    scaling, spatial = vae
    return ComponentInfo("transformer", layout, match_variant(config), dims, dtype_name(dtype), str(path),
                         None if scaling is None else float(scaling), spatial)


def load_transformer(path, dtype=None, device="cpu", text_len: int | None = None, pipeline_root=None):
    """-> (CogVideoXTransformer3DModel, ComponentInfo). `text_len`: the number of text tokens the model will see
    (T5 length + stabilizer tokens, e.g. 226 + 4); sin-cos (2B-style) models have their text positions sized to it.
    dtype None keeps the stored dtype (float8 storage computes in bfloat16). `pipeline_root`: as find_transformer."""
    root = existing(pipeline_root) if pipeline_root is not None else None
    layout, where, config, weights, vae = find_transformer(existing(path), root)
    config = _with_text_len(config, text_len, where)
    model = _build(lambda: CogVideoXTransformer3DModel.from_config(config), weights, dtype, device, str(where))
    return model, transformer_info(layout, where, config, model.dtype, vae)


# ---- VAE -------------------------------------------------------------------------------------------------

def find_vae(path: Path):
    """-> (layout, folder or file, full config, weights)."""
    if path.is_file():
        return "single-file", path, *single_file.read_vae(path)
    folder, config = component_folder(path, "vae", is_class("AutoencoderKLCogVideoX"), "CogVideoX VAE")
    warn_unknown_fields(config, AutoencoderKLCogVideoX, folder / "config.json")
    return "diffusers-folder", folder, full_config(AutoencoderKLCogVideoX, config), read_folder(folder)


def vae_info(layout, path, config, dtype) -> ComponentInfo:
    dims = dict(latent_channels=config["latent_channels"], block_out_channels=list(config["block_out_channels"]),
                layers_per_block=config["layers_per_block"],
                temporal_compression_ratio=config["temporal_compression_ratio"])
    scaling = config["scaling_factor"]
    return ComponentInfo("vae", layout, None, dims, dtype_name(dtype), str(path),
                         None if scaling is None else float(scaling))


def load_vae(path, dtype=None, device="cpu", scaling_factor: float | None = None):
    """-> (AutoencoderKLCogVideoX, ComponentInfo). A single file without config metadata is read as the CogVideoX
    VAE, whose scaling factor the weights do not tell (2B 1.15258426, 5B/1.5 0.7): pass `scaling_factor` (the
    transformer's ComponentInfo.vae_scaling_factor), else diffusers' default 1.15258426 is used."""
    layout, where, config, weights = find_vae(existing(path))
    if config["norm_num_groups"] is None:
        raise ValueError(f"{where}: a CogVideoX VAE of other size than the published one (block_out_channels "
                         f"{list(config['block_out_channels'])}, latent_channels {config['latent_channels']}): its "
                         f"norm groups and temporal compression are not in its weights, so this file alone cannot "
                         f"build it. Load its diffusers folder (config.json beside the weights), or a file written "
                         f"by mimir's save_single_file, which carries its config")
    if scaling_factor is not None:
        config = {**config, "scaling_factor": float(scaling_factor)}
    model = _build(lambda: AutoencoderKLCogVideoX.from_config(config), weights, dtype, device, str(where))
    return model, vae_info(layout, where, config, model.dtype)


# ---- T5 --------------------------------------------------------------------------------------------------

def find_t5(path: Path):
    """-> (layout, folder or file, T5Config, weights, tokenizer folder or None)."""
    if path.is_file():
        return "single-file", path, *single_file.read_t5(path), None
    folder, config = component_folder(path, "text_encoder", lambda c: c.get("model_type") == "t5", "T5 encoder")
    warn_unknown_fields(config, T5Config, folder / "config.json")
    tokenizer_dir = next((d for d in (folder.parent / "tokenizer", folder) if has_tokenizer(d)), None)
    return "transformers-folder", folder, T5Config.from_dict(config), \
        single_file.t5_weights(read_folder(folder)), tokenizer_dir


def t5_info(layout, path, config: T5Config, dtype) -> ComponentInfo:
    dims = dict(d_model=config.d_model, num_layers=config.num_layers, num_heads=config.num_heads, d_ff=config.d_ff,
                vocab_size=config.vocab_size)
    return ComponentInfo("t5", layout, None, dims, dtype_name(dtype), str(path))


def load_t5(path, tokenizer_path=None, dtype=None, device="cpu"):
    """-> (T5EncoderModel, tokenizer, ComponentInfo). A single file holds no tokenizer: pass `tokenizer_path`."""
    layout, where, config, weights, tokenizer_dir = find_t5(existing(path))
    tokenizer_dir = existing(tokenizer_path) if tokenizer_path is not None else tokenizer_dir
    if tokenizer_dir is None:
        raise ValueError(f"{where}: no T5 tokenizer found beside it: pass tokenizer_path (a tokenizer folder)")
    if not has_tokenizer(tokenizer_dir):
        raise ValueError(f"{tokenizer_dir}: no tokenizer here (no tokenizer.json, tokenizer_config.json or spiece.model)")
    tokenizer = load_tokenizer(tokenizer_dir, model_type="t5")
    model = _build(lambda: T5EncoderModel(config), weights, dtype, device, str(where))
    model.set_input_embeddings(model.shared)  # the encoder reads the shared table; keep them one tensor
    return model, tokenizer, t5_info(layout, where, config, model.dtype)


# ---- LLM -------------------------------------------------------------------------------------------------

# transformers renamed from_pretrained's `torch_dtype` to `dtype` in 4.56 and warns about the old name since
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def find_llm(path: Path) -> tuple[Path, dict, Weights]:
    """-> (transformers folder, its config, its weights), given that folder or a Mimir pipeline root."""
    if path.is_file():
        raise ValueError(f"{path}: an LLM must be a transformers folder (config.json, tokenizer, *.safetensors), "
                         f"not a single file")
    for folder in (path / "llm", path):
        if (folder / "config.json").is_file():
            # refuses pickle-only folders and truncated weights before transformers looks at them
            weights = read_folder(folder)
            return folder, read_json(folder / "config.json"), weights
    raise ValueError(f"{path}: not an LLM folder: expected a transformers folder with config.json (or a Mimir "
                     f"pipeline folder with llm/)")


def warn_unknown_llm_fields(folder: Path, config: dict) -> None:
    model_type = config.get("model_type")
    if model_type in transformers.CONFIG_MAPPING:  # a remote-code model's fields are its code's
        warn_unknown_fields(config, transformers.CONFIG_MAPPING[model_type], folder / "config.json")


def llm_dims(config: dict) -> dict:
    text = config.get("text_config") or config  # multimodal configs nest the language model's
    return dict(hidden_size=text.get("hidden_size"), num_hidden_layers=text.get("num_hidden_layers"),
                vocab_size=text.get("vocab_size"), model_type=config.get("model_type"))


def load_llm(path, dtype=None, device="cpu", trust_remote_code: bool = False):
    """-> (causal LM, tokenizer, ComponentInfo) from a transformers folder. dtype None keeps the stored dtype."""
    folder, config, _ = find_llm(existing(path))
    warn_unknown_llm_fields(folder, config)
    dtype = resolve_dtype(dtype)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)  # fails before the weights load
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), **{_DTYPE_KWARG: dtype or "auto"}, use_safetensors=True, local_files_only=True,
        trust_remote_code=trust_remote_code)
    model = model.to(device).eval()
    info = ComponentInfo("llm", "transformers-folder", None, llm_dims(config), dtype_name(model.dtype), str(folder))
    return model, tokenizer, info


# ---- tokenizers ------------------------------------------------------------------------------------------

_SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")
# A tokenizer's vocabulary is in one of these (transformers builds an empty tokenizer from a config alone).
_VOCABULARY_FILES = ("tokenizer.json", "tekken.json", "*.model", "*.tiktoken", "*.spm", "vocab.*", "merges.txt")


def has_tokenizer(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", *_SENTENCEPIECE_FILES)
    return any((folder / name).is_file() for name in names)


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

def fuser_info(path: Path, weights: Weights) -> ComponentInfo:
    config = read_fuser_config(path)
    dims = dict(t5_dim=config.t5_dim, llm_dim=config.llm_dim, text_len=config.text_len,
                stabilizer_tokens=config.stabilizer_tokens, out_len=config.out_len)
    return ComponentInfo("fuser", "mimir-fuser", None, dims, dtype_name(weights.stored_dtype()), str(path))


def load_token_fuser(path, dtype=None, device="cpu") -> tuple[TokenFuser, ComponentInfo]:
    """-> (TokenFuser, ComponentInfo) from a Mimir fuser file. dtype None keeps the stored dtype."""
    path = existing(path)
    weights = read_file(path)
    info = fuser_info(path, weights)
    fuser = load_fuser(path, device=device, dtype=resolve_dtype(dtype) or weights.stored_dtype())
    return fuser, dataclasses.replace(info, dtype=dtype_name(next(fuser.parameters()).dtype))


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
    folder, config = component_folder(Path(path_or_kind), "scheduler", lambda c: True, "scheduler",
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
