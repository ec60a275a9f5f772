"""The training loop: end-to-end Mimir training of the token fuser and the DiT, one CPU to many GPUs.

Objective (CogVideoX's own, with the inference scheduler object): for a clip's latents x0 (VAE sample times
the VAE scaling factor, diffusers order [B, T, C, h, w]) draw t uniform in [0, 1000) and noise e, then
    x_t = scheduler.add_noise(x0, e, t),   v = scheduler.get_velocity(x0, e, t),
    loss = MSE(DiT(x_t, t, fuser(features)), v).
CogVideoX's finetune scripts write the loss in x0 space weighted by 1/(1 - alpha_bar_t); since
x0_pred - x0 = -sqrt(1 - alpha_bar_t) (v_pred - v), that is exactly this plain MSE on v.

Every random draw of a sample (text dropout, t, the VAE sample, the noise) comes from a generator seeded by
(seed, sample position), and positions are dealt out by data.GlobalOrder; so the trajectory does not depend on
the number of processes (for the same global batch) or on where a run was stopped and resumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object, set_seed
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..encoder import PromptEncoder
from ..offload import Placement
from ..pipeline import MimirPipeline
from ..sampler import fit_text_positions, rotary_embeddings
from ..video import write_video
from .cache import (
    CachedDataset,
    add_prompts,
    cached_prompts,
    check_meta,
    check_same_encoders,
    describe_cache,
    stack_features,
)
from .checkpoint import (
    check_resume_point,
    list_checkpoints,
    load_checkpoint,
    register_weight_hooks,
    remove_partial,
    resolve_resume,
    save_checkpoint,
)
from .config import TrainConfig
from .data import GlobalOrder, VideoDataset, collate, read_clips
from .export import export_model
from .metrics import Metrics, read_metrics
from .model import (
    Denoiser,
    LRSchedule,
    describe_trainable,
    encode_latent_params,
    frozen_placement,
    fsdp_wrap_policy,
    group_settings,
    load_components,
    load_text_encoders,
    make_optimizer,
    setup_trainable,
    starting_fuser,
    trainable_parameters,
    use_8bit_adam,
)
from .storage import RunFailed, reported_write, write_text

logger = logging.getLogger(__name__)
EXPORT_INFO = "export.json"  # in export/: the step the export was written at and its files
DIT_BLOCK = "CogVideoXBlock"  # FSDP's unit when the accelerate config names none
SCHEDULE_FIELDS = ("lr", "fuser_lr", "warmup_steps", "max_steps", "lr_schedule", "weight_decay", "adam_beta1",
                   "adam_beta2", "adam_eps")  # what a resumed run takes from its own config, not the checkpoint
StepHook = Callable[[int, float], None]  # (step done, loss) after each optimizer step; may raise to stop


@dataclass
class Run:
    """What one training run holds between steps."""

    config: TrainConfig
    accelerator: Accelerator
    pipe: MimirPipeline  # frozen encoders + the live fuser and DiT
    dataset: object  # VideoDataset or CachedDataset
    model: torch.nn.Module  # the prepared Denoiser (DDP / DeepSpeed / FSDP wrapped)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR  # of an LRSchedule
    params: list  # trained parameters (of the unwrapped modules)
    ema: EMAModel | None
    scaling: float  # VAE scaling factor
    empty_row: dict | None  # the empty prompt's cached features
    prompts: object  # features of "" + validation prompts
    skipped: dict  # videos skipped so far {path: reason}
    trainable: dict
    fuser_source: Path | None  # the fuser file the run started from (None: the components' own)
    start_step: int = 0
    checkpoint: Path | None = None  # the newest checkpoint: the one resumed from, then each one written
    skipped_steps: list[int] = field(default_factory=list)  # steps not applied: non-finite loss or gradient norm


def train(config: TrainConfig, components: dict | None = None, on_step: StepHook | None = None,
          progress: bool = True) -> dict:
    """Train (or resume) the run in `config.output_dir`. `components`: MimirPipeline keyword arguments to use
    instead of loading `config.model`. A resumed run already at max_steps only completes what its killed session
    left out (the export, the summary). -> run summary (also written to summary.json)."""
    started = time.perf_counter()
    run = setup(config, components)
    run_dir, main = Path(config.output_dir), run.accelerator.is_main_process
    batches = iter(data_loader(run))
    metrics = Metrics(run_dir, run.start_step, main, config.tensorboard)
    bar = tqdm(total=config.max_steps, initial=run.start_step, desc="training", unit="step",
               disable=not (progress and main))
    losses, loop_start = [], time.perf_counter()
    for step in range(run.start_step, config.max_steps):
        rates = used_rates(run.optimizer)  # before the step moves the schedule on
        loss, grad_norm, applied = optimizer_step(run, batches)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}", lr=f"{rates.get('dit', rates['fuser']):.3g}")
        if done % config.log_every == 0 or done == config.max_steps or not applied:
            metrics.log(done, {"loss": loss, "lr": rates.get("dit"), "fuser_lr": rates["fuser"],
                               "grad_norm": grad_norm, "seconds": time.perf_counter() - started})
        if applied:
            losses.append((done, loss))
        else:
            skip_or_stop(run, done, loss, grad_norm)
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.max_steps:
            run.skipped = all_skipped(run.accelerator, run.skipped)
            run.checkpoint = save_checkpoint(run.accelerator, run_dir, done, run_state(run, done),
                                             config.keep_checkpoints)
            metrics.plot()
        if config.validate_every and done % config.validate_every == 0:
            validate(run, done)
        if on_step is not None:
            on_step(done, loss)
    bar.close()
    del batches  # stops the loader's worker processes
    loop_seconds = time.perf_counter() - loop_start
    exported = export(run) if config.export else None
    metrics.close()
    steps_run = config.max_steps - run.start_step
    if not steps_run:  # a finished run resumed to complete it: its losses are the ones it logged
        losses = [(int(row["step"]), row["loss"]) for row in read_metrics(metrics.csv_path)
                  if math.isfinite(row["loss"])]  # not the steps skipped as non-finite
    summary = {
        "run_dir": str(run_dir), "start_step": run.start_step, "steps": config.max_steps,
        "processes": run.accelerator.num_processes,
        "global_batch": config.batch_size * run.accelerator.num_processes * config.grad_accum,
        "first_loss": losses[0][1] if losses else None, "final_loss": losses[-1][1] if losses else None,
        "losses": losses, "skipped_videos": len(run.skipped), "skipped": run.skipped,
        "skipped_steps": run.skipped_steps, "trainable": run.trainable,
        "checkpoint": str(run.checkpoint) if run.checkpoint else None, "export": exported,
        "loss_curve": str(run_dir / "loss.png"), "seconds": time.perf_counter() - started,
        "steps_per_second": steps_run / loop_seconds if steps_run else None,
    }
    if main:
        write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return summary


def optimizer_step(run: Run, batches) -> tuple[float, float | None, bool]:
    """grad_accum micro-batches, one optimizer step. -> (loss averaged over micro-batches and processes,
    gradient norm before clipping, whether the step was applied: not when the loss or the norm is not finite).
    Both are the same on every process, so all of them apply or skip a step together."""
    config, accelerator = run.config, run.accelerator
    losses, grad_norm, applied = [], None, False
    for _ in range(config.grad_accum):
        batch = next(batches)
        run.skipped.update(batch["skipped"])
        with accelerator.accumulate(run.model):
            loss = diffusion_loss(run.model, run.pipe, batch, config, run.empty_row, run.scaling, accelerator.device)
            accelerator.backward(loss)
            losses.append(loss.detach())
            if accelerator.sync_gradients:
                # the norm is measured even without clipping (max norm inf: the gradients are scaled by 1)
                grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), config.max_grad_norm or math.inf)
                grad_norm = None if grad_norm is None else float(grad_norm)
                mean_loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
                applied = finite_step(accelerator, mean_loss, grad_norm)
                if applied or accelerator.scaler is not None:  # fp16: the GradScaler skips a non-finite step itself
                    run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    run.lr_scheduler.step()
    if run.ema is not None and applied:
        run.ema.step(run.params)
    return mean_loss, grad_norm, applied


def finite_step(accelerator: Accelerator, loss: float, grad_norm: float | None) -> bool:
    """Under fp16 an infinite gradient norm is the GradScaler's business (it skips the step and lowers its
    scale): only the loss counts there."""
    norm_ok = grad_norm is None or math.isfinite(grad_norm) or accelerator.scaler is not None
    return math.isfinite(loss) and norm_ok


def skip_or_stop(run: Run, step: int, loss: float, grad_norm: float | None) -> None:
    """Step `step` was not applied (non-finite loss or gradient norm): stop the run before anything of it is
    saved (nonfinite=stop), or go on without it, counted (nonfinite=skip)."""
    what = f"step {step}: loss {loss}, gradient norm {grad_norm}"
    if run.config.nonfinite == "skip":
        logger.warning("%s: not finite, step skipped (nonfinite=skip)", what)
        run.skipped_steps.append(step)
        return
    newest = run.checkpoint or "none (no checkpoint was written yet)"
    raise RunFailed(f"{what}: not finite, so the run stopped (nonfinite=stop) and saved nothing of this step; "
                    f"the newest checkpoint, from before it, is {newest}. Resume from it (--resume) with a lower lr "
                    f"or other data, or pass nonfinite=skip to leave such steps out")


# ---- set-up ----------------------------------------------------------------------------------------------

def setup(config: TrainConfig, components: dict | None) -> Run:
    """Accelerator, data, models, optimizer; the checkpoint's state when resuming."""
    run_dir = Path(config.output_dir)
    accelerator = make_accelerator(config)
    describe_launch(accelerator, config)
    resume_from = start_run(accelerator, config, run_dir)
    set_seed(config.seed)
    dataset, skipped = open_dataset(config)
    fuser_source = start_fuser(accelerator, config, components, run_dir)
    pipe = open_pipeline(accelerator, config, components, fuser_source)
    scaling = check_features(config, dataset, pipe)
    empty_row = dataset.empty_prompt() if isinstance(dataset, CachedDataset) else None
    prompts = validation_features(accelerator, config, dataset, pipe, empty_row)
    denoiser = Denoiser(pipe.fuser, pipe.transformer)
    setup_trainable(denoiser, config)
    denoiser.to(accelerator.device)
    optimizer = make_optimizer(denoiser, config, deepspeed(accelerator))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(config.warmup_steps, config.max_steps,
                                                                           config.lr_schedule))
    configure_distributed(accelerator, config, denoiser)
    model, optimizer = accelerator.prepare(denoiser, optimizer)
    params = trainable_parameters(denoiser)
    ema = EMAModel(params, decay=config.ema_decay) if config.ema_decay else None
    accelerator.register_for_checkpointing(lr_scheduler, *([ema] if ema else []))
    register_weight_hooks(accelerator)
    run = Run(config, accelerator, pipe, dataset, model, optimizer, lr_scheduler, params, ema, scaling,
              empty_row, prompts, skipped, describe_trainable(denoiser), fuser_source)
    if resume_from is not None:
        layout = [(g["name"], g["decay"]) for g in optimizer.param_groups]  # older checkpoints' groups lack them
        state = load_checkpoint(accelerator, resume_from)
        run.start_step, run.skipped = state["step"], {**skipped, **state["skipped"]}
        run.checkpoint, run.skipped_steps = resume_from, state.get("skipped_steps", [])  # older checkpoints lack it
        fit_scalar_moments(run.optimizer)
        follow_config_schedule(run, layout, state["config"])
        if state["global_batch"] != config.batch_size * accelerator.num_processes:
            logger.warning("resuming with a global batch of %d instead of %d: the sample order changes",
                           config.batch_size * accelerator.num_processes, state["global_batch"])
        logger.info("resumed from %s at step %d", resume_from, run.start_step)
    if accelerator.is_main_process:  # only now: a resume refused or failed above leaves the run's config.yaml
        config.save(run_dir / "config.yaml")
    return run


