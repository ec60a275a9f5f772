"""Checkpoint reading and writing (mimir.weights, single_file, components, describe, loading): every layout saved
from tiny real-architecture models loads back to bit-equal outputs; variant detection on the published CogVideoX
shapes (meta tensors, nothing allocated); each refusal names its cause."""

import copy
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece
import tokenizers
import torch
import transformers
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel

from mimir import components, loading, single_file, variants
from mimir.components import (
    load_llm,
    load_scheduler,
    load_t5,
    load_token_fuser,
    load_tokenizer,
    load_transformer,
    load_vae,
)
from mimir.configs import warn_unknown_fields
from mimir.describe import describe
from mimir.fuser import FORMAT as FUSER_FORMAT
from mimir.fuser import FuserConfig, TokenFuser, save_fuser
from mimir.loading import DEMO_MODEL_DIR, load_pipeline, save_pipeline, save_single_file
from mimir.offload import Placement
from mimir.pipeline import MimirPipeline
from mimir.single_file import t5_config_from_shapes
from mimir.testing import (
    BASE_WORDS,
    real_scheduler,
    tiny_components,
    tiny_llm,
    tiny_transformer,
    tiny_vae,
    word_tokenizer,
)
from mimir.text import chat_template_parts, encode_t5
from mimir.variants import SCHEDULER_SETTINGS, TRANSFORMER_CONFIGS, match_variant, transformer_config_from_shapes

CALL = dict(num_frames=9, height=16, width=16, steps=2, guidance=6.0, seed=3, output_type="latent")


# ---- helpers ---------------------------------------------------------------------------------------------

def transformer_out(model, text_len=20, latent_frames=2):
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    x = torch.randn(1, latent_frames, cfg.in_channels, 4, 4, generator=g)
    text = torch.randn(1, text_len, cfg.text_embed_dim, generator=g)
    with torch.no_grad():
        return model(hidden_states=x.to(model.dtype), encoder_hidden_states=text.to(model.dtype),
                     timestep=torch.tensor([500]), return_dict=False)[0]


