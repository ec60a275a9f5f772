"""Checkpoints: everything needed to continue a run exactly, written so a kill never leaves half of one.

A checkpoint is a folder `checkpoints/step-00000100/` written by accelerate's `save_state` (optimizer, LR
schedule, EMA, GradScaler, every process's RNG states; DeepSpeed / FSDP shards when those are used) plus
`trainable.safetensors` (only the trained weights: fuser, DiT or its LoRA) and `state.json` (step, data position,
skipped videos, the resolved config). It is first written under a temporary name and renamed when complete:
a folder named `step-*` is always whole. The newest `keep_checkpoints` are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file, save_file

CHECKPOINTS, STATE, WEIGHTS = "checkpoints", "state.json", "trainable.safetensors"
TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / STATE).is_file())


def resolve_resume(run_dir, resume: str | None) -> Path | None:
    """resume=None: start fresh; "latest": the newest complete checkpoint of the run (None if there is none)."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {STATE}); checkpoints of this run: "
                         f"{[p.name for p in list_checkpoints(run_dir)] or 'none'}")
    return path


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
    """Write checkpoint `step` atomically (temp folder + rename), then drop all but the newest `keep`."""
    folder = Path(run_dir) / CHECKPOINTS
    final = folder / checkpoint_name(step)
    tmp = folder / (TMP_PREFIX + final.name)
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
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE).read_text())


def remove_partial(run_dir) -> None:
    """Temporary folders of checkpoints a killed run did not finish."""
    for tmp in (Path(run_dir) / CHECKPOINTS).glob(TMP_PREFIX + "*"):
        shutil.rmtree(tmp, ignore_errors=True)
