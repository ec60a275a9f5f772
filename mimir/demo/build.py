"""Build the bundled demo model from scratch: `python -m mimir.demo.build [--quick] [--no-fuser] [--out DIR]`.

Every stage is seeded; the same command gives the same model (up to float reduction order across CPUs).
1. world: render the training clips of `world.py` (train split only) to mp4 files + captions.jsonl.
2. vae: train a CogVideoX-architecture VAE (4 blocks: 8x spatial, 4x temporal compression) for reconstruction
   on the same clips rendered at half size; its scaling factor is 1 / std of the latents.
3. text: word-level tokenizers from the caption vocabulary; a T5 encoder left at its seeded random init (the
   DiT learns to read it); a Phi-3 causal LM briefly trained on chat-formatted training captions, so that its
   answer tokens restate the prompt canonically and each instruction token predicts one attribute.
4. init: a fresh CogVideoX DiT (rotary positions, as 5B) and a fresh token fuser, saved with the parts above as
   an ordinary Mimir pipeline folder (mimir.loading.save_pipeline).
5. cache + train: the project's own training loop (mimir.train) caches VAE latents and text features once,
   then trains the DiT and the fuser end to end.
6. the trained DiT and fuser replace the fresh ones, and the folder is written to `--out`.

`--no-fuser` is the ablation arm: the fuser keeps its zero init (fuser_lr 0, no stabilizer tokens, no answer
tokens), so the DiT reads exactly the T5 stream, as plain CogVideoX does. `--reuse MODEL` takes the VAE,
tokenizers, T5 and LLM from an existing model folder instead of training them (the benchmark's ablation uses
it with the bundled model, so both arms share everything but the fuser).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from transformers import Phi3Config, Phi3ForCausalLM, T5Config, T5EncoderModel

from ..components import load_scheduler, load_token_fuser, load_transformer
from ..fuser import DEFAULT_INSTRUCTIONS, FuserConfig, TokenFuser
from ..loading import DEMO_MODEL_DIR, load_pipeline, save_pipeline
from ..pipeline import MimirPipeline
from ..text import chat_template_parts, text_ids
from . import DEMO_GUIDANCE, DEMO_STEPS
from .tokenizers import word_tokenizer
from .world import COUNT_WORDS, PLURALS, caption_vocabulary, make_caption, make_dataset, render, write_dataset

ANSWER_WORDS = {v: k for k, v in COUNT_WORDS.items() if k in ("one", "two", "three")}  # 1 -> "one", ...


@dataclass
class Recipe:
    """Every size and step count of the build. Defaults: the bundled model; `quick()`: the CI smoke build."""

    seed: int = 0
    clips: int = 2000  # training clips of the world (train split)
    frames: int = 9  # 8k+1; 3 latent frames
    size: int = 64  # square frames; 8 x 8 latents
    # VAE (AutoencoderKLCogVideoX, layers_per_block 1)
    vae_channels: tuple[int, ...] = (8, 16, 32, 32)
    latent_channels: int = 8
    vae_image_steps: int = 600  # single frames
    vae_image_batch: int = 16
    vae_steps: int = 300  # whole clips
    vae_batch: int = 8
    vae_size: int = 32  # the VAE trains on the same scenes rendered smaller (4x cheaper) and runs at `size`
    vae_lr: float = 2e-3
    vae_kl: float = 1e-2  # per latent element; a smooth latent space keeps the DiT's small errors small in pixels
    # text encoders
    t5_dim: int = 64
    llm_dim: int = 64
    llm_steps: int = 250
    llm_batch: int = 64
    llm_lr: float = 3e-3
    # fuser
    fuser: bool = True  # False: the ablation arm (see the module docstring)
    text_len: int = 24  # T5 length n: captions are at most 8 words + </s>
    answer_tokens: int = 12  # the canonical restatement is at most 8 words + <|end|>
    # DiT (CogVideoXTransformer3DModel, rotary positions as in 5B)
    dit_layers: int = 4
    dit_heads: int = 4
    dit_head_dim: int = 32  # rotary needs a multiple of 16
    dit_patch: int = 2
    dit_rotary: bool = True  # rotary positions (5B); False: absolute sin-cos positions (2B)
    dit_steps: int = 5000
    dit_batch: int = 16
    dit_lr: float = 1e-3
    fuser_lr: float = 1e-3

    @classmethod
    def quick(cls, **changes) -> Recipe:
        """A few steps of every stage on a tiny dataset: proves the recipe end to end in seconds."""
        small = dict(clips=8, vae_image_steps=2, vae_image_batch=2, vae_steps=2, vae_batch=2, llm_steps=2,
                     llm_batch=8, dit_steps=2, dit_batch=2)
        return cls(**{**small, **changes})

    def fuser_config(self) -> FuserConfig:
        """The full fuser, or for the ablation arm one that passes T5 through (no LLM tokens of any kind)."""
        instructions = DEFAULT_INSTRUCTIONS if self.fuser else ()
        return FuserConfig(t5_dim=self.t5_dim, llm_dim=self.llm_dim, text_len=self.text_len,
                           stabilizer_tokens=len(instructions), instructions=instructions,
                           answer_tokens=self.answer_tokens if self.fuser else 0)


# ---- 1. world ---------------------------------------------------------------------------------------------

def write_world(recipe: Recipe, folder: Path) -> Path:
    """The training clips as mp4 + captions.jsonl (the dataset format mimir.train reads)."""
    return write_dataset(folder, recipe.clips, recipe.seed, "train", frames=recipe.frames, size=recipe.size)


def vae_clips(recipe: Recipe, size: int, count: int | None = None) -> torch.Tensor:
    """The first `count` training clips rendered at `size` as the VAE's input: float [N, 3, F, H, W] in -1..1."""
    specs = make_dataset(recipe.clips, recipe.seed, "train")[:count]
    clips = torch.stack([render(spec, recipe.frames, size) for spec in specs])
    return clips.permute(0, 4, 1, 2, 3) * 2.0 - 1.0


