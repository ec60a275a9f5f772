"""Tiny models built from configs, for tests, benchmarks and the smoke run; a SIGKILL at a chosen moment.

Every component has the real architecture (diffusers' CogVideoX transformer and VAE, transformers' T5 and
causal LMs) at toy sizes, with word-level tokenizers built offline. Nothing here downloads anything.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    T5Config,
    T5EncoderModel,
)

from .demo.tokenizers import word_tokenizer as demo_tokenizer
from .demo.world import make_dataset, render
from .fuser import FuserConfig, TokenFuser
from .text import stack_encoded
from .variants import SCHEDULER_SETTINGS, SCHEDULERS
from .video import write_video

BASE_WORDS = (
    "a an the one two three red green blue yellow orange purple white black circle square triangle ball box "
    "moves moving slides sliding to left right up down spins in of and on with is video describe detailed "
    "motion color colour spatial relationships positions number objects object"
).split()

def word_tokenizer(words=BASE_WORDS, kind: str = "t5"):
    """The demo's word-level tokenizer (mimir.demo.tokenizers) over the test vocabulary."""
    return demo_tokenizer(words, kind)


def tiny_t5(tokenizer, d_model: int = 32, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def tiny_llm(tokenizer, arch: str = "phi3", hidden_size: int = 48, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    if arch == "phi3":
        return Phi3ForCausalLM(Phi3Config(**common)).eval()
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    raise ValueError(f"tiny_llm: arch must be 'phi3' or 'llama', got {arch!r}")


def tiny_transformer(variant: str = "2b", text_dim: int = 32, text_len: int = 16, in_channels: int = 4,
                     seed: int = 0) -> CogVideoXTransformer3DModel:
    """variant "2b": sin-cos positions; "5b": rotary; "1.5": rotary with temporal patch 2."""
    torch.manual_seed(seed)
    rotary = variant in ("5b", "1.5")
    config = dict(num_attention_heads=2, attention_head_dim=16, in_channels=in_channels, out_channels=in_channels,
                  time_embed_dim=8, text_embed_dim=text_dim, num_layers=2, sample_width=4, sample_height=4,
                  sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=text_len,
                  use_rotary_positional_embeddings=rotary, use_learned_positional_embeddings=False)
    if variant == "1.5":
        config.update(patch_size_t=2, sample_frames=17)
    return CogVideoXTransformer3DModel(**config).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0) -> AutoencoderKLCogVideoX:
    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
        sample_height=32, sample_width=32,
    ).eval()


def real_scheduler(kind: str = "ddim", snr_shift_scale: float = 3.0):
    """A scheduler with the settings of the published CogVideoX checkpoints (the class defaults differ)."""
    return SCHEDULERS[kind](**SCHEDULER_SETTINGS, snr_shift_scale=snr_shift_scale)


def tiny_components(variant: str = "2b", llm_arch: str = "phi3", stabilizer_tokens: int = 4, text_len: int = 16,
                    scheduler: str = "ddim", seed: int = 0) -> dict:
    """Everything MimirPipeline needs, tiny. `text_len` is the T5 length n (226 in real models)."""
    t5_tok, llm_tok = word_tokenizer(kind="t5"), word_tokenizer(kind="llm")
    text_encoder = tiny_t5(t5_tok, seed=seed)
    llm = tiny_llm(llm_tok, arch=llm_arch, seed=seed + 1)
    instructions = FuserConfig().instructions[:stabilizer_tokens]
    fuser_config = FuserConfig(t5_dim=32, llm_dim=llm.config.hidden_size, text_len=text_len,
                               stabilizer_tokens=stabilizer_tokens, instructions=instructions, answer_tokens=4)
    torch.manual_seed(seed + 2)
    return dict(
        tokenizer=t5_tok, text_encoder=text_encoder, llm_tokenizer=llm_tok, llm=llm,
        fuser=TokenFuser(fuser_config).eval(),
        transformer=tiny_transformer(variant, text_len=text_len + stabilizer_tokens, seed=seed + 3),
        vae=tiny_vae(seed=seed + 4), scheduler=real_scheduler(scheduler),
    )


