"""Prompt nodes: Mimir text encode (T5 + LLM + token fuser), T5-only encode (plain CogVideoX), and saving /
reloading the frozen encoders' features so the LLM need not be loaded on every run.

CONDITIONING is ComfyUI's `[[tensor [1, tokens, width], {...}]]`; the tensor is the DiT's text stream.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ..mimir.encoder import PromptEncoder, t5_only_text_len
from ..mimir.prompt_cache import PromptCache, encoding_key_parts
from ..mimir.text import TextFeatures
from ..mimir.variants import T5_TEXT_LEN
from . import comfy_services as services

CATEGORY = "Mimir/conditioning"
_UNLINKED = object()  # VALIDATE_INPUTS: ComfyUI passes a linked input as None and leaves an unlinked one out


def conditioning(stream: torch.Tensor, kind: str) -> list:
    """[1, tokens, width] text stream -> ComfyUI CONDITIONING. `kind` says which encoder made it."""
    return [[stream.detach().float().cpu(), {"mimir_encoder": kind}]]


def _instructions(text: str, config) -> tuple[str, ...]:
    """One instruction per non-empty line; empty text keeps the fuser's own instructions."""
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        return config.instructions
    if len(lines) != config.stabilizer_tokens:
        raise ValueError(f"instructions: {len(lines)} lines given but this fuser has {config.stabilizer_tokens} "
                         f"instruction tokens; give one instruction per line, or leave it empty for the fuser's own")
    return lines


def _encoder_config(fuser, answer_tokens: int, instructions: str):
    config = fuser.config
    return dataclasses.replace(config, answer_tokens=config.answer_tokens if answer_tokens < 0 else answer_tokens,
                               instructions=_instructions(instructions, config))


def _check_widths(t5_width: int, llm_width: int, fuser) -> None:
    cfg = fuser.config
    if t5_width != cfg.t5_dim:
        raise ValueError(f"t5: this T5 encoder is {t5_width} wide but the fuser expects t5_dim={cfg.t5_dim}")
    if llm_width != cfg.llm_dim:
        raise ValueError(f"llm: this LLM has hidden size {llm_width} but the fuser was trained for llm_dim="
                         f"{cfg.llm_dim}; load the LLM the fuser was trained with")


def _text_side(t5=None, llm=None, fuser=None, model=None) -> PromptEncoder:
    """The text side over the loaded encoders, placed by ComfyUI's model management; without a fuser it encodes
    T5 to the length the model's transformer reads."""
    text = PromptEncoder(t5 and t5.tokenizer, t5 and t5.model, llm and llm.model, llm and llm.tokenizer, fuser,
                         services.placement())
    if model is not None:
        text.t5_len = t5_only_text_len(model.transformer)
    return text


def check_text_sources(llm: bool, fuser: bool, model: bool) -> str | None:
    """What is wrong with the linked inputs of Mimir Text Encode, or None."""
    if llm != fuser:
        return "connect both the LLM and the token fuser (Mimir), or neither (a T5-only model such as the demo's T5-only arm)"
    if not fuser and not model:
        return ("with no LLM and fuser the prompt is encoded by T5 alone: connect the model, whose transformer "
                "tells how many T5 tokens it reads")
    return None


class MimirTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "t5": ("MIMIR_T5", {"tooltip": "The T5 encoder, from Mimir T5 Loader."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                  "tooltip": "The text to encode. For a negative prompt use a second node (an empty "
                                             "prompt is fine): it goes through the whole fuser as well."}),
            "answer_tokens": ("INT", {
                "default": -1, "min": -1, "max": 512,
                "tooltip": "How many tokens the LLM generates after the prompt (its 'imagination'), whose hidden "
                           "states are fused too. -1 uses the number the fuser was trained with; 0 disables."}),
            "instructions": ("STRING", {
                "multiline": True, "default": "",
                "tooltip": "Override the instruction prompts behind the stabilizer tokens, one per line (as many "
                           "lines as the fuser has instruction tokens, usually 4). Empty uses the fuser's own."}),
            "answer_seed": ("INT", {
                "default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                "tooltip": "Seed for the answer tokens when the fuser samples them; fusers trained with greedy "
                           "answers (the default) ignore it."}),
        }, "optional": {
            "llm": ("MIMIR_LLM", {"tooltip": "The LLM the fuser was trained with, from Mimir LLM Loader. Leave it and "
                                             "the fuser unconnected for a T5-only model (then connect model)."}),
            "fuser": ("MIMIR_FUSER", {"tooltip": "The token fuser, from Mimir Token Fuser Loader."}),
            "model": ("MIMIR_MODEL", {"tooltip": "Only for a T5-only model (no LLM and fuser connected, e.g. "
                                                 "mimir-demo T5-only): the prompt is encoded to the number of T5 "
                                                 "tokens its transformer was trained on."}),
            "prompt_cache": ("BOOLEAN", {
                "default": True,
                "tooltip": "Keep encoded prompts (T5 + LLM features, before the fuser) in ComfyUI's user folder "
                           "(mimir_prompt_cache), keyed by the prompt, the T5 and LLM files and dtypes, the answer "
                           "and instruction settings (and the seed when answers are sampled). A repeated prompt "
                           "then loads and runs neither T5 nor the LLM. Off: always encode, write nothing."}),
        }}

    RETURN_TYPES = ("CONDITIONING", "MIMIR_TEXT_FEATURES")
    RETURN_NAMES = ("conditioning", "features")
    OUTPUT_TOOLTIPS = ("The fused text stream for the Mimir Sampler.",
                       "The frozen encoders' features (T5 + LLM), for Mimir Save Encoded Prompt.")
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes a prompt the Mimir way: T5 tokens plus the LLM's query, answer and instruction tokens, "
                   "merged by the token fuser. With no LLM and fuser (a T5-only model, connected as model), T5 "
                   "alone as plain CogVideoX. Prompt words a tokenizer does not know are named in the log.")

    @classmethod
    def VALIDATE_INPUTS(cls, t5=None, llm=_UNLINKED, fuser=_UNLINKED, model=_UNLINKED):
        # t5 (required) is named so that ComfyUI, which reports once per named input it passes, reports at all
        fault = check_text_sources(llm is not _UNLINKED, fuser is not _UNLINKED, model is not _UNLINKED)
        return fault or True

    def encode(self, t5, prompt, answer_tokens, instructions, answer_seed, llm=None, fuser=None, model=None,
               prompt_cache=True):
        fault = check_text_sources(llm is not None, fuser is not None, model is not None)
        if fault:
            raise ValueError(fault)
        if fuser is None:  # a T5-only model: never cached, as the library caches only LLM features
            features = _text_side(t5, model=model).encode_features([prompt])
            return conditioning(features.t5, "t5"), features
        config = _encoder_config(fuser, answer_tokens, instructions)
        services.check_interrupted()
        if not prompt_cache:
            features = _encode(t5, llm, fuser, prompt, config, answer_seed)
        else:
            cache = PromptCache(services.prompt_cache_dir())
            parts = encoding_key_parts(prompt, t5.identity(), llm.identity(), config, answer_seed)
            features = cache.get(parts)
            if features is None:
                features = _encode(t5, llm, fuser, prompt, config, answer_seed)
                cache.put(parts, features)
            else:  # made by these encoders, but perhaps for a fuser of other widths
                _check_widths(features.t5.shape[-1], features.llm.shape[-1], fuser)
        return conditioning(_text_side(fuser=fuser).fuse(features), "mimir"), features


