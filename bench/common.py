"""Shared benchmark tools: interleaved timing, peak memory, the machine's description, result rows.

Peak memory. On CUDA: `torch.cuda.max_memory_allocated` above what was allocated before the call. On the CPU,
process RSS mixes in the allocator's caching and Python objects, and tracemalloc does not see torch, so we
count tensors: `PeakTensorMemory` is a dispatch mode that sees every tensor an operator allocates (outputs
whose storage is not one of the inputs') and subtracts it when the storage is freed. Its peak is the most
tensor bytes alive at once during the call, beyond what existed before (model weights are not included).
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MIB = 2 ** 20


@dataclass
class Row:
    name: str
    value: float  # the ratio
    target: str  # e.g. "<= 1.05", "" when there is none
    met: bool | None
    detail: str  # what was measured, medians, config


def check(value: float, op: str, bound: float) -> tuple[str, bool]:
    return f"{op} {bound:g}", value <= bound if op == "<=" else value >= bound


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call, the functions alternating (order reversed every round) so that load from other
    processes falls on all of them alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def median_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's time / b's time in the same round: calls that ran side by side are compared,
    so a slow phase of the machine cancels out."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def ratio_spread(times: dict[str, list[float]], a: str, b: str) -> str:
    """Quartiles of the per-round ratios: how much the machine's load moved them."""
    q1, _, q3 = statistics.quantiles([x / y for x, y in zip(times[a], times[b])], n=4)
    return f"per-round ratios' quartiles {q1:.2f}-{q3:.2f}"


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live CPU tensors allocated inside the `with` block (see the module doc). `resident` is
    added to the current count; the offload benchmark books model weights there."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = self.resident = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def note(self) -> None:
        self.peak = max(self.peak, self.current + self.resident)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._freed, key)
        self.note()
        return out


def peak_memory(fn) -> int:
    """Peak bytes allocated while fn() runs, above what was allocated before (method: module doc)."""
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base
    with PeakTensorMemory() as meter:
        fn()
    return meter.peak


def matmul_gflops(size: int = 2048) -> tuple[callable, float]:
    """A square fp32 matmul on DEVICE and its FLOP count: the machine's reference speed."""
    a = torch.randn(size, size, device=DEVICE)
    b = torch.randn(size, size, device=DEVICE)
    return (lambda: torch.mm(a, b)), 2.0 * size ** 3


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def header() -> list[str]:
    import diffusers
    import transformers

    if DEVICE.type == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads"
    return [f"date: {datetime.datetime.now().isoformat(timespec='seconds')}", f"machine: {machine}",
            f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}"]


def table(rows: list[Row]) -> str:
    lines = ["| benchmark | ratio | target | met | measured |", "|---|---|---|---|---|"]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        lines.append(f"| {r.name} | {r.value:.3f} | {r.target} | {met} | {r.detail} |")
    return "\n".join(lines)


def sized_components(t5_dim: int, t5_layers: int, llm_dim: int, llm_layers: int, dit_heads: int, dit_layers: int,
                     stabilizer_tokens: int = 4, answer_tokens: int = 8, text_len: int = 226) -> dict:
    """MimirPipeline components of chosen sizes: real architectures (T5 v1.1, Phi-3, CogVideoX-5B-style rotary
    DiT with heads of 64, mimir.testing's tiny VAE), word tokenizers, random weights."""
    from diffusers import CogVideoXTransformer3DModel
    from transformers import Phi3Config, Phi3ForCausalLM, T5Config, T5EncoderModel

    from mimir.fuser import DEFAULT_INSTRUCTIONS, FuserConfig, TokenFuser
    from mimir.testing import real_scheduler, tiny_vae, word_tokenizer

    torch.manual_seed(0)
    t5_tok, llm_tok = word_tokenizer(kind="t5"), word_tokenizer(kind="llm")
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=t5_dim, d_kv=64, d_ff=t5_dim * 5 // 2,
                                 num_layers=t5_layers, num_heads=t5_dim // 64, relative_attention_num_buckets=32,
                                 feed_forward_proj="gated-gelu", pad_token_id=t5_tok.pad_token_id,
                                 eos_token_id=t5_tok.eos_token_id)).eval()
    llm = Phi3ForCausalLM(Phi3Config(vocab_size=len(llm_tok), hidden_size=llm_dim, intermediate_size=llm_dim * 8 // 3,
                                     num_hidden_layers=llm_layers, num_attention_heads=llm_dim // 64,
                                     num_key_value_heads=llm_dim // 64, max_position_embeddings=1024,
                                     pad_token_id=llm_tok.pad_token_id, bos_token_id=llm_tok.bos_token_id,
                                     eos_token_id=llm_tok.eos_token_id, tie_word_embeddings=False)).eval()
    fuser = TokenFuser(FuserConfig(t5_dim=t5_dim, llm_dim=llm_dim, text_len=text_len, answer_tokens=answer_tokens,
                                   stabilizer_tokens=stabilizer_tokens,
                                   instructions=DEFAULT_INSTRUCTIONS[:stabilizer_tokens])).eval()
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=dit_heads, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=64,
        text_embed_dim=t5_dim, num_layers=dit_layers, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        max_text_seq_length=text_len + stabilizer_tokens, use_rotary_positional_embeddings=True).eval()
    return dict(tokenizer=t5_tok, text_encoder=t5, llm_tokenizer=llm_tok, llm=llm, fuser=fuser,
                transformer=transformer, vae=tiny_vae(), scheduler=real_scheduler("ddim", snr_shift_scale=1.0))
