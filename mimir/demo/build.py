"""Build the bundled demo model from scratch: `python -m mimir.demo.build --out DIR [--quick] [--jobs 2]`.

Every stage is seeded; the same command gives the same model (up to float reduction order across CPUs).
vae stage:
1. world: render the training clips of `world.py` (train split only, narrow captions) to mp4 + captions.jsonl.
2. vae: train a CogVideoX-architecture VAE (3 blocks: 4x spatial, 4x temporal compression) for reconstruction;
   its scaling factor is 1 / std of the latents. Its round trip is read by the analysis (build.json "checks").
text stage:
3. text: word-level tokenizers over the caption and corpus vocabulary; both encoders pretrained on the same text
   corpus (`corpus.py`), each with its own real objective: T5 by span-corruption denoising, the Phi-3 causal LM
   by next-token prediction plus the fuser's four instruction answers and a plain-words restatement.
4. init: a fresh CogVideoX DiT (rotary positions, as 5B) and a fresh token fuser per arm, saved with the parts
   above as ordinary Mimir pipeline folders (mimir.loading.save_pipeline).
mimir / t5-only stages: the project's own training loop (mimir.train) caches VAE latents and text features,
   then trains the DiT and the fuser end to end (mimir), or the DiT alone on the T5 stream (t5-only: the fuser
   keeps its zero init, so the DiT reads exactly what plain CogVideoX reads). Same DiT init, steps and seed.
write stage: the Mimir arm as a pipeline folder at `--out`, the T5-only DiT in `--out`/t5_only/transformer/.

`--reuse MODEL` takes the VAE, tokenizers, T5 and LLM from an existing model folder instead of training them.
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
from transformers import Phi3Config, Phi3ForCausalLM, T5Config, T5EncoderModel, T5ForConditionalGeneration

from ..codec import spatial_factor
from ..components import load_scheduler, load_transformer, load_vae
from ..fuser import DEFAULT_INSTRUCTIONS, FuserConfig, TokenFuser
from ..loading import DEMO_MODEL_DIR, DEMO_T5_ONLY_DIR, load_pipeline, save_pipeline
from ..pipeline import MimirPipeline
from ..text import chat_template_parts, text_ids
from . import DEMO_GUIDANCE, DEMO_STEPS
from .analysis import analyse
from .corpus import corpus_vocabulary, documents, plain_text, understanding_prompts
from .tokenizers import word_tokenizer
from .world import caption_vocabulary, heldout_prompts, make_caption, make_dataset, render, write_dataset


@dataclass
class Recipe:
    """Every size and step count of the build. Defaults: the bundled model; `quick()`: the CI smoke build."""

    seed: int = 0
    clips: int = 2000  # training clips of the world (train split)
    frames: int = 9  # 8k+1; 3 latent frames
    size: int = 48  # square frames; 12 x 12 latents
    # VAE (AutoencoderKLCogVideoX, layers_per_block 1); one block per channel count: 3 blocks = 4x spatial
    vae_channels: tuple[int, ...] = (8, 16, 32)
    latent_channels: int = 8
    vae_image_steps: int = 600  # single frames
    vae_image_batch: int = 16
    vae_steps: int = 1200  # whole clips: the 4x temporal compression of moving objects needs them most
    vae_batch: int = 8
    vae_size: int = 48  # the size the VAE trains at (a convolutional VAE runs at any multiple of its factor)
    vae_lr: float = 2e-3
    vae_kl: float = 1e-2  # per latent element; a smooth latent space keeps the DiT's small errors small in pixels
    # text encoders, pretrained on the same text corpus (corpus.py), each with its own objective
    corpus_documents: int = 20000
    t5_dim: int = 64
    t5_sentinels: int = 8  # <extra_id_k> span markers
    t5_steps: int = 1500  # span-corruption denoising
    t5_batch: int = 64
    t5_lr: float = 3e-3
    llm_dim: int = 64
    llm_steps: int = 1500  # next-token prediction + instruction answers
    llm_batch: int = 64
    llm_lr: float = 3e-3
    # fuser
    fuser: bool = True  # False: the T5-only arm (see the module docstring)
    text_len: int = 24  # T5 length n: prompts are at most 8 words + </s>
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
    dit_ema: float = 0.999
    fuser_lr: float = 1e-3
    t5_dropout: float = 0.3  # fuser arm: T5 branch alone replaced by the empty prompt's (as SD3 drops encoders)

    @classmethod
    def quick(cls, **changes) -> Recipe:
        """A few steps of every stage on a tiny dataset: proves the recipe end to end in seconds."""
        small = dict(clips=8, vae_image_steps=2, vae_image_batch=2, vae_steps=2, vae_batch=2, corpus_documents=64,
                     t5_steps=2, t5_batch=8, llm_steps=2, llm_batch=8, dit_steps=2, dit_batch=2)
        return cls(**{**small, **changes})

    def fuser_config(self) -> FuserConfig:
        """The full fuser, or for the T5-only arm one that passes T5 through (no LLM tokens of any kind)."""
        instructions = DEFAULT_INSTRUCTIONS if self.fuser else ()
        return FuserConfig(t5_dim=self.t5_dim, llm_dim=self.llm_dim, text_len=self.text_len,
                           stabilizer_tokens=len(instructions), instructions=instructions,
                           answer_tokens=self.answer_tokens if self.fuser else 0)

    @property
    def vae_factor(self) -> int:
        return spatial_factor({"block_out_channels": self.vae_channels})


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
        down_block_types=("CogVideoXDownBlock3D",) * len(recipe.vae_channels),
        up_block_types=("CogVideoXUpBlock3D",) * len(recipe.vae_channels),
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

def make_tokenizers(recipe: Recipe):
    """(T5 tokenizer, LLM tokenizer): word level over the caption and corpus vocabulary (the LLM's also knows the
    instruction words; T5's has its sentinels)."""
    words = sorted(set(caption_vocabulary()) | set(corpus_vocabulary()))
    return (word_tokenizer(words, kind="t5", extra_ids=recipe.t5_sentinels), word_tokenizer(words, kind="llm"))


def t5_config(recipe: Recipe, tokenizer) -> T5Config:
    return T5Config(vocab_size=len(tokenizer), d_model=recipe.t5_dim, d_kv=16, d_ff=2 * recipe.t5_dim,
                    num_layers=2, num_decoder_layers=2, num_heads=recipe.t5_dim // 16,
                    relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)


def span_corruption(ids: list[int], sentinels: list[int], eos: int, rng: random.Random,
                    noise: float = 0.15, mean_span: int = 3) -> tuple[list[int], list[int]]:
    """T5's objective on one text: (input with each masked span replaced by the next sentinel,
    target = each sentinel followed by the tokens it hides, then </s>)."""
    masked = [False] * len(ids)
    want = max(1, round(noise * len(ids)))
    while sum(masked) < want:
        start, length = rng.randrange(len(ids)), rng.randint(1, 2 * mean_span - 1)
        masked[start:start + length] = [True] * len(masked[start:start + length])
    inputs, target, k = [], [], -1
    for i, (token, hide) in enumerate(zip(ids, masked)):
        if hide and (i == 0 or not masked[i - 1]):
            k += 1
            inputs.append(sentinels[min(k, len(sentinels) - 1)])
            target.append(sentinels[min(k, len(sentinels) - 1)])
        (target if hide else inputs).append(token)
    return inputs + [eos], target + [eos]


def pretrain_t5(recipe: Recipe, tokenizer, docs: list[dict], log=print) -> T5EncoderModel:
    """Span-corruption denoising of the corpus (encoder + decoder, as T5 is pretrained); the encoder is kept.
    Inputs are padded to text_len and read without a mask, as CogVideoX runs T5."""
    torch.manual_seed(recipe.seed + 1)
    model = T5ForConditionalGeneration(t5_config(recipe, tokenizer)).train()
    texts = [text_ids(tokenizer, plain_text(doc))[:recipe.text_len - 1] for doc in docs]
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{k}>" for k in range(recipe.t5_sentinels)])
    pad, rng = tokenizer.pad_token_id, random.Random(recipe.seed + 1)

    def batch_loss() -> torch.Tensor:
        pairs = [span_corruption(ids, sentinels, tokenizer.eos_token_id, rng) for ids in rng.sample(texts, recipe.t5_batch)]
        inputs = torch.tensor([_pad(x, pad, recipe.text_len) for x, _ in pairs])
        longest = max(len(y) for _, y in pairs)
        labels = torch.tensor([_pad(y, -100, longest) for _, y in pairs])
        return model(input_ids=inputs, labels=labels).loss

    _fit(model, "t5", recipe.t5_steps, recipe.t5_lr, batch_loss, log)
    encoder = T5EncoderModel(model.config)
    missing, _ = encoder.load_state_dict(model.state_dict(), strict=False)  # the decoder is dropped
    assert not missing, missing
    return encoder.eval()


def make_llm(recipe: Recipe, tokenizer) -> Phi3ForCausalLM:
    torch.manual_seed(recipe.seed + 2)
    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=recipe.llm_dim, intermediate_size=4 * recipe.llm_dim,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        tie_word_embeddings=False)
    return Phi3ForCausalLM(config)


