"""Peak device memory with stage-wise offload vs everything resident, at a config where the LLM is the
largest model.

Config (random weights, fp32): T5 v1.1 encoder d_model 256 x 4 layers; Phi-3 LLM hidden 384 x 4 layers
(8 answer tokens, 4 instructions); fuser; CogVideoX-5B-style DiT 4 heads x 64 x 4 layers; tiny VAE;
9 frames at 32 x 32, 2 steps with CFG.

Method. On CUDA: torch.cuda.max_memory_allocated over the whole call, models on the GPU throughout vs
Placement("cuda", "cpu"). On the CPU there is no second memory to offload to, so we measure what the device
would hold: the live tensors the call allocates (PeakTensorMemory, common.py) plus the weights that are on
the compute device at that moment. "Resident" books all five models' weights for the whole call; "offload"
runs the pipeline with a Placement whose stage() books exactly the modules the pipeline stages, for as
long as the stage lasts (it computes in place instead of moving them). The staging order is the real
pipeline's; the only assumption is that a moved model occupies its parameter and buffer bytes.
"""

from __future__ import annotations

import contextlib

import torch
from common import DEVICE, MIB, PeakTensorMemory, Row, check, nbytes, sized_components, table

from mimir.offload import Placement
from mimir.pipeline import MimirPipeline

PROMPT = "two red balls and a blue box slide to the left"
VIDEO = dict(num_frames=9, height=32, width=32, steps=2, guidance=6.0, seed=0)
MODELS = ("text_encoder", "llm", "fuser", "transformer", "vae")


class BookedPlacement(Placement):
    """Computes on the CPU in place, booking on `meter.resident` the weights of each staged module."""

    def __init__(self, meter: PeakTensorMemory):
        super().__init__("cpu", "cpu")
        self.meter = meter

    @contextlib.contextmanager
    def stage(self, *modules):
        size = sum(nbytes(m) for m in modules if m is not None)
        self.meter.resident += size
        self.meter.note()
        try:
            yield self.device
        finally:
            self.meter.resident -= size


def peak_cpu(c: dict, offload: bool) -> int:
    meter = PeakTensorMemory()
    pipe = MimirPipeline(**c, placement=BookedPlacement(meter) if offload else Placement())
    meter.resident = 0 if offload else sum(nbytes(c[k]) for k in MODELS)
    with torch.no_grad(), meter:
        pipe(PROMPT, **VIDEO)
    return meter.peak


def peak_cuda(c: dict, offload: bool) -> int:
    for k in MODELS:
        c[k].to("cpu" if offload else DEVICE)
    pipe = MimirPipeline(**c, placement=Placement(DEVICE, "cpu" if offload else DEVICE))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        pipe(PROMPT, **VIDEO)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def run() -> list[Row]:
    c = sized_components(t5_dim=256, t5_layers=4, llm_dim=384, llm_layers=4, dit_heads=4, dit_layers=4)
    sizes = {k: nbytes(c[k]) for k in MODELS}
    peak = peak_cuda if DEVICE.type == "cuda" else peak_cpu
    resident, offload = peak(c, offload=False), peak(c, offload=True)
    ratio = offload / resident
    target, met = check(ratio, "<=", 0.6)
    split = ", ".join(f"{k} {v / MIB:.1f}" for k, v in sizes.items())
    method = "CUDA max_memory_allocated" if DEVICE.type == "cuda" else "CPU: live tensors + booked weights"
    detail = (f"{offload / MIB:.1f} MiB vs {resident / MIB:.1f} MiB ({method}); weights MiB: {split}; "
              f"9 frames 32x32, 2 steps, CFG")
    return [Row("peak memory, stage-wise offload / all resident", ratio, target, met, detail)]


if __name__ == "__main__":
    print(table(run()))
