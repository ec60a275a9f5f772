"""End-to-end Mimir training: data, feature cache, the loop, checkpoints, export (see loop.py)."""

from .cache import build_cache
from .commands import main_cache, main_train
from .config import TrainConfig, load_config
from .loop import train

__all__ = ["TrainConfig", "build_cache", "load_config", "main_cache", "main_train", "train"]