def follow_config_schedule(run: Run, layout: list[tuple[str, bool]], saved: dict) -> None:
    """load_state restored the optimizer settings and LR schedule of the run that saved the checkpoint (its
    rates, warm-up and max_steps); the resumed run follows its own config from its next step on. `layout`:
    (name, decay) of each optimizer group, as make_optimizer made them."""
    config, groups = run.config, run.optimizer.param_groups
    changed = [f"{k} {saved.get(k)} -> {getattr(config, k)}" for k in SCHEDULE_FIELDS if saved.get(k) != getattr(config, k)]
    if changed:
        logger.warning("resuming at step %d with this config's %s", run.start_step, ", ".join(changed))
    schedule = LRSchedule(config.warmup_steps, config.max_steps, config.lr_schedule)
    for group, (name, decay) in zip(groups, layout, strict=True):
        group.update(name=name, decay=decay, **group_settings(config, name, decay))
        group["initial_lr"] = group["lr"]
    run.lr_scheduler.base_lrs = [g["initial_lr"] for g in groups]
    run.lr_scheduler.lr_lambdas = [schedule] * len(groups)
    for group in groups:  # the rate of the next step; LambdaLR's step counter is the checkpoint's step
        group["lr"] = group["initial_lr"] * schedule(run.lr_scheduler.last_epoch)


