"""Encoded-prompt cache: T5 + LLM features of a prompt, saved once, so a repeated prompt runs neither encoder.

One safetensors file per prompt (mimir.text.TextFeatures) in a folder (default ~/.cache/mimir/prompts, or
$MIMIR_PROMPT_CACHE). The file name is a hash of everything that changes the features: the prompt, the T5
and LLM identities (files_identity of their files and compute dtype, as the CLI and the nodes key; a pipeline
of models built in memory keys on model_identity's weight fingerprint), and the fuser config's encoding fields (text_len, instructions,
answer_tokens, answer_sampling, llm_hidden_layer) plus the seed when answers are sampled. The fuser's
weights are not part of the key: fusing runs after the cache, so a retrained fuser reuses the features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .fuser import FuserConfig
from .offload import module_dtype
from .text import TextFeatures
from .weights import read_file, read_folder, resolve_dtype

logger = logging.getLogger(__name__)
FORMAT = "mimir-prompt-cache-2"  # bump when the encoding code changes what it produces
FINGERPRINT_VALUES = 64  # weight values sampled per tensor for the identity of a loaded model


def default_folder() -> Path:
    return Path(os.environ.get("MIMIR_PROMPT_CACHE") or Path.home() / ".cache" / "mimir" / "prompts")


def model_identity(model) -> str:
    """A hash that changes when a text model would encode differently. A path (file or folder): resolved path,
    sizes and modification times, nothing loaded. A loaded nn.Module: class, config, dtypes and evenly spaced
    weight values of every tensor. A tokenizer: its full rules (fast tokenizers) or vocabulary, and chat template."""
    h = hashlib.sha256(type(model).__name__.encode())
    if isinstance(model, (str, Path)):
        _hash_path(h, Path(model))
    elif isinstance(model, torch.nn.Module):
        _hash_module(h, model)
    elif hasattr(model, "get_vocab"):
        h.update(_tokenizer_rules(model).encode())
        h.update(str(getattr(model, "chat_template", None)).encode())
    else:
        raise TypeError(f"model_identity: expected a path, an nn.Module or a tokenizer, got {type(model).__name__}")
    return h.hexdigest()[:32]


def files_identity(paths, dtype) -> str:
    """The identity of a text model from its files (the first holds the weights) and the dtype it computes in
    (None: the dtype stored in the weights, read from their headers), nothing loaded: what the CLI and the nodes
    key on, so that both find the same entries."""
    dtype = resolve_dtype(dtype) or _stored_dtype(Path(paths[0]))
    return "+".join(model_identity(Path(p)) for p in paths) + ":" + str(dtype).removeprefix("torch.")


def _stored_dtype(path: Path) -> torch.dtype:
    return (read_file(path) if path.is_file() else read_folder(path)).stored_dtype()


def _tokenizer_rules(tokenizer) -> str:
    """A tokenizer's rules, without the padding/truncation state a fast tokenizer keeps from its last call (it
    changed the identity after the first encode, and every prompt was cached twice)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return json.dumps(tokenizer.get_vocab(), sort_keys=True)
    rules = json.loads(backend.to_str())
    rules.pop("padding", None), rules.pop("truncation", None)
    return json.dumps(rules, sort_keys=True)


def _hash_path(h, path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model_identity: {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h.update(str(path.resolve()).encode())
    for file in files:
        stat = file.stat()
        h.update(f"{file.relative_to(path) if path.is_dir() else ''}:{stat.st_size}:{stat.st_mtime_ns}".encode())


def _hash_module(h, module: torch.nn.Module) -> None:
    config = getattr(module, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    config.pop("transformers_version", None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            flat = tensor.reshape(-1)
            sample = flat[:: max(1, flat.numel() // FINGERPRINT_VALUES)][:FINGERPRINT_VALUES]
            h.update(sample.float().cpu().numpy().tobytes())


def encoding_key_parts(prompt: str, t5_identity: str, llm_identity: str, config: FuserConfig,
                       seed: int | None = None) -> dict:
    """Everything the TextFeatures of `prompt` depend on (see the module doc)."""
    sampled = config.answer_sampling and config.answer_tokens > 0
    return {"format": FORMAT, "prompt": prompt, "t5": t5_identity, "llm": llm_identity, "text_len": config.text_len,
            "instructions": list(config.instructions), "answer_tokens": config.answer_tokens,
            "answer_sampling": config.answer_sampling, "llm_hidden_layer": config.llm_hidden_layer,
            "seed": seed if sampled else None}


class PromptCache:
    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else default_folder()

    @staticmethod
    def key(parts: dict) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def path(self, parts: dict) -> Path:
        return self.folder / f"{self.key(parts)}.safetensors"

    def get(self, parts: dict) -> TextFeatures | None:
        path = self.path(parts)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                stored = json.loads((f.metadata() or {}).get("key_parts", "null"))
            if stored != parts:
                raise ValueError("its key parts differ from the requested ones")
            return TextFeatures.load(path)
        except Exception as exc:  # a damaged or foreign file is re-encoded, never trusted
            logger.warning("prompt cache: ignoring %s (%s)", path, exc)
            return None

    def put(self, parts: dict, features: TextFeatures) -> Path | None:
        """Store features; a folder that cannot be written (read-only, full) warns and stores nothing, since
        the features are already computed and the generation can go on without the cache."""
        path = self.path(parts)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            features.save(tmp, metadata={"key_parts": json.dumps(parts, sort_keys=True)})
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        except OSError as exc:
            logger.warning("prompt cache: cannot write to %s (%s): running without the cache", self.folder, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return None
        return path


def encode_features_cached(pipeline, prompts: list[str], cache: PromptCache, seed: int | None = None,
                           t5_identity: str | None = None, llm_identity: str | None = None,
                           callback=None) -> TextFeatures:
    """`pipeline.encode_features(prompts)` through the cache: only prompts not cached yet are encoded (in one
    batch). Identities default to those of the pipeline's loaded models; pass them (e.g. from model file
    paths) to use cached prompts without the LLM."""
    if pipeline.fuser is None:
        raise ValueError("the prompt cache stores T5 + LLM features: this pipeline has no fuser")
    sources = pipeline.text_sources  # a MimirPipeline or its PromptEncoder
    t5_identity = t5_identity or _joint_identity(pipeline.text_encoder, pipeline.tokenizer, "T5", sources, 0)
    llm_identity = llm_identity or _joint_identity(pipeline.llm, pipeline.llm_tokenizer, "LLM", sources, 1)
    parts = {p: encoding_key_parts(p, t5_identity, llm_identity, pipeline.fuser.config, seed) for p in prompts}
    found = {p: cache.get(parts[p]) for p in parts}
    missing = [p for p, features in found.items() if features is None]
    if missing:
        for prompt, features in zip(missing, pipeline.encode_features(missing, seed=seed, callback=callback).split()):
            cache.put(parts[prompt], features)
            found[prompt] = features
    return TextFeatures.cat([found[p] for p in prompts])


def _joint_identity(model, tokenizer, what: str, sources=None, index: int = 0) -> str:
    """Models loaded from files key on those files (as the CLI and the nodes do); models built in memory on
    their weights."""
    if sources is not None and model is not None:
        return files_identity(sources[index], module_dtype(model))
    if model is None or tokenizer is None:
        raise ValueError(f"the {what} (model or tokenizer) is not loaded: pass its identity (model_identity of its "
                         f"files) to use the prompt cache without it")
    return model_identity(model) + model_identity(tokenizer)