def _encode(t5, llm, fuser, prompt: str, config, seed: int):
    """Run T5 and the LLM (loading them if needed) on one prompt, with a progress bar over the answer tokens."""
    _check_widths(t5.info.dims["d_model"], llm.model.config.hidden_size, fuser)
    bar = services.progress_bar(max(config.answer_tokens, 1))

    def on_token(done, total):
        services.check_interrupted()
        bar.update_absolute(done, total)

    features = _text_side(t5, llm, fuser).encode_features([prompt], seed=seed, callback=on_token, config=config)
    bar.update_absolute(bar.total, bar.total)
    return features


class MimirT5TextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "t5": ("MIMIR_T5", {"tooltip": "The T5 encoder, from Mimir T5 Loader."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to encode."}),
            "text_len": ("INT", {"default": T5_TEXT_LEN, "min": 1, "max": 1024,
                                 "tooltip": f"T5 tokens (padded/truncated); CogVideoX uses {T5_TEXT_LEN}."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The T5 text stream, as plain CogVideoX reads it.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes a prompt with T5 only, exactly as diffusers' CogVideoX pipeline does: the baseline to "
                   "compare Mimir against, with the same sampler.")

    def encode(self, t5, prompt, text_len):
        text = _text_side(t5)
        text.t5_len = text_len
        return (conditioning(text.encode_features([prompt]).t5, "t5"),)


class MimirSaveEncodedPrompt:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "features": ("MIMIR_TEXT_FEATURES", {"tooltip": "The features output of Mimir Text Encode."}),
            "name": ("STRING", {"default": "mimir_prompt",
                                "tooltip": "File name (letters, digits, - _ . and /) under output/mimir_prompts; "
                                           "an existing file of that name is replaced."}),
        }}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Saves an encoded prompt (T5 + LLM features, before the fuser) as .safetensors, so later runs "
                   "can use Mimir Load Encoded Prompt without loading the LLM.")

    def save(self, features, name):
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*", name or "") or ".." in name.split("/"):
            raise ValueError(f"name: {name!r} must be a relative file name of letters, digits, - _ . and /")
        path = services.prompts_dir() / (name if name.endswith(".safetensors") else f"{name}.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        features.save(path)
        return {"ui": {"text": [path.name]}}


class MimirLoadEncodedPrompt:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "fuser": ("MIMIR_FUSER", {"tooltip": "The token fuser to fuse the saved features with."}),
            "encoded_prompt": (services.list_models(services.PROMPTS_FOLDER, folders=False), {
                "tooltip": "A file saved by Mimir Save Encoded Prompt (in output/mimir_prompts)."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The fused text stream for the Mimir Sampler.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Fuses a saved encoded prompt: Mimir conditioning without loading T5 or the LLM."

    def load(self, fuser, encoded_prompt):
        path = services.resolve_model(services.PROMPTS_FOLDER, encoded_prompt, "encoded_prompt")
        try:
            features = TextFeatures.load(path)
        except Exception as exc:
            raise ValueError(f"encoded_prompt: {encoded_prompt} is not a saved Mimir prompt ({exc})") from exc
        try:
            fuser.check_inputs(features.t5, features.llm, features.llm_mask, features.instructions)
        except ValueError as exc:
            raise ValueError(f"encoded_prompt: {encoded_prompt} does not fit this fuser: {exc}") from exc
        return (conditioning(_text_side(fuser=fuser).fuse(features), "mimir"),)


NODE_CLASS_MAPPINGS = {
    "MimirTextEncode": MimirTextEncode,
    "MimirT5TextEncode": MimirT5TextEncode,
    "MimirSaveEncodedPrompt": MimirSaveEncodedPrompt,
    "MimirLoadEncodedPrompt": MimirLoadEncodedPrompt,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MimirTextEncode": "Mimir Text Encode (T5 + LLM)",
    "MimirT5TextEncode": "Mimir T5 Text Encode (plain CogVideoX)",
    "MimirSaveEncodedPrompt": "Mimir Save Encoded Prompt",
    "MimirLoadEncodedPrompt": "Mimir Load Encoded Prompt",
}