def fit_scalar_moments(optimizer) -> None:
    """Checkpoints from before the fuser's scale became [1] (FSDP shards no 0-dim parameter) hold its Adam
    moments 0-dim, which Adam's in-place update into a [1] parameter refuses."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            moments = optimizer.state.get(p, {})
            for key, value in moments.items():
                if key != "step" and torch.is_tensor(value) and value.ndim == 0 and p.shape == (1,):
                    moments[key] = value.reshape(1)


def used_rates(optimizer) -> dict[str, float]:
    """{"fuser": rate, "dit": rate (when the DiT trains)} the optimizer's next step uses."""
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def configure_distributed(accelerator: Accelerator, config: TrainConfig, denoiser: Denoiser) -> None:
    """What the run's config decides over `accelerate launch`'s config, set before prepare(): gradient
    accumulation (accelerate takes the launch config's over the Accelerator's argument), DeepSpeed's batch
    arithmetic and clipping, FSDP's units."""
    if accelerator.gradient_accumulation_steps != config.grad_accum:
        logger.warning("the launch config's gradient_accumulation_steps %d is replaced by grad_accum=%d",
                       accelerator.gradient_accumulation_steps, config.grad_accum)
        accelerator.gradient_accumulation_steps = config.grad_accum
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version == 1:
        plugin = accelerator.state.fsdp_plugin  # FSDP2 shards per parameter: frozen and trained ones may share a unit
        plugin.auto_wrap_policy = fsdp_wrap_policy(denoiser, config, plugin.transformer_cls_names_to_wrap or [DIT_BLOCK])
    if accelerator.state.deepspeed_plugin is not None:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        settings = deepspeed_settings(config, accelerator.num_processes)
        replaced = [f"{k} {ds_config[k]} -> {v}" for k, v in settings.items() if ds_config.get(k, "auto") not in ("auto", v)]
        if replaced:
            logger.warning("DeepSpeed config: %s (from the run's config)", ", ".join(replaced))
        ds_config.update(settings)


