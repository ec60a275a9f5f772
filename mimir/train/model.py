"""The models of a training run: loading them, what trains (fuser, DiT fully / LoRA / not), the optimizer.

Everything loads through mimir.loading (or mimir.testing for the `tiny` models), so a trained model is the
same object the pipeline runs. The fuser and the DiT are wrapped into one `Denoiser` module: the text stream is
fused inside its forward, so the fuser trains end-to-end and accelerate (DDP, FSDP, DeepSpeed) sees one model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..components import load_scheduler, load_token_fuser, load_transformer, load_vae
from ..describe import describe
from ..fuser import FuserConfig, TokenFuser, save_fuser
from ..loading import load_pipeline
from ..testing import tiny_components
from ..variants import FUSER_FILE
from .config import TrainConfig
from .data import pixels_to_vae_input

FRESH_FUSER = "fuser-init.safetensors"  # a fresh fuser, written where its run or cache lives
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weight_dtype(config: TrainConfig) -> torch.dtype:
    """Frozen weights are stored in the autocast dtype; trained weights stay float32 (the optimizer's copy)."""
    return WEIGHT_DTYPES[config.mixed_precision]


def fuser_file(config: TrainConfig, fresh_dir) -> Path | None:
    """The fuser file a run starts from: `fuser`, else the model folder's own, else a fresh one in `fresh_dir`."""
    if config.fuser:
        return Path(config.fuser)
    own = Path(config.model) / FUSER_FILE
    if own.is_file():
        return own
    fresh = Path(fresh_dir) / FRESH_FUSER
    return fresh if fresh.is_file() else None


def write_fresh_fuser(config: TrainConfig, folder) -> Path:
    """A new fuser (zero-convs at zero, e_l ~ N(0, 0.02) from `seed`; the spec's default settings) for a plain
    CogVideoX + an LLM, its dims read from their configs."""
    if not config.llm:
        raise ValueError(f"{config.model} has no {FUSER_FILE}: give fuser= (a fuser file) or llm= (an LLM folder, "
                         f"to start a fresh fuser)")
    t5_dim = describe(config.model)["components"]["text_encoder"]["dims"]["d_model"]
    fuser_config = FuserConfig(t5_dim=t5_dim, llm_dim=describe(config.llm)["dims"]["hidden_size"])
    torch.manual_seed(config.seed)
    path = Path(folder) / FRESH_FUSER
    path.parent.mkdir(parents=True, exist_ok=True)
    save_fuser(TokenFuser(fuser_config), path)
    return path


def load_components(config: TrainConfig, fuser_path: Path | None, encoders: bool = True, vae: bool = True) -> dict:
    """MimirPipeline keyword arguments. Without `encoders` (training from a cache) no T5 or LLM is loaded,
    without `vae` no VAE: a cached run needs neither in memory."""
    dtype = weight_dtype(config)
    if config.model.startswith("tiny"):
        parts = tiny_components(variant=config.model.partition(":")[2] or "2b")
        if fuser_path is not None:
            parts["fuser"] = load_token_fuser(fuser_path, dtype=torch.float32)[0]
    elif encoders:
        pipe = load_pipeline(config.model, dtype=dtype, fuser_path=fuser_path, llm_path=config.llm)
        parts = {name: getattr(pipe, name) for name in ("transformer", "vae", "scheduler", "tokenizer",
                                                        "text_encoder", "llm", "llm_tokenizer", "fuser")}
    else:
        fuser = load_token_fuser(fuser_path, dtype=torch.float32)[0]
        parts = dict(fuser=fuser, scheduler=load_scheduler(config.model),
                     transformer=load_transformer(config.model, dtype, text_len=fuser.config.out_len)[0],
                     vae=load_vae(config.model, dtype)[0] if vae else None)
    if parts.get("fuser") is None:
        raise ValueError(f"{config.model}: no token fuser to train (give fuser= or llm=)")
    if not encoders:
        parts.update(tokenizer=None, text_encoder=None, llm=None, llm_tokenizer=None)
    if not vae:
        parts["vae"] = None
    return parts


class Denoiser(nn.Module):
    """Fuser + DiT: (text features, noisy latents, timesteps) -> the transformer's prediction (v)."""

    def __init__(self, fuser: TokenFuser, transformer):
        super().__init__()
        self.fuser, self.transformer = fuser, transformer

    def forward(self, t5, llm, llm_mask, instructions, noisy, timesteps, rotary=None):
        text = self.fuser(t5, llm, llm_mask, instructions)
        return self.transformer(hidden_states=noisy, encoder_hidden_states=text.to(noisy.dtype), timestep=timesteps,
                                image_rotary_emb=rotary, return_dict=False)[0]



def setup_trainable(denoiser: Denoiser, config: TrainConfig) -> None:
    """Fuser always trains; the DiT fully, through LoRA on its attention projections, or not at all. Frozen
    weights take the autocast dtype; trained ones are float32."""
    fuser, transformer = denoiser.fuser, denoiser.transformer
    denoiser.requires_grad_(False)
    cast(fuser, torch.float32).requires_grad_(True)
    if config.dit == "full":
        cast(transformer, torch.float32).requires_grad_(True)
    else:
        cast(transformer, weight_dtype(config))
    if config.dit == "lora":
        from peft import LoraConfig

        transformer.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, init_lora_weights=True,
                                           target_modules=list(config.lora_targets)))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if config.gradient_checkpointing:  # the fuser's gradient flows through the DiT even when it is frozen
        transformer.enable_gradient_checkpointing()
    denoiser.train()


def cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast only when needed (diffusers warns on every dtype cast)."""
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module.to(dtype)
    return module


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def make_optimizer(denoiser: Denoiser, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the fuser in its own groups (fuser_lr); no weight decay on biases, scales and norms."""
    fuser_lr = config.lr if config.fuser_lr is None else config.fuser_lr
    groups = []
    for module, lr in ((denoiser.fuser, fuser_lr), (denoiser.transformer, config.lr)):
        params = trainable_parameters(module)
        groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": config.weight_decay})
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    kwargs = dict(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    if use_8bit_adam(config):
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def use_8bit_adam(config: TrainConfig) -> bool:
    have = importlib.util.find_spec("bitsandbytes") is not None
    if config.optimizer == "adamw8bit" and not have:
        raise ValueError("optimizer=adamw8bit needs the bitsandbytes package (pip install bitsandbytes)")
    return config.optimizer == "adamw8bit" or (config.optimizer == "auto" and have and torch.cuda.is_available()
                                               and config.device != "cpu")


class LRSchedule:
    """Linear warm-up, then constant or cosine decay to zero at max_steps (a multiplier of each group's lr)."""

    def __init__(self, warmup: int, total: int, kind: str):
        self.warmup, self.total, self.kind = warmup, total, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * min(1.0, progress))).item())


def merged_transformer(transformer, config: TrainConfig):
    """The DiT to export: LoRA weights folded into the base weights (in place: called once, at the end)."""
    if config.dit == "lora":
        transformer.fuse_lora()
        transformer.unload_lora()
    return transformer


def describe_trainable(denoiser: Denoiser) -> dict:
    count = lambda m: sum(p.numel() for p in trainable_parameters(m))
    return {"fuser": count(denoiser.fuser), "dit": count(denoiser.transformer)}


@torch.no_grad()
def encode_latent_params(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 clips [B, F, H, W, 3] -> the VAE's latent distribution [B, 2C, T, h, w] (mean, logvar), float32.
    The sample is drawn later with each clip's own generator, so a cache holds the distribution, not a draw."""
    with pipe.placement.stage(pipe.vae) as device:
        x = pixels_to_vae_input(pixels).to(device=device, dtype=next(pipe.vae.parameters()).dtype)
        return pipe.vae.encode(x).latent_dist.parameters.float()
