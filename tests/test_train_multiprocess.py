"""Two processes (accelerate launch, DDP over gloo on the CPU) follow the one-process loss trajectory."""

import os
import socket
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from mimir.train import TrainConfig, build_cache, train
from mimir.train.checkpoint import WEIGHTS, list_checkpoints
from mimir.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # this process; the launched ones get OMP_NUM_THREADS=1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_with_the_same_global_batch(world_clips, tiny_run, tiny_model_dir, tmp_path):
    values = dict(data=str(world_clips(5)), cache=str(tmp_path / "cache"), max_steps=4, lr=1e-3, warmup_steps=1,
                  text_dropout=0.5, **{**tiny_run, "model": str(tiny_model_dir)})
    build_cache(TrainConfig(**values), progress=False)
    one = train(TrainConfig(**values, batch_size=2, output_dir=str(tmp_path / "one")), progress=False)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({**values, "batch_size": 1, "output_dir": str(tmp_path / "two")}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "mimir.train", "--config", str(tmp_path / "two.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the command the README gives for N CPU processes starts 2, and the loop says so
    assert "mimir.train.loop: 2 processes (MULTI_CPU, cpu:0); global batch 2 = batch_size 1 x 2 x grad_accum 1" \
        in done.stderr
    two = read_metrics(tmp_path / "two" / "metrics.csv")
    losses_one, losses_two = [loss for _, loss in one["losses"]], [row["loss"] for row in two]
    print("1 process x batch 2:", losses_one, "\n2 processes x batch 1:", losses_two)
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    a = load_file(str(list_checkpoints(tmp_path / "one")[-1] / WEIGHTS))
    b = load_file(str(list_checkpoints(tmp_path / "two")[-1] / WEIGHTS))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |param difference| after 4 steps: {diff:g}")
    # Adam divides by sqrt(v): where a gradient is ~0, reduction-order rounding moves a weight by up to lr;
    # 4 steps at lr 1e-3 move weights by up to 4e-3
    assert diff < 2e-4