def vae_out(vae):
    z = torch.randn(1, vae.config.latent_channels, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return vae.decode(z.to(vae.dtype)).sample


def t5_out(model, tokenizer):
    return encode_t5(tokenizer, model, ["a red circle moves to the left", ""], max_length=16)


def llm_out(model, tokenizer):
    ids = tokenizer(["a blue square slides up"], return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def config_of(model) -> dict:
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Mimir pipeline (2B-style DiT, Phi-3 LLM, 4 stabilizer tokens) and its saved folder."""
    pipe = MimirPipeline(**tiny_components("2b"))
    folder = tmp_path_factory.mktemp("mimir_pipeline")
    save_pipeline(pipe, folder)
    return pipe, folder


# ---- diffusers / Mimir pipeline folders -------------------------------------------------------------------

def test_pipeline_folder_layout_and_round_trip(saved):
    pipe, folder = saved
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["fuser.safetensors", "llm", "model_index.json", "scheduler", "text_encoder", "tokenizer",
                     "transformer", "vae"]
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert list(folder.rglob("*.bin")) == []
    loaded = load_pipeline(folder)
    for name in ("transformer", "vae", "text_encoder", "llm", "fuser"):
        assert same_state(getattr(pipe, name), getattr(loaded, name)), name
    assert config_of(loaded.scheduler) == config_of(pipe.scheduler)
    assert torch.equal(pipe("a red circle moves to the left", **CALL), loaded("a red circle moves to the left", **CALL))


def test_rotary_pipeline_folder_round_trip(tmp_path):
    """The paper's setting: a 5B-style (rotary) DiT, here with a Llama LLM and the DPM scheduler."""
    pipe = MimirPipeline(**tiny_components("5b", llm_arch="llama", scheduler="dpm"))
    save_pipeline(pipe, tmp_path)
    loaded = load_pipeline(tmp_path)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert torch.equal(pipe("two green squares", **CALL), loaded("two green squares", **CALL))


def test_component_path_is_root_or_subfolder(saved):
    pipe, folder = saved
    for path in (folder, folder / "transformer"):
        model, info = load_transformer(path)
        assert (info.kind, info.layout, info.variant) == ("transformer", "diffusers-folder", "custom")
        assert info.path == str(folder / "transformer")
        assert torch.equal(transformer_out(model), transformer_out(pipe.transformer))
    for path in (folder, folder / "vae"):
        vae, info = load_vae(path)
        assert (info.kind, info.vae_scaling_factor) == ("vae", pipe.vae.config.scaling_factor)
        assert torch.equal(vae_out(vae), vae_out(pipe.vae))
    for path in (folder, folder / "text_encoder"):  # the tokenizer is found in the sibling tokenizer/
        t5, tokenizer, info = load_t5(path)
        assert (info.kind, info.layout, info.dims["d_model"]) == ("t5", "transformers-folder", 32)
        assert torch.equal(t5_out(t5, tokenizer), t5_out(pipe.text_encoder, pipe.tokenizer))
    for path in (folder, folder / "llm"):
        llm, tokenizer, info = load_llm(path)
        assert info.dims["hidden_size"] == 48 and info.layout == "transformers-folder"
        assert torch.equal(llm_out(llm, tokenizer), llm_out(pipe.llm, pipe.llm_tokenizer))
    for path in (folder, folder / "scheduler"):
        assert config_of(load_scheduler(path)) == config_of(pipe.scheduler)
    fuser, info = load_token_fuser(folder / "fuser.safetensors")
    assert same_state(fuser, pipe.fuser) and info.dims["out_len"] == 20


def test_saved_folder_is_a_real_diffusers_folder(saved):
    pipe, folder = saved
    reference = CogVideoXPipeline.from_pretrained(str(folder))  # diffusers ignores llm/ and fuser.safetensors
    assert same_state(reference.transformer, pipe.transformer) and same_state(reference.vae, pipe.vae)
    ours, _ = load_transformer(folder / "transformer")
    assert torch.equal(transformer_out(ours), transformer_out(reference.transformer))


def test_sharded_folders(saved, tmp_path):
    pipe, _ = saved
    pipe.transformer.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    pipe.text_encoder.save_pretrained(tmp_path / "text_encoder", max_shard_size="20KB")
    pipe.tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    assert len(list((tmp_path / "text_encoder").glob("*.safetensors"))) > 1
    model, _ = load_transformer(tmp_path / "transformer")
    assert same_state(model, pipe.transformer)
    t5, tokenizer, _ = load_t5(tmp_path / "text_encoder")
    assert torch.equal(t5_out(t5, tokenizer), t5_out(pipe.text_encoder, pipe.tokenizer))


def test_plain_cogvideox_folder_loads_without_fuser(tmp_path):
    components = tiny_components("2b")
    components.update(fuser=None, llm=None, llm_tokenizer=None)
    pipe = MimirPipeline(**components)
    save_pipeline(pipe, tmp_path)
    assert not (tmp_path / "llm").exists() and not (tmp_path / "fuser.safetensors").exists()
    loaded = load_pipeline(tmp_path)
    assert loaded.fuser is None and loaded.llm is None
    # plain CogVideoX reads as many T5 tokens as its transformer was made for (this tiny one: 20)
    assert loaded.transformer.config.max_text_seq_length == loaded.text_len == pipe.text_len == 20
    assert torch.equal(pipe("a red ball", **CALL), loaded("a red ball", **CALL))
    assert describe(tmp_path)["mimir"] is False


def test_real_size_transformer_config_reads_226_t5_tokens(tmp_path):
    """Every published CogVideoX says max_text_seq_length 226: T5-only pipelines of them encode 226 tokens."""
    parts = {**tiny_components("2b"), "fuser": None, "llm": None, "llm_tokenizer": None,
             "transformer": tiny_transformer("2b", text_len=226)}
    save_pipeline(MimirPipeline(**parts), tmp_path)
    loaded = load_pipeline(tmp_path)
    cond, uncond = loaded.encode_prompt("a red circle")
    assert loaded.text_len == 226 and cond.shape == uncond.shape == (1, 226, 32)


def write_t5_only_arm(root: Path, text_len: int) -> Path:
    """A T5-only arm beside a Mimir folder, in the bundled demo's layout: root/t5_only/transformer."""
    arm = root / "t5_only" / "transformer"
    tiny_transformer("5b", text_len=text_len, seed=7).save_pretrained(str(arm), safe_serialization=True)
    return arm


def test_t5_only_arm_equals_the_same_dit_through_a_pass_through_fuser(tmp_path):
    """A fresh fuser without stabilizer, answer or instruction tokens gives the T5 stream exactly (its zero-convs
    are zero): through it and without any fuser, the arm's DiT must see the same text, so the same latents."""
    length = 12
    save_pipeline(MimirPipeline(**tiny_components("5b")), tmp_path / "mimir")
    arm = write_t5_only_arm(tmp_path / "mimir", length)
    pass_through = tmp_path / "pass_through.safetensors"
    save_fuser(TokenFuser(FuserConfig(t5_dim=32, llm_dim=48, text_len=length, stabilizer_tokens=0, instructions=(),
                                      answer_tokens=0)), pass_through)
    fused = load_pipeline(tmp_path / "mimir", transformer_path=arm, fuser_path=pass_through)
    t5_only = load_pipeline(tmp_path / "mimir", transformer_path=arm, with_fuser=False)
    assert t5_only.fuser is None and t5_only.llm is None and fused.llm is not None
    assert t5_only.text_len == fused.text_len == length
    assert same_state(t5_only.transformer, load_transformer(arm)[0])
    assert torch.equal(fused("a red circle moves up", **CALL), t5_only("a red circle moves up", **CALL))


def test_transformer_path_is_checked_before_any_weights_load(tmp_path, monkeypatch):
    save_pipeline(MimirPipeline(**tiny_components("5b")), tmp_path / "mimir")
    for name in ("load_transformer", "load_token_fuser", "load_llm", "load_t5", "load_vae"):
        monkeypatch.setattr(loading.components, name, lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(FileNotFoundError, match="transformer_path .*t5_only.*no such folder"):
        load_pipeline(tmp_path / "mimir", transformer_path=tmp_path / "mimir" / "t5_only" / "transformer")
    with pytest.raises(ValueError, match="transformer_path: .*vae: not a CogVideoX transformer"):
        load_pipeline(tmp_path / "mimir", transformer_path=tmp_path / "mimir" / "vae")


def test_pipeline_with_external_fuser_and_llm(saved, tmp_path):
    pipe, folder = saved
    plain = tmp_path / "plain"
    components = tiny_components("2b")
    components.update(fuser=None, llm=None, llm_tokenizer=None)
    save_pipeline(MimirPipeline(**components), plain)
    loaded = load_pipeline(plain, fuser_path=folder / "fuser.safetensors", llm_path=folder / "llm",
                           placement=Placement("cpu", "cpu"))
    assert same_state(loaded.fuser, pipe.fuser) and same_state(loaded.llm, pipe.llm)
    assert loaded.transformer.config.max_text_seq_length == 20  # 16 T5 tokens + 4 stabilizer tokens


# ---- transformer single files -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["2b", "5b", "1.5"])
def test_transformer_single_file_round_trip(tmp_path, variant):
    model = tiny_transformer(variant, text_len=20)
    path = tmp_path / "dit.safetensors"
    save_single_file(model, path, vae_scaling_factor=0.7)
    with safe_open(str(path), "pt") as f:
        assert "transformer_blocks.0.attn1.to_q.weight" in f.keys()  # diffusers key names
        assert json.loads(f.metadata()["config"])["num_layers"] == 2
    loaded, info = load_transformer(path)
    assert (info.layout, info.variant, info.vae_scaling_factor) == ("single-file", "custom", 0.7)
    assert info.dims["positional_embeddings"] == ("sincos" if variant == "2b" else "rotary")
    assert config_of(loaded) == config_of(model) and same_state(loaded, model)
    frames = 4 if variant == "1.5" else 2
    assert torch.equal(transformer_out(loaded, latent_frames=frames), transformer_out(model, latent_frames=frames))


@pytest.mark.parametrize("variant", list(TRANSFORMER_CONFIGS))
def test_variant_detected_from_published_shapes(variant):
    config = TRANSFORMER_CONFIGS[variant]
    with torch.device("meta"):  # real-size shapes, no memory
        model = CogVideoXTransformer3DModel(**config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found, built = transformer_config_from_shapes(shapes)
    assert found == variant and built == config and match_variant(built) == variant
    assert built == {k: v for k, v in config_of(model).items()}  # the table is complete for the diffusers class
    expected_proj = {"2b": (1920, 16, 2, 2), "5b": (3072, 16, 2, 2), "5b-i2v": (3072, 32, 2, 2), "1.5": (3072, 128),
                     "1.5-i2v": (3072, 256)}[variant]
    assert shapes["patch_embed.proj.weight"] == expected_proj
    assert built["num_layers"] == (30 if variant == "2b" else 42)


def test_published_configs_match_the_papers_models():
    two, five, one5 = TRANSFORMER_CONFIGS["2b"], TRANSFORMER_CONFIGS["5b"], TRANSFORMER_CONFIGS["1.5"]
    assert (two["num_attention_heads"], two["num_layers"], two["use_rotary_positional_embeddings"]) == (30, 30, False)
    assert (five["num_attention_heads"], five["num_layers"], five["use_rotary_positional_embeddings"]) == (48, 42, True)
    assert (one5["patch_size_t"], one5["sample_height"], one5["sample_width"], one5["sample_frames"]) == (2, 300, 300, 81)
    assert all(c["text_embed_dim"] == 4096 and c["attention_head_dim"] == 64 and c["max_text_seq_length"] == 226
               for c in TRANSFORMER_CONFIGS.values())


def test_depth_is_counted_from_keys():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CogVideoXTransformer3DModel(**TRANSFORMER_CONFIGS["5b"]).state_dict().items()}
    pruned = {k: v for k, v in shapes.items() if not k.startswith("transformer_blocks.") or int(k.split(".")[1]) < 10}
    assert transformer_config_from_shapes(pruned)[1]["num_layers"] == 10


def test_single_file_without_metadata_is_read_by_its_shapes(tmp_path, monkeypatch):
    """The path a ComfyUI file of a published model takes, with a tiny entry in the table of known configs."""
    model = tiny_transformer("5b", text_len=20)
    monkeypatch.setitem(variants.TRANSFORMER_CONFIGS, "tiny", config_of(model))
    monkeypatch.setitem(variants.VAE_SCALING_FACTORS, "tiny", 0.5)
    path = tmp_path / "comfy_dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))  # no metadata
    loaded, info = load_transformer(path)
    assert (info.variant, info.vae_scaling_factor, info.layout) == ("tiny", 0.5, "single-file")
    assert torch.equal(transformer_out(loaded), transformer_out(model))


def test_unknown_transformer_shapes_are_named(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_transformer("2b").state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"\[32, 4, 2, 2\].*2b \[1920, 16, 2, 2\].*5b \[3072, 16, 2, 2\]"):
        load_transformer(path)


# ---- text_len, dtype, device ------------------------------------------------------------------------------

def test_sincos_text_positions_follow_text_len(tmp_path):
    model = tiny_transformer("2b", text_len=16)
    save_single_file(model, tmp_path / "dit.safetensors")
    as_saved, _ = load_transformer(tmp_path / "dit.safetensors")
    with pytest.raises(RuntimeError):  # 20 text tokens do not fit a 16-token position table
        transformer_out(as_saved, text_len=20)
    extended, info = load_transformer(tmp_path / "dit.safetensors", text_len=20)
    assert info.dims["max_text_seq_length"] == 20 and same_state(extended, model)  # weights unchanged
    assert transformer_out(extended, text_len=20).shape == (1, 2, 4, 4, 4)


def test_rotary_models_take_any_text_len(tmp_path):
    model = tiny_transformer("5b", text_len=16)
    save_single_file(model, tmp_path / "dit.safetensors")
    loaded, info = load_transformer(tmp_path / "dit.safetensors", text_len=20)
    assert info.dims["max_text_seq_length"] == 16
    assert torch.equal(transformer_out(loaded, text_len=20), transformer_out(model, text_len=20))


def test_learned_positions_refuse_another_text_len(tmp_path):
    model = CogVideoXTransformer3DModel(**{**config_of(tiny_transformer("5b")),
                                           "use_learned_positional_embeddings": True}).float().eval()
    save_single_file(model, tmp_path / "i2v.safetensors")
    with pytest.raises(ValueError, match="learned positional embeddings for 16 text tokens; it cannot take 20"):
        load_transformer(tmp_path / "i2v.safetensors", text_len=20)
    loaded, info = load_transformer(tmp_path / "i2v.safetensors", text_len=16)
    assert info.dims["positional_embeddings"] == "learned" and same_state(loaded, model)


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                             ("float32", torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_dtype_option(saved, dtype, expected):
    pipe, folder = saved
    model, info = load_transformer(folder, dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {expected} and info.dtype == str(expected).split(".")[1]
    reference = copy.deepcopy(pipe.transformer).to(expected)  # the same weights, cast by torch
    assert same_state(model, reference)
    assert load_transformer(folder, dtype=dtype, device="meta")[0].proj_out.weight.device.type == "meta"


def test_dtype_none_keeps_the_stored_dtype(tmp_path):
    save_single_file(tiny_transformer("5b").to(torch.bfloat16), tmp_path / "dit_bf16.safetensors")
    model, info = load_transformer(tmp_path / "dit_bf16.safetensors")
    assert model.dtype == torch.bfloat16 and info.dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown dtype 'fp12'"):
        load_transformer(tmp_path / "dit_bf16.safetensors", dtype="fp12")


def test_t5_fp16_keeps_wo_in_fp32_like_transformers(saved):
    _, folder = saved
    ours, tokenizer, _ = load_t5(folder, dtype="fp16")
    reference = T5EncoderModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.float16)
    assert ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert same_state(ours, reference)
    assert torch.equal(t5_out(ours, tokenizer), t5_out(reference, tokenizer))


# ---- VAE and T5 single files ------------------------------------------------------------------------------

def test_vae_single_file_round_trip(tmp_path):
    vae = tiny_vae()
    save_single_file(vae, tmp_path / "vae.safetensors")
    loaded, info = load_vae(tmp_path / "vae.safetensors")
    assert (info.kind, info.layout, info.vae_scaling_factor) == ("vae", "single-file", vae.config.scaling_factor)
    assert torch.equal(vae_out(loaded), vae_out(vae))
    assert load_vae(tmp_path / "vae.safetensors", scaling_factor=0.7)[0].config.scaling_factor == 0.7


def test_vae_single_file_without_metadata(tmp_path, monkeypatch):
    vae = tiny_vae()
    path = tmp_path / "comfy_vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"comfy_vae.safetensors: a CogVideoX VAE of other size than the published "
                                         r"one \(block_out_channels \[8, 8, 8, 8\], latent_channels 4\): its norm "
                                         r"groups and temporal compression are not in its weights"):
        load_vae(path)  # the published CogVideoX VAE's config does not fit, and the weights cannot tell all of one
    monkeypatch.setattr(single_file, "VAE_CONFIG", config_of(vae))
    loaded, info = load_vae(path, scaling_factor=0.7)
    assert info.vae_scaling_factor == 0.7 and torch.equal(vae_out(loaded), vae_out(vae))


def test_t5_single_file_as_comfyui_stores_it(saved, tmp_path):
    pipe, folder = saved
    path = tmp_path / "t5.safetensors"
    save_single_file(pipe.text_encoder, path)
    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys
    expected = t5_out(pipe.text_encoder, pipe.tokenizer)
    model, tokenizer, info = load_t5(path, tokenizer_path=folder / "tokenizer")
    assert info.layout == "single-file" and torch.equal(t5_out(model, tokenizer), expected)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    comfy = tmp_path / "comfy_t5.safetensors"  # no config metadata: the config is read from the shapes
    save_file(tensors, str(comfy))
    model, tokenizer, _ = load_t5(comfy, tokenizer_path=folder / "tokenizer")
    assert torch.equal(t5_out(model, tokenizer), expected)
    with pytest.raises(ValueError, match="pass tokenizer_path"):
        load_t5(comfy)
    assert json.loads(metadata["config"])["d_model"] == 32


def test_t5_xxl_config_from_shapes():
    real = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                    feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in T5EncoderModel(real).state_dict().items()}
    inferred = t5_config_from_shapes(shapes)
    fields = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
              "relative_attention_max_distance", "is_gated_act", "dense_act_fn", "layer_norm_epsilon")
    assert {f: getattr(inferred, f) for f in fields} == {f: getattr(real, f) for f in fields}


# ---- LLM ----------------------------------------------------------------------------------------------------

def test_llm_pickle_only_folder_is_refused(saved, tmp_path):
    pipe, _ = saved
    pipe.llm.config.save_pretrained(tmp_path)
    pipe.llm_tokenizer.save_pretrained(tmp_path)
    torch.save(pipe.llm.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickled PyTorch weights \(pytorch_model.bin\).*safetensors only"):
        load_llm(tmp_path)


def test_llm_trust_remote_code_is_passed_through(tmp_path, monkeypatch):
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "custom"
    tokenizer = word_tokenizer(kind="llm")
    tiny_llm(tokenizer, arch="llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "custom_lm.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'mimir_custom_llama'\n"
        "class CustomLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mimir_custom_llama", auto_map={"AutoConfig": "custom_lm.CustomConfig",
                                                            "AutoModelForCausalLM": "custom_lm.CustomLM"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_llm(folder)
    model, _, info = load_llm(folder, trust_remote_code=True)
    assert type(model).__name__ == "CustomLM" and info.dims["model_type"] == "mimir_custom_llama"


# ---- scheduler -------------------------------------------------------------------------------------------

def test_scheduler_kinds_have_the_published_settings(saved):
    assert config_of(load_scheduler("ddim", variant="2b")) == config_of(real_scheduler("ddim", snr_shift_scale=3.0))
    dpm = load_scheduler("dpm", variant="5b")
    assert type(dpm).__name__ == "CogVideoXDPMScheduler" and dpm.config.snr_shift_scale == 1.0
    assert all(dpm.config[k] == v for k, v in SCHEDULER_SETTINGS.items())
    assert type(load_scheduler(saved[1], kind="dpm")).__name__ == "CogVideoXDPMScheduler"
    with pytest.raises(ValueError, match="no published scheduler settings for variant 'custom'"):
        load_scheduler("ddim", variant="custom")
    with pytest.raises(FileNotFoundError, match="neither a scheduler kind"):
        load_scheduler("euler")


# ---- errors ----------------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    for load in (load_transformer, load_vae, load_t5, load_llm, load_pipeline, describe):
        with pytest.raises(FileNotFoundError, match="no such file or folder"):
            load(tmp_path / "nowhere")


def test_folder_of_no_known_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a CogVideoX transformer"):
        load_transformer(tmp_path)
    with pytest.raises(ValueError, match="not a CogVideoX pipeline folder: it lacks transformer/, vae/"):
        load_pipeline(tmp_path)
    with pytest.raises(ValueError, match="not an LLM folder"):
        load_llm(tmp_path)
    with pytest.raises(ValueError, match="not a known checkpoint folder"):
        describe(tmp_path)
    save_file({"some.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a known checkpoint: keys such as some.weight"):
        describe(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="expected a transformer single file, but it holds no known component"):
        load_transformer(tmp_path / "other.safetensors")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save(tiny_transformer("2b").state_dict(), path)
    with pytest.raises(ValueError, match=rf"{suffix} files are pickled PyTorch checkpoints; Mimir loads .safetensors only"):
        load_transformer(path)


def test_corrupt_and_truncated_files(tmp_path):
    good = tmp_path / "dit.safetensors"
    save_single_file(tiny_transformer("2b"), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    in_header = tmp_path / "in_header.safetensors"
    in_header.write_bytes(good.read_bytes()[:100])
    faults = {truncated: rf"truncated: {truncated.stat().st_size} bytes, but its header describes {good.stat().st_size}",
              in_header: r"truncated: 100 bytes, cut inside its \d+-byte header",
              garbage: "corrupt: not a .safetensors file"}
    for path, fault in faults.items():
        for read in (load_transformer, describe):
            with pytest.raises(ValueError, match=rf"{path.name}: {fault}"):
                read(path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model = tiny_transformer("2b")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["norm_final.weight"]
    state["extra.lora_A.weight"] = torch.zeros(2, 2)
    state["proj_out.bias"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path), metadata={"mimir_kind": "transformer", "config": model.to_json_string()})
    with pytest.raises(ValueError) as err:
        load_transformer(path)
    message = str(err.value)
    assert "1 missing: norm_final.weight" in message and "1 unexpected: extra.lora_A.weight" in message
    assert "proj_out.bias [3] (expected [16])" in message


def test_wrong_component_kind(saved):
    _, folder = saved
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError, match="expected a transformer single file, but it holds a vae"):
        load_transformer(vae_file)
    with pytest.raises(ValueError, match="not a CogVideoX VAE"):
        load_vae(folder / "transformer")


def test_fuser_llm_dim_must_match_the_llm(saved, tmp_path):
    _, folder = saved
    fuser = TokenFuser(FuserConfig(t5_dim=32, llm_dim=64, text_len=16, stabilizer_tokens=0, instructions=()))
    save_fuser(fuser, tmp_path / "fuser64.safetensors")
    with pytest.raises(ValueError, match="hidden size 64 \\(llm_dim\\).*has hidden size 48"):
        load_pipeline(folder, fuser_path=tmp_path / "fuser64.safetensors")


def test_fuser_needs_an_llm(saved, tmp_path):
    _, folder = saved
    components = tiny_components("2b")
    components.update(llm=None, llm_tokenizer=None)
    save_pipeline(MimirPipeline(**components), tmp_path)
    with pytest.raises(ValueError, match="not an LLM folder"):
        load_pipeline(tmp_path)
    assert load_pipeline(tmp_path, llm_path=folder / "llm").llm is not None


def test_save_single_file_refuses_other_objects(tmp_path):
    with pytest.raises(TypeError, match="cannot save a Linear"):
        save_single_file(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="written as .safetensors"):
        save_single_file(tiny_vae(), tmp_path / "x.ckpt")


# ---- bad files: each names the file and its fault --------------------------------------------------------

# Published configs, as their repositories hold them: CogVideoX-2B / -5B transformers (kijai's ComfyUI-CogVideoXWrapper
# configs/, with THUDM's bookkeeping), the CogVideoX VAE and scheduler, CogVideoX's T5-XXL text_encoder/ and
# Phi-3.5-mini-instruct (its longrope factors shortened to one repeated value: only the fields matter here).
COGVIDEOX_2B = {"_class_name": "CogVideoXTransformer3DModel", "_diffusers_version": "0.30.0.dev0",
                "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 64, "dropout": 0.0,
                "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 16, "max_text_seq_length": 226,
                "norm_elementwise_affine": True, "norm_eps": 1e-05, "num_attention_heads": 30, "num_layers": 30,
                "out_channels": 16, "patch_size": 2, "sample_frames": 49, "sample_height": 60, "sample_width": 90,
                "spatial_interpolation_scale": 1.875, "temporal_compression_ratio": 4,
                "temporal_interpolation_scale": 1.0, "text_embed_dim": 4096, "time_embed_dim": 512,
                "timestep_activation_fn": "silu", "use_rotary_positional_embeddings": False}
COGVIDEOX_5B = {**COGVIDEOX_2B, "num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True,
                "use_learned_positional_embeddings": False}
COGVIDEOX_VAE = {"_class_name": "AutoencoderKLCogVideoX", "_diffusers_version": "0.31.0.dev0", "act_fn": "silu",
                 "block_out_channels": [128, 256, 256, 512], "down_block_types": ["CogVideoXDownBlock3D"] * 4,
                 "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None,
                 "latents_std": None, "layers_per_block": 3, "norm_eps": 1e-06, "norm_num_groups": 32,
                 "out_channels": 3, "sample_height": 480, "sample_width": 720, "scaling_factor": 0.7,
                 "shift_factor": None, "temporal_compression_ratio": 4, "up_block_types": ["CogVideoXUpBlock3D"] * 4,
                 "use_post_quant_conv": False, "use_quant_conv": False}
COGVIDEOX_SCHEDULER = {"_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": "0.30.0.dev0", "beta_end": 0.012,
                       "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                       "clip_sample_range": 1.0, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                       "rescale_betas_zero_snr": True, "sample_max_value": 1.0, "set_alpha_to_one": True,
                       "snr_shift_scale": 3.0, "steps_offset": 0, "timestep_spacing": "trailing",
                       "trained_betas": None}
T5_XXL = {"_name_or_path": "google/t5-v1_1-xxl", "architectures": ["T5EncoderModel"], "classifier_dropout": 0.0,
          "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
          "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
          "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
          "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
          "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
          "torch_dtype": "float16", "transformers_version": "4.44.0.dev0", "use_cache": True, "vocab_size": 32128}
PHI_35_MINI = {"_name_or_path": "Phi-3.5-mini-instruct", "architectures": ["Phi3ForCausalLM"],
               "attention_dropout": 0.0, "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                                                      "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
               "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
               "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
               "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
               "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0,
               "rms_norm_eps": 1e-05, "rope_scaling": {"long_factor": [1.08] * 48, "short_factor": [1.0] * 48,
                                                       "type": "longrope"},
               "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
               "transformers_version": "4.43.3", "use_cache": True, "attention_bias": False, "vocab_size": 32064}


@pytest.mark.parametrize("config, cls", [
    (COGVIDEOX_2B, CogVideoXTransformer3DModel), (COGVIDEOX_5B, CogVideoXTransformer3DModel),
    (COGVIDEOX_VAE, AutoencoderKLCogVideoX), (COGVIDEOX_SCHEDULER, CogVideoXDDIMScheduler), (T5_XXL, T5Config),
    (PHI_35_MINI, transformers.Phi3Config)], ids=["2b", "5b", "vae", "scheduler", "t5-xxl", "phi-3.5-mini"])
def test_published_configs_do_not_warn(config, cls, caplog):
    assert warn_unknown_fields(config, cls, "config.json") == [] and caplog.records == []


def test_configs_written_today_do_not_warn(saved, caplog):
    describe(DEMO_MODEL_DIR)  # every component's config, as this diffusers and transformers write them
    load_pipeline(saved[1])
    assert [r.getMessage() for r in caplog.records if r.name == "mimir.configs"] == []


def edit_json(file, **changes):
    """Rename fields (old_name="new_name") in a JSON file."""
    config = json.loads(file.read_text())
    file.write_text(json.dumps({changes.get(k, k): v for k, v in config.items()}))


def test_config_typos_warn_with_the_nearest_field(saved, tmp_path, caplog):
    folder = tmp_path / "typos"
    shutil.copytree(saved[1], folder)
    edit_json(folder / "transformer" / "config.json", use_rotary_positional_embeddings="use_rotary_positional_embedding")
    edit_json(folder / "vae" / "config.json", scaling_factor="scaling_factr")
    edit_json(folder / "text_encoder" / "config.json", layer_norm_epsilon="layer_norm_epsilo")
    edit_json(folder / "llm" / "config.json", rms_norm_eps="rms_norm_epsilon")
    edit_json(folder / "scheduler" / "scheduler_config.json", snr_shift_scale="snr_shift_scal")
    load_pipeline(folder)
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "mimir.configs")
    expected = [("llm/config.json", "rms_norm_epsilon", "Phi3Config", "rms_norm_eps"),
                ("scheduler/scheduler_config.json", "snr_shift_scal", "CogVideoXDDIMScheduler", "snr_shift_scale"),
                ("text_encoder/config.json", "layer_norm_epsilo", "T5Config", "layer_norm_epsilon"),
                ("transformer/config.json", "use_rotary_positional_embedding", "CogVideoXTransformer3DModel",
                 "use_rotary_positional_embeddings"),
                ("vae/config.json", "scaling_factr", "AutoencoderKLCogVideoX", "scaling_factor")]
    assert warnings == [f"{folder / file}: unknown field {typo!r} ({cls} has no such field, so it is ignored); the "
                        f"nearest known field is {near!r}" for file, typo, cls, near in expected]


def test_config_typo_in_single_file_metadata_warns(tmp_path, caplog):
    model = tiny_transformer("5b")
    config = {("use_rotary_positional_embedding" if k == "use_rotary_positional_embeddings" else k): v
              for k, v in json.loads(model.to_json_string()).items()}
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"mimir_kind": "transformer", "config": json.dumps(config)})
    _, info = load_transformer(path)
    assert info.dims["positional_embeddings"] == "sincos"  # the class default: the reason the warning exists
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} (the config in its safetensors metadata): unknown field 'use_rotary_positional_embedding' "
        f"(CogVideoXTransformer3DModel has no such field, so it is ignored); the nearest known field is "
        f"'use_rotary_positional_embeddings'"]