def tiny_train_components(variant: str = "2b", latent_gain: float = 3.0) -> dict:
    """tiny_components with a VAE whose latents look like a trained one's: about unit variance after the
    scaling factor, and a sharp posterior (logvar -14). A randomly initialised VAE has logvar ~ 0, so its
    sampled latents are mostly noise that no model can learn, and a loss could not fall far."""
    parts = tiny_components(variant=variant)
    conv = parts["vae"].encoder.conv_out.conv  # outputs [mean, logvar] channels
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[:half] *= latent_gain
        conv.bias[:half] *= latent_gain
        conv.weight[half:] = 0.0
        conv.bias[half:] = -14.0
    return parts


@torch.no_grad()
def uncached_llm_features(encoder, prompts: list[str], seed: int | None = None):
    """LLMTextEncoder(prompts) the straightforward way, as it was before its caches (issue 13): the answer
    generated, then one forward over prompt + answer, then one padded forward over prompt + instruction per
    instruction; every prompt, the empty one too, encoded anew. The reference the cached encoder is tested and
    benchmarked against. -> (tokens [B, m, D], mask [B, m], instructions [B, K, D] or None)."""
    llm, cfg = encoder.llm, encoder.config
    layer, pad, device = cfg.llm_hidden_layer, encoder.tokenizer.pad_token_id or 0, encoder.device
    encoded = []
    for prompt in prompts:
        query = encoder._ids(prompt)
        context = encoder.prefix + query + encoder.suffix
        answer = encoder._answer(context, seed, None)[0] if cfg.answer_tokens else []
        hidden = llm(torch.tensor([context + answer], device=device), output_hidden_states=True,
                     use_cache=False).hidden_states[layer][0]
        start = len(encoder.prefix)
        tokens = torch.cat([hidden[start:start + len(query)], hidden[len(context):]])
        instructions = None
        if cfg.stabilizer_tokens:
            rows = [context + encoder._ids(text) for text in cfg.instructions]
            longest = max(map(len, rows))
            ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], device=device)
            states = llm(ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[layer]
            instructions = states[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])]
        encoded.append((tokens, instructions))
    return stack_encoded(encoded)


def write_world_clips(folder, count: int, frames: int = 9, size: int = 32, seed: int = 0) -> list[tuple[Path, str]]:
    """The demo world's clips make_dataset(count, seed) as folder/clip000.mp4, ... each with a same-name .txt
    caption: the caption-folder layout of mimir.train.data (the world's own write_dataset writes JSONL).
    Returns [(video, caption)]."""
    folder = Path(folder)
    written = []
    for index, spec in enumerate(make_dataset(count, seed)):
        video = write_video(render(spec, frames, size), folder / f"clip{index:03d}.mp4")
        video.with_suffix(".txt").write_text(spec.caption)
        written.append((video, spec.caption))
    return written


def import_pack(root):
    """The node pack imported the way ComfyUI does it: the folder `root` (the repository) as a package named
    mimir_video_pack, not by the name `mimir`. Imported once per process."""
    name = "mimir_video_pack"
    if name not in sys.modules:
        root = Path(root)
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def kill_at(target: str, call: int = 1, when: str = "after") -> None:
    """SIGKILL this process on the `call`-th call of `target`, just "before" or "after" it runs: the moment a
    kill test chooses, with no sleeps. `target` is "module:name" or "module:Class.method", patched where the
    caller looks it up (e.g. "mimir.train.loop:export", not where export is defined)."""
    module, _, attribute = target.partition(":")
    *path, name = attribute.split(".")
    owner = functools.reduce(getattr, path, importlib.import_module(module))
    original, calls = getattr(owner, name), [0]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls[0] == call and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


def run_killed(command: str, config: dict, target: str, call: int = 1, when: str = "after",
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run mimir.train's `train` or `build_cache` (command "train" | "cache") on `config` (TrainConfig fields)
    with tiny_train_components() in a new Python process that kill_at(target, call, when) stops. -> the ended
    process: returncode -SIGKILL when the kill came, 0 if the run ended before reaching it."""
    spec = json.dumps({"command": command, "config": config, "kill": [target, call, when]})
    code = "import sys; from mimir.testing import _killed_child; _killed_child(sys.argv[1])"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _killed_child(spec: str) -> None:
    from .train import TrainConfig, build_cache, train

    spec = json.loads(spec)
    torch.set_num_threads(1)
    kill_at(*spec["kill"])
    run = train if spec["command"] == "train" else build_cache
    run(TrainConfig(**spec["config"]), tiny_train_components(), progress=False)