def llm_example(tokenizer, template: tuple[list[int], list[int]], doc: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one corpus document. Text: next-token prediction over all of it. An instruction
    answer: laid out as LLMTextEncoder feeds the LLM (chat-wrapped prompt, then the instruction; "" asks for the
    answer tokens), loss on the answer and end-of-turn only. template: chat_template_parts(tokenizer)."""
    if "text" in doc:
        ids = [tokenizer.bos_token_id] + text_ids(tokenizer, f"{doc['text']} {tokenizer.eos_token}")
        return ids, ids
    prefix, suffix = template
    context = prefix + text_ids(tokenizer, doc["prompt"]) + suffix + text_ids(tokenizer, doc["instruction"])
    answer = text_ids(tokenizer, f"{doc['answer']} {tokenizer.eos_token}")
    return context + answer, [-100] * len(context) + answer


def train_llm(recipe: Recipe, tokenizer, docs: list[dict], log=print) -> Phi3ForCausalLM:
    """Next-token prediction on the corpus texts plus its instruction answers (and the empty prompt, which
    guidance encodes)."""
    llm = make_llm(recipe, tokenizer).train()
    template = chat_template_parts(tokenizer)
    examples = [llm_example(tokenizer, template, doc) for doc in docs]
    examples += [llm_example(tokenizer, template, {"prompt": "", "instruction": "", "answer": ""})] * (len(examples) // 50)
    rng = random.Random(recipe.seed)

    def batch_loss() -> torch.Tensor:
        batch = rng.sample(examples, recipe.llm_batch)
        longest = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([_pad(ids, tokenizer.pad_token_id, longest) for ids, _ in batch])
        labels = torch.tensor([_pad(labels, -100, longest) for _, labels in batch])
        mask = torch.tensor([_pad([1] * len(ids), 0, longest) for ids, _ in batch])
        return llm(input_ids=ids, attention_mask=mask, labels=labels).loss

    _fit(llm, "llm", recipe.llm_steps, recipe.llm_lr, batch_loss, log)
    return llm.eval()


def _fit(model: torch.nn.Module, name: str, steps: int, lr: float, batch_loss, log) -> None:
    """AdamW with warm-up and cosine decay over `steps` steps of batch_loss() (a text encoder's objective)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps))
    for step in range(steps):
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            log(f"{name} step {step + 1}/{steps}: loss {loss.item():.4f}")


def _pad(row: list[int], value: int, length: int) -> list[int]:
    return row + [value] * (length - len(row))


# ---- checks of the frozen parts (logged and kept in build.json) -------------------------------------------

@torch.no_grad()
def vae_round_trip(recipe: Recipe, vae: AutoencoderKLCogVideoX, clips: int = 40) -> dict:
    """Share of held-out clips whose VAE reconstruction the frame analysis still reads right, per attribute:
    the ceiling of what the DiT can show."""
    specs = make_dataset(clips, recipe.seed, "heldout")
    hits = {name: 0 for name in ("colour", "direction", "count", "shape")}
    for spec in specs:
        x = render(spec, recipe.frames, recipe.size).permute(3, 0, 1, 2)[None] * 2 - 1
        frames = ((vae.decode(vae.encode(x).latent_dist.mode()).sample[0] + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0)
        found = analyse(frames)
        for name in hits:
            hits[name] += found[name] == spec.attributes()[name]
    return {name: round(count / clips, 3) for name, count in hits.items()}


@torch.no_grad()
def restatement_accuracy(llm: Phi3ForCausalLM, tokenizer, prompts: list[dict]) -> float:
    """Share of prompts whose greedy answer (what becomes the fuser's answer tokens) is the canonical caption."""
    prefix, suffix = chat_template_parts(tokenizer)
    right = 0
    for item in prompts:
        ids = torch.tensor([prefix + text_ids(tokenizer, item["prompt"]) + suffix])
        out = llm.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        answer = tokenizer.decode(out, skip_special_tokens=True).strip()
        right += answer == make_caption(item["shape"], item["colour"], item["direction"], item["count"])
    return round(right / len(prompts), 3)


# ---- 4. the initial pipelines -----------------------------------------------------------------------------

def make_transformer(recipe: Recipe) -> CogVideoXTransformer3DModel:
    """A fresh CogVideoX DiT (5B layout: rotary positions) for recipe.size frames (latents vae_factor smaller).
    Both arms start from the same weights: the seed is the same and the text length only sizes a buffer."""
    torch.manual_seed(recipe.seed + 4)
    width, latent = recipe.dit_heads * recipe.dit_head_dim, recipe.size // recipe.vae_factor
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


def text_parts(recipe: Recipe, reuse: Path | None, log=print) -> tuple[dict, dict]:
    """(tokenizers, T5 and LLM; their checks): pretrained here on the corpus, or taken from the folder `reuse`."""
    if reuse is not None:
        pipe = load_pipeline(reuse)
        log(f"reusing the tokenizers, T5 and LLM of {reuse}")
        return dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, llm=pipe.llm,
                    llm_tokenizer=pipe.llm_tokenizer), {}
    t5_tokenizer, llm_tokenizer = make_tokenizers(recipe)
    docs = documents(recipe.corpus_documents, recipe.seed)
    t5 = pretrain_t5(recipe, t5_tokenizer, docs, log)
    llm = train_llm(recipe, llm_tokenizer, docs, log)
    checks = {"llm_restates_understanding_prompts": restatement_accuracy(llm, llm_tokenizer, understanding_prompts()),
              "llm_restates_heldout_captions": restatement_accuracy(llm, llm_tokenizer, heldout_prompts())}
    log(f"checks: {checks}")
    return dict(tokenizer=t5_tokenizer, text_encoder=t5, llm=llm, llm_tokenizer=llm_tokenizer), checks


# ---- 5. cache + training with mimir.train, one run per arm ------------------------------------------------

ARMS = ("mimir", "t5-only")


def arm_recipe(recipe: Recipe, arm: str) -> Recipe:
    """The T5-only arm: the fuser keeps its zero init (fuser_lr 0, no stabilizer, instruction or answer tokens),
    so its DiT reads exactly the T5 stream, as plain CogVideoX does."""
    return dataclasses.replace(recipe, fuser=arm == "mimir")


def train_config(recipe: Recipe, init: Path, captions: Path, work: Path):
    from ..train import TrainConfig

    return TrainConfig(
        model=str(init), data=str(captions), cache=str(work / "cache"), output_dir=str(work / "run"),
        num_frames=recipe.frames, height=recipe.size, width=recipe.size, text_dropout=0.1,
        t5_dropout=recipe.t5_dropout if recipe.fuser else 0.0, num_workers=0,
        cache_shard_size=16, max_steps=recipe.dit_steps, batch_size=recipe.dit_batch, lr=recipe.dit_lr,
        fuser_lr=recipe.fuser_lr if recipe.fuser else 0.0, weight_decay=1e-4, optimizer="adamw",
        warmup_steps=min(100, recipe.dit_steps // 10), lr_schedule="cosine", ema_decay=recipe.dit_ema,
        seed=recipe.seed, device="cpu", log_every=max(1, min(100, recipe.dit_steps // 10)), tensorboard=False,
        checkpoint_every=0, keep_checkpoints=1, export=True)


def train_arm(recipe: Recipe, arm: str, work: Path, threads: int | None = None, log=print) -> dict:
    """Feature cache, then the DiT (+ fuser) run of one arm in work/<arm>/ from work/init-<arm>.
    -> {"seconds", "dit_loss"}; the trained files are in work/<arm>/run/export/."""
    from ..train import build_cache, train

    if threads:  # arms in parallel: one thread each (also keeps each run's float order fixed)
        torch.set_num_threads(threads)
    start = time.perf_counter()
    config = train_config(arm_recipe(recipe, arm), work / f"init-{arm}", work / "clips" / "captions.jsonl", work / arm)
    cache = build_cache(config, progress=False)
    log(f"[{arm}] cached {cache['clips']} clips")
    summary = train(config, progress=False)
    log(f"[{arm}] trained {summary['steps']} steps: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")
    return {"seconds": round(time.perf_counter() - start, 1), "dit_loss": [summary["first_loss"], summary["final_loss"]]}


# ---- the whole build --------------------------------------------------------------------------------------

STAGES = ("vae", "text", *ARMS, "write")


def build(recipe: Recipe, out: Path = DEMO_MODEL_DIR, work: Path | None = None, reuse: Path | None = None,
          stages=STAGES, jobs: int = 1, log=print) -> dict:
    """Run the stages and write the model folder `out` (replaced): the Mimir arm as a pipeline folder, the T5-only
    arm's DiT in out/t5_only/. A stage reads what the earlier ones left in `work`, so stages can run one at a
    time with the same --work. jobs=2 trains the two arms at once, one thread each. -> build info."""
    out = Path(out)
    temporary = work is None
    work = Path(tempfile.mkdtemp(prefix="mimir-demo-build-") if temporary else work)
    work.mkdir(parents=True, exist_ok=True)
    info_path = work / "build.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"seconds": {}}
    info.update(recipe=dataclasses.asdict(recipe), reuse=str(reuse) if reuse else None)
    try:
        info.setdefault("checks", {})
        for name, run_stage in (("vae", _vae_stage), ("text", _text_stage)):
            if name in stages:
                start = time.perf_counter()
                info["checks"].update(run_stage(recipe, work, reuse, log))
                info["seconds"][name] = round(time.perf_counter() - start, 1)
                log(f"[{name}] {info['seconds'][name]} s")
        arms = [arm for arm in ARMS if arm in stages]
        if jobs > 1 and len(arms) > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(len(arms)) as pool:
                runs = pool.starmap(train_arm, [(recipe, arm, work, 1) for arm in arms])
        else:
            runs = [train_arm(recipe, arm, work, log=log) for arm in arms]
        for arm, run in zip(arms, runs):
            info["seconds"][arm], info[f"dit_loss_{arm}"] = run["seconds"], run["dit_loss"]
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        if "write" in stages:
            info["jobs"] = jobs
            _write_model(work, out, info, recipe)
        return info
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def _vae_stage(recipe: Recipe, work: Path, reuse: Path | None, log) -> dict:
    """World clips and the VAE (work/clips, work/vae). -> checks."""
    write_world(recipe, work / "clips")
    if reuse is not None:
        load_vae(reuse)[0].save_pretrained(str(work / "vae"), safe_serialization=True)
        log(f"reusing the VAE of {reuse}")
        return {}
    vae = train_vae(recipe, vae_clips(recipe, recipe.vae_size), log)
    vae.save_pretrained(str(work / "vae"), safe_serialization=True)
    checks = {"vae_round_trip_heldout": vae_round_trip(recipe, vae)}
    log(f"VAE round trip on held-out clips, read by the analysis: {checks['vae_round_trip_heldout']}")
    return checks


def _text_stage(recipe: Recipe, work: Path, reuse: Path | None, log) -> dict:
    """Tokenizers, T5 and LLM, saved with the VAE and a fresh DiT and fuser as each arm's initial pipeline
    (work/init-<arm>). -> checks."""
    parts, checks = text_parts(recipe, reuse, log)
    vae = load_vae(work / "vae")[0]
    for arm in ARMS:
        r = arm_recipe(recipe, arm)
        pipe = MimirPipeline(transformer=make_transformer(r), scheduler=load_scheduler("ddim", variant="5b"),
                             fuser=make_fuser(r), vae=vae, **parts)
        save_pipeline(pipe, work / f"init-{arm}")
    return checks


def model_card(recipe: Recipe) -> str:
    """README.md of the model folder: what each part is and how it was made."""
    r, fuser = recipe, recipe.fuser_config()
    return f"""# mimir-demo

A Mimir pipeline at toy size in the ordinary layouts (diffusers CogVideoX folder + `llm/` + `fuser.safetensors`),
with its T5-only twin's DiT in `t5_only/`, built from scratch by `python -m mimir.demo.build` (recipe, checks
and stage timings: `build.json`) on the synthetic world of `mimir/demo/world.py`: {r.clips} training clips,
{r.size} x {r.size} pixels, {r.frames} frames, captioned in a narrow vocabulary.

- VAE: `AutoencoderKLCogVideoX`, {len(r.vae_channels)} blocks {tuple(r.vae_channels)} ({r.vae_factor}x spatial, \
4x temporal), {r.latent_channels} latent channels; trained for reconstruction ({r.vae_image_steps} single-frame + \
{r.vae_steps} clip steps).
- Text corpus (`mimir/demo/corpus.py`): {r.corpus_documents} documents naming every attribute in words the
  captions never use (synonyms, paraphrases, everyday things of a colour), the same for both encoders.
- T5: `T5EncoderModel` (d_model {r.t5_dim}), pretrained as T5 is, by span-corruption denoising of the corpus
  ({r.t5_steps} steps, encoder + decoder; the encoder is kept).
- LLM: `Phi3ForCausalLM` (hidden {r.llm_dim}) with a chat template, {r.llm_steps} steps of next-token prediction
  on the corpus plus its instruction answers (motion, colour, spatial positions, number; the prompt restated).
- Mimir arm: `CogVideoXTransformer3DModel`, {r.dit_layers} layers, {r.dit_heads} heads x {r.dit_head_dim}, patch \
{r.dit_patch}, rotary positions (5B layout), and a token fuser (text_len {fuser.text_len}, \
{fuser.stabilizer_tokens} stabilizer tokens, {fuser.answer_tokens} answer tokens), trained end to end with
  `mimir.train` ({r.dit_steps} steps, batch {r.dit_batch}, lr {r.dit_lr:g} cosine, EMA {r.dit_ema:g}; T5 branch
  dropped alone in {r.t5_dropout:.0%} of the captions).
- T5-only arm (`t5_only/transformer/`): the same DiT from the same init, trained the same way on the T5 stream
  alone, as plain CogVideoX reads its prompt.

Sampled by default with {DEMO_STEPS} DDIM steps and guidance {DEMO_GUIDANCE:g} (`mimir.demo`). Both arms measured on
held-out and "understanding" prompts: `python bench/alignment.py`.
"""


def _write_model(work: Path, out: Path, info: dict, recipe: Recipe) -> None:
    """The Mimir arm's trained pipeline, plus the T5-only DiT in t5_only/ (sharing the rest), written
    into a sibling folder and then swapped in, so a failed build never leaves half a model."""
    pipe = load_pipeline(work / "mimir" / "run" / "export" / "pipeline")  # mimir.train's export: a whole folder
    t5_only = load_transformer(work / "t5-only" / "run" / "export" / "pipeline", text_len=recipe.text_len)[0]
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_pipeline(pipe, staging)
    t5_only.save_pretrained(str(staging / DEMO_T5_ONLY_DIR.name / "transformer"), safe_serialization=True)
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
    parser.add_argument("--work", type=Path, help="keep clips, caches and training runs here (default: a temp "
                                                   "dir); needed to run stages one at a time")
    parser.add_argument("--stage", choices=STAGES, action="append",
                        help="run only this stage (repeatable; default: all, in order): vae = world clips and "
                             "VAE; text = tokenizers, T5 and LLM; mimir / t5-only = one arm's cache + DiT "
                             "training; write = the model folder")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=1,
                        help="2: train the two arms at once, one CPU thread each")
    parser.add_argument("--quick", action="store_true", help="a few steps of every stage (CI)")
    parser.add_argument("--reuse", type=Path, help="take the VAE (vae stage) and the tokenizers, T5 and LLM (text "
                                                   "stage) from this model folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.resolve() == DEMO_MODEL_DIR.resolve() and (args.quick or not args.overwrite_bundled):
        parser.error(f"--out {args.out} is the bundled model: " + ("a --quick build never replaces it" if args.quick
                     else "add --overwrite-bundled to replace it"))
    if args.stage and args.work is None:
        parser.error("--stage needs --work: the stages hand their results on through it")
    recipe = Recipe.quick(seed=args.seed) if args.quick else Recipe(seed=args.seed)
    stages = tuple(s for s in STAGES if s in (args.stage or STAGES))
    info = build(recipe, args.out, args.work, args.reuse, stages=stages, jobs=args.jobs)
    print(f"stages {', '.join(stages)} done: {info['seconds']}" + (f"; wrote {args.out}" if "write" in stages else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
