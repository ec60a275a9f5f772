"""The node pack through its no-ComfyUI fallback layer, on tiny models saved in a ComfyUI-style models folder.

Outputs are compared with the library run directly on the in-memory models the files were saved from, so
loading, type conversions (CONDITIONING, LATENT order and scaling, IMAGE) and node wiring are all checked.
"""

import dataclasses
import importlib.util
import inspect
import logging
import shutil

import pytest
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline
from torch import nn

from mimir.fuser import save_fuser
from mimir.loading import load_pipeline, save_pipeline, save_single_file
from mimir.pipeline import MimirPipeline
from mimir.sampler import TextStream
from mimir.speed import StepCache
from mimir.testing import real_scheduler, tiny_components, tiny_transformer
from mimir.text import LLMTextEncoder, encode_t5

PROMPT = "a red circle moves to the left"
SCALING = 1.15258426  # the tiny VAE's scaling factor, recorded with the tiny transformers
SNR_SHIFT = 1.0  # its scheduler: a custom variant without scheduler folder gets CogVideoX-5B's settings


def _perturb(fuser, seed=0):
    """A fresh fuser passes T5 through unchanged; give every branch weights so the LLM path shows in outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in fuser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return fuser


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(models dir, components, plain components, 2B components) with every layout the loaders read."""
    root = tmp_path_factory.mktemp("models")
    c = tiny_components(variant="5b")
    _perturb(c["fuser"])
    plain = tiny_components(variant="5b", stabilizer_tokens=0)
    c["scheduler"] = plain["scheduler"] = real_scheduler("ddim", snr_shift_scale=SNR_SHIFT)
    assert c["vae"].config.scaling_factor == SCALING
    c2b = tiny_components(variant="2b")
    for sub in ("text_encoders", "LLM", "mimir", "diffusion_models", "vae"):
        (root / sub).mkdir()
    c["text_encoder"].save_pretrained(root / "text_encoders" / "tiny-t5")
    c["tokenizer"].save_pretrained(root / "text_encoders" / "tiny-t5")
    save_single_file(c["text_encoder"], root / "text_encoders" / "tiny_t5.safetensors")
    c["tokenizer"].save_pretrained(root / "t5_tokenizer")  # stands in for ComfyUI's bundled T5 tokenizer
    c["llm"].save_pretrained(root / "LLM" / "tiny-phi3")
    c["llm_tokenizer"].save_pretrained(root / "LLM" / "tiny-phi3")
    save_fuser(c["fuser"], root / "mimir" / "tiny_fuser.safetensors")
    save_fuser(tiny_components(llm_arch="llama", seed=5)["fuser"], root / "mimir" / "other_fuser.safetensors")
    save_single_file(c["transformer"], root / "diffusion_models" / "tiny_5b.safetensors", vae_scaling_factor=SCALING)
    save_single_file(plain["transformer"], root / "diffusion_models" / "plain_5b.safetensors",
                     vae_scaling_factor=SCALING)
    save_single_file(c2b["transformer"], root / "diffusion_models" / "tiny_2b.safetensors", vae_scaling_factor=1.0)
    save_pipeline(MimirPipeline(**{**c, "scheduler": real_scheduler("dpm", snr_shift_scale=3.0)}),
                  root / "diffusion_models" / "tiny-pipeline")
    save_single_file(c["vae"], root / "vae" / "tiny_vae.safetensors")
    return root, c, plain


@pytest.fixture
def services(pack, tiny, tmp_path, monkeypatch):
    services = pack.nodes.comfy_services
    services.use_models_dir(tiny[0], output_dir=tmp_path / "output")
    monkeypatch.setattr(services, "bundled_t5_tokenizer", lambda: tiny[0] / "t5_tokenizer")
    monkeypatch.setenv("MIMIR_PROMPT_CACHE", str(tmp_path / "prompt_cache"))  # the cache folder outside ComfyUI
    yield services
    services.use_models_dir(None)


@pytest.fixture
def nodes(pack, services):
    return pack.nodes.NODE_CLASS_MAPPINGS


def run(nodes, node_type, **inputs):
    cls = nodes[node_type]
    return getattr(cls(), cls.FUNCTION)(**inputs)


def load_all(nodes, t5="tiny-t5", model="tiny_5b.safetensors"):
    return dict(
        t5=run(nodes, "MimirT5Loader", t5_name=t5, dtype="auto")[0],
        llm=run(nodes, "MimirLLMLoader", llm_name="tiny-phi3", dtype="auto", trust_remote_code=False)[0],
        fuser=run(nodes, "MimirFuserLoader", fuser_name="tiny_fuser.safetensors")[0],
        model=run(nodes, "MimirModelLoader", model_name=model, dtype="auto", blocks_to_swap=0)[0],
        vae=run(nodes, "MimirVAELoader", vae_name="tiny_vae.safetensors", dtype="auto")[0],
    )