@pytest.mark.parametrize("text, fault", [
    (b'{"a": 1,\n "b": }', r"invalid JSON at line 2, column 7: Expecting value"),
    (b"[1, 2]", r"expected a JSON object \(\{\.\.\.\}\), found a list"),
    (b'"config"', r"expected a JSON object \(\{\.\.\.\}\), found a string"),
    (b'\xff{"a": 1}', r"not UTF-8 text \(invalid start byte at byte 0\)")], ids=["invalid", "list", "string", "binary"])
def test_broken_config_files_name_the_file_and_fault(saved, tmp_path, text, fault):
    folder = tmp_path / "broken"
    shutil.copytree(saved[1], folder)
    readers = {"transformer/config.json": load_transformer, "vae/config.json": load_vae,
               "text_encoder/config.json": load_t5, "llm/config.json": load_llm,
               "scheduler/scheduler_config.json": load_scheduler, "llm/model.safetensors.index.json": load_llm}
    for name, read in readers.items():
        file = folder / name
        original = file.read_bytes() if file.exists() else None
        file.write_bytes(text)
        for call in (read, describe):
            with pytest.raises(ValueError, match=rf"^{re.escape(str(file))}: {fault}"):
                call(file.parent)
        file.write_bytes(original) if original is not None else file.unlink()