# ---- 2. VAE -----------------------------------------------------------------------------------------------

def make_vae(recipe: Recipe) -> AutoencoderKLCogVideoX:
    # Few channels per norm group would normalise each colour feature on its own and erase hue (a group of one
    # channel is instance norm): 2 groups keep 4+ channels, and their ratios, together.
    torch.manual_seed(recipe.seed)
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, latent_channels=recipe.latent_channels,
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=recipe.vae_channels, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4, sample_height=recipe.size, sample_width=recipe.size)


# RGB -> (luma, blue-difference, red-difference) chroma (BT.601)
YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]])


def reconstruction_loss(error: torch.Tensor, target: torch.Tensor, chroma_weight: float = 4.0) -> torch.Tensor:
    """L1 + MSE in YCbCr with chroma weighted up, object pixels 5x background pixels.

    With plain RGB losses this small CogVideoX VAE learns shapes in luma and leaves every object the mean colour
    for hundreds of steps (here: 8/40 colours right after 400 steps); weighting chroma fixes colour within
    ~400 steps. Objects cover ~10% of a frame, hence their weight."""
    weights = torch.tensor([1.0, chroma_weight, chroma_weight])[:, None]
    error = torch.einsum("ij,bj...->bi...", YCBCR * weights, error)
    pixel_weight = 1.0 + 4.0 * (target > -0.9).any(dim=1, keepdim=True).float()
    return (pixel_weight * (error.abs() + error.pow(2))).mean() / pixel_weight.mean()