def deepspeed_settings(config: TrainConfig, num_processes: int) -> dict:
    """The DeepSpeed config entries that make one logged step one optimizer update of batch_size x grad_accum x
    processes clips, clipped at max_grad_norm (DeepSpeed clips inside its step; 0 disables it there too)."""
    return {"train_micro_batch_size_per_gpu": config.batch_size, "gradient_accumulation_steps": config.grad_accum,
            "train_batch_size": config.batch_size * config.grad_accum * num_processes,
            "gradient_clipping": config.max_grad_norm}


def data_loader(run: Run) -> DataLoader:
    """Batches of this process, from the run's data position on (see data.GlobalOrder)."""
    config, accelerator = run.config, run.accelerator
    order = GlobalOrder(len(run.dataset), config.batch_size, accelerator.process_index, accelerator.num_processes,
                        config.seed, start=run.start_step * config.grad_accum)
    return DataLoader(run.dataset, batch_size=config.batch_size, sampler=order, collate_fn=collate,
                      num_workers=config.num_workers, pin_memory=accelerator.device.type == "cuda")


def make_accelerator(config: TrainConfig) -> Accelerator:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available")
    cpu = config.device == "cpu" or not torch.cuda.is_available()
    # train() may run several times in one process (tests, notebooks, the demo recipe) with other precision
    # settings: start from a fresh accelerator state, keeping the process group (PartialState)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # the process group's timeout (when this call starts it): how long a process waits for the others
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=config.collective_timeout))
    accelerator = Accelerator(cpu=cpu, mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.grad_accum, kwargs_handlers=[timeout])
    use_8bit_adam(config, deepspeed(accelerator))  # refuses an optimizer the launch cannot use, before any loading
    return accelerator