def test_broken_config_in_metadata_names_the_file(saved, tmp_path):
    pipe, _ = saved
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, str(path),
              metadata={"mimir_kind": "transformer", "config": '{"num_layers": 2,}'})
    with pytest.raises(ValueError, match=r"dit.safetensors \(the config in its safetensors metadata\): invalid JSON "
                                         r"at line 1, column 18: Expecting property name"):
        load_transformer(path)
    fuser = tmp_path / "fuser.safetensors"
    save_file(pipe.fuser.state_dict(), str(fuser), metadata={"format": FUSER_FORMAT, "config": "[1, 2]"})
    for call in (load_token_fuser, describe):
        with pytest.raises(ValueError, match=r"fuser.safetensors: the fuser config in its metadata is not valid: "
                                             r"the fuser config must be a JSON object, not list"):
            call(fuser)


def truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return file


def test_truncated_weights_name_the_file(saved, tmp_path, monkeypatch):
    folder = tmp_path / "truncated"
    shutil.copytree(saved[1], folder)
    readers = {"transformer/diffusion_pytorch_model.safetensors": load_transformer,
               "vae/diffusion_pytorch_model.safetensors": load_vae, "text_encoder/model.safetensors": load_t5,
               "llm/model.safetensors": load_llm, "fuser.safetensors": load_token_fuser}
    for name, read in readers.items():
        file = folder / name
        original, size = file.read_bytes(), file.stat().st_size
        truncate(file)
        fault = rf"^{re.escape(str(file))}: truncated: {size // 2} bytes, but its header describes {size} "
        with pytest.raises(ValueError, match=fault):
            read(file if file.parent == folder else file.parent)
        file.write_bytes(original)
    # a Mimir pipeline checks its LLM's and fuser's files before it builds any model
    monkeypatch.setattr(components, "_build", lambda *a: pytest.fail("a model was built"))
    for name in ("llm/model.safetensors", "fuser.safetensors"):
        truncate(folder / name)
        with pytest.raises(ValueError, match=rf"{name}: truncated"):
            load_pipeline(folder)
        shutil.copy(saved[1] / name, folder / name)