def train_vae(recipe: Recipe, clips: torch.Tensor, log=print) -> AutoencoderKLCogVideoX:
    """Reconstruction with a light KL term, then the scaling factor. Two phases, as CogVideoX's VAE mixes images
    and videos: single frames first (spatial detail and colour at a third of the cost of a clip step), then
    whole clips (the 4x temporal compression). Clips are rendered at vae_size: a convolutional VAE trained on
    small frames runs at recipe.size, the scenes being the same, only bigger."""
    vae = make_vae(recipe).train()
    generator = torch.Generator().manual_seed(recipe.seed)
    phases = (("image", recipe.vae_image_steps, recipe.vae_image_batch, recipe.vae_lr),
              ("clip", recipe.vae_steps, recipe.vae_batch, recipe.vae_lr / 2))
    for phase, steps, batch, lr in phases:
        optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps))
        for step in range(steps):
            x = clips[torch.randint(len(clips), (batch,), generator=generator)]
            if phase == "image":
                x = x[:, :, torch.randint(x.shape[2], (1,), generator=generator)]
            posterior = vae.encode(x).latent_dist
            error = vae.decode(posterior.sample(generator)).sample - x
            kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
            loss = reconstruction_loss(error, x) + recipe.vae_kl * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if (step + 1) % 100 == 0 or step + 1 == steps:
                log(f"vae {phase} step {step + 1}/{steps}: loss {loss.item():.4f}")
    vae.eval()
    full_size = vae_clips(recipe, recipe.size, count=64)  # the scale of the latents the DiT will see
    vae.register_to_config(scaling_factor=latent_scaling(vae, full_size))
    return vae


@torch.no_grad()
def latent_scaling(vae: AutoencoderKLCogVideoX, clips: torch.Tensor) -> float:
    """1 / std of latent samples around their per-channel means, so that the content (objects), not the
    constant background code, has unit variance in diffusion space. Dividing by the plain std, which here is
    half per-channel offsets, left the objects at a quarter of the noise schedule's assumed variance: their
    SNR 4x lower at every step, and the DiT's layout decided in the last few steps."""
    generator = torch.Generator().manual_seed(0)
    samples = torch.cat([vae.encode(batch).latent_dist.sample(generator) for batch in clips.split(8)])
    return float(1.0 / (samples - samples.mean(dim=(0, 2, 3, 4), keepdim=True)).std())


def _warmup_cosine(total: int, warmup: int = 20):
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


# ---- 3. text encoders -------------------------------------------------------------------------------------

def make_tokenizers():
    """(T5 tokenizer, LLM tokenizer): word level; the LLM's also knows the instruction words."""
    instruction_words = [w for text in DEFAULT_INSTRUCTIONS for w in text.lower().replace(".", " .").split()]
    words = caption_vocabulary()
    return word_tokenizer(words, kind="t5"), word_tokenizer(words + instruction_words, kind="llm")


def make_t5(recipe: Recipe, tokenizer) -> T5EncoderModel:
    """A T5 encoder at its seeded random init: frozen like the real one, and the DiT learns to read it."""
    torch.manual_seed(recipe.seed + 1)
    config = T5Config(vocab_size=len(tokenizer), d_model=recipe.t5_dim, d_kv=16, d_ff=2 * recipe.t5_dim,
                      num_layers=2, num_heads=recipe.t5_dim // 16, relative_attention_num_buckets=8,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def make_llm(recipe: Recipe, tokenizer) -> Phi3ForCausalLM:
    torch.manual_seed(recipe.seed + 2)
    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=recipe.llm_dim, intermediate_size=4 * recipe.llm_dim,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        tie_word_embeddings=False)
    return Phi3ForCausalLM(config)


def llm_lessons(spec, instructions=DEFAULT_INSTRUCTIONS) -> list[tuple[str, str, str]]:
    """(caption, instruction, answer) triples the LLM learns for one clip spec, laid out as LLMTextEncoder feeds
    it: after the chat-wrapped caption, restate the caption canonically (the answer tokens); after the caption and
    an instruction, name one attribute (motion, colour, shape, number: the instruction tokens)."""
    canonical = make_caption(spec.shape, spec.colour, spec.motion, spec.count)
    noun = spec.shape if spec.count == 1 else PLURALS[spec.shape]
    answers = (spec.motion, spec.colour, noun, ANSWER_WORDS[spec.count])
    return [(spec.caption, "", canonical)] + [(spec.caption, i, a) for i, a in zip(instructions, answers)]