def describe_launch(accelerator: Accelerator, config: TrainConfig) -> None:
    """Say what the launch started (`accelerate launch --cpu --num_processes 2` starts one process, for one)."""
    if accelerator.is_main_process:
        n = accelerator.num_processes
        logger.info("%d process%s (%s, %s); global batch %d = batch_size %d x %d x grad_accum %d", n,
                    "" if n == 1 else "es", accelerator.distributed_type.value, accelerator.device,
                    config.batch_size * n * config.grad_accum, config.batch_size, n, config.grad_accum)


def deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def start_run(accelerator: Accelerator, config: TrainConfig, run_dir: Path) -> Path | None:
    """Refuse, before anything loads, to mix a fresh run into an old one or to resume where work would be lost
    (see checkpoint.check_resume_point). -> the checkpoint to resume."""
    resume_from = resolve_resume(run_dir, config.resume)
    if config.resume is None and list_checkpoints(run_dir):
        raise ValueError(f"{run_dir} already holds checkpoints: pass resume=latest (--resume) to continue that run, "
                         f"or choose another output_dir")
    if resume_from is not None:
        check_resume_point(run_dir, resume_from, config.max_steps)
    if config.nonfinite == "skip" and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("nonfinite=skip cannot work under DeepSpeed: it applies a step inside backward, before its "
                         "loss and gradient norm can be checked; use nonfinite=stop")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(run_dir)
    accelerator.wait_for_everyone()
    return resume_from


def open_dataset(config: TrainConfig):
    """-> (VideoDataset or CachedDataset, videos skipped so far {path: reason})."""
    if config.cache:
        return CachedDataset(config.cache), describe_cache(config.cache)["skipped"]
    clips, skipped = read_clips(config.data)
    return VideoDataset(clips, config.num_frames, config.height, config.width, config.frame_stride), skipped


def start_fuser(accelerator: Accelerator, config: TrainConfig, components: dict | None, run_dir: Path) -> Path | None:
    """The fuser file the run starts from (model.fuser_file); a fresh one, written to run_dir, for a plain
    CogVideoX. None when `components` bring their own fuser."""
    if components is not None:
        return None
    return starting_fuser(config, accelerator, config.cache or run_dir, run_dir)


def open_pipeline(accelerator: Accelerator, config: TrainConfig, components: dict | None, fuser_path: Path | None):
    """The pipeline whose fuser and DiT train. Frozen encoders take the autocast dtype and, with `offload`,
    wait on the CPU between their stages. From a cache, no T5 or LLM is loaded, and a VAE only to validate."""
    cached = config.cache is not None
    parts = dict(components) if components is not None else \
        load_components(config, fuser_path, encoders=not cached, vae=not cached or config.validate_every > 0)
    placement = frozen_placement(parts, config, accelerator.device)
    fit_text_positions(parts["transformer"], parts["fuser"].config.out_len)  # 2B: sin-cos positions for n + K
    return MimirPipeline(**parts, placement=placement)


def check_features(config: TrainConfig, dataset, pipe: MimirPipeline) -> float:
    """A cache must match the run (video size, fuser config, VAE). -> the VAE scaling factor."""
    if not isinstance(dataset, CachedDataset):
        return float(pipe.vae.config.scaling_factor)
    meta = dataset.meta
    expected = {"num_frames": config.num_frames, "height": config.height, "width": config.width,
                "frame_stride": config.frame_stride, "fuser_config": json.loads(pipe.fuser.config.to_json())}
    if pipe.vae is not None:
        expected["scaling_factor"] = float(pipe.vae.config.scaling_factor)
    check_meta(meta, expected, f"the cache {config.cache}")
    return float(meta["scaling_factor"])


def validation_features(accelerator: Accelerator, config: TrainConfig, dataset, pipe: MimirPipeline, empty_row):
    """Features of "" followed by the validation prompts: encoded once, or read from the cache, which first gets
    the prompts it lacks (T5 and the LLM are loaded for that alone when the run has none)."""
    if not config.validate_every:
        return None
    if not isinstance(dataset, CachedDataset):
        return pipe.encode_features([""] + list(config.validation_prompts), seed=config.seed)
    missing = [p for p in config.validation_prompts if p not in cached_prompts(dataset.folder)]
    if missing:
        check_same_encoders(config, dataset.folder)
    if missing and accelerator.is_main_process:
        logger.warning("the cache %s lacks the validation prompts %s: encoding them into it", dataset.folder, missing)
        add_prompts(text_pipeline(config, pipe, accelerator.device), dataset.folder, missing, config.seed)
    accelerator.wait_for_everyone()
    return stack_features([empty_row] + dataset.prompt_rows(config.validation_prompts))