@pytest.mark.parametrize("layer, allowed", [(-1, True), (2, True), (-3, True), (3, False), (-4, False)])
def test_llm_hidden_layer_is_checked_where_the_llm_meets_the_fuser(saved, tmp_path, layer, allowed):
    _, folder = saved  # its LLM has 2 layers: hidden_states has 3 entries
    config = FuserConfig(t5_dim=32, llm_dim=48, text_len=16, stabilizer_tokens=0, instructions=(),
                         llm_hidden_layer=layer)
    save_fuser(TokenFuser(config), tmp_path / "fuser.safetensors")
    if allowed:
        assert loading.pipeline_paths(folder, fuser_path=tmp_path / "fuser.safetensors")[2] == folder / "llm"
        return
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'fuser.safetensors'} \(with the LLM {folder / 'llm'}\): "
                                         rf"llm_hidden_layer {layer} is out of range for an LLM with 2 layers: its "
                                         rf"hidden_states has 3 entries, so the index must be in -3..2"):
        load_pipeline(folder, fuser_path=tmp_path / "fuser.safetensors")


def scaled_fp8(state: dict) -> dict:
    """A state dict as ComfyUI's "scaled fp8" T5 files store it: each Linear weight as fp8 e4m3fn divided by its
    scale_weight (with a scale_input), other tensors as they were, and a `scaled_fp8` marker."""
    out = {"scaled_fp8": torch.tensor([], dtype=torch.float8_e4m3fn)}
    for key, tensor in state.items():
        if tensor.ndim == 2 and key.startswith("encoder.block.") and "relative_attention_bias" not in key:
            scale = tensor.abs().max() / 448  # float8_e4m3fn's largest value
            out[key] = (tensor / scale).to(torch.float8_e4m3fn)
            out[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
            out[key.removesuffix("weight") + "scale_input"] = torch.ones(())
        else:
            out[key] = tensor.contiguous()
    return out


def test_t5_scaled_fp8_file_as_comfyui_stores_it(saved, tmp_path):
    pipe, folder = saved
    state = {k: v for k, v in pipe.text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    stored = scaled_fp8(state)
    path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(stored, str(path))
    assert sum(k.endswith((".scale_weight", ".scale_input")) for k in stored) == 24  # 2 layers x 6 Linear x 2
    model, tokenizer, info = load_t5(path, tokenizer_path=folder / "tokenizer", dtype="fp32")
    dequantized = {k: stored[k].float() * stored[k.removesuffix("weight") + "scale_weight"]
                   if stored[k].dtype == torch.float8_e4m3fn else stored[k] for k in state}
    reference = copy.deepcopy(pipe.text_encoder)
    reference.load_state_dict(dequantized, strict=False)
    assert same_state(model, reference) and info.layout == "single-file"
    assert torch.equal(t5_out(model, tokenizer), t5_out(reference, tokenizer))
    ours, original = t5_out(model, tokenizer), t5_out(pipe.text_encoder, tokenizer)
    assert (ours - original).norm() / original.norm() < 0.1  # fp8's rounding; unscaled weights would be far off
    assert load_t5(path, tokenizer_path=folder / "tokenizer")[0].dtype == torch.bfloat16  # fp8 computes in bf16
    assert describe(path)["kind"] == "t5"


def test_vae_single_file_of_another_size_is_inspected(tmp_path):
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 32), layers_per_block=2, latent_channels=4,
                                 norm_num_groups=4, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4)
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))  # no metadata, as ComfyUI's
    info = describe(path)
    assert (info["kind"], info["layout"], info["vae_scaling_factor"]) == ("vae", "single-file", None)
    assert info["dims"] == dict(latent_channels=4, block_out_channels=[8, 16, 16, 32], layers_per_block=2,
                                temporal_compression_ratio=None)  # no weight's shape depends on it
    with pytest.raises(ValueError, match=r"block_out_channels \[8, 16, 16, 32\], latent_channels 4\): its norm groups"):
        load_vae(path)
    bundled = DEMO_MODEL_DIR / "vae"
    as_file, as_folder = describe(bundled / "diffusion_pytorch_model.safetensors"), describe(bundled)
    told = ("latent_channels", "block_out_channels", "layers_per_block")
    assert {k: as_file["dims"][k] for k in told} == {k: as_folder["dims"][k] for k in told}