def lesson_ids(tokenizer, template: tuple[list[int], list[int]], caption: str, instruction: str,
               answer: str) -> tuple[list[int], list[int]]:
    """(input ids, labels): prefix + caption + suffix + instruction, as LLMTextEncoder builds them (no loss), then
    the answer and end-of-turn (loss). template: chat_template_parts(tokenizer)."""
    prefix, suffix = template
    context = prefix + text_ids(tokenizer, caption) + suffix + text_ids(tokenizer, instruction)
    answer_ids = text_ids(tokenizer, f"{answer} {tokenizer.eos_token}")
    return context + answer_ids, [-100] * len(context) + answer_ids


def train_llm(recipe: Recipe, tokenizer, log=print) -> Phi3ForCausalLM:
    """Brief training on chat-formatted training-split captions (and the empty prompt), loss on answers only."""
    llm = make_llm(recipe, tokenizer).train()
    specs = make_dataset(max(recipe.llm_batch, recipe.clips), recipe.seed + 3, "train")
    template = chat_template_parts(tokenizer)
    lessons = [lesson_ids(tokenizer, template, *lesson) for spec in specs for lesson in llm_lessons(spec)]
    lessons += [lesson_ids(tokenizer, template, "", "", "")] * (len(lessons) // 50)  # the empty prompt (guidance)
    optimizer = torch.optim.AdamW(llm.parameters(), lr=recipe.llm_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(recipe.llm_steps))
    rng = random.Random(recipe.seed)
    for step in range(recipe.llm_steps):
        batch = rng.sample(lessons, recipe.llm_batch)
        longest = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([_pad(ids, tokenizer.pad_token_id, longest) for ids, _ in batch])
        labels = torch.tensor([_pad(labels, -100, longest) for _, labels in batch])
        mask = torch.tensor([_pad([1] * len(ids), 0, longest) for ids, _ in batch])
        loss = llm(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 50 == 0 or step + 1 == recipe.llm_steps:
            log(f"llm step {step + 1}/{recipe.llm_steps}: loss {loss.item():.4f}")
    return llm.eval()


def _pad(row: list[int], value: int, length: int) -> list[int]:
    return row + [value] * (length - len(row))


# ---- 4. the initial pipeline ------------------------------------------------------------------------------

def make_transformer(recipe: Recipe) -> CogVideoXTransformer3DModel:
    """A fresh CogVideoX DiT (5B layout: rotary positions) for recipe.size frames: 8x smaller latents."""
    torch.manual_seed(recipe.seed + 4)
    width, latent = recipe.dit_heads * recipe.dit_head_dim, recipe.size // 8
    return CogVideoXTransformer3DModel(
        num_attention_heads=recipe.dit_heads, attention_head_dim=recipe.dit_head_dim,
        in_channels=recipe.latent_channels, out_channels=recipe.latent_channels, time_embed_dim=width,
        text_embed_dim=recipe.t5_dim, num_layers=recipe.dit_layers, sample_width=latent, sample_height=latent,
        sample_frames=recipe.frames, patch_size=recipe.dit_patch, temporal_compression_ratio=4,
        max_text_seq_length=recipe.fuser_config().out_len, use_rotary_positional_embeddings=recipe.dit_rotary,
        use_learned_positional_embeddings=False)


def make_fuser(recipe: Recipe) -> TokenFuser:
    torch.manual_seed(recipe.seed + 5)
    return TokenFuser(recipe.fuser_config()).eval()


def frozen_parts(recipe: Recipe, reuse: Path | None, log=print) -> dict:
    """VAE, tokenizers, T5 and LLM: trained here, or taken from the model folder `reuse`."""
    if reuse is not None:
        pipe = load_pipeline(reuse)
        log(f"reusing the VAE, tokenizers, T5 and LLM of {reuse}")
        return dict(vae=pipe.vae, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, llm=pipe.llm,
                    llm_tokenizer=pipe.llm_tokenizer)
    vae = train_vae(recipe, vae_clips(recipe, recipe.vae_size), log)
    t5_tokenizer, llm_tokenizer = make_tokenizers()
    return dict(vae=vae, tokenizer=t5_tokenizer, text_encoder=make_t5(recipe, t5_tokenizer),
                llm=train_llm(recipe, llm_tokenizer, log), llm_tokenizer=llm_tokenizer)


# ---- 5. cache + training with mimir.train -----------------------------------------------------------------

def train_config(recipe: Recipe, init: Path, captions: Path, work: Path):
    from ..train import TrainConfig

    return TrainConfig(
        model=str(init), data=str(captions), cache=str(work / "cache"), output_dir=str(work / "run"),
        num_frames=recipe.frames, height=recipe.size, width=recipe.size, text_dropout=0.1, num_workers=0,
        cache_shard_size=16, max_steps=recipe.dit_steps, batch_size=recipe.dit_batch, lr=recipe.dit_lr,
        fuser_lr=recipe.fuser_lr if recipe.fuser else 0.0, weight_decay=1e-4, optimizer="adamw",
        warmup_steps=min(100, recipe.dit_steps // 10), lr_schedule="cosine", seed=recipe.seed, device="cpu",
        log_every=max(1, min(100, recipe.dit_steps // 10)), tensorboard=False, checkpoint_every=0,
        keep_checkpoints=1, export=True)


def train_dit(recipe: Recipe, init: Path, captions: Path, work: Path, log=print) -> dict:
    """Feature cache, then the DiT + fuser training run. -> the run summary (its `export` holds the files)."""
    from ..train import build_cache, train

    config = train_config(recipe, init, captions, work)
    cache = build_cache(config, progress=False)
    log(f"cached {cache['clips']} clips")
    summary = train(config, progress=False)
    log(f"trained {summary['steps']} steps: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")
    return summary


# ---- the whole build --------------------------------------------------------------------------------------

def build(recipe: Recipe, out: Path = DEMO_MODEL_DIR, work: Path | None = None, reuse: Path | None = None,
          log=print) -> dict:
    """Run every stage and write the model folder `out` (replaced). -> build info (also out/build.json)."""
    out = Path(out)
    temporary = work is None
    work = Path(tempfile.mkdtemp(prefix="mimir-demo-build-") if temporary else work)
    times, start = {}, time.perf_counter()

    def stage(name: str, since: float) -> float:
        times[name] = round(time.perf_counter() - since, 1)
        log(f"[{name}] {times[name]} s")
        return time.perf_counter()

    try:
        t = time.perf_counter()
        captions = write_world(recipe, work / "clips")
        t = stage("world", t)
        parts = frozen_parts(recipe, reuse, log)
        t = stage("vae+text" if reuse is None else "reuse", t)
        pipe = MimirPipeline(transformer=make_transformer(recipe), scheduler=load_scheduler("ddim", variant="5b"),
                             fuser=make_fuser(recipe), **parts)
        save_pipeline(pipe, work / "init")
        summary = train_dit(recipe, work / "init", captions, work, log)
        t = stage("cache+dit", t)
        pipe.fuser = load_token_fuser(summary["export"]["fuser"])[0]
        pipe.transformer = load_transformer(summary["export"]["transformer"],
                                            text_len=pipe.fuser.config.out_len)[0].eval()
        info = {"recipe": dataclasses.asdict(recipe), "reuse": str(reuse) if reuse else None,
                "seconds": times, "total_seconds": round(time.perf_counter() - start, 1),
                "dit_loss": [summary["first_loss"], summary["final_loss"]]}
        _write_model(pipe, out, info, recipe)
        return info
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def model_card(recipe: Recipe) -> str:
    """README.md of the model folder: what each part is and how it was made."""
    r, fuser = recipe, recipe.fuser_config()
    arm = ("DiT + token fuser trained end to end" if r.fuser else
           "ablation arm: the DiT trained on the T5 stream alone (fuser kept at its zero init)")
    return f"""# mimir-demo{'' if r.fuser else ' (no-fuser ablation arm)'}

A Mimir pipeline at toy size in the ordinary layouts (diffusers CogVideoX folder + `llm/` + `fuser.safetensors`),
built from scratch by `python -m mimir.demo.build` (recipe and stage timings: `build.json`) on the synthetic
world of `mimir/demo/world.py`: {r.clips} training clips, {r.size} x {r.size} pixels, {r.frames} frames.

- VAE: `AutoencoderKLCogVideoX`, 4 blocks {tuple(r.vae_channels)} (8x spatial, 4x temporal), {r.latent_channels} \
latent channels; trained for reconstruction ({r.vae_image_steps} single-frame + {r.vae_steps} clip steps).
- T5: `T5EncoderModel` (d_model {r.t5_dim}), word-level tokenizer of the caption vocabulary; seeded random init.
- LLM: `Phi3ForCausalLM` (hidden {r.llm_dim}), word-level tokenizer with a chat template; {r.llm_steps} steps \
on chat-formatted training captions (answer: the caption restated; after each instruction: one attribute word).
- DiT: `CogVideoXTransformer3DModel`, {r.dit_layers} layers, {r.dit_heads} heads x {r.dit_head_dim}, patch \
{r.dit_patch}, rotary positions (5B layout); token fuser: text_len {fuser.text_len}, {fuser.stabilizer_tokens} \
stabilizer tokens, {fuser.answer_tokens} answer tokens. {arm} with `mimir.train` from a feature cache \
({r.dit_steps} steps, batch {r.dit_batch}, lr {r.dit_lr:g} cosine).

Sampled by default with {DEMO_STEPS} DDIM steps and guidance {DEMO_GUIDANCE:g} (`mimir.demo`). Measured text alignment on
held-out attribute combinations, with the no-fuser ablation arm: `python bench/alignment.py`.
"""


def _write_model(pipe: MimirPipeline, out: Path, info: dict, recipe: Recipe) -> None:
    """save_pipeline into a sibling folder, then swap it in, so a failed build never leaves half a model."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_pipeline(pipe, staging)
    (staging / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    (staging / "README.md").write_text(model_card(recipe))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimir.demo.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help=f"model folder to write (replaced); the bundled model is {DEMO_MODEL_DIR}, which "
                             f"also needs --overwrite-bundled")
    parser.add_argument("--overwrite-bundled", action="store_true",
                        help="allow --out to be the bundled model folder (inside the installed package)")
    parser.add_argument("--work", type=Path, help="keep clips, cache and training run here (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="a few steps of every stage (CI)")
    parser.add_argument("--no-fuser", action="store_true", help="the ablation arm: T5 only, fuser at its zero init")
    parser.add_argument("--reuse", type=Path, help="take VAE, tokenizers, T5 and LLM from this model folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.resolve() == DEMO_MODEL_DIR.resolve() and (args.quick or not args.overwrite_bundled):
        parser.error(f"--out {args.out} is the bundled model: " + ("a --quick build never replaces it" if args.quick
                     else "add --overwrite-bundled to replace it"))
    changes = dict(seed=args.seed, fuser=not args.no_fuser)
    recipe = Recipe.quick(**changes) if args.quick else Recipe(**changes)
    info = build(recipe, args.out, args.work, args.reuse)
    print(f"wrote {args.out} in {info['total_seconds']} s ({info['seconds']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