def text_pipeline(config: TrainConfig, pipe: MimirPipeline, device) -> PromptEncoder:
    """`pipe`'s text side when it holds T5 and the LLM, else one of those alone: each waits on the CPU and is on
    `device` only for its stage, next to the DiT already there."""
    if pipe.text_encoder is not None:
        return pipe.text
    parts = load_text_encoders(config)
    placement = frozen_placement(parts, dataclasses.replace(config, offload=True), device)
    return PromptEncoder(**parts, fuser=pipe.fuser, placement=placement)


def run_state(run: Run, step: int) -> dict:
    config = run.config
    return {"step": step, "micro_batches": step * config.grad_accum,
            "global_batch": config.batch_size * run.accelerator.num_processes, "skipped": run.skipped,
            "skipped_steps": run.skipped_steps, "config": config.to_dict()}


def all_skipped(accelerator: Accelerator, skipped: dict) -> dict:
    if accelerator.num_processes == 1:
        return skipped
    return {k: v for part in gather_object([skipped]) for k, v in part.items()}


def sharded(accelerator: Accelerator) -> bool:
    """FSDP and ZeRO-3 split the weights: the unwrapped modules do not hold them."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


# ---- one step --------------------------------------------------------------------------------------------

def sample_generator(seed: int, position: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed, position)))


def diffusion_loss(model, pipe: MimirPipeline, batch: dict, config: TrainConfig, empty_row, scaling: float,
                   device) -> torch.Tensor:
    """The v-prediction MSE of one micro-batch (see the module docstring)."""
    generators = [sample_generator(config.seed, p) for p in batch["position"]]
    drop = [bool(torch.rand((), generator=g) < config.text_dropout) for g in generators]
    # drawn only when used, so runs without it keep their random streams
    drop_t5 = [bool(torch.rand((), generator=g) < config.t5_dropout) for g in generators] if config.t5_dropout \
        else [False] * len(generators)
    timesteps = torch.stack([torch.randint(0, pipe.scheduler.config.num_train_timesteps, (), generator=g)
                             for g in generators]).to(device)
    latents, features = batch_inputs(pipe, batch, drop, drop_t5, generators, empty_row, scaling, config, device)
    noise = randn_tensor(latents.shape, generator=generators, device=device, dtype=latents.dtype)
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
    target = pipe.scheduler.get_velocity(latents, noise, timesteps)
    rotary = rotary_embeddings(pipe.transformer.config, config.height, config.width, latents.shape[1], device,
                               spatial=config.height // latents.shape[-2])
    pred = model(features.t5, features.llm, features.llm_mask, features.instructions, noisy, timesteps, rotary)
    return F.mse_loss(pred.float(), target.float())


def batch_inputs(pipe: MimirPipeline, batch: dict, drop: list[bool], drop_t5: list[bool], generators, empty_row,
                 scaling: float, config: TrainConfig, device):
    """-> (latents [B, T, C, h, w] in diffusion space, text features); a dropped caption becomes "", a caption
    in drop_t5 keeps its LLM features and gets the empty prompt's T5 features."""
    if "pixels" in batch:
        params = encode_latent_params(pipe, batch["pixels"])
        captions = ["" if d else c for d, c in zip(drop, batch["caption"])]
        features = pipe.encode_features(captions, seed=config.seed)
        if any(drop_t5):
            empty_t5 = pipe.encode_features([""], seed=config.seed).t5[0]
            features.t5[torch.tensor(drop_t5)] = empty_t5.to(features.t5.dtype)
    else:
        params = batch["latent_params"]
        rows = [empty_row if d else {**f, "t5": empty_row["t5"]} if d5 else f
                for d, d5, f in zip(drop, drop_t5, batch["features"])]
        features = stack_features(rows)
    latents = DiagonalGaussianDistribution(params.to(device)).sample(generators) * scaling
    latents = latents.permute(0, 2, 1, 3, 4)
    patch_t = pipe.transformer.config.patch_size_t
    extra = 0 if patch_t is None else (-latents.shape[1]) % patch_t
    if extra:  # CogVideoX 1.5: pad the frames to the temporal patch as the pipeline does
        latents = torch.cat([latents[:, :extra], latents], dim=1)
    return latents, features.to(device)


