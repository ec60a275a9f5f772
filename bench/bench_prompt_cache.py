"""Encoded-prompt cache: the encode stage (T5 + LLM features, then the fuser) of a prompt seen before vs the
first time, timed interleaved.

Config: the offload benchmark's text models (T5 v1.1 d_model 256 x 4 layers, Phi-3 hidden 384 x 4 layers,
random weights, fp32), 32 answer tokens (the default), 4 instruction tokens, prompt + empty negative prompt.
"First" encodes into an empty cache folder each time (and writes the files); "second" reads them back.
"""

from __future__ import annotations

import tempfile

import torch
from common import DEVICE, Row, check, interleaved, median, median_ratio, sized_components, table

from mimir.offload import Placement
from mimir.pipeline import MimirPipeline
from mimir.prompt_cache import PromptCache

PROMPT = "two red balls and a blue box slide to the left while a green triangle spins"


def run(repeats: int = 5) -> list[Row]:
    c = sized_components(t5_dim=256, t5_layers=4, llm_dim=384, llm_layers=4, dit_heads=4, dit_layers=1,
                         answer_tokens=32)
    for value in c.values():
        if isinstance(value, torch.nn.Module):
            value.to(DEVICE)
    with tempfile.TemporaryDirectory() as folder:
        warm = MimirPipeline(**c, placement=Placement(DEVICE, DEVICE), prompt_cache=PromptCache(f"{folder}/warm"))
        warm.encode_prompt(PROMPT, "")  # fills the cache that "second" reads
        fresh = iter(range(10 ** 6))

        def first():
            pipe = MimirPipeline(**c, placement=Placement(DEVICE, DEVICE),
                                 prompt_cache=PromptCache(f"{folder}/cold{next(fresh)}"))
            return pipe.encode_prompt(PROMPT, "")

        with torch.no_grad():
            times = interleaved({"second": lambda: warm.encode_prompt(PROMPT, ""), "first": first}, repeats)
    ratio = median_ratio(times, "second", "first")
    target, met = check(ratio, "<=", 0.1)
    detail = (f"median {median(times['second']) * 1e3:.1f} ms vs {median(times['first']) * 1e3:.1f} ms, {repeats} interleaved repeats; "
              f"{DEVICE.type.upper()}; T5 256x4, Phi-3 384x4, 32 answer + 4 instruction tokens, prompt + negative")
    return [Row("encode stage, cached prompt / first encoding", ratio, target, met, detail)]


if __name__ == "__main__":
    print(table(run()))
