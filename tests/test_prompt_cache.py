import dataclasses

import pytest
import torch

from mimir.pipeline import MimirPipeline
from mimir.prompt_cache import PromptCache, encode_features_cached, encoding_key_parts, files_identity, model_identity
from mimir.testing import tiny_components, tiny_llm, tiny_t5

PROMPT = "a red circle moves to the left"


@pytest.fixture(scope="module")
def components():
    return tiny_components(stabilizer_tokens=4)


class Counting:
    """Counts forward calls of a model (an encoder run) without changing it."""

    def __init__(self, *modules):
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._count) for m in modules]

    def _count(self, module, args):
        self.calls += 1


def assert_same(a, b):
    for name in ("t5", "llm", "llm_mask", "instructions"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_second_call_skips_the_encoders_and_keeps_one_file_per_prompt(tmp_path, components):
    """The key must not change after the first encode (a fast tokenizer keeps its last padding/truncation state,
    which was part of the T5 identity: every prompt was stored twice)."""
    pipe = MimirPipeline(**components)
    cache = PromptCache(tmp_path)
    runs = Counting(pipe.llm, pipe.text_encoder)
    first = encode_features_cached(pipe, ["", PROMPT], cache)
    assert runs.calls > 0
    runs.calls = 0
    for _ in range(2):
        assert_same(encode_features_cached(pipe, ["", PROMPT], cache), first)
    assert runs.calls == 0
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_a_cache_folder_that_cannot_be_written_warns_and_runs_uncached(tmp_path, components, caplog):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")  # mkdir fails, even as root
    pipe = MimirPipeline(**components)
    reference = pipe.encode_features([PROMPT])
    with caplog.at_level("WARNING"):
        features = encode_features_cached(pipe, [PROMPT], PromptCache(blocked))
    assert_same(features, reference)
    assert "cannot write to" in caplog.text and str(blocked) in caplog.text


def test_pipeline_with_cache_runs_no_encoder_on_a_repeated_prompt(tmp_path, components):
    pipe = MimirPipeline(**components)
    ref_cond, ref_uncond = pipe.encode_prompt(PROMPT, "", seed=0)
    cached = MimirPipeline(**components, prompt_cache=PromptCache(tmp_path))
    runs = Counting(cached.llm, cached.text_encoder)
    cond1, uncond1 = cached.encode_prompt(PROMPT, "", seed=0)
    assert runs.calls > 0
    runs.calls = 0
    cond2, uncond2 = cached.encode_prompt(PROMPT, "", seed=0)
    assert runs.calls == 0  # neither T5 nor the LLM ran
    assert torch.equal(cond1, cond2) and torch.equal(uncond1, uncond2)
    # features cached per prompt and re-batched fuse to what the plain pipeline gives
    assert torch.allclose(cond2, ref_cond, atol=1e-6) and torch.allclose(uncond2, ref_uncond, atol=1e-6)


def test_cached_prompts_need_no_llm_when_identities_are_given(tmp_path, components):
    pipe = MimirPipeline(**components)
    cache = PromptCache(tmp_path)
    ids = dict(t5_identity="t5-file-id", llm_identity="llm-file-id")
    first = encode_features_cached(pipe, ["", PROMPT], cache, **ids)
    pipe.release_llm()
    assert_same(encode_features_cached(pipe, ["", PROMPT], cache, **ids), first)
    with pytest.raises(ValueError, match="LLM .* is not loaded"):
        encode_features_cached(pipe, [PROMPT], cache)  # no identity given and no LLM to take it from
    with pytest.raises(ValueError, match="no LLM"):
        encode_features_cached(pipe, ["a new prompt"], cache, **ids)  # a miss needs the LLM


def test_key_changes_with_everything_that_changes_the_features(components):
    config = components["fuser"].config
    base = PromptCache.key(encoding_key_parts(PROMPT, "t5", "llm", config, seed=1))
    variants = [
        encoding_key_parts(PROMPT + " fast", "t5", "llm", config),
        encoding_key_parts(PROMPT, "t5b", "llm", config),
        encoding_key_parts(PROMPT, "t5", "llmb", config),
        encoding_key_parts(PROMPT, "t5", "llm", dataclasses.replace(config, text_len=32)),
        encoding_key_parts(PROMPT, "t5", "llm", dataclasses.replace(config, answer_tokens=8)),
        encoding_key_parts(PROMPT, "t5", "llm", dataclasses.replace(config, llm_hidden_layer=-2)),
        encoding_key_parts(PROMPT, "t5", "llm", dataclasses.replace(config, instructions=("a", "b", "c", "d"))),
        encoding_key_parts(PROMPT, "t5", "llm", dataclasses.replace(config, answer_sampling=True), seed=1),
    ]
    keys = [PromptCache.key(v) for v in variants]
    assert base not in keys and len(set(keys)) == len(keys)
    # greedy answers do not depend on the seed; sampled ones do
    assert PromptCache.key(encoding_key_parts(PROMPT, "t5", "llm", config, seed=2)) == base
    sampled = dataclasses.replace(config, answer_sampling=True)
    assert PromptCache.key(encoding_key_parts(PROMPT, "t5", "llm", sampled, seed=1)) != \
        PromptCache.key(encoding_key_parts(PROMPT, "t5", "llm", sampled, seed=2))


def test_model_identity_tells_models_apart(tmp_path, components):
    llm, tok = components["llm"], components["llm_tokenizer"]
    assert model_identity(llm) == model_identity(tiny_llm(tok, seed=1))  # the same model, built again
    assert model_identity(llm) != model_identity(tiny_llm(tok, seed=7))  # same config, other weights
    assert model_identity(llm) != model_identity(tiny_llm(tok, seed=1).to(torch.bfloat16))
    assert model_identity(components["text_encoder"]) != model_identity(tiny_t5(components["tokenizer"], d_model=48))
    assert model_identity(tok) != model_identity(components["tokenizer"])
    weights = tmp_path / "llm.safetensors"
    weights.write_bytes(b"x" * 10)
    first = model_identity(weights)
    weights.write_bytes(b"y" * 11)
    assert model_identity(weights) != first
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_identity(tmp_path / "missing")


def test_damaged_cache_file_is_re_encoded(tmp_path, components):
    pipe = MimirPipeline(**components)
    cache = PromptCache(tmp_path)
    first = encode_features_cached(pipe, [PROMPT], cache)
    [stored] = tmp_path.glob("*.safetensors")
    stored.write_bytes(b"not safetensors")
    assert_same(encode_features_cached(pipe, [PROMPT], cache), first)
    assert stored.read_bytes() != b"not safetensors"  # stored again


def test_files_identity_keys_on_the_dtype(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, dtype=torch.float16)}, str(tmp_path / "model.safetensors"))
    ids = {files_identity([tmp_path], dtype) for dtype in ("fp32", "bf16", "fp16")}
    assert len(ids) == 3
    assert files_identity([tmp_path], "fp32") == files_identity([tmp_path], torch.float32)
    # "auto" (a node's default) computes in the stored dtype: the same key as asking for it by name
    assert files_identity([tmp_path], None) == files_identity([tmp_path], "fp16")


def test_default_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMIR_PROMPT_CACHE", str(tmp_path / "prompts"))
    assert PromptCache().folder == tmp_path / "prompts"


def test_a_loaded_pipeline_and_the_cli_find_the_same_entries(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """One identity: a pipeline loaded from files keys on those files and its dtype, as the CLI and the nodes do."""
    import mimir.components
    from mimir.cli import main
    from mimir.loading import load_pipeline

    pipe = load_pipeline(tiny_model_dir, dtype="fp32")
    pipe.prompt_cache = PromptCache(tmp_path / "cache")
    pipe.encode_prompt(PROMPT, "", seed=0)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    for name in ("load_t5", "load_llm"):
        monkeypatch.setattr(mimir.components, name, lambda *a, **k: pytest.fail("a cached prompt loaded an encoder"))
    assert main(["generate", PROMPT, "--model", str(tiny_model_dir), "--steps", "1", "--prompt-cache",
                 str(tmp_path / "cache"), "-o", str(tmp_path / "v.webp")]) == 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
