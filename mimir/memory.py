"""Memory and speed options for the CogVideoX transformer (DiT): fp8 weight storage, block swap, torch.compile.

- fp8 storage: the Linear layers of the transformer blocks keep their weights in float8 (e4m3fn) with one
  fp32 scale per tensor, and upcast them to the input's dtype inside each forward; 1 byte per weight instead
  of 2 (bf16) or 4 (fp32). Inference only: fp8 weights are frozen.
- block swap: the last N transformer blocks live on the offload device (pinned CPU memory when computing on
  CUDA) and are copied to the compute device just before their forward, the next one prefetched on a side
  stream while the current one computes; at most two swapped blocks are on the device at once. After its
  forward a block's device copy is dropped, not written back, so block swap is for inference only.
- compile: `torch.compile` of each block's forward with static shapes. Every denoising step of a run has the
  same shapes, so the blocks compile on the first step and do not recompile on the later ones; a new
  resolution, frame count or batch size compiles again. Off unless asked for.

Order: enable fp8 storage first, then block swap (block swap keeps the tensors it finds at enable time).
`apply_memory_options` is the one place that applies them, for the CLI and the nodes (training uses none: fp8
weights and swapped blocks are for inference only).

Why our own and not diffusers': measured on one CogVideoX-5B-width block (3072 wide, weights spread 0.02, bf16
compute), fp8 storage with a per-tensor scale is 0.79% off the bf16 output and holds 168 MB of parameters;
diffusers' layerwise casting to float8_e4m3fn is 1.20% off and holds 185 MB (unscaled, weights this small sit
in fp8's subnormal range). diffusers' group offloading moves every block; block swap moves only the last N, so a
card that holds most of the DiT keeps most of its speed (not yet timed on a GPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


@dataclass
class MemoryOptions:
    """The DiT's memory and speed options: CLI flags --fp8 / --blocks-to-swap / --compile, Model Loader inputs."""

    fp8: bool = False
    blocks_to_swap: int = 0
    compile: bool = False


def apply_memory_options(transformer: nn.Module, options: MemoryOptions, device, offload_device="cpu") -> None:
    """fp8 storage (computing in the dtype the transformer was loaded in), then block swap, then compile."""
    blocks = len(_blocks(transformer))
    if not 0 <= options.blocks_to_swap <= blocks:
        raise ValueError(f"blocks_to_swap must be in 0..{blocks} (the model's blocks), got {options.blocks_to_swap}")
    if options.fp8:
        enable_fp8_storage(transformer, next(transformer.parameters()).dtype)
    if options.blocks_to_swap:
        enable_block_swap(transformer, options.blocks_to_swap, device, offload_device)
    if options.compile:
        compile_blocks(transformer)


