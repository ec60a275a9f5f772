"""FSDP wraps the real training module in every `dit` mode and a step trains what it should: torch FSDP on the
CPU (gloo, world size 1) with the settings `accelerate launch --config_file accelerate_fsdp.yaml` gives each
process, wrapped the way accelerate's prepare() wraps a model (accelerate itself runs FSDP only on GPUs). At world
size 1 FSDP shards nothing (NO_SHARD) but flattens its units all the same: a 0-dim parameter or a unit of two
dtypes is refused there as on 8 GPUs."""

import os
import socket
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from mimir.pipeline import MimirPipeline
from mimir.testing import tiny_train_components
from mimir.train import TrainConfig
from mimir.train.cache import feature_rows
from mimir.train.loop import configure_distributed, diffusion_loss
from mimir.train.model import Denoiser, encode_latent_params, make_optimizer, setup_trainable

pytestmark = pytest.mark.usefixtures("one_thread")
FSDP_YAML = Path(__file__).resolve().parents[1] / "mimir" / "train" / "configs" / "accelerate_fsdp.yaml"


@pytest.fixture(scope="module")
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def fsdp_plugin() -> FullyShardedDataParallelPlugin:
    """The plugin accelerate builds from the environment `accelerate launch` sets for the shipped yaml."""
    args = launch_command_parser().parse_args(["--config_file", str(FSDP_YAML), "-m", "mimir.train"])
    env = {k: v for k, v in prepare_multi_gpu_env(_validate_launch_command(args)[0]).items() if k.startswith("FSDP_")}
    assert env["FSDP_USE_ORIG_PARAMS"] == "true" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "CogVideoXBlock"
    # FSDP broadcasts rank 0's weights only from a GPU and refuses on the CPU; world size 1 has nothing to send
    env["FSDP_SYNC_MODULE_STATES"] = "false"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision("bf16")  # as Accelerator(mixed_precision="bf16") does
    return plugin


def accelerate_fsdp(model, plugin: FullyShardedDataParallelPlugin) -> FSDP:
    """accelerate's FSDP1 prepare_model, on the CPU."""
    return FSDP(model, sharding_strategy=plugin.sharding_strategy, cpu_offload=plugin.cpu_offload,
                auto_wrap_policy=plugin.auto_wrap_policy, mixed_precision=plugin.mixed_precision_policy,
                sync_module_states=plugin.sync_module_states, backward_prefetch=plugin.backward_prefetch,
                forward_prefetch=plugin.forward_prefetch, use_orig_params=plugin.use_orig_params,
                param_init_fn=plugin.param_init_fn, ignored_modules=plugin.ignored_modules,
                limit_all_gathers=plugin.limit_all_gathers, device_id=torch.device("cpu"))


@pytest.mark.parametrize("dit, lora_units", [("full", 0), ("lora", 2 * 4 * 2), ("frozen", 0)])
def test_fsdp_wraps_every_dit_mode_and_steps(dit, lora_units, process_group, fsdp_plugin, tiny_run):
    config = TrainConfig(**tiny_run, dit=dit, lora_rank=4, mixed_precision="bf16",
                         gradient_checkpointing=True, text_dropout=0.0, lr=1e-3)
    parts = tiny_train_components("5b")
    pipe = MimirPipeline(**parts)
    pixels = torch.randint(0, 256, (1, 9, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = {"position": [0], "latent_params": encode_latent_params(pipe, pixels),
             "features": feature_rows(pipe.encode_features(["a red square moves right"], seed=0))}
    denoiser = Denoiser(parts["fuser"], parts["transformer"])
    setup_trainable(denoiser, config)
    optimizer = make_optimizer(denoiser, config)  # before wrapping, as the loop does: use_orig_params keeps them
    before = {name: (p, p.detach().clone()) for name, p in denoiser.named_parameters()}
    launched = SimpleNamespace(distributed_type=DistributedType.FSDP, gradient_accumulation_steps=1, num_processes=1,
                               state=SimpleNamespace(fsdp_plugin=fsdp_plugin, deepspeed_plugin=None))
    configure_distributed(launched, config, denoiser)  # what the loop does to accelerate's plugin before prepare()
    model = accelerate_fsdp(denoiser, fsdp_plugin)

    units = FSDP.fsdp_modules(model)
    named = [type(u.module).__name__ for u in units]
    assert named.count("CogVideoXBlock") == 2 and named.count("TokenFuser") == 1
    assert len(units) == 4 + lora_units  # root, 2 blocks, fuser (+ each LoRA A and B layer)
    for unit in units:  # FSDP would refuse a unit of two dtypes; trained units hold fp32, frozen ones bf16
        flat = unit._flat_param if unit._has_params else None
        assert flat is None or flat.dtype == (torch.float32 if flat.requires_grad else torch.bfloat16)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion_loss(model, pipe, batch, config, None, 1.0, torch.device("cpu"))
    loss.backward()
    grad_norm = model.clip_grad_norm_(config.max_grad_norm)
    optimizer.step()
    assert torch.isfinite(loss) and 0 < float(grad_norm) < float("inf")
    with FSDP.summon_full_params(model):
        moved = {name for name, (p, old) in before.items() if not torch.equal(p.detach(), old)}
    trained = {name for name, (p, _) in before.items() if p.requires_grad}
    print(f"dit={dit}: {len(units)} FSDP units, loss {loss.item():.4f}, grad norm {float(grad_norm):.4f}, "
          f"{len(moved)} of {len(trained)} trained tensors moved")
    assert moved <= trained and "fuser.z_theta.weight" in moved  # nothing frozen moved, the fuser did
    dit_moved = {n for n in moved if n.startswith("transformer.")}
    assert bool(dit_moved) == (dit != "frozen") and all(("lora_" in n) == (dit == "lora") for n in dit_moved)