def encode(nodes, m, prompt=PROMPT, answer_tokens=-1, instructions="", answer_seed=0, prompt_cache=True):
    return run(nodes, "MimirTextEncode", t5=m["t5"], llm=m["llm"], fuser=m["fuser"], prompt=prompt,
               answer_tokens=answer_tokens, instructions=instructions, answer_seed=answer_seed,
               prompt_cache=prompt_cache)


def text_loaders(nodes, t5_dtype="auto"):
    """Fresh T5 and LLM loader outputs (nothing loaded yet)."""
    return dict(t5=run(nodes, "MimirT5Loader", t5_name="tiny-t5", dtype=t5_dtype)[0],
                llm=run(nodes, "MimirLLMLoader", llm_name="tiny-phi3", dtype="auto", trust_remote_code=False)[0])


def sample(nodes, model, pos, neg, **overrides):
    inputs = dict(model=model, positive=pos, negative=neg, width=32, height=32, frames=9, steps=2, cfg=6.0,
                  seed=3, scheduler="ddim", dynamic_cfg=False, denoise=1.0)
    return run(nodes, "MimirSampler", **{**inputs, **overrides})[0]


def to_diffusion(latent, scaling=SCALING):
    return latent["samples"].permute(0, 2, 1, 3, 4) * scaling


# ---- definitions ----------------------------------------------------------------------------------------

# Saved UI workflows store widget values by position: this order must never change.
WIDGETS = {
    "MimirT5Loader": ["t5_name", "dtype"],
    "MimirLLMLoader": ["llm_name", "dtype", "trust_remote_code"],
    "MimirFuserLoader": ["fuser_name"],
    "MimirModelLoader": ["model_name", "dtype", "blocks_to_swap", "attention"],
    "MimirVAELoader": ["vae_name", "dtype"],
    "MimirTextEncode": ["t5", "prompt", "answer_tokens", "instructions", "answer_seed", "llm", "fuser", "model",
                        "prompt_cache"],
    "MimirT5TextEncode": ["t5", "prompt", "text_len"],
    "MimirSaveEncodedPrompt": ["features", "name"],
    "MimirLoadEncodedPrompt": ["fuser", "encoded_prompt"],
    "MimirSampler": ["model", "positive", "negative", "width", "height", "frames", "steps", "cfg", "seed", "scheduler",
                     "dynamic_cfg", "denoise", "latent", "step_cache", "step_cache_setting"],
    "MimirDecode": ["vae", "samples", "tiling"],
    "MimirVAEEncode": ["vae", "images"],
}
CORE_TYPES = {"CONDITIONING", "LATENT", "IMAGE", "INT", "FLOAT", "STRING", "BOOLEAN"}


def test_every_node_is_declared_with_tooltips_and_its_own_types(pack, nodes):
    assert set(nodes) == set(WIDGETS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in nodes.items():
        spec = cls.INPUT_TYPES()
        inputs = {**spec["required"], **spec.get("optional", {})}
        assert list(inputs) == WIDGETS[name], name
        assert cls.DESCRIPTION and cls.CATEGORY.startswith("Mimir/") and callable(getattr(cls, cls.FUNCTION))
        assert all(options.get("tooltip") for _, options in inputs.values()), name
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), name
        for kind in [t for t, _ in inputs.values() if isinstance(t, str)] + list(cls.RETURN_TYPES):
            assert kind in CORE_TYPES or kind.startswith("MIMIR_"), (name, kind)
        assert not hasattr(cls, "comfy_entrypoint")
    assert not hasattr(pack, "comfy_entrypoint")


def test_loaders_list_files_and_model_folders(nodes, services, tiny, tmp_path, monkeypatch):
    def choices(node, field):
        return nodes[node].INPUT_TYPES()["required"][field][0]

    loaders = nodes["MimirT5Loader"].__module__
    demo = tmp_path / "demo"
    monkeypatch.setattr(f"{loaders}.DEMO_MODEL_DIR", demo)  # not installed, until the folders below exist
    monkeypatch.setattr(f"{loaders}.DEMO_T5_ONLY_DIR", demo / "t5_only")
    assert choices("MimirT5Loader", "t5_name") == ["tiny-t5", "tiny_t5.safetensors"]
    assert choices("MimirLLMLoader", "llm_name") == ["tiny-phi3"]
    assert choices("MimirFuserLoader", "fuser_name") == ["other_fuser.safetensors", "tiny_fuser.safetensors"]
    assert choices("MimirModelLoader", "model_name") == ["plain_5b.safetensors", "tiny-pipeline", "tiny_2b.safetensors",
                                                         "tiny_5b.safetensors"]
    assert choices("MimirVAELoader", "vae_name") == ["tiny_vae.safetensors"]
    assert "mimir-demo (bundled)" not in choices("MimirModelLoader", "model_name")
    for part in ("transformer", "vae", "text_encoder", "llm"):
        (demo / part).mkdir(parents=True)
    (demo / "fuser.safetensors").touch()
    for node, field in [("MimirT5Loader", "t5_name"), ("MimirLLMLoader", "llm_name"), ("MimirFuserLoader", "fuser_name"),
                        ("MimirModelLoader", "model_name"), ("MimirVAELoader", "vae_name")]:
        assert choices(node, field)[0] == "mimir-demo (bundled)"
    assert "mimir-demo T5-only (bundled)" not in choices("MimirModelLoader", "model_name")
    (demo / "t5_only" / "transformer").mkdir(parents=True)  # the T5-only arm: a DiT, for the Model Loader only
    assert choices("MimirModelLoader", "model_name")[:2] == ["mimir-demo (bundled)", "mimir-demo T5-only (bundled)"]
    assert not any("T5-only" in name for node, field in [("MimirT5Loader", "t5_name"), ("MimirLLMLoader", "llm_name"),
                                                         ("MimirFuserLoader", "fuser_name")]
                   for name in choices(node, field))