# ---- fp8 weight storage --------------------------------------------------------------------------------
class Fp8Linear(nn.Module):
    """A Linear layer whose weight is stored as float8 e4m3fn (times an fp32 per-tensor scale)."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype, scaled: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        # scaling maps the largest |w| to the fp8 maximum, so no weight saturates and small ones keep precision
        scale = weight.abs().max().clamp(min=1e-12) / FP8_MAX if scaled else weight.new_tensor(1.0)
        self.weight = nn.Parameter((weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), requires_grad=False)
        self.register_buffer("weight_scale", scale.reshape(()))
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=linear.bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=float8_e4m3fn"


def enable_fp8_storage(transformer: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, scaled: bool = True) -> int:
    """Store every nn.Linear inside `transformer.transformer_blocks` in fp8; biases in `compute_dtype`.
    Embeddings, final norm and output projection stay as they are (small, and most sensitive).
    Returns the number of layers converted."""
    if getattr(transformer, "_mimir_block_swap", None) is not None:
        raise RuntimeError("enable fp8 storage before block swap (block swap keeps the tensors it found)")
    blocks = _blocks(transformer)
    linears = [(parent, name, child) for parent in blocks.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear]
    for parent, name, child in linears:
        setattr(parent, name, Fp8Linear(child, compute_dtype, scaled))
    return len(linears)


# ---- block swap ----------------------------------------------------------------------------------------
class BlockSwap:
    """Forward hooks that bring swapped blocks to the compute device just in time (see the module doc)."""

    def __init__(self, transformer: nn.Module, blocks_to_swap: int, device, offload_device="cpu"):
        blocks = _blocks(transformer)
        if not 0 < blocks_to_swap <= len(blocks):
            raise ValueError(f"blocks_to_swap must be in 1..{len(blocks)} (the transformer's block count), "
                             f"got {blocks_to_swap}")
        self.transformer, self.blocks = transformer, blocks
        self.device, self.offload_device = torch.device(device), torch.device(offload_device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.swapped = range(len(blocks) - blocks_to_swap, len(blocks))
        self.homes = {i: self._send_home(blocks[i]) for i in self.swapped}  # i -> [(tensor, home copy)]
        self.copies: dict[int, list[torch.Tensor]] = {}  # i -> device copies, loading or loaded
        self.handles = [transformer.register_forward_pre_hook(self._before_transformer)]
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(partial(self._before_block, i)))
            if i in self.swapped:
                self.handles.append(block.register_forward_hook(partial(self._after_block, i)))

    def _send_home(self, block: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pin = self.cuda and self.offload_device.type == "cpu"
        pairs = []
        for tensor in [*block.parameters(), *block.buffers()]:
            home = tensor.data.to(self.offload_device)
            tensor.data = home.pin_memory() if pin else home
            pairs.append((tensor, tensor.data))
        return pairs

    def _load(self, i: int) -> None:
        """Start copying block i to the compute device (on the side stream when on CUDA)."""
        if i in self.copies:
            return
        stream = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        with stream:
            self.copies[i] = [torch.empty_like(home, device=self.device).copy_(home, non_blocking=self.cuda)
                              for _, home in self.homes[i]]

    def _before_transformer(self, module, args):
        if self.swapped.start == 0:
            self._load(0)

    def _before_block(self, i: int, block: nn.Module, args):
        if i in self.swapped:
            if torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters()):
                raise RuntimeError("block swap is for inference: run under torch.no_grad() or disable block swap")
            self._load(i)
            if self.cuda:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_stream(self.stream)
            for (tensor, _), copy in zip(self.homes[i], self.copies[i]):
                if self.cuda:
                    copy.record_stream(compute)  # the side stream allocated it; the compute stream reads it
                tensor.data = copy
        if i + 1 in self.swapped:
            self._load(i + 1)  # prefetch while block i computes

    def _after_block(self, i: int, block: nn.Module, args, output):
        self._restore(i)

    def _restore(self, i: int) -> None:
        for tensor, home in self.homes[i]:
            tensor.data = home
        self.copies.pop(i, None)

    def release(self) -> None:
        """Drop every device copy (a prefetched block, or one left by an interrupted forward)."""
        for i in list(self.copies):
            self._restore(i)

    def place(self, device) -> None:
        """`transformer.to(device)` for everything but the swapped blocks, which stay on the offload device.
        Placement.stage (offload.py) calls this instead of `.to` while block swap is on."""
        self.release()
        for tensor in [*self.transformer.parameters(recurse=False), *self.transformer.buffers(recurse=False)]:
            tensor.data = tensor.data.to(device)
        for child in self.transformer.children():
            if child is not self.blocks:
                child.to(device)
        for i, block in enumerate(self.blocks):
            if i not in self.swapped:
                block.to(device)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.release()


def enable_block_swap(transformer: nn.Module, blocks_to_swap: int, device, offload_device="cpu") -> BlockSwap:
    """Keep the last `blocks_to_swap` blocks on `offload_device`; they visit `device` only for their forward.
    The rest of the transformer is not moved here: Placement (or the caller) puts it on `device`."""
    disable_block_swap(transformer)
    swap = BlockSwap(transformer, blocks_to_swap, device, offload_device)
    transformer._mimir_block_swap = swap
    transformer._mimir_place = swap.place
    return swap


def disable_block_swap(transformer: nn.Module) -> None:
    """Remove the hooks; swapped blocks stay on the offload device until the transformer is moved."""
    swap = getattr(transformer, "_mimir_block_swap", None)
    if swap is not None:
        swap.remove()
        del transformer._mimir_block_swap, transformer._mimir_place


# ---- torch.compile -------------------------------------------------------------------------------------
def compile_blocks(transformer: nn.Module, backend="inductor", mode: str | None = None) -> None:
    """Compile each block's forward with static shapes (no recompiles across the steps of a run).
    Hooks (block swap) stay outside the compiled code. `backend` may be any torch.compile backend."""
    for block in _blocks(transformer):
        block.forward = torch.compile(type(block).forward.__get__(block), backend=backend, mode=mode, dynamic=False)


def uncompile_blocks(transformer: nn.Module) -> None:
    for block in _blocks(transformer):
        block.__dict__.pop("forward", None)


def _blocks(transformer: nn.Module) -> nn.ModuleList:
    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"expected a CogVideoX transformer with .transformer_blocks, got {type(transformer).__name__}")
    return blocks
