"""TrainConfig: every setting of a training (or caching) run, read from YAML/JSON and `key=value` overrides.

A config is checked completely when it is built, so a typo or an impossible value is refused before any model
is loaded or any file written. The resolved config is saved with each run (`config.yaml`) and each checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..loading import DEMO_MODEL_DIR
from ..sampler import check_video_size

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections of every CogVideoX block


@dataclass
class TrainConfig:
    # ---- what is trained -------------------------------------------------------------------------------
    model: str = ""  # Mimir/CogVideoX diffusers folder, or "demo" (the bundled demo model); unset only from
    # Python, with the models passed in as `components`
    llm: str | None = None  # transformers folder of the LLM, when `model` holds none
    fuser: str | None = None  # fuser .safetensors to start from; default: the model's own, else a fresh one
    dit: str = "full"  # how the DiT trains: full | lora | frozen (fuser-only warm-up)
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # ---- data ------------------------------------------------------------------------------------------
    data: str | None = None  # folder of videos + same-name .txt captions, or a .csv / .jsonl of (video, caption)
    cache: str | None = None  # feature cache folder: written by `mimir cache`, read by `mimir train`
    num_frames: int = 49  # 8k+1
    height: int = 480  # multiple of 16
    width: int = 720  # multiple of 16
    frame_stride: int = 1  # read every n-th frame
    text_dropout: float = 0.1  # probability that a caption is replaced by "" (for classifier-free guidance)
    # probability that a kept caption's T5 features alone are the empty prompt's, its LLM features kept: each
    # encoder dropped on its own, as SD3 trains its three, so the DiT learns to read the LLM branch by itself
    t5_dropout: float = 0.0
    num_workers: int = 2  # data loader processes
    cache_shard_size: int = 64  # clips per cache shard (the unit of resumption)
    # ---- optimisation ----------------------------------------------------------------------------------
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 1  # clips per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-5  # DiT learning rate
    fuser_lr: float | None = None  # fuser learning rate; None: same as lr
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4  # on matrices only, not on biases, scales or norms
    optimizer: str = "auto"  # auto (8-bit AdamW with bitsandbytes on CUDA, not under DeepSpeed) | adamw | adamw8bit
    max_grad_norm: float = 1.0  # 0 disables clipping
    nonfinite: str = "stop"  # a step whose loss or gradient norm is nan/inf: stop (saving nothing of it) | skip
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # constant | cosine (to zero at max_steps), both after a linear warm-up
    mixed_precision: str = "no"  # no | bf16 | fp16; frozen weights are stored in this dtype too
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # EMA of the trained weights; 0 disables, 0.9999 typical
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    offload: bool = False  # frozen encoders wait on the CPU between their stages
    # ---- run, logs, checkpoints, export ----------------------------------------------------------------
    output_dir: str = "runs/mimir"
    resume: str | None = None  # "latest" or a checkpoint folder
    log_every: int = 1  # steps between metric rows
    tensorboard: bool = True
    checkpoint_every: int = 500  # steps; 0: only at the end
    keep_checkpoints: int = 3
    validate_every: int = 0  # steps; 0 disables validation videos
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 25
    validation_guidance: float = 6.0
    validation_fps: int = 8
    collective_timeout: int = 1800  # s a process waits for the others; validation stops denoising after half of it
    export: bool = True  # write fuser + DiT (single file and diffusers folder) at the end
    export_dtype: str = "source"  # source (the dtype of the files they started from) | fp32 | bf16 | fp16

    def __post_init__(self):
        _check_finite(self)
        check_video_size(self.num_frames, self.height, self.width)
        _choose("dit", self.dit, ("full", "lora", "frozen"))
        _choose("optimizer", self.optimizer, ("auto", "adamw", "adamw8bit"))
        _choose("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _choose("mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _choose("device", self.device, ("auto", "cpu", "cuda"))
        _choose("nonfinite", self.nonfinite, ("stop", "skip"))
        _choose("export_dtype", self.export_dtype, ("source", "fp32", "bf16", "fp16"))
        for name in ("max_steps", "batch_size", "grad_accum", "frame_stride", "keep_checkpoints", "lora_rank",
                     "cache_shard_size", "validation_steps", "validation_fps", "log_every", "collective_timeout"):
            _at_least(name, getattr(self, name), 1)
        for name in ("num_workers", "warmup_steps", "checkpoint_every", "validate_every", "weight_decay",
                     "max_grad_norm"):
            _at_least(name, getattr(self, name), 0)
        if self.lr <= 0 or (self.fuser_lr is not None and self.fuser_lr < 0):
            raise ValueError(f"lr must be > 0 and fuser_lr >= 0, got lr={self.lr}, fuser_lr={self.fuser_lr}")
        for name in ("text_dropout", "t5_dropout", "ema_decay", "adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not self.lora_targets:
            raise ValueError("lora_targets must name at least one module (e.g. to_q)")
        if self.validate_every and not self.validation_prompts:
            raise ValueError("validate_every is set but validation_prompts is empty")
        if self.model == "demo":
            self.model = str(DEMO_MODEL_DIR)

    @property
    def trains_dit(self) -> bool:
        return self.dit != "frozen"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


def _choose(name: str, value, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}; got {value!r}")


def _check_finite(config: TrainConfig) -> None:
    """nan passes every comparison test (nan <= 0 is False): refuse nan and inf in any float field first."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


def _at_least(name: str, value, low) -> None:
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _field_types() -> dict[str, type]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value, kind):
    """Turn a YAML/JSON or command-line value into the field's type, or say what was expected."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [value]
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, v, args[0]) for v in value]
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}") from None


def parse_overrides(items: list[str]) -> dict[str, str]:
    """["lr=1e-4", "dit=lora"] -> {"lr": "1e-4", "dit": "lora"}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        out[key.strip()] = value
    return out


def read_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    text = path.read_text()
    data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of field: value, got {type(data).__name__}")
    return data


def make_config(values: dict) -> TrainConfig:
    """Build a TrainConfig from raw values (any field missing takes its default); refuse unknown fields."""
    kinds = _field_types()
    unknown = [k for k in values if k not in kinds]
    if unknown:
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, kinds, 1)) else repr(k)
                 for k in unknown]
        raise ValueError(f"unknown config field(s) {', '.join(hints)}; known fields: {', '.join(kinds)}")
    return TrainConfig(**{k: _coerce(k, v, kinds[k]) for k, v in values.items()})


def load_config(path=None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Config file (YAML or JSON; optional) + overrides ("key=value" strings or a dict) -> checked TrainConfig."""
    values = read_config_file(path) if path else {}
    extra = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    return make_config({**values, **extra})
