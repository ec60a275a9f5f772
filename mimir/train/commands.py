"""`mimir train` and `mimir cache`: argument parsing and the checks that run before any work.

    mimir train --config FILE [--resume [CHECKPOINT]] [key=value ...]
    mimir cache --config FILE [key=value ...]

Both read a TrainConfig (YAML or JSON; every field can be overridden as key=value). Exit codes: 0 done, 2 refused
before any work (a bad config, missing inputs, a resume that would lose work), 1 stopped during the work with a
message saying what was kept (a failed write such as a full disk, a non-finite loss). Multi-process runs start
the same commands under `accelerate launch` with a launch config that names the processes (e.g. `accelerate
launch --config_file mimir/train/configs/accelerate_ddp.yaml -m mimir.train --config FILE`; `-m mimir.cli cache`
for the cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import sys
from pathlib import Path

from .cache import build_cache, read_meta
from .config import TrainConfig, load_config
from .loop import train
from .model import fuser_file
from .storage import RunFailed


def _fields_help() -> str:
    rows = [f"  {f.name} = {f.default if f.default is not dataclasses.MISSING else f.default_factory()!r}"
            for f in dataclasses.fields(TrainConfig)]
    return "config fields (defaults):\n" + "\n".join(rows)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=_fields_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML or JSON file of TrainConfig fields")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override a config field")
    return parser


def check_paths(config: TrainConfig, command: str) -> None:
    """Inputs that must exist before `command` ("train" or "cache") loads anything."""
    check_train_extra(config, command)
    if not config.model:
        raise ValueError("model= is required: a Mimir/CogVideoX diffusers folder, or demo (the bundled demo model)")
    if not Path(config.model).exists():
        raise ValueError(f"model {config.model}: no such folder")
    for name in ("llm", "fuser", "data"):
        value = getattr(config, name)
        if value and not Path(value).exists():
            raise ValueError(f"{name} {value}: no such file or folder")
    if command == "cache":
        if not config.data or not config.cache:
            raise ValueError("mimir cache needs data= (the dataset) and cache= (the folder to write)")
    elif config.cache:
        read_meta(config.cache)
    elif not config.data:
        raise ValueError("mimir train needs data= (a dataset) or cache= (a feature cache from `mimir cache`)")
    folders = [config.cache] if command == "cache" else [f for f in (config.cache, config.output_dir) if f]
    if not config.llm and all(fuser_file(config, f) is None for f in folders):
        raise ValueError(f"{config.model} has no fuser.safetensors: give fuser= (a fuser file) or llm= (an LLM "
                         f"folder, to start a fresh fuser)")


def check_train_extra(config: TrainConfig, command: str) -> None:
    """The train extra's packages this run will import (late: LoRA at setup, TensorBoard, loss.png at the end),
    checked before any work so that a run never dies on a missing package after training."""
    needed = [] if command == "cache" else ["matplotlib", *(["peft"] if config.dit == "lora" else []),
                                            *(["tensorboard"] if config.tensorboard else [])]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} not installed: `mimir {command}` needs the train extra, "
                         f"pip install \"mimir-video[train]\" (or -e \".[train]\" in a clone)")


def show_messages() -> None:
    """The training messages (processes launched, resume, skipped videos) on stderr."""
    log = logging.getLogger("mimir")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main_train(argv: list[str] | None = None) -> int:
    """`mimir train`: exit code 0, 2 (argparse's) for a refused config before any work, 1 for a stopped run."""
    parser = _parser("mimir train", "Train the Mimir token fuser and the CogVideoX DiT end-to-end.")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue the run in output_dir from its newest checkpoint (or the one given)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides + ([f"resume={args.resume}"] if args.resume else []))
        check_paths(config, "train")
    except ValueError as error:
        parser.error(str(error))
    show_messages()
    try:
        summary = train(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"mimir train: error: {error}", file=sys.stderr)
        return 2
    except RunFailed as error:
        print(f"mimir train: stopped: {error}", file=sys.stderr)
        return 1
    shown = {k: summary[k] for k in ("run_dir", "steps", "first_loss", "final_loss", "skipped_videos", "checkpoint",
                                     "export", "loss_curve", "steps_per_second")}
    print(json.dumps(shown, indent=2))
    return 0


def main_cache(argv: list[str] | None = None) -> int:
    """`mimir cache`: exit code 0, 2 for a refused config before any work, 1 for a failed write."""
    parser = _parser("mimir cache", "Precompute VAE latents and T5 + LLM features into a resumable cache folder.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides)
        check_paths(config, "cache")
    except ValueError as error:
        parser.error(str(error))
    show_messages()
    try:
        summary = build_cache(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"mimir cache: error: {error}", file=sys.stderr)
        return 2
    except RunFailed as error:
        print(f"mimir cache: stopped: {error}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("cache", "shards", "clips")} | {"skipped_videos": len(summary["skipped"])},
                     indent=2))
    return 0
