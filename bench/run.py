"""Every benchmark in one run: `python bench/run.py` prints a table of ratios, each measured within this run.

    python bench/run.py                  # all of them (a few minutes on 2 CPU cores)
    python bench/run.py --only dit offload
    python bench/run.py --threads 0      # torch's default thread count (CPU)

On the CPU the default is one torch thread: every figure is a ratio of two things measured side by side,
and one thread keeps those steady when other processes share the cores (two threads on two busy cores were
several times slower and far noisier here).

A benchmark is a module `bench/bench_<name>.py` with `run() -> list[common.Row]`; a module that is absent
is listed as such. Each module's docstring states its config and method.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import DEVICE, header, table

BENCHMARKS = {
    "pipeline": "Mimir vs diffusers CogVideoXPipeline, identical components",
    "nodes": "ComfyUI node path vs direct library call",
    "dit": "DiT forward throughput vs fp32 matmul",
    "offload": "stage-wise offload vs everything resident",
    "prompt_cache": "encoded-prompt cache",
    "train": "training steps/s from cache vs uncached",
    "step_cache": "step caching (diffusers' hooks) vs uncached on the demo model",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads and DEVICE.type == "cpu":
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, notes = [], []
    for name in args.only or BENCHMARKS:
        if not (HERE / f"bench_{name}.py").exists():
            notes.append(f"{name} ({BENCHMARKS[name]}): bench/bench_{name}.py is not in the repository yet")
            continue
        began = time.perf_counter()
        try:
            rows += importlib.import_module(f"bench_{name}").run()
        except Exception:
            notes.append(f"{name}: FAILED\n{traceback.format_exc()}")
        notes.append(f"{name}: {time.perf_counter() - began:.0f} s")
    print("\n".join(header()))
    print(f"torch threads: {torch.get_num_threads()}; total {time.perf_counter() - start:.0f} s\n")
    print(table(rows))
    print("\n" + "\n".join(notes))
    return 1 if any("FAILED" in n for n in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
