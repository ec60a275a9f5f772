import copy
import importlib.util

import pytest
import torch

from mimir.pipeline import MimirPipeline
from mimir.speed import STEP_CACHES, DispatchCogVideoXAttnProcessor, StepCache, set_attention_backend
from mimir.testing import tiny_components

PROMPT = "a red circle moves to the left"
PACKAGES = {"flash": "flash_attn", "sage": "sageattention", "xformers": "xformers"}


def denoise(pipe, steps=3, guidance=6.0, frames=9):
    cond, uncond = pipe.encode_prompt(PROMPT, "" if guidance > 1 else None)
    return pipe.denoise(cond, uncond, frames, 32, 32, steps, guidance, seed=0)


@pytest.mark.parametrize("variant", ["2b", "5b", "1.5"])
def test_native_backend_reaches_every_attention_layer_and_matches_the_default_bit_for_bit(variant):
    c = tiny_components(variant=variant)
    default = MimirPipeline(**c)
    native = MimirPipeline(**{**c, "transformer": copy.deepcopy(c["transformer"])})
    assert set_attention_backend(native.transformer, "native") == 2
    processors = [block.attn1.processor for block in native.transformer.transformer_blocks]
    assert all(type(p) is DispatchCogVideoXAttnProcessor and p._attention_backend == "native" for p in processors)
    frames = 17 if variant == "1.5" else 9
    assert torch.equal(denoise(native, frames=frames), denoise(default, frames=frames))


@pytest.mark.parametrize("backend", sorted(PACKAGES))
def test_a_backend_without_its_package_is_refused_with_the_package_named(backend):
    if importlib.util.find_spec(PACKAGES[backend]) is not None:
        pytest.skip(f"{PACKAGES[backend]} is installed here")
    transformer = tiny_components()["transformer"]
    package = {"flash": "flash-attn", "sage": "sageattention", "xformers": "xformers"}[backend]
    with pytest.raises(ValueError, match=f"attention backend '{backend}'.*{package}"):
        set_attention_backend(transformer, backend)
    assert all(type(b.attn1.processor) is not DispatchCogVideoXAttnProcessor for b in transformer.transformer_blocks)
    with pytest.raises(ValueError, match="must be one of"):
        set_attention_backend(transformer, "flash3")


def test_step_cache_settings_are_parsed_and_checked():
    assert StepCache.parse("fbc:0.2") == StepCache("fbc", 0.2) and StepCache.parse("pab").setting == 2
    assert str(StepCache.parse("taylorseer:3")) == "taylorseer (interval 3)"
    for bad, message in [("teacache", "must be one of"), ("fbc:-1", "must be > 0"), ("pab:x", "pab:x"),
                         ("pab:0.4", "whole number of steps >= 1, got 0.4"),  # round() gave 0: a modulo by zero
                         ("taylorseer:2.5", "whole number of steps >= 1")]:
        with pytest.raises(ValueError, match=message):
            StepCache.parse(bad)


# settings that skip work on the tiny random model within 8 steps
CACHES = {"fbc": "fbc:2", "pab": "pab:3", "faster": "faster:3", "taylorseer": "taylorseer:2", "mag": "mag:2"}


@pytest.mark.parametrize("method", sorted(STEP_CACHES))
def test_each_step_cache_changes_the_run_a_little_and_leaves_the_transformer_as_it_was(method):
    pipe = MimirPipeline(**tiny_components(variant="5b"))
    uncached = denoise(pipe, steps=8)
    pipe.step_cache = StepCache.parse(CACHES[method])
    first = denoise(pipe, steps=8)
    if method == "mag":  # its first run calibrates: nothing is skipped
        assert torch.equal(first, uncached)
        first = denoise(pipe, steps=8)
    assert not torch.equal(first, uncached)
    assert (first - uncached).abs().mean() < 0.5 * uncached.abs().mean()  # an approximation, not another video
    assert torch.equal(denoise(pipe, steps=8), first)  # fresh cache state every run
    assert not pipe.transformer.is_cache_enabled
    pipe.step_cache = None
    assert torch.equal(denoise(pipe, steps=8), uncached)


def test_faster_cache_without_guidance_runs_the_single_batch():
    pipe = MimirPipeline(**tiny_components(variant="5b"))
    uncached = denoise(pipe, steps=8, guidance=1.0)
    pipe.step_cache = StepCache("faster", 3)
    cached = denoise(pipe, steps=8, guidance=1.0)
    assert cached.shape == uncached.shape and not torch.equal(cached, uncached)