@pytest.fixture(scope="module")
def spiece_model() -> bytes:
    """A tiny SentencePiece model trained offline, with T5's special ids (pad 0, </s> 1, <unk> 2, no <s>)."""
    words = BASE_WORDS
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(words[i:i + 6]) for i in range(0, len(words), 3)), model_writer=model,
        vocab_size=60, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return model.getvalue()


def t5_tokenizer_config(vocab_size: int) -> dict:
    """tokenizer_config.json as CogVideoX's tokenizer/ publishes it (100 extra ids after the SentencePiece ones)."""
    token = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    specials = {0: "<pad>", 1: "</s>", 2: "<unk>", **{vocab_size + i: f"<extra_id_{99 - i}>" for i in range(100)}}
    return {"add_prefix_space": True, "added_tokens_decoder": {str(i): {"content": t, **token} for i, t in specials.items()},
            "additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)], "clean_up_tokenization_spaces": True,
            "eos_token": "</s>", "extra_ids": 100, "legacy": True, "model_max_length": 226, "pad_token": "<pad>",
            "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}


@pytest.mark.parametrize("with_config", [True, False], ids=["with-tokenizer-config", "spiece-model-only"])
def test_published_t5_tokenizer_folder_loads(saved, tmp_path, spiece_model, with_config):
    _, folder = saved
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "spiece.model").write_bytes(spiece_model)
    sp = sentencepiece.SentencePieceProcessor(model_proto=spiece_model)
    if with_config:
        (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(t5_tokenizer_config(sp.vocab_size())))
    _, tokenizer, _ = load_t5(folder / "text_encoder", tokenizer_path=tokenizer_dir)
    prompt = "a red circle moves to the left"
    assert tokenizer(prompt).input_ids == sp.encode(prompt) + [1]  # T5 appends </s>
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer)) == (0, 1, sp.vocab_size() + 100)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == sp.vocab_size() + 99


