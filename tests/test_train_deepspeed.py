"""The DeepSpeed path, checked without DeepSpeed (accelerate runs it only on GPUs): what the loop writes into the
DeepSpeed config accelerate builds for `accelerate launch --config_file accelerate_deepspeed_zero2.yaml`, and
the optimizer it picks."""

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env

from mimir.testing import tiny_train_components
from mimir.train import TrainConfig, load_config
from mimir.train.loop import configure_distributed
from mimir.train.model import Denoiser, make_optimizer, setup_trainable, use_8bit_adam

CONFIGS = Path(__file__).resolve().parents[1] / "mimir" / "train" / "configs"


def zero2_plugin(**env_changes) -> DeepSpeedPlugin:
    """The plugin accelerate builds in each process `accelerate launch` starts for the shipped ZeRO-2 yaml."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "accelerate_deepspeed_zero2.yaml"),
                                               "-m", "mimir.train"])
    args, defaults, precision_from_config = _validate_launch_command(args)
    fields = list(defaults.deepspeed_config) + ["mixed_precision"] * precision_from_config  # as launch_command does
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    env = {k: v for k, v in prepare_deepspeed_cmd_env(args)[1].items() if k.startswith("ACCELERATE_")}
    with mock.patch.dict(os.environ, {**env, **env_changes}):
        return DeepSpeedPlugin()


def launched(plugin: DeepSpeedPlugin, processes: int, grad_accum: int = 1):
    """What the loop sees of an Accelerator under DeepSpeed (`grad_accum`: the launch config's value, which
    accelerate takes over the Accelerator's argument)."""
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, gradient_accumulation_steps=grad_accum,
                           num_processes=processes, state=SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=plugin))


@pytest.mark.parametrize("name", ["mimir_5b.yaml", "mimir_5b_lora.yaml"])
def test_deepspeed_config_takes_the_runs_batch_arithmetic(name):
    config = load_config(CONFIGS / name, ["grad_accum=3", "max_grad_norm=0.5"])
    plugin = zero2_plugin()
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"  # the yaml leaves it to the run
    accelerator = launched(plugin, processes=8)
    configure_distributed(accelerator, config, denoiser=None)
    ds = plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (
        1, 3, 0.5)
    assert accelerator.gradient_accumulation_steps == 3  # accelerate's accumulate() and DeepSpeed count alike
    assert ds["train_batch_size"] == 1 * 3 * 8  # = the summary's global_batch: one logged step, one update
    # accelerate's own fill-in before deepspeed.initialize, with must_match: it finds nothing to change
    plugin.deepspeed_config_process(must_match=True, train_micro_batch_size_per_gpu=1, train_batch_size=24,
                                    gradient_accumulation_steps=3)


def test_a_launch_config_that_says_otherwise_is_overridden_with_a_warning(caplog):
    """An older yaml with gradient_accumulation_steps 1 and clipping 1.0 (accelerate then also forces the
    Accelerator to 1): a grad_accum=4 run would have logged 4 optimizer updates per step."""
    plugin = zero2_plugin(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="1", ACCELERATE_GRADIENT_CLIPPING="1.0")
    accelerator = launched(plugin, processes=2, grad_accum=1)
    with caplog.at_level("WARNING", logger="mimir.train.loop"):
        configure_distributed(accelerator, TrainConfig(batch_size=2, grad_accum=4, max_grad_norm=0.0), denoiser=None)
    assert accelerator.gradient_accumulation_steps == 4 and plugin.deepspeed_config["train_batch_size"] == 16
    assert plugin.deepspeed_config["gradient_clipping"] == 0.0  # max_grad_norm 0: no clipping, as without DeepSpeed
    assert "gradient_accumulation_steps 1 is replaced by grad_accum=4" in caplog.text
    assert "gradient_accumulation_steps 1 -> 4, gradient_clipping 1.0 -> 0.0" in caplog.text


def test_auto_optimizer_is_not_8bit_under_deepspeed(monkeypatch):
    """With bitsandbytes and CUDA there, auto picks 8-bit AdamW except under DeepSpeed; adamw8bit is refused there."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else
                        find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    auto = TrainConfig(optimizer="auto", device="auto")
    assert use_8bit_adam(auto) and not use_8bit_adam(auto, deepspeed=True)
    with pytest.raises(ValueError, match="optimizer=adamw8bit is not used under DeepSpeed"):
        use_8bit_adam(TrainConfig(optimizer="adamw8bit"), deepspeed=True)
    parts = tiny_train_components()
    denoiser = Denoiser(parts["fuser"], parts["transformer"])
    setup_trainable(denoiser, auto)
    assert type(make_optimizer(denoiser, auto, deepspeed=True)) is torch.optim.AdamW
