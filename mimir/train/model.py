"""The models of a training run: loading them, what trains (fuser, DiT fully / LoRA / not), the optimizer.

Everything loads through mimir.loading (or comes from the caller as `components`), so a trained model is the
same object the pipeline runs. The fuser and the DiT are wrapped into one `Denoiser` module: the text stream is
fused inside its forward, so the fuser trains end-to-end and accelerate (DDP, FSDP, DeepSpeed) sees one model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..components import load_llm, load_scheduler, load_t5, load_token_fuser, load_transformer, load_vae
from ..describe import describe
from ..fuser import FuserConfig, TokenFuser, save_fuser
from ..loading import load_pipeline
from ..offload import Placement
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
    own = Path(config.model) / FUSER_FILE if config.model else None
    if own is not None and own.is_file():
        return own
    fresh = Path(fresh_dir) / FRESH_FUSER
    return fresh if fresh.is_file() else None


def require_model(config: TrainConfig) -> None:
    """Without `components` the models come from `model`, which must then be set."""
    if not config.model:
        raise ValueError("model is not set: give a Mimir/CogVideoX folder (or model=demo), or pass the models "
                         "from Python as components")


def starting_fuser(config: TrainConfig, state, fresh_dir, write_dir=None) -> Path:
    """The fuser file a run or a cache starts from (fuser_file); for a plain CogVideoX a fresh one, written once
    into `write_dir` (default `fresh_dir`) by the main process while the others wait. `state`: the Accelerator
    or PartialState."""
    require_model(config)
    found = fuser_file(config, fresh_dir)
    if found is None:
        write_dir = fresh_dir if write_dir is None else write_dir
        if state.is_main_process:
            write_fresh_fuser(config, write_dir)
        state.wait_for_everyone()
        found = fuser_file(config, write_dir)
    return found


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


def load_components(config: TrainConfig, fuser_path: Path | None, encoders: bool = True, vae: bool = True,
                    dit: bool = True) -> dict:
    """MimirPipeline keyword arguments. Without `encoders` (training from a cache) no T5 or LLM is loaded,
    without `vae` no VAE, without `dit` no DiT (caching needs none)."""
    dtype = weight_dtype(config)
    require_model(config)
    if encoders and dit:
        pipe = load_pipeline(config.model, dtype=dtype, fuser_path=fuser_path, llm_path=config.llm)
        parts = {name: getattr(pipe, name) for name in ("transformer", "vae", "scheduler", "tokenizer",
                                                        "text_encoder", "llm", "llm_tokenizer", "fuser")}
    else:
        fuser = load_token_fuser(fuser_path, dtype=torch.float32)[0]
        parts = dict(fuser=fuser, scheduler=load_scheduler(config.model),
                     transformer=load_transformer(config.model, dtype, text_len=fuser.config.out_len)[0] if dit else None,
                     vae=load_vae(config.model, dtype)[0] if vae else None)
        if encoders:
            parts.update(load_text_encoders(config))
    if parts.get("fuser") is None:
        raise ValueError(f"{config.model}: no token fuser to train (give fuser= or llm=)")
    if not encoders:
        parts.update(tokenizer=None, text_encoder=None, llm=None, llm_tokenizer=None)
    if not vae:
        parts["vae"] = None
    if not dit:
        parts["transformer"] = None
    return parts


def load_text_encoders(config: TrainConfig) -> dict:
    """T5 and the LLM with their tokenizers (MimirPipeline keyword arguments) of `config.model` (`config.llm`
    when given), in the autocast dtype, on the CPU."""
    text_encoder, tokenizer, _ = load_t5(config.model, dtype=weight_dtype(config))
    llm, llm_tokenizer, _ = load_llm(config.llm or config.model, weight_dtype(config))
    return dict(text_encoder=text_encoder, tokenizer=tokenizer, llm=llm, llm_tokenizer=llm_tokenizer)


def frozen_placement(parts: dict, config: TrainConfig, device) -> Placement:
    """Frozen encoders (T5, LLM, VAE) take the autocast dtype and wait on `device`, where their stages run, or
    on the CPU with `offload` (each stage then moves its model in and out). -> the pipeline's placement."""
    placement = Placement(device, "cpu" if config.offload else device)
    for name in ("text_encoder", "llm", "vae"):
        if parts.get(name) is not None:
            cast(parts[name], weight_dtype(config)).to(placement.offload_device).requires_grad_(False)
    return placement


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


def fsdp_wrap_policy(denoiser: Denoiser, config: TrainConfig, block_names):
    """FSDP (v1) flattens each wrapped unit into one tensor of one dtype, so no unit may hold both frozen weights
    (autocast dtype) and trained ones (fp32): one unit per DiT block (`block_names`, the accelerate config's), one
    for the fuser, and under LoRA one per adapter layer. The root unit keeps the DiT's embeddings and output
    layers, which train (full) or stay frozen (lora, frozen) with the rest of the DiT."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    blocks = set(block_names)
    adapters = {id(m) for m in denoiser.transformer.modules() if config.dit == "lora" and not list(m.children())
                and any(p.requires_grad for p in m.parameters())}
    return CustomPolicy(lambda m: isinstance(m, TokenFuser) or type(m).__name__ in blocks or id(m) in adapters)


def cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast only when needed (diffusers warns on every dtype cast)."""
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module.to(dtype)
    return module


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def make_optimizer(denoiser: Denoiser, config: TrainConfig, deepspeed: bool = False) -> torch.optim.Optimizer:
    """AdamW with the fuser in its own groups (fuser_lr); no weight decay on biases, scales and norms. Each
    group is tagged with `name` ("fuser" / "dit") and `decay`, the keys of group_settings."""
    groups = []
    for name, module in (("fuser", denoiser.fuser), ("dit", denoiser.transformer)):
        params = trainable_parameters(module)
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "name": name, "decay": decay, **group_settings(config, name, decay)})
    if use_8bit_adam(config, deepspeed):
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups)
    return torch.optim.AdamW(groups)


def group_settings(config: TrainConfig, name: str, decay: bool) -> dict:
    """The settings of the optimizer's group `name` that come from the config (set again on resume: a
    checkpoint restores the settings of the run that saved it)."""
    lr = config.lr if name == "dit" or config.fuser_lr is None else config.fuser_lr
    return {"lr": lr, "weight_decay": config.weight_decay if decay else 0.0,
            "betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_eps}


def use_8bit_adam(config: TrainConfig, deepspeed: bool = False) -> bool:
    """optimizer=auto: 8-bit AdamW when bitsandbytes and CUDA are there, but not under DeepSpeed: ZeRO steps a
    flat fp32 copy of the weights and is tested with torch's and its own optimizers only (accelerate lets any
    torch optimizer through by setting zero_allow_untested_optimizer)."""
    have = importlib.util.find_spec("bitsandbytes") is not None
    if config.optimizer == "adamw8bit" and deepspeed:
        raise ValueError("optimizer=adamw8bit is not used under DeepSpeed (ZeRO steps its fp32 shards with the "
                         "optimizers it has tested): use optimizer=adamw or auto")
    if config.optimizer == "adamw8bit" and not have:
        raise ValueError("optimizer=adamw8bit needs the bitsandbytes package (pip install bitsandbytes)")
    return config.optimizer == "adamw8bit" or (config.optimizer == "auto" and have and torch.cuda.is_available()
                                               and config.device != "cpu" and not deepspeed)


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