def test_broken_tokenizer_folders_name_the_cause(saved, tmp_path, spiece_model):
    _, folder = saved
    broken = tmp_path / "tokenizer"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    causes = [(lambda: None, "it has no vocabulary file .*; it holds tokenizer_config.json"),
              (lambda: (broken / "spiece.model").write_bytes(b"not a model"),
               rf"{broken / 'spiece.model'} is not a SentencePiece model"),
              (lambda: ((broken / "spiece.model").write_bytes(spiece_model),
                        (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer",}')),
               rf"{broken / 'tokenizer_config.json'}: invalid JSON at line 1, column 35")]
    for make, cause in causes:
        make()
        with pytest.raises(ValueError, match=rf"^{broken}: the tokenizer cannot be loaded: {cause}"):
            load_t5(folder / "text_encoder", tokenizer_path=broken)


def phi_35_tokenizer_config() -> dict:
    """Phi-3.5-mini-instruct's tokenizer_config.json: the Llama-2 SentencePiece model plus its chat tokens."""
    chat = {32000: "<|endoftext|>", 32001: "<|assistant|>", 32002: "<|placeholder1|>", 32003: "<|placeholder2|>",
            32004: "<|placeholder3|>", 32005: "<|placeholder4|>", 32006: "<|system|>", 32007: "<|end|>",
            32008: "<|placeholder5|>", 32009: "<|placeholder6|>", 32010: "<|user|>"}
    token = dict(lstrip=False, normalized=False, single_word=False, special=True)
    decoder = {"0": {"content": "<unk>", "rstrip": False, **token}, "1": {"content": "<s>", "rstrip": False, **token},
               "2": {"content": "</s>", "rstrip": True, **token, "special": False}}
    decoder.update({str(i): {"content": t, "rstrip": i != 32000, **token} for i, t in chat.items()})
    template = ("{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
                "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
                "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
                "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
    return {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<s>",
            "chat_template": template, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
            "legacy": False, "model_max_length": 131072, "pad_token": "<|endoftext|>", "padding_side": "left",
            "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
            "use_default_system_prompt": False}


COMFYUI = os.environ.get("COMFYUI_PATH")


@pytest.mark.skipif(not COMFYUI, reason="COMFYUI_PATH is not set: the real tokenizers come from a ComfyUI checkout")
def test_comfyui_tokenizers_load(tmp_path):
    encoders = Path(COMFYUI) / "comfy" / "text_encoders"
    t5 = load_tokenizer(encoders / "t5_tokenizer", model_type="t5")
    reference = tokenizers.Tokenizer.from_file(str(encoders / "t5_tokenizer" / "tokenizer.json"))
    prompt = "a red ball moves to the left"
    assert t5(prompt).input_ids == reference.encode(prompt).ids and len(t5) == 32100
    # The Llama-2 SentencePiece model, as Phi-3.5's tokenizer (its 32000 pieces, then the chat tokens). ComfyUI
    # 0.3.64 ships it as Pile-T5's tokenizer; later versions under llama_tokenizer/.
    sources = [encoders / "llama_tokenizer" / "tokenizer.model", encoders / "t5_pile_tokenizer" / "tokenizer.model"]
    source = next((p for p in sources if p.is_file()), None)
    if source is None:
        pytest.skip(f"no Llama-2 SentencePiece model in {encoders} ({', '.join(p.parent.name for p in sources)})")
    phi = tmp_path / "phi-3.5-mini"
    phi.mkdir()
    shutil.copy(source, phi / "tokenizer.model")
    (phi / "tokenizer_config.json").write_text(json.dumps(phi_35_tokenizer_config()))
    (phi / "config.json").write_text(json.dumps(PHI_35_MINI))
    tokenizer, sp = load_tokenizer(phi), sentencepiece.SentencePieceProcessor(model_file=str(source))
    assert tokenizer(prompt).input_ids == sp.encode(prompt) and sp.vocab_size() == 32000
    assert tokenizer.convert_tokens_to_ids(["<|user|>", "<|end|>", "<|assistant|>"]) == [32010, 32007, 32001]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (32000, 32000, 32011)
    assert chat_template_parts(tokenizer) == ([32010], [32007, 32001])


# ---- describe (mimir inspect) ----------------------------------------------------------------------------

def test_inspect_files_and_folders(saved, tmp_path):
    pipe, folder = saved
    fuser = describe(folder / "fuser.safetensors")
    assert fuser["kind"] == "fuser" and fuser["config"]["llm_dim"] == 48 and fuser["config"]["stabilizer_tokens"] == 4
    save_single_file(pipe.transformer, tmp_path / "dit.safetensors", vae_scaling_factor=1.15258426)
    dit = describe(tmp_path / "dit.safetensors")
    assert (dit["kind"], dit["layout"], dit["variant"], dit["vae_scaling_factor"]) == \
        ("transformer", "single-file", "custom", 1.15258426)
    assert dit["dims"]["inner_dim"] == 32 and dit["dims"]["max_text_seq_length"] == 20
    whole = describe(folder)
    assert whole["kind"] == "pipeline" and whole["mimir"] is True
    assert set(whole["components"]) == {"transformer", "vae", "text_encoder", "scheduler", "llm", "fuser"}
    assert whole["components"]["llm"]["dims"]["hidden_size"] == 48
    assert describe(folder / "llm")["kind"] == "llm" and describe(folder / "vae")["kind"] == "vae"
    json.dumps(whole)  # plain data for the CLI


def test_single_file_fuser_and_demo_dir(saved, tmp_path):
    pipe, _ = saved
    save_single_file(pipe.fuser, tmp_path / "fuser.safetensors")
    fuser, info = load_token_fuser(tmp_path / "fuser.safetensors", dtype="bf16")
    assert info.dtype == "bfloat16" and fuser.z_beta.weight.dtype == torch.bfloat16
    assert DEMO_MODEL_DIR.parts[-3:] == ("mimir", "demo", "model")