def test_loaders_report_what_they_loaded(nodes):
    m = load_all(nodes)
    assert not m["t5"].loaded and not m["llm"].loaded  # the text models load on first use
    assert m["model"].info.variant == "custom" and m["model"].info.vae_scaling_factor == SCALING
    assert type(m["model"].scheduler).__name__ == "CogVideoXDDIMScheduler"
    assert m["model"].scheduler.config.snr_shift_scale == 1.0  # unknown variant: the 5B settings
    assert m["t5"].info.dims["d_model"] == 32 and m["llm"].model.config.hidden_size == 48
    assert m["fuser"].config.out_len == 20 and m["vae"].config.latent_channels == 4
    assert m["t5"].loaded and m["llm"].loaded and m["llm"].get()[0] is m["llm"].model  # loaded once, kept
    folder = run(nodes, "MimirModelLoader", model_name="tiny-pipeline", dtype="fp32", blocks_to_swap=0)[0]
    assert folder.info.layout == "diffusers-folder"
    assert type(folder.scheduler).__name__ == "CogVideoXDPMScheduler"  # the folder's own scheduler
    assert folder.scheduler.config.snr_shift_scale == 3.0


# ---- text --------------------------------------------------------------------------------------------------

def test_mimir_text_encode_matches_the_pipeline(nodes, tiny):
    _, c, _ = tiny
    m = load_all(nodes)
    cond, features = encode(nodes, m)
    assert isinstance(cond, list) and len(cond) == 1 and cond[0][1] == {"mimir_encoder": "mimir"}
    expected, _ = MimirPipeline(**c).encode_prompt(PROMPT, negative_prompt=None)
    assert cond[0][0].shape == (1, 20, 32) and cond[0][0].dtype == torch.float32
    assert torch.equal(cond[0][0], expected)
    assert features.t5.shape == (1, 16, 32) and features.instructions.shape == (1, 4, 48)
    single = run(nodes, "MimirT5Loader", t5_name="tiny_t5.safetensors", dtype="auto")[0]
    assert torch.equal(encode(nodes, {**m, "t5": single})[0][0][0], expected)


def test_answer_tokens_and_instructions_can_be_overridden(nodes, tiny):
    _, c, _ = tiny
    m = load_all(nodes)
    lines = ["Describe the shapes.", "Describe the colours.", "Describe the places.", "Describe the counts."]
    for answer_tokens, override in [(0, False), (2, True)]:
        text = "\n  " + "\n".join(lines) + "\n\n" if override else ""  # blank lines and spaces are ignored
        got = encode(nodes, m, answer_tokens=answer_tokens, instructions=text)[0][0][0]
        config = dataclasses.replace(c["fuser"].config, answer_tokens=answer_tokens,
                                     instructions=tuple(lines) if override else c["fuser"].config.instructions)
        llm, mask, instr = LLMTextEncoder(c["llm"], c["llm_tokenizer"], config)([PROMPT])
        t5 = encode_t5(c["tokenizer"], c["text_encoder"], [PROMPT], max_length=16)
        with torch.no_grad():
            assert torch.equal(got, c["fuser"](t5, llm, mask, instr))
        assert not torch.equal(got, encode(nodes, m)[0][0][0])


def cache_files(services):
    return sorted(services.prompt_cache_dir().glob("*.safetensors"))


def test_a_cached_prompt_loads_neither_t5_nor_the_llm(nodes, services, tiny, pack, monkeypatch):
    m = load_all(nodes)
    uncached = encode(nodes, m, prompt_cache=False)
    first = encode(nodes, m)
    assert len(cache_files(services)) == 1 and torch.equal(first[0][0][0], uncached[0][0][0])
    fresh = text_loaders(nodes)
    with monkeypatch.context() as patch:
        patch.setattr(pack.nodes.loaders, "load_t5", lambda *a, **k: pytest.fail("T5 was loaded"))
        patch.setattr(pack.nodes.loaders, "load_llm", lambda *a, **k: pytest.fail("the LLM was loaded"))
        cond, features = encode(nodes, {**m, **fresh})
        assert not fresh["t5"].loaded and not fresh["llm"].loaded
        assert torch.equal(cond[0][0], first[0][0][0]) and cond[0][1] == first[0][0][1]
        for name in ("t5", "llm", "llm_mask", "instructions"):
            assert torch.equal(getattr(features, name), getattr(first[1], name)), name
        # greedy answers: the seed changes nothing, so it is no part of the key
        assert torch.equal(encode(nodes, {**m, **fresh}, answer_seed=7)[0][0][0], cond[0][0])
        # a hit checks the widths against the fuser it meets, still without loading anything
        wide = run(nodes, "MimirFuserLoader", fuser_name="tiny_fuser.safetensors")[0]
        wide.config = dataclasses.replace(wide.config, llm_dim=64)
        with pytest.raises(ValueError, match="^llm: this LLM has hidden size 48 .*llm_dim=64"):
            encode(nodes, {**m, **fresh, "fuser": wide})
    assert len(cache_files(services)) == 1


