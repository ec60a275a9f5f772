"""Checkpoints: everything needed to continue a run exactly, written so a kill never leaves half of one.

A checkpoint is a folder `checkpoints/step-00000100/` written by accelerate's `save_state` (optimizer, LR
schedule, EMA, GradScaler, every process's RNG states; DeepSpeed / FSDP shards when those are used) plus
`trainable.safetensors` (only the trained weights: fuser, DiT or its LoRA) and `state.json` (step, data position,
skipped videos, the resolved config). It is first written under a temporary name and renamed when complete:
a folder named `step-*` is always whole. The newest `keep_checkpoints` (by step) are kept; an old one is renamed
to a temporary name before it is deleted, so a kill while deleting leaves nothing that looks whole.

A run only ever continues from its newest checkpoint: resuming an older one in the same output_dir is refused
(it would mix two runs and rotate the newer checkpoints away). Continuing from an older checkpoint is a branch,
written to another output_dir, which leaves the original run as it was.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .storage import reported_write

logger = logging.getLogger(__name__)
CHECKPOINTS, STATE, WEIGHTS = "checkpoints", "state.json", "trainable.safetensors"
TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(path.name.partition("-")[2])


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("step-*") if (p / STATE).is_file()), key=checkpoint_step)


def resolve_resume(run_dir, resume: str | None) -> Path | None:
    """resume=None: start fresh; "latest": the newest complete checkpoint of the run (None, with a warning, if
    there is none: a job that always passes --resume starts its first run this way)."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            logger.warning("resume=latest: %s holds no complete checkpoint; starting a new run at step 0", run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {STATE}); checkpoints of this run: "
                         f"{[p.name for p in list_checkpoints(run_dir)] or 'none'}")
    return path


def check_resume_point(run_dir, checkpoint: Path, max_steps: int) -> None:
    """Refuse a resume that would lose work: from a checkpoint older than one `run_dir` already holds, or past
    max_steps. Read from state.json alone, before anything loads."""
    step = json.loads((checkpoint / STATE).read_text())["step"]
    if step > max_steps:
        raise ValueError(f"{checkpoint} is at step {step}, past max_steps={max_steps}: raise max_steps to continue "
                         f"it")
    newer = [p.name for p in list_checkpoints(run_dir) if checkpoint_step(p) > step]
    if newer:
        raise ValueError(f"{checkpoint} is at step {step} but {run_dir} holds the newer checkpoints {newer}: "
                         f"continuing here would mix two runs and rotate the newer checkpoints away. Continue it as "
                         f"a branch in another folder (output_dir=NEW resume={checkpoint}), or resume=latest; "
                         f"{run_dir} is left as it is")


def register_weight_hooks(accelerator: Accelerator) -> None:
    """Make save_state/load_state write and read only the trained weights (a LoRA run does not copy the whole
    DiT into every checkpoint). DeepSpeed and FSDP save their own shards and pass no weights to the hooks."""

    def save_hook(models, weights, output_dir):
        if not weights:
            return
        for model in models:
            model = accelerator.unwrap_model(model)
            state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            if accelerator.is_main_process:
                save_file(state, str(Path(output_dir) / WEIGHTS))
        weights.clear()

    def load_hook(models, input_dir):
        for model in models:
            load_trainable(accelerator.unwrap_model(model), Path(input_dir) / WEIGHTS)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_trainable(model, path: Path) -> None:
    state = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"{path} does not hold this run's trained weights: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (was it saved with another dit= mode or LoRA setting?)")
    for name, p in params.items():
        p.data.copy_(state[name])


def save_checkpoint(accelerator: Accelerator, run_dir, step: int, state: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically (temp folder + rename), then drop all but the newest `keep`. A failed
    write (a full disk) removes the partial folder and stops the run, the older checkpoints untouched."""
    folder = Path(run_dir) / CHECKPOINTS
    final = folder / checkpoint_name(step)
    tmp = folder / (TMP_PREFIX + final.name)
    existing = list_checkpoints(run_dir)
    kept = (f"No checkpoint was lost: the newest is {existing[-1]}" if existing else "No checkpoint was written yet")
    with reported_write("checkpoint", final, kept + "; free space and resume (--resume)",
                        partial=tmp if accelerator.is_main_process else None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE).write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    if accelerator.is_main_process:
        prune(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def prune(run_dir, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, each renamed first so a kill mid-way leaves only a temporary
    folder (removed at the next start). Only older ones go: a run never holds checkpoints past its own step."""
    for old in list_checkpoints(run_dir)[:-keep]:
        doomed = old.with_name(f"{TMP_PREFIX}old-{old.name}")
        old.rename(doomed)
        shutil.rmtree(doomed)
        logger.info("removed checkpoint %s (keep_checkpoints=%d)", old, keep)


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE).read_text())


def remove_partial(run_dir) -> None:
    """Temporary folders of checkpoints a killed run did not finish."""
    for tmp in (Path(run_dir) / CHECKPOINTS).glob(TMP_PREFIX + "*"):
        shutil.rmtree(tmp, ignore_errors=True)
