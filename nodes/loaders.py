"""Loader nodes: T5, LLM, token fuser, CogVideoX transformer (+ its scheduler settings) and VAE.

Every loader reads through `mimir.components` (the one place that knows checkpoint layouts) and lists its files
through ComfyUI's model folders. Models are loaded onto ComfyUI's offload device and visit the compute
device only while their stage runs; the T5 and LLM load on first use, so a prompt answered by the prompt cache
costs no text-model load. The bundled demo model appears as "mimir-demo (bundled)" once it exists, and the
Model Loader lists its T5-only arm (a DiT trained on T5 alone, sharing the demo's T5, VAE and scheduler) as
"mimir-demo T5-only (bundled)": with the bundled T5 and no LLM or fuser it is plain CogVideoX at demo size.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..mimir.components import (
    ComponentInfo,
    load_llm,
    load_scheduler,
    load_t5,
    load_token_fuser,
    load_transformer,
    load_vae,
    transformer_pipeline,
)
from ..mimir.loading import DEMO_MODEL_DIR, DEMO_T5_ONLY_DIR
from ..mimir.memory import MemoryOptions, apply_memory_options
from ..mimir.prompt_cache import files_identity
from ..mimir.speed import ATTENTION_BACKENDS, check_attention_backend, set_attention_backend
from ..mimir.variants import FUSER_FILE, SNR_SHIFT_SCALE
from . import comfy_services as services

logger = logging.getLogger(__name__)

BUNDLED = "mimir-demo (bundled)"
BUNDLED_T5_ONLY = "mimir-demo T5-only (bundled)"
DTYPES = ["auto", "fp32", "bf16", "fp16"]
MODEL_DTYPES = DTYPES + ["fp8_e4m3fn"]
DTYPE_TOOLTIP = ("Weights' dtype in memory. auto keeps the dtype stored in the file. On CPU, fp32 is the "
                 "fastest; on GPU use bf16 (CogVideoX-5B) or fp16 (CogVideoX-2B).")
CATEGORY = "Mimir/loaders"


class _LazyTextModel:
    """A text model and its tokenizer, loaded on first use of `model`, `tokenizer` or `info` (or `get()`): a
    loader node only resolves the files, so a prompt found in the prompt cache never loads the weights."""

    def __init__(self, path: Path, dtype: str | None):
        self.path, self.dtype = path, dtype
        self._loaded = None

    def _load(self) -> tuple:
        raise NotImplementedError

    def get(self) -> tuple:
        """-> (model, tokenizer, ComponentInfo), loading them onto ComfyUI's offload device the first time."""
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    model = property(lambda self: self.get()[0])
    tokenizer = property(lambda self: self.get()[1])
    info = property(lambda self: self.get()[2])

    def _files(self) -> list[Path]:
        return [self.path]

    def identity(self) -> str:
        """What the prompt cache keys on: the files (paths, sizes, modification times; nothing loaded) and the
        dtype the model computes in, which changes its features."""
        return files_identity(self._files(), self.dtype)


class MimirT5(_LazyTextModel):
    """MIMIR_T5: a T5 encoder with its tokenizer (loaded on first use)."""

    def __init__(self, path: Path, dtype: str | None, tokenizer_path: Path | None = None):
        super().__init__(path, dtype)
        self.tokenizer_path = tokenizer_path

    def _load(self) -> tuple:
        return load_t5(self.path, tokenizer_path=self.tokenizer_path, dtype=self.dtype,
                       device=services.offload_device())

    def _files(self) -> list[Path]:
        # a diffusers text_encoder/ folder reads the tokenizer beside it (as mimir.components does)
        beside = self.path.parent / "tokenizer" if self.path.is_dir() else None
        return [self.path, *(p for p in (self.tokenizer_path, beside) if p is not None and p.is_dir())]


class MimirLLM(_LazyTextModel):
    """MIMIR_LLM: a transformers causal LM with its tokenizer (loaded on first use)."""

    def __init__(self, path: Path, dtype: str | None, trust_remote_code: bool = False):
        super().__init__(path, dtype)
        self.trust_remote_code = trust_remote_code

    def _load(self) -> tuple:
        return load_llm(self.path, dtype=self.dtype, device=services.offload_device(),
                        trust_remote_code=self.trust_remote_code)


@dataclass
class MimirModel:
    """MIMIR_MODEL: the CogVideoX transformer and the scheduler settings it was trained with. `info` carries the
    VAE scaling factor the sampler divides by, so LATENT outputs are in VAE space."""
    transformer: torch.nn.Module
    scheduler: object
    info: ComponentInfo


def _choices(folder: str, demo_part: str | None, extensions=(".safetensors",), folders: bool = True) -> list[str]:
    bundled = [BUNDLED] if demo_part is not None and (DEMO_MODEL_DIR / demo_part).exists() else []
    return bundled + services.list_models(folder, extensions, folders)