def test_changed_encoding_settings_miss_the_prompt_cache(nodes, services, tiny):
    m = load_all(nodes)
    encode(nodes, m)
    lines = "Describe the shapes.\nDescribe the colours.\nDescribe the places.\nDescribe the counts."
    sampled = run(nodes, "MimirFuserLoader", fuser_name="tiny_fuser.safetensors")[0]
    sampled.config = dataclasses.replace(sampled.config, answer_sampling=True)
    changes = [dict(prompt="two blue squares"), dict(answer_tokens=2), dict(instructions=lines),
               dict(t5_dtype="bf16"), dict(fuser=sampled), dict(fuser=sampled, answer_seed=1)]
    # (t5_dtype fp32 would be a hit: the tiny files are stored in fp32, which is what "auto" computes in)
    for i, change in enumerate(changes, start=2):
        fresh = text_loaders(nodes, change.pop("t5_dtype", "auto"))
        fresh["fuser"] = change.pop("fuser", m["fuser"])
        got = encode(nodes, {**m, **fresh}, **change)[0][0][0]
        assert fresh["t5"].loaded and fresh["llm"].loaded, change  # encoded, not read from the cache
        assert len(cache_files(services)) == i, change
        assert torch.equal(got, encode(nodes, {**m, **fresh}, prompt_cache=False, **change)[0][0][0]), change


def test_prompt_cache_off_neither_reads_nor_writes(nodes, services, tiny):
    m = load_all(nodes)
    encode(nodes, m, prompt_cache=False)
    assert not services.prompt_cache_dir().exists()
    encode(nodes, m)
    written = {p: p.stat().st_mtime_ns for p in cache_files(services)}
    fresh = text_loaders(nodes)
    encode(nodes, {**m, **fresh}, prompt_cache=False)
    assert fresh["t5"].loaded and fresh["llm"].loaded
    assert {p: p.stat().st_mtime_ns for p in cache_files(services)} == written


def test_t5_only_encode_is_diffusers_cogvideox_encoding(nodes, tiny):
    _, c, _ = tiny
    t5 = run(nodes, "MimirT5Loader", t5_name="tiny-t5", dtype="auto")[0]
    cond = run(nodes, "MimirT5TextEncode", t5=t5, prompt=PROMPT, text_len=226)[0]
    with torch.no_grad():
        expected = CogVideoXPipeline(c["tokenizer"], c["text_encoder"], c["vae"], c["transformer"],
                                     c["scheduler"]).encode_prompt(PROMPT, do_classifier_free_guidance=False)[0]
    assert cond[0][1] == {"mimir_encoder": "t5"} and cond[0][0].shape == (1, 226, 32)
    assert torch.equal(cond[0][0], expected)


@pytest.fixture
def demo_arms(pack, tiny, tmp_path, monkeypatch):
    """A tiny stand-in for the bundled demo (a Mimir folder) and its T5-only arm (a DiT reading 12 T5 tokens)."""
    _, c, _ = tiny
    demo = tmp_path / "demo"
    save_pipeline(MimirPipeline(**c), demo)
    tiny_transformer("5b", text_len=12, seed=7).save_pretrained(str(demo / "t5_only" / "transformer"))
    monkeypatch.setattr(pack.nodes.loaders, "DEMO_MODEL_DIR", demo)
    monkeypatch.setattr(pack.nodes.loaders, "DEMO_T5_ONLY_DIR", demo / "t5_only")
    return demo


