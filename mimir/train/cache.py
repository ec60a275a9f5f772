"""`mimir cache`: VAE latents and T5 + LLM features of every clip, computed once, in safetensors shards.

Layout of a cache folder:
    meta.json                 what the features were made with (frames, size, stride, model, fuser config, the
                              clip count and a hash of the clip list, the encoder files' identities, ...)
    clips.json                the dataset's clip list [[video, caption], ...] the cache was started from
    shard-00000.safetensors   clips [0, S), S = cache_shard_size: "{i}.latent_params" [2C, T, h, w] (the VAE's
                              mean and logvar), "{i}.t5", "{i}.llm", "{i}.llm_mask", "{i}.instructions"; the
                              metadata lists each clip's video and caption, and the videos that were skipped
    empty.safetensors         the empty prompt's features (text dropout for classifier-free guidance)
    prompts.safetensors       the validation prompts' features, when there are any
    listing.json              dataset entries skipped before decoding (no caption, malformed CSV/JSONL rows)
A shard is written to a temporary name and renamed, so an interrupted run leaves only whole shards; running the
command again computes the missing ones and rebuilds any that is damaged (truncated, unreadable, or holding other
clips than its place in the clip list). Shards hold clips by position, so a cache only resumes with the clip list
and encoder files it was started from: otherwise it is refused, saying what changed, before any model loads.
Several processes (accelerate launch) split the shards between them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..pipeline import MimirPipeline
from ..prompt_cache import model_identity
from ..text import TextFeatures
from ..variants import FUSER_FILE
from ..video import VideoReadError
from .config import TrainConfig
from .data import Clip, load_clip, read_clips
from .model import (
    encode_latent_params,
    frozen_placement,
    load_components,
    starting_fuser,
)
from .storage import reported_write, write_text

logger = logging.getLogger(__name__)
FORMAT = "mimir-train-cache"
META, EMPTY, PROMPTS, LISTING = "meta.json", "empty.safetensors", "prompts.safetensors", "listing.json"
CLIPS = "clips.json"
FEATURE_KEYS = ("t5", "llm", "llm_mask", "instructions")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def cache_meta(config: TrainConfig, fuser_config, scaling_factor: float) -> dict:
    """What must match between a cache and the run that reads (or resumes) it."""
    return {"format": FORMAT, "data": str(config.data), "model": config.model, "num_frames": config.num_frames,
            "height": config.height, "width": config.width, "frame_stride": config.frame_stride,
            "shard_size": config.cache_shard_size, "seed": config.seed, "scaling_factor": scaling_factor,
            "fuser_config": json.loads(fuser_config.to_json())}


def cache_sources(config: TrainConfig, listing: list[list[str]]) -> dict:
    """What the cached features come from besides the settings: the clip list (hashed) and the encoder files."""
    return {"clips": len(listing), "clips_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
            "encoder_files": encoder_files(config)}


def clip_list(clips: list[Clip]) -> list[list[str]]:
    return [[str(c.video), c.caption] for c in clips]


def encoder_files(config: TrainConfig) -> dict[str, str]:
    """{file: identity} of the files the features come from: the model folder but its DiT and fuser (T5 and its
    tokenizer, the VAE, a Mimir folder's llm/), and the llm= folder. Identities as the prompt cache takes them
    (path, size, modification time; nothing is read). Models passed in from Python (no `model`) have none."""
    if not config.model:
        return {}
    files = {}
    for name, root in (("model", config.model), ("llm", config.llm)):
        if root is None or not Path(root).is_dir():
            continue
        for path in sorted(Path(root).rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and rel.parts[0] not in ("transformer", FUSER_FILE) and not rel.name.startswith("."):
                files[f"{name}/{rel.as_posix()}"] = model_identity(path)
    return files


def read_meta(folder) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise ValueError(f"{folder} is not a feature cache (no {META}); build one with `mimir cache`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a Mimir feature cache")
    if "clips_sha256" not in meta:
        raise ValueError(f"{path}: written by an older mimir that did not record the clip list; build the cache "
                         f"again (into a new folder)")
    return meta


def check_sources(folder: Path, sources: dict, listing: list[list[str]]) -> None:
    """Refuse to resume a cache started from another clip list or other encoder files, saying what changed."""
    meta, changed = read_meta(folder), []
    if meta["clips_sha256"] != sources["clips_sha256"]:
        started = json.loads((folder / CLIPS).read_text())
        changed.append("the clip list (video: caption): " + describe_changes(dict(map(tuple, started)),
                                                                             dict(map(tuple, listing))))
    if meta["encoder_files"] != sources["encoder_files"]:
        changed.append("the encoder files: " + describe_changes(meta["encoder_files"], sources["encoder_files"]))
    if changed:
        raise ValueError(f"the cache {folder} was started from other inputs; changed since: {'; '.join(changed)}. "
                         f"Its shards hold clips by position, encoded by those files: build the cache into a new "
                         f"folder (or delete {folder} to rebuild it)")


def describe_changes(old: dict, new: dict) -> str:
    """Which names were added, removed or changed between two {name: value} maps (the first few of each)."""
    parts = []
    for what, names in (("added", [k for k in new if k not in old]), ("removed", [k for k in old if k not in new]),
                        ("changed", [k for k in new if k in old and old[k] != new[k]])):
        if names:
            parts.append(f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    return ", ".join(parts) or "the same entries in another order or repeated"


def check_meta(meta: dict, expected: dict, where) -> None:
    different = [f"{k}: cache has {meta.get(k)!r}, this run {v!r}" for k, v in expected.items() if meta.get(k) != v]
    if different:
        raise ValueError(f"{where} was built with other settings: " + "; ".join(different))


def feature_rows(features: TextFeatures) -> list[dict[str, torch.Tensor]]:
    """A batch of features -> one dict of float32 tensors per prompt (a shard's rows: no batch dimension)."""
    return [{k: (v.float() if v.is_floating_point() else v)[0] for k, v in one.tensors().items()}
            for one in features.split()]


def stack_features(rows: list[dict]) -> TextFeatures:
    """Rows of feature_rows -> a batch (TextFeatures.cat pads the LLM tokens)."""
    return TextFeatures.cat([TextFeatures.from_tensors({k: v[None] for k, v in row.items()}) for row in rows])


def save_rows(rows: list[dict], path: Path, metadata: dict[str, str]) -> None:
    tensors = {f"{i}.{k}": v for i, row in enumerate(rows) for k, v in row.items()}
    tmp = path.with_name(path.name + ".tmp")
    with reported_write("cache file", path, "The shards written before it are whole: free space and run "
                        "`mimir cache` again to finish", partial=tmp):
        save_file(tensors, str(tmp), metadata={"format": FORMAT, **metadata})
        os.replace(tmp, path)


def load_rows(path: Path) -> tuple[list[dict], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        rows: dict[int, dict] = {}
        for key in f.keys():
            i, name = key.split(".", 1)
            rows.setdefault(int(i), {})[name] = f.get_tensor(key)
    return [rows[i] for i in sorted(rows)], metadata


# ---- building ------------------------------------------------------------------------------------------

def build_cache(config: TrainConfig, components: dict | None = None, progress: bool = True) -> dict:
    """Encode every clip of `config.data` into `config.cache`; skip shards already there. -> summary."""
    if not config.data or not config.cache:
        raise ValueError("mimir cache needs data= (the dataset) and cache= (the folder to write)")
    state = PartialState(cpu=config.device == "cpu")
    folder = Path(config.cache)
    clips, skipped = read_clips(config.data)
    listing = clip_list(clips)
    sources = cache_sources(config, listing)
    if (folder / META).exists():
        check_sources(folder, sources, listing)
    if components is None:
        parts = load_components(config, starting_fuser(config, state, folder), dit=False)
    else:
        parts = dict(components)
    pipe = MimirPipeline(**{**parts, "transformer": None}, placement=frozen_placement(parts, config, state.device))
    meta = cache_meta(config, pipe.fuser.config, float(pipe.vae.config.scaling_factor)) | sources
    if state.is_main_process:
        _start_folder(folder, meta, listing)
    state.wait_for_everyone()
    shards = range((len(clips) + config.cache_shard_size - 1) // config.cache_shard_size)
    todo = [k for k in shards[state.process_index::state.num_processes]
            if not _usable(folder / shard_name(k), _shard_clips(clips, k, config))]
    logger.info("process %d of %d: %d of the %d shards to write", state.process_index + 1, state.num_processes,
                len(todo), len(shards))
    bar = tqdm(total=sum(len(_shard_clips(clips, k, config)) for k in todo), desc="caching", unit="clip",
               disable=not (progress and state.is_main_process))
    for k in todo:
        _write_shard(pipe, config, _shard_clips(clips, k, config), folder / shard_name(k), bar)
    bar.close()
    if state.is_main_process:
        _write_prompts(pipe, config, folder)
        (folder / LISTING).write_text(json.dumps({"skipped": skipped}, indent=2))
    state.wait_for_everyone()
    return describe_cache(folder)


def _start_folder(folder: Path, meta: dict, listing: list[list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / META).exists():
        check_meta(read_meta(folder), meta, folder)
        return
    write_text(folder / CLIPS, json.dumps(listing))
    write_text(folder / META, json.dumps(meta, indent=2))  # last: a folder with meta.json is a started cache


def _usable(path: Path, clips: list[Clip]) -> bool:
    """A shard already there is kept only if it checks out (see shard_problem); a damaged one is rebuilt."""
    if not path.exists():
        return False
    problem = shard_problem(path, clips)
    if problem:
        logger.warning("rebuilding the cache shard %s: %s", path, problem)
    return problem is None


def shard_problem(path: Path, clips: list[Clip]) -> str | None:
    """Why the shard at `path` cannot stand for `clips` (its place in the clip list), or None: it must open (a
    truncated file does not), list exactly these clips but the ones it skipped, and hold each one's tensors.
    Only the header is read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, keys = f.metadata() or {}, set(f.keys())
    except SafetensorError as error:
        return f"unreadable ({error})"
    held = [[e["video"], e["caption"]] for e in json.loads(metadata.get("clips", "[]"))]
    skipped = json.loads(metadata.get("skipped", "{}"))
    if held != [entry for entry in clip_list(clips) if entry[0] not in skipped]:
        return "it holds other clips than its place in the clip list"
    missing = [f"{i}.{n}" for i in range(len(held)) for n in ("latent_params", "t5", "llm", "llm_mask")
               if f"{i}.{n}" not in keys]
    return f"tensors missing: {', '.join(missing[:3])}" if missing else None


def _shard_clips(clips: list[Clip], k: int, config: TrainConfig) -> list[Clip]:
    return clips[k * config.cache_shard_size:(k + 1) * config.cache_shard_size]


def _write_shard(pipe, config: TrainConfig, clips: list[Clip], path: Path, bar) -> None:
    rows, entries, skipped = [], [], {}
    for clip in clips:
        bar.update(1)
        try:
            pixels = load_clip(clip, config.num_frames, config.height, config.width, config.frame_stride)
        except VideoReadError as error:
            logger.warning("skipping video %s: %s", clip.video, error)
            skipped[str(clip.video)] = str(error)
            continue
        row = feature_rows(pipe.encode_features([clip.caption], seed=config.seed))[0]
        row["latent_params"] = encode_latent_params(pipe, pixels[None])[0].cpu()
        rows.append(row)
        entries.append({"video": str(clip.video), "caption": clip.caption})
    save_rows(rows, path, {"clips": json.dumps(entries), "skipped": json.dumps(skipped)})


def _write_prompts(pipe, config: TrainConfig, folder: Path) -> None:
    """The empty prompt (text dropout, unconditional validation) and the validation prompts."""
    if not (folder / EMPTY).exists():
        save_rows(feature_rows(pipe.encode_features([""], seed=config.seed)), folder / EMPTY, {})
    add_prompts(pipe, folder, config.validation_prompts, config.seed)


def add_prompts(pipe, folder: Path, prompts: list[str], seed: int) -> None:
    """Encode the `prompts` the cache lacks into prompts.safetensors, next to those of earlier configs (so that
    runs with other validation prompts, e.g. the 5B and LoRA configs, share one cache)."""
    have = cached_prompts(folder)
    missing = [p for p in dict.fromkeys(prompts) if p not in have]
    if not missing:
        return
    rows = (load_rows(Path(folder) / PROMPTS)[0] if have else []) + feature_rows(pipe.encode_features(missing, seed=seed))
    save_rows(rows, Path(folder) / PROMPTS, {"prompts": json.dumps(have + missing)})


def check_same_encoders(config: TrainConfig, folder) -> None:
    """Prompts added to a cache must come from the encoder files its other features came from."""
    recorded, now = read_meta(folder)["encoder_files"], encoder_files(config)
    if recorded != now:
        raise ValueError(f"the cache {folder} was built from other encoder files than this run's model/llm "
                         f"({describe_changes(recorded, now)}): the validation prompts it lacks cannot be added from "
                         f"them; give validation prompts the cache holds, or a cache of this run's encoders")


def cached_prompts(folder: Path) -> list[str]:
    if not (Path(folder) / PROMPTS).exists():
        return []
    with safe_open(str(Path(folder) / PROMPTS), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("prompts", "[]"))


def describe_cache(folder) -> dict:
    """Clips and skipped videos over all shards (read from their headers only)."""
    meta, listing = read_meta(folder), Path(folder) / LISTING
    skipped = json.loads(listing.read_text())["skipped"] if listing.is_file() else {}
    clips, shards = 0, sorted(Path(folder).glob("shard-*.safetensors"))
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata() or {}
        clips += len(json.loads(metadata.get("clips", "[]")))
        skipped.update(json.loads(metadata.get("skipped", "{}")))
    return {"cache": str(folder), "shards": len(shards), "clips": clips, "skipped": skipped, "meta": meta}


# ---- reading -------------------------------------------------------------------------------------------

class CachedDataset(Dataset):
    """The clips of a cache folder; items as VideoDataset's, with latents and features instead of pixels."""

    def __init__(self, folder):
        self.folder, self.meta = Path(folder), read_meta(folder)
        count = (self.meta["clips"] + self.meta["shard_size"] - 1) // self.meta["shard_size"]
        missing = [shard_name(k) for k in range(count) if not (self.folder / shard_name(k)).is_file()]
        if missing:
            raise ValueError(f"the cache {folder} is incomplete: {len(missing)} of {count} shards missing "
                             f"({', '.join(missing[:3])}): run `mimir cache` again with the same settings to finish it")
        self.entries = []  # (shard path, row index, caption)
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    clips = json.loads((f.metadata() or {}).get("clips", "[]"))
            except SafetensorError as error:
                raise ValueError(f"the cache shard {shard} is damaged ({error}): run `mimir cache` again with the "
                                 f"same settings to rebuild it") from None
            self.entries += [(shard, i, clip["caption"]) for i, clip in enumerate(clips)]
        if not self.entries:
            raise ValueError(f"the cache {folder} holds no clips (did `mimir cache` finish?)")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        shard, i, caption = self.entries[index]
        with safe_open(str(shard), framework="pt") as f:
            keys = set(f.keys())
            names = [n for n in FEATURE_KEYS if f"{i}.{n}" in keys]
            features = {n: f.get_tensor(f"{i}.{n}") for n in names}
            latent_params = f.get_tensor(f"{i}.latent_params")
        return {"position": position, "latent_params": latent_params, "features": features, "caption": caption}

    def empty_prompt(self) -> dict:
        return load_rows(self.folder / EMPTY)[0][0]

    def prompt_rows(self, prompts: list[str]) -> list[dict]:
        names = cached_prompts(self.folder)
        missing = [p for p in prompts if p not in names]
        if missing:
            raise ValueError(f"the cache {self.folder} holds no features for the validation prompts {missing} "
                             f"(it has {names}): run `mimir cache` again with these validation_prompts")
        rows = load_rows(self.folder / PROMPTS)[0]
        return [rows[names.index(p)] for p in prompts]