def _resolve(folder: str, name: str, input_name: str, demo_part: str | None = None) -> Path:
    """A model name from a widget -> its path; the bundled demo resolves to the demo model folder."""
    if name == BUNDLED and demo_part is not None:
        if not (DEMO_MODEL_DIR / demo_part).exists():
            raise FileNotFoundError(f"{input_name}: the bundled demo model is not installed ({DEMO_MODEL_DIR / demo_part} "
                                    f"is missing)")
        return DEMO_MODEL_DIR
    return services.resolve_model(folder, name, input_name)


def _dtype(dtype: str, input_name: str = "dtype"):
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"{input_name}: must be one of {MODEL_DTYPES}, got {dtype!r}")
    return None if dtype == "auto" else dtype


class MimirT5Loader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "t5_name": (_choices("text_encoders", "text_encoder"), {
                "tooltip": "T5 v1.1 XXL encoder from models/text_encoders: a ComfyUI single file such as "
                           "t5xxl_fp16.safetensors (uses ComfyUI's bundled T5 tokenizer) or a transformers folder "
                           "with its tokenizer. mimir-demo (bundled) is the demo's T5, for both of its arms."}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }}

    RETURN_TYPES = ("MIMIR_T5",)
    RETURN_NAMES = ("t5",)
    OUTPUT_TOOLTIPS = ("The T5 text encoder and its tokenizer.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the T5 text encoder CogVideoX reads (and Mimir fuses with the LLM)."

    def load(self, t5_name, dtype):
        path = _resolve("text_encoders", t5_name, "t5_name", "text_encoder")
        tokenizer = services.bundled_t5_tokenizer() if path.is_file() else None
        if path.is_file() and tokenizer is None:
            raise ValueError(f"t5_name: {t5_name} is a single file, which holds no tokenizer, and ComfyUI's bundled "
                             f"T5 tokenizer was not found; use a transformers folder that has its tokenizer")
        return (MimirT5(path, _dtype(dtype), tokenizer_path=tokenizer),)


class MimirLLMLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "llm_name": (_choices("LLM", "llm", extensions=(), folders=True), {
                "tooltip": "A transformers causal-LM folder (config.json, tokenizer, *.safetensors) under "
                           "models/LLM, e.g. Phi-3.5-mini-instruct. It must be the LLM the token fuser was "
                           "trained with."}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
            "trust_remote_code": ("BOOLEAN", {
                "default": False,
                "tooltip": "Run Python code shipped inside the model folder. Leave off unless you trust the folder; "
                           "Phi-3.5 and Llama models do not need it."}),
        }}

    RETURN_TYPES = ("MIMIR_LLM",)
    RETURN_NAMES = ("llm",)
    OUTPUT_TOOLTIPS = ("The decoder-only LLM and its tokenizer.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads the decoder-only LLM whose hidden states Mimir fuses with T5 (frozen; only used to "
                   "encode prompts).")

    def load(self, llm_name, dtype, trust_remote_code):
        path = _resolve("LLM", llm_name, "llm_name", "llm")
        if path.is_file():
            raise ValueError(f"llm_name: {llm_name} is a file; an LLM is a transformers folder with config.json")
        return (MimirLLM(path, _dtype(dtype), trust_remote_code=trust_remote_code),)


class MimirFuserLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "fuser_name": (_choices("mimir", FUSER_FILE, folders=False), {
                "tooltip": "A Mimir token-fuser .safetensors file from models/mimir (its config is stored inside)."}),
        }}

    RETURN_TYPES = ("MIMIR_FUSER",)
    RETURN_NAMES = ("fuser",)
    OUTPUT_TOOLTIPS = ("The token fuser that merges T5 and LLM tokens into the DiT's text stream.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a trained Mimir token fuser (fp32; it is small)."

    def load(self, fuser_name):
        path = _resolve("mimir", fuser_name, "fuser_name", FUSER_FILE)
        if path.is_dir():
            path = path / FUSER_FILE
        fuser, _ = load_token_fuser(path, dtype="fp32", device=services.offload_device())
        return (fuser,)


class MimirModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_model_choices(), {
                "tooltip": "CogVideoX transformer (Mimir-finetuned or original) from models/diffusion_models: a "
                           "single .safetensors file with diffusers key names, or a diffusers folder (the pipeline "
                           "root or its transformer/). The variant (2B, 5B, 1.5) is detected from the weights. "
                           "mimir-demo T5-only (bundled) is the demo's DiT trained on T5 alone: encode for it with "
                           "no LLM and fuser."}),
            "dtype": (MODEL_DTYPES, {
                "default": "auto",
                "tooltip": DTYPE_TOOLTIP + " fp8_e4m3fn stores the transformer blocks' weights in 8 bits (half of "
                           "bf16) and computes in bf16: for GPUs short of memory."}),
            "blocks_to_swap": ("INT", {
                "default": 0, "min": 0, "max": 64,
                "tooltip": "Keep this many of the last transformer blocks in CPU memory and copy each to the GPU "
                           "just for its step (slower, less GPU memory). 0 keeps the whole model together."}),
        }, "optional": {
            "attention": (list(ATTENTION_BACKENDS), {
                "default": "native",
                "tooltip": "Attention backend (diffusers' dispatcher): native is PyTorch SDPA; flash, sage and "
                           "xformers need flash-attn, sageattention or xformers installed (usually GPU only)."}),
        }}

    RETURN_TYPES = ("MIMIR_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The CogVideoX transformer with its scheduler settings and VAE scaling factor.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the CogVideoX video transformer (DiT) that the Mimir Sampler runs."

    def load(self, model_name, dtype, blocks_to_swap, attention="native"):
        try:
            check_attention_backend(attention)  # before the weights are read
        except ValueError as exc:
            raise ValueError(f"attention: {exc}") from exc
        path, root = _model_path(model_name)
        fp8 = _dtype(dtype) == "fp8_e4m3fn"
        transformer, info = load_transformer(path, dtype="bf16" if fp8 else _dtype(dtype),
                                             device=services.offload_device(), pipeline_root=root)
        apply_memory_options(transformer, MemoryOptions(fp8=fp8, blocks_to_swap=blocks_to_swap),
                             services.compute_device(), services.offload_device())
        if fp8:
            info = dataclasses.replace(info, dtype="float8_e4m3fn")
        set_attention_backend(transformer, attention)
        if info.vae_scaling_factor is None:
            raise ValueError(f"model_name: {model_name} is a custom CogVideoX variant whose VAE scaling factor is "
                             f"unknown; save it with mimir's save_single_file(..., vae_scaling_factor=...) or as a "
                             f"diffusers folder with vae/")
        return (MimirModel(transformer, _scheduler_for(info, root), info),)


def _model_choices() -> list[str]:
    choices = _choices("diffusion_models", "transformer")
    if (DEMO_T5_ONLY_DIR / "transformer").is_dir():  # listed after the bundled Mimir DiT
        choices.insert(int(choices[:1] == [BUNDLED]), BUNDLED_T5_ONLY)
    return choices


def _model_path(model_name: str) -> tuple[Path, Path | None]:
    """-> (the transformer's path, the pipeline folder whose VAE and scheduler it shares, when not its own)."""
    if model_name != BUNDLED_T5_ONLY:
        return _resolve("diffusion_models", model_name, "model_name", "transformer"), None
    arm = DEMO_T5_ONLY_DIR / "transformer"
    if not arm.is_dir():
        raise FileNotFoundError(f"model_name: the bundled demo's T5-only arm is not installed ({arm} is missing)")
    return arm, DEMO_MODEL_DIR


def _scheduler_for(info: ComponentInfo, pipeline_root: Path | None = None):
    """The checkpoint's own scheduler folder (or that of the pipeline it shares) when it has one, else the
    published settings of its variant."""
    root = transformer_pipeline(Path(info.path), pipeline_root)
    if root is not None and (root / "scheduler").is_dir():
        return load_scheduler(root)
    if info.variant not in SNR_SHIFT_SCALE:
        logger.warning("Mimir: %s has no scheduler folder and is a custom variant; using CogVideoX-5B's "
                       "scheduler settings", info.path)
        return load_scheduler("ddim", "5b")
    return load_scheduler("ddim", info.variant)


class MimirVAELoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (_choices("vae", "vae"), {
                "tooltip": "The CogVideoX VAE from models/vae: a single .safetensors file with diffusers key "
                           "names, or a diffusers folder (the pipeline root or its vae/)."}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }}

    RETURN_TYPES = ("MIMIR_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The CogVideoX VAE (AutoencoderKLCogVideoX).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the CogVideoX 3D VAE that turns LATENT videos into frames and back."

    def load(self, vae_name, dtype):
        path = _resolve("vae", vae_name, "vae_name", "vae")
        vae, _ = load_vae(path, dtype=_dtype(dtype), device=services.offload_device())
        return (vae,)


NODE_CLASS_MAPPINGS = {
    "MimirT5Loader": MimirT5Loader,
    "MimirLLMLoader": MimirLLMLoader,
    "MimirFuserLoader": MimirFuserLoader,
    "MimirModelLoader": MimirModelLoader,
    "MimirVAELoader": MimirVAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MimirT5Loader": "Mimir T5 Loader",
    "MimirLLMLoader": "Mimir LLM Loader",
    "MimirFuserLoader": "Mimir Token Fuser Loader",
    "MimirModelLoader": "Mimir Model Loader (CogVideoX)",
    "MimirVAELoader": "Mimir VAE Loader",
}
