"""Stage-wise placement: a model sits on the compute device only while its stage runs, so peak accelerator
memory is the largest stage (T5, LLM, DiT or VAE), not their sum."""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch


@dataclass
class Placement:
    device: torch.device | str = "cpu"  # where stages compute
    offload_device: torch.device | str = "cpu"  # where idle models wait

    def __post_init__(self):
        self.device, self.offload_device = torch.device(self.device), torch.device(self.offload_device)

    @contextlib.contextmanager
    def stage(self, *modules):
        """Move `modules` to the compute device for the duration of the block, then back and free the cache."""
        modules = [m for m in modules if m is not None]
        moving = self.device != self.offload_device
        if moving:
            for m in modules:
                move_module(m, self.device)
        try:
            yield self.device
        finally:
            if moving:
                for m in modules:
                    move_module(m, self.offload_device)
                free_accelerator_cache(self.device)


def move_module(module: torch.nn.Module, device: torch.device) -> None:
    """`module.to(device)`; a transformer with block swap (memory.py) keeps its swapped blocks offloaded."""
    place = getattr(module, "_mimir_place", None)
    if place is None:
        module.to(device)
    else:
        place(device)


def free_accelerator_cache(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The compute dtype: float8 weights (memory.py's fp8 storage) are upcast at run time, so they don't count."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point() and p.dtype.itemsize > 1)