def test_the_demos_t5_only_arm_is_the_librarys(nodes, demo_arms):
    """Model Loader's mimir-demo T5-only and Mimir Text Encode without LLM and fuser: the library's T5-only arm."""
    choices = nodes["MimirModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert choices[:2] == ["mimir-demo (bundled)", "mimir-demo T5-only (bundled)"]
    t5 = run(nodes, "MimirT5Loader", t5_name="mimir-demo (bundled)", dtype="auto")[0]
    model = run(nodes, "MimirModelLoader", model_name="mimir-demo T5-only (bundled)", dtype="auto",
                blocks_to_swap=0)[0]
    pos, neg = (run(nodes, "MimirTextEncode", t5=t5, model=model, prompt=p, answer_tokens=-1, instructions="",
                    answer_seed=0)[0] for p in (PROMPT, ""))
    assert pos[0][1] == {"mimir_encoder": "t5"} and pos[0][0].shape == (1, 12, 32)
    latent = sample(nodes, model, pos, neg)
    arm = demo_arms / "t5_only" / "transformer"
    pipe = load_pipeline(demo_arms, transformer_path=arm, with_fuser=False)
    assert model.info.vae_scaling_factor == pipe.vae.config.scaling_factor == SCALING  # the demo's VAE
    assert model.scheduler.config == pipe.scheduler.config  # and its scheduler
    expected = pipe(PROMPT, num_frames=9, height=32, width=32, steps=2, guidance=6.0, seed=3, output_type="latent")
    assert (to_diffusion(latent) - expected).abs().max() <= 1e-5
    shutil.rmtree(arm)
    assert "mimir-demo T5-only (bundled)" not in nodes["MimirModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    with pytest.raises(FileNotFoundError, match="^model_name: the bundled demo's T5-only arm is not installed"):
        run(nodes, "MimirModelLoader", model_name="mimir-demo T5-only (bundled)", dtype="auto", blocks_to_swap=0)


def test_text_encode_needs_the_llm_and_fuser_or_a_t5_only_model(nodes):
    """Checked when the graph is queued (ComfyUI passes linked inputs as None, leaves unlinked ones out) and run."""
    validate = nodes["MimirTextEncode"].VALIDATE_INPUTS
    assert validate(t5=None, llm=None, fuser=None) is True and validate(t5=None, model=None) is True
    assert validate(t5=None, llm=None, fuser=None, model=None) is True
    assert validate(t5=None, llm=None).startswith("connect both the LLM and the token fuser")
    assert validate(t5=None, fuser=None, model=None).startswith("connect both the LLM and the token fuser")
    assert validate(t5=None).startswith("with no LLM and fuser the prompt is encoded by T5 alone: connect the model")
    m = load_all(nodes)
    with pytest.raises(ValueError, match="^connect both the LLM and the token fuser"):
        run(nodes, "MimirTextEncode", t5=m["t5"], llm=m["llm"], prompt=PROMPT, answer_tokens=-1, instructions="",
            answer_seed=0)


def test_text_encode_names_unknown_words_in_the_log(nodes, caplog):
    m = load_all(nodes)
    with caplog.at_level(logging.WARNING):
        encode(nodes, m, prompt="a red zebra moves up", prompt_cache=False)
    warned = [r.getMessage() for r in caplog.records if "zebra" in r.getMessage()]
    assert len(warned) == 2 and "T5 tokenizer" in warned[0] and "LLM tokenizer" in warned[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # Mimir T5 Text Encode goes through the same text side
        run(nodes, "MimirT5TextEncode", t5=m["t5"], prompt="a red zebra moves up", text_len=16)
    assert [r.getMessage() for r in caplog.records if "zebra" in r.getMessage() and "T5 tokenizer" in r.getMessage()]


def test_encoded_prompt_round_trip(nodes, services, tiny):
    m = load_all(nodes)
    cond, features = encode(nodes, m)
    assert run(nodes, "MimirSaveEncodedPrompt", features=features, name="prompts/red_circle") == \
        {"ui": {"text": ["red_circle.safetensors"]}}
    assert (services.prompts_dir() / "prompts" / "red_circle.safetensors").is_file()
    choices = nodes["MimirLoadEncodedPrompt"].INPUT_TYPES()["required"]["encoded_prompt"][0]
    assert choices == ["prompts/red_circle.safetensors"]
    loaded = run(nodes, "MimirLoadEncodedPrompt", fuser=m["fuser"], encoded_prompt=choices[0])[0]
    assert torch.equal(loaded[0][0], cond[0][0])
    other = run(nodes, "MimirFuserLoader", fuser_name="other_fuser.safetensors")[0]
    other.config = dataclasses.replace(other.config, llm_dim=64)
    other.z_beta = nn.Linear(64, 32)
    with pytest.raises(ValueError, match="^encoded_prompt: .*llm_dim|^encoded_prompt: .*64"):
        run(nodes, "MimirLoadEncodedPrompt", fuser=other, encoded_prompt=choices[0])
    with pytest.raises(ValueError, match="^name: "):
        run(nodes, "MimirSaveEncodedPrompt", features=features, name="../escape")


# ---- sampling and decoding -----------------------------------------------------------------------------------

def test_sampler_and_decoder_match_the_pipeline(nodes, tiny):
    _, c, _ = tiny
    m = load_all(nodes)
    latent = sample(nodes, m["model"], encode(nodes, m)[0], encode(nodes, m, prompt="")[0])
    assert set(latent) == {"samples"} and latent["samples"].shape == (1, 4, 3, 4, 4)  # [B, C, T, H/8, W/8]
    pipe = MimirPipeline(**c)
    expected = pipe(PROMPT, "", num_frames=9, height=32, width=32, steps=2, guidance=6.0, seed=3, output_type="latent")
    assert (to_diffusion(latent) - expected).abs().max() <= 1e-5  # VAE space, ComfyUI order
    images = run(nodes, "MimirDecode", vae=m["vae"], samples=latent, tiling=True)[0]
    assert images.shape == (9, 32, 32, 3) and images.min() >= 0 and images.max() <= 1
    assert (images - pipe.decode(expected)[0]).abs().max() <= 1e-5  # the tiny VAE's tiles do not fit: whole


def test_model_loader_attention_and_sampler_step_cache(nodes, tiny, pack, monkeypatch):
    _, c, _ = tiny
    m = load_all(nodes)
    assert {b.attn1.processor._attention_backend for b in m["model"].transformer.transformer_blocks} == {"native"}
    pos, neg = encode(nodes, m)[0], encode(nodes, m, prompt="")[0]
    off = sample(nodes, m["model"], pos, neg, steps=8)
    cached = sample(nodes, m["model"], pos, neg, steps=8, step_cache="taylorseer", step_cache_setting=2.0)
    pipe = MimirPipeline(**c)
    pipe.step_cache = StepCache("taylorseer", 2)
    expected = pipe(PROMPT, "", num_frames=9, height=32, width=32, steps=8, guidance=6.0, seed=3, output_type="latent")
    assert not torch.equal(cached["samples"], off["samples"])
    assert (to_diffusion(cached) - expected).abs().max() <= 1e-5
    assert torch.equal(sample(nodes, m["model"], pos, neg, steps=8)["samples"], off["samples"])  # hooks removed
    with pytest.raises(ValueError, match="^step_cache: .*teacache"):
        sample(nodes, m["model"], pos, neg, step_cache="teacache")
    if importlib.util.find_spec("sageattention") is None:
        monkeypatch.setattr(pack.nodes.loaders, "load_transformer", lambda *a, **k: pytest.fail("weights were read"))
        with pytest.raises(ValueError, match="^attention: .*sageattention"):
            run(nodes, "MimirModelLoader", model_name="tiny_5b.safetensors", dtype="auto", blocks_to_swap=0,
                attention="sage")


def test_decoder_tiles_when_the_tiles_fit(nodes, tiny):
    vae = run(nodes, "MimirVAELoader", vae_name="tiny_vae.safetensors", dtype="auto")[0]
    samples = {"samples": torch.randn(1, 4, 3, 8, 8)}
    whole = run(nodes, "MimirDecode", vae=vae, samples=samples, tiling=False)[0]
    vae.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=40)  # 6 x 5 latent tiles: strides fit
    calls = []
    vae.tiled_decode = lambda z, real=vae.tiled_decode, **kw: calls.append(z.shape) or real(z, **kw)
    tiled = run(nodes, "MimirDecode", vae=vae, samples=samples, tiling=True)[0]
    assert calls and tiled.shape == whole.shape == (9, 64, 64, 3)
    assert (tiled - whole).abs().mean() < 0.05  # blended seams, not another picture


def test_t5_only_nodes_give_diffusers_cogvideox_latents(nodes, tiny):
    _, _, plain = tiny
    t5 = run(nodes, "MimirT5Loader", t5_name="tiny-t5", dtype="auto")[0]
    model = run(nodes, "MimirModelLoader", model_name="plain_5b.safetensors", dtype="auto", blocks_to_swap=0)[0]
    pos, neg = (run(nodes, "MimirT5TextEncode", t5=t5, prompt=p, text_len=16)[0] for p in (PROMPT, ""))
    latent = sample(nodes, model, pos, neg, scheduler="dpm", steps=3)
    ref = CogVideoXPipeline(plain["tokenizer"], plain["text_encoder"], plain["vae"], plain["transformer"],
                            CogVideoXDPMScheduler.from_config(plain["scheduler"].config))
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, negative_prompt="", num_frames=9, height=32, width=32, num_inference_steps=3,
                   guidance_scale=6.0, generator=torch.Generator().manual_seed(3), max_sequence_length=16,
                   output_type="latent").frames
    assert (to_diffusion(latent) - expected).abs().max() <= 1e-5


def test_video_to_video_from_an_encoded_latent(nodes, tiny):
    _, c, _ = tiny
    m = load_all(nodes)
    frames = torch.rand(9, 32, 32, 3)
    latent = run(nodes, "MimirVAEEncode", vae=m["vae"], images=frames)[0]
    assert latent["samples"].shape == (1, 4, 3, 4, 4)
    pos, neg = encode(nodes, m)[0], encode(nodes, m, prompt="")[0]
    out = sample(nodes, m["model"], pos, neg, latent=latent, denoise=0.5, steps=4)
    pipe = MimirPipeline(**c)
    cond, uncond = pipe.encode_prompt(PROMPT, "")
    expected = pipe.denoise(cond, uncond, 9, 32, 32, steps=4, guidance=6.0, seed=3, latents=to_diffusion(latent),
                            strength=0.5)
    assert (to_diffusion(out) - expected).abs().max() <= 1e-5
    full = sample(nodes, m["model"], pos, neg, steps=4)
    assert not torch.allclose(out["samples"], full["samples"])


def test_progress_every_step_and_interrupt_leaves_the_model_usable(nodes, services, monkeypatch):
    m = load_all(nodes)
    pos, neg = encode(nodes, m)[0], encode(nodes, m, prompt="")[0]
    bars = []
    real_bar = services.progress_bar
    monkeypatch.setattr(services, "progress_bar", lambda total: bars.append(real_bar(total)) or bars[-1])
    first = sample(nodes, m["model"], pos, neg, steps=3)
    assert bars[-1].updates == [(1, 3), (2, 3), (3, 3)]
    calls = []

    class Interrupted(Exception):
        pass

    def interrupt_on_second_step():
        calls.append(1)
        if len(calls) == 3:  # once before sampling, then after each step
            raise Interrupted

    monkeypatch.setattr(services, "check_interrupted", interrupt_on_second_step)
    with pytest.raises(Interrupted):
        sample(nodes, m["model"], pos, neg, steps=3)
    monkeypatch.setattr(services, "check_interrupted", lambda: None)
    assert torch.equal(sample(nodes, m["model"], pos, neg, steps=3)["samples"], first["samples"])


def test_fp8_storage_and_block_swap(nodes, pack):
    m = load_all(nodes)
    pos, neg = encode(nodes, m)[0], encode(nodes, m, prompt="")[0]
    reference = sample(nodes, m["model"], pos, neg)["samples"]
    fp8 = run(nodes, "MimirModelLoader", model_name="tiny_5b.safetensors", dtype="fp8_e4m3fn", blocks_to_swap=0)[0]
    assert fp8.info.dtype == "float8_e4m3fn"
    assert sum(type(mod).__name__ == "Fp8Linear" for mod in fp8.transformer.modules()) > 0
    out = sample(nodes, fp8, pos, neg)["samples"]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()
    swapped = run(nodes, "MimirModelLoader", model_name="tiny_5b.safetensors", dtype="auto", blocks_to_swap=1)[0]
    assert torch.equal(sample(nodes, swapped, pos, neg)["samples"], reference)


def test_a_denoise_that_rounds_to_no_step_runs_one(nodes, tiny):
    """steps 50 x denoise 0.01 rounds to 0 steps, which crashed with a tensor-size error."""
    _, c, _ = tiny
    m = load_all(nodes)
    latent = run(nodes, "MimirVAEEncode", vae=m["vae"], images=torch.rand(9, 32, 32, 3))[0]
    pos, neg = encode(nodes, m)[0], encode(nodes, m, prompt="")[0]
    out = sample(nodes, m["model"], pos, neg, latent=latent, steps=50, denoise=0.01)
    pipe = MimirPipeline(**c)
    cond, uncond = pipe.encode_prompt(PROMPT, "")
    one_step = pipe.denoise(cond, uncond, 9, 32, 32, steps=50, guidance=6.0, seed=3, latents=to_diffusion(latent),
                            strength=0.02)  # round(50 x 0.02) == 1
    assert (to_diffusion(out) - one_step).abs().max() <= 1e-5


# ---- conditioning as ComfyUI's samplers read it -------------------------------------------------------------------

def with_option(cond, **options):
    return [[t, {**old, **options}] for t, old in cond]


def ranged(cond, start, end):
    """What ComfyUI's ConditioningSetTimestepRange makes of a conditioning."""
    return with_option(cond, start_percent=start, end_percent=end)


def test_timestep_ranges_and_combined_entries_are_the_library_s(nodes, tiny):
    _, c, _ = tiny
    m = load_all(nodes)
    pos, other, neg = (encode(nodes, m, prompt=p)[0] for p in (PROMPT, "a blue square", ""))
    plain = sample(nodes, m["model"], pos, neg, steps=4)["samples"]
    assert torch.equal(sample(nodes, m["model"], ranged(pos, 0.0, 1.0), ranged(neg, 0.0, 1.0), steps=4)["samples"],
                       plain)
    weighted = with_option(other, strength=3.0)  # ConditioningSetAreaStrength
    combined = ranged(pos, 0.0, 0.5) + weighted  # ConditioningCombine: the lists joined
    out = sample(nodes, m["model"], combined, neg, steps=4)
    pipe = MimirPipeline(**c)
    a, b, n = (pipe.encode_prompt(p, None)[0] for p in (PROMPT, "a blue square", ""))
    expected = pipe.denoise([TextStream(a, end=0.5), TextStream(b, strength=3.0)], n, 9, 32, 32, steps=4,
                            guidance=6.0, seed=3)
    assert (to_diffusion(out) - expected).abs().max() <= 1e-5
    assert (out["samples"] - plain).abs().max() > 1e-2


def test_conditioning_options_the_sampler_cannot_honour_are_refused(nodes):
    m = load_all(nodes)
    pos, neg = encode(nodes, m)[0], encode(nodes, m, prompt="")[0]
    cases = [
        (dict(positive=with_option(pos, area=(8, 8, 0, 0))), "^positive: the conditioning option 'area' is not supp"),
        (dict(negative=neg + with_option(neg, mask=torch.ones(1, 32, 32))), "^negative entry 2: .*'mask'"),
        (dict(positive=with_option(pos, control=object(), gligen=None)), "^positive: .*'control'"),
        (dict(positive=with_option(pos, strength=-1.0)), "^positive: strength must be a finite number >= 0"),
        (dict(positive=ranged(pos, 0.0, 0.5)), "^positive: no conditioning entry of strength > 0 is active"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            sample(nodes, m["model"], pos, neg, **overrides)


# ---- errors name the input at fault ---------------------------------------------------------------------------

def test_bad_video_sizes_are_refused_when_the_graph_is_queued(nodes, monkeypatch):
    """ComfyUI calls VALIDATE_INPUTS at queue time with only the inputs it names, linked ones as None, and skips
    its own min/max check for those: a bad size is refused before any loader runs."""
    validate = nodes["MimirSampler"].VALIDATE_INPUTS
    assert inspect.getfullargspec(validate).args == ["cls", "width", "height", "frames"]
    assert validate(width=720, height=480, frames=49) is True and validate() is True  # all linked: run time
    assert validate(width=32, height=32, frames=12).startswith("frames must be") and "got 12" in validate(frames=12)
    assert validate(width=40, height=None, frames=None).startswith("width must be a positive multiple of 16")
    assert validate(height=30).startswith("height must be")
    assert validate(frames=5000) == "frames must be in 1..1025, got 5000"
    assert validate(width=0) == "width must be in 16..4096, got 0"

    def rule(frames, height, width):
        raise ValueError(f"rule got {frames} {height} {width}")

    monkeypatch.setattr(f"{nodes['MimirSampler'].__module__}.check_video_size", rule)  # the library's, not a copy
    assert validate(height=32) == "rule got 49 32 720"  # unknown values stand in as the widgets' valid defaults



def test_sampler_errors_name_the_input(nodes):
    m = load_all(nodes)
    pos, neg = encode(nodes, m)[0], encode(nodes, m, prompt="")[0]
    t5_only = run(nodes, "MimirT5TextEncode", t5=m["t5"], prompt="", text_len=16)[0]
    clip_like = [[torch.zeros(1, 77, 768), {}]]
    bad_latent = {"samples": torch.zeros(1, 4, 8, 8)}
    cases = [
        (dict(frames=10), "^frames must be 8k"),
        (dict(width=40), "^width must be"),
        (dict(positive=clip_like), "^positive: .*768"),
        (dict(negative=t5_only), "^negative: "),
        (dict(latent=bad_latent, denoise=0.5), "^latent: "),
        (dict(scheduler="euler"), "^scheduler: "),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            sample(nodes, m["model"], pos, neg, **overrides)
    with pytest.raises(ValueError, match="^samples: "):
        run(nodes, "MimirDecode", vae=m["vae"], samples=bad_latent, tiling=False)
    with pytest.raises(ValueError, match="^images: frames must be 8k"):
        run(nodes, "MimirVAEEncode", vae=m["vae"], images=torch.rand(8, 32, 32, 3))


def test_text_and_loader_errors_name_the_input(nodes, tmp_path, monkeypatch):
    m = load_all(nodes)
    with pytest.raises(ValueError, match="^instructions: 2 lines given but this fuser has 4"):
        encode(nodes, m, instructions="one\ntwo")
    llama_fuser = run(nodes, "MimirFuserLoader", fuser_name="other_fuser.safetensors")[0]
    llama_fuser.config = dataclasses.replace(llama_fuser.config, llm_dim=64)
    with pytest.raises(ValueError, match="^llm: this LLM has hidden size 48 .*llm_dim=64"):
        encode(nodes, {**m, "fuser": llama_fuser})
    with pytest.raises(FileNotFoundError, match="^vae_name: 'missing.safetensors' was not found"):
        run(nodes, "MimirVAELoader", vae_name="missing.safetensors", dtype="auto")
    with pytest.raises(ValueError, match="^model_name: .*not a name inside"):
        run(nodes, "MimirModelLoader", model_name="../vae/tiny_vae.safetensors", dtype="auto", blocks_to_swap=0)
    with pytest.raises(ValueError, match="^blocks_to_swap must be in 0..2 \\(the model's blocks\\), got 5"):
        run(nodes, "MimirModelLoader", model_name="tiny_5b.safetensors", dtype="auto", blocks_to_swap=5)
    monkeypatch.setattr(f"{nodes['MimirT5Loader'].__module__}.DEMO_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="^t5_name: the bundled demo model is not installed"):
        run(nodes, "MimirT5Loader", t5_name="mimir-demo (bundled)", dtype="auto")


def test_single_file_t5_needs_a_tokenizer(nodes, services, monkeypatch):
    monkeypatch.setattr(services, "bundled_t5_tokenizer", lambda: None)
    with pytest.raises(ValueError, match="^t5_name: tiny_t5.safetensors is a single file"):
        run(nodes, "MimirT5Loader", t5_name="tiny_t5.safetensors", dtype="auto")
