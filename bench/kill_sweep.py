"""Kill sweep of `mimir cache` and `mimir train`: SIGKILLs at chosen moments, each run resumed to its end and
compared with an uninterrupted run (issue 14). Not a ratio benchmark: `bench/run.py` does not run it.

Config: mimir.testing's tiny models, 6 demo-world clips (9 frames, 16 x 16); the cache 2 clips per shard; training
from the cache with batch 2, grad_accum 2, 8 steps, cosine LR after 2 warm-up steps, text dropout 0.5, EMA 0.9,
a checkpoint every 2 steps, 2 kept, export on; one torch thread. Each kill is a real SIGKILL of a child process at
the n-th call of a function (mimir.testing.run_killed); a scenario may kill the resumed runs again. After the
last kill the run is resumed in this process to its end. A cache must then hold exactly the reference cache's
tensors; a run must end with the reference run's final checkpoint weights and export files, and metrics rows
1..8. Prints one line per scenario and the totals.

    python bench/kill_sweep.py          (about 5 minutes on 2 shared CPU cores)
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from mimir.testing import run_killed, tiny_train_components, write_world_clips
from mimir.train import TrainConfig, build_cache, train
from mimir.train.cache import CachedDataset
from mimir.train.checkpoint import WEIGHTS, list_checkpoints
from mimir.train.metrics import read_metrics

TINY = dict(device="cpu", num_frames=9, height=16, width=16, num_workers=0, tensorboard=False)
RUN = dict(batch_size=2, grad_accum=2, max_steps=8, lr=1e-3, lr_schedule="cosine", warmup_steps=2, text_dropout=0.5,
           ema_decay=0.9, checkpoint_every=2, keep_checkpoints=2, export=True, resume="latest")
# (where, target, call, when): the moment of one kill
CACHE_KILLS = [
    ("shard 0 written, not renamed", "mimir.train.cache:save_file", 1, "after"),
    ("between shards 0 and 1", "mimir.train.cache:save_file", 2, "before"),
    ("last shard written, not renamed", "mimir.train.cache:save_file", 3, "after"),
    ("empty-prompt features written, not renamed", "mimir.train.cache:save_file", 4, "after"),
    ("after the shards, before the summary", "mimir.train.cache:describe_cache", 1, "before"),
]
STEP_3 = ("after step 3", "mimir.train.loop:optimizer_step", 3, "after")
IN_CHECKPOINT_6 = ("checkpoint 6: weights written, optimizer not", "mimir.train.checkpoint:save_file", 3, "after")
CHECKPOINT_2 = ("checkpoint 2: weights written, optimizer not", "mimir.train.checkpoint:save_file", 1, "after")
BEFORE_EXPORT = ("after the last checkpoint, before the export", "mimir.train.loop:export", 1, "before")
TRAIN_KILLS = [
    [("after step 1", "mimir.train.loop:optimizer_step", 1, "after")],
    [STEP_3],
    [("after step 7", "mimir.train.loop:optimizer_step", 7, "after")],
    [CHECKPOINT_2],
    [IN_CHECKPOINT_6],
    [("checkpoint 4: optimizer, LR schedule written, EMA not", "accelerate.checkpointing:save", 5, "after")],
    [("checkpoint 6: accelerate state written, no state.json", "accelerate.accelerator:Accelerator.save_state", 3,
      "after")],
    [("checkpoint 6: whole, not yet renamed", "pathlib:Path.rename", 3, "before")],
    [("pruning step 2: renamed away, not deleted", "pathlib:Path.rename", 4, "after")],
    [("checkpoint 8: whole, not yet renamed", "pathlib:Path.rename", 5, "before")],
    [BEFORE_EXPORT],
    [("export: fuser written, DiT not", "mimir.train.export:save_fuser", 1, "after")],
    [("export whole, summary not written", "mimir.train.loop:write_text", 1, "before")],
    # one run killed three times, each resume at another moment (calls count from the resumed step)
    [STEP_3, ("(from 2) checkpoint 6: weights written", "mimir.train.checkpoint:save_file", 2, "after"),
     BEFORE_EXPORT],
    [CHECKPOINT_2, ("(from 0) after step 5", "mimir.train.loop:optimizer_step", 5, "after"),
     ("export: fuser written", "mimir.train.export:save_fuser", 1, "after")],
]


def kill(command: str, config: dict, point) -> None:
    where, target, call, when = point
    ended = run_killed(command, config, target, call, when)
    if ended.returncode != -signal.SIGKILL:
        sys.exit(f"kill {where!r} did not happen (exit code {ended.returncode}):\n{ended.stderr[-3000:]}")


def max_difference(a: dict, b: dict) -> float:
    assert a and a.keys() == b.keys(), "different tensors"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def cache_difference(folder: Path, reference: Path) -> float:
    a, b = CachedDataset(folder), CachedDataset(reference)
    assert len(a) == len(b) and [e[2] for e in a.entries] == [e[2] for e in b.entries], "other clips"
    return max(max_difference({"latent_params": a[(i, 0)]["latent_params"], **a[(i, 0)]["features"]},
                              {"latent_params": b[(i, 0)]["latent_params"], **b[(i, 0)]["features"]})
               for i in range(len(a)))


def run_difference(run: Path, reference: Path) -> float:
    last = f"checkpoints/step-{RUN['max_steps']:08d}/{WEIGHTS}"
    assert [int(r["step"]) for r in read_metrics(run / "metrics.csv")] == list(range(1, RUN["max_steps"] + 1))
    assert [p.name for p in list_checkpoints(run)] == [p.name for p in list_checkpoints(reference)]
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "export.tmp").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["export"] and len(summary["losses"]) >= 1, "incomplete summary"
    files = [last, "export/fuser.safetensors", "export/transformer.safetensors"]
    return max(max_difference(load_file(str(run / f)), load_file(str(reference / f))) for f in files)


def main() -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="kill_sweep_"))
    write_world_clips(tmp / "clips", count=6, frames=9, size=16)
    cache = dict(TINY, data=str(tmp / "clips"), cache_shard_size=2)
    build_cache(TrainConfig(**cache, cache=str(tmp / "reference_cache")), tiny_train_components(), progress=False)
    train_values = dict(TINY, **RUN, cache=str(tmp / "reference_cache"))
    train(TrainConfig(**train_values, output_dir=str(tmp / "reference_run")), tiny_train_components(), progress=False)
    kills, worst = 0, 0.0
    for n, point in enumerate(CACHE_KILLS):
        values = dict(cache, cache=str(tmp / f"cache{n}"))
        kill("cache", values, point)
        build_cache(TrainConfig(**values), tiny_train_components(), progress=False)
        diff = cache_difference(tmp / f"cache{n}", tmp / "reference_cache")
        kills, worst = kills + 1, max(worst, diff)
        print(f"cache | {point[0]:60s} | resumed: max |tensor difference| {diff:g}", flush=True)
    for n, points in enumerate(TRAIN_KILLS):
        values = dict(train_values, output_dir=str(tmp / f"run{n}"))
        for point in points:
            kill("train", values, point)
        train(TrainConfig(**values), tiny_train_components(), progress=False)
        diff = run_difference(tmp / f"run{n}", tmp / "reference_run")
        kills, worst = kills + len(points), max(worst, diff)
        print(f"train | {' -> '.join(p[0] for p in points):60s} | resumed: max |weight difference| {diff:g}", flush=True)
    print(f"{kills} SIGKILLs ({len(CACHE_KILLS)} of the cache, {kills - len(CACHE_KILLS)} of training in "
          f"{len(TRAIN_KILLS)} runs); every resume ended with the uninterrupted run's tensors: max difference {worst:g}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