# ---- validation and export -------------------------------------------------------------------------------

@contextlib.contextmanager
def ema_weights(ema, params):
    """Swap the EMA weights in for the duration of the block."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


class ValidationTimeout(Exception):
    pass


def validate(run: Run, step: int) -> list[Path]:
    """Videos of the validation prompts with the live fuser and DiT (main process). The other processes wait
    in a collective meanwhile: denoising stops (no videos) once half of collective_timeout has passed."""
    accelerator, config = run.accelerator, run.config
    if sharded(accelerator):
        logger.warning("validation videos need unsharded weights (DDP or ZeRO-2); skipped under FSDP / ZeRO-3")
        return []
    paths = []
    if accelerator.is_main_process:
        trained = (run.pipe.fuser, run.pipe.transformer)
        for module in trained:
            module.eval()
        try:
            frames = validation_videos(run, deadline=time.monotonic() + config.collective_timeout / 2)
        except ValidationTimeout as stop:
            logger.warning("validation at step %d skipped: %s; raise collective_timeout (%d s) or lower "
                           "validation_steps", step, stop, config.collective_timeout)
            frames = []
        finally:
            for module in trained:
                module.train()
        folder = Path(config.output_dir) / "validation"
        paths = [write_video(video, folder / f"step-{step:08d}-{i}.mp4", config.validation_fps)
                 for i, video in enumerate(frames)]
    accelerator.wait_for_everyone()
    return paths


def validation_videos(run: Run, deadline: float) -> torch.Tensor:
    """Denoise the validation prompts (checking `deadline`, time.monotonic(), at each step) and decode them with
    VAE tiling and slicing: a 49 x 480 x 720 decode in one piece would need tens of GB next to the training."""
    accelerator, config, pipe = run.accelerator, run.config, run.pipe
    live = MimirPipeline(pipe.transformer, pipe.vae, type(pipe.scheduler).from_config(pipe.scheduler.config),
                         fuser=pipe.fuser, placement=Placement(accelerator.device, accelerator.device))

    def in_time(done: int, steps: int, latents) -> None:
        if time.monotonic() > deadline:
            raise ValidationTimeout(f"half the collective timeout passed after {done} of {steps} denoising steps")

    with ema_weights(run.ema, run.params), torch.no_grad(), accelerator.autocast():
        fused = live.fuse(run.prompts)
        uncond, cond = fused[:1].expand(fused.shape[0] - 1, -1, -1), fused[1:]
        latents = live.denoise(cond, uncond, config.num_frames, config.height, config.width, config.validation_steps,
                               config.validation_guidance, config.seed, callback=in_time)
        with pipe.placement.stage(pipe.vae):  # the VAE may wait on the CPU (offload)
            return live.decode(latents, tiling=True, slicing=True)


def export(run: Run) -> dict | None:
    """Fuser + DiT (EMA weights when kept) into output_dir/export (main process): written to export.tmp/ with
    export.json (the step, the files), then renamed. An export of max_steps already there is kept as it is."""
    if sharded(run.accelerator):
        logger.warning("export needs unsharded weights (DDP or ZeRO-2); under FSDP / ZeRO-3 use the checkpoints")
        return None
    config = run.config
    folder = Path(config.output_dir) / "export"
    done = written_export(folder, config.max_steps)
    if done is not None:
        return done
    exported = None
    if run.accelerator.is_main_process:
        tmp = folder.with_name(folder.name + ".tmp")
        with reported_write("export", folder, f"The checkpoints are whole (newest: {run.checkpoint}): free space and "
                            f"resume the run (--resume) to write the export", partial=tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            with ema_weights(run.ema, run.params):
                written = export_model(run.pipe, config, tmp, run.fuser_source)
            exported = {k: str(folder / Path(v).relative_to(tmp)) for k, v in written.items()}
            (tmp / EXPORT_INFO).write_text(json.dumps({"step": config.max_steps, "files": exported}, indent=2))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
    run.accelerator.wait_for_everyone()
    return exported


def written_export(folder: Path, step: int) -> dict | None:
    """The files of the export in `folder` if it is whole and from `step`."""
    info = folder / EXPORT_INFO
    if not info.is_file():
        return None
    done = json.loads(info.read_text())
    return done["files"] if done["step"] == step else None
