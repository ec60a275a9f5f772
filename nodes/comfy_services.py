"""The one module that touches ComfyUI: model folders (folder_paths), devices and memory (model_management),
progress bars and interruption.

Inside ComfyUI these are ComfyUI's own services. Without it (tests, plain Python) plain fallbacks stand in:
model folders are the subfolders of the directory given to `use_models_dir`, everything computes on the CPU,
progress is only recorded, and nothing interrupts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from ..mimir.offload import Placement
from ..mimir.prompt_cache import default_folder

try:
    import comfy.model_management as _mm
    import comfy.utils as _comfy_utils
    import folder_paths as _folder_paths
except ImportError:
    _mm = _comfy_utils = _folder_paths = None

IN_COMFYUI = _folder_paths is not None
logger = logging.getLogger(__name__)

# Model folders this pack adds to ComfyUI's (also settable in extra_model_paths.yaml under the same names).
PACK_FOLDERS = {"LLM": "LLM", "mimir": "mimir"}
PROMPTS_FOLDER = "mimir_prompts"  # encoded prompts, saved under ComfyUI's output directory
PROMPT_CACHE_FOLDER = "mimir_prompt_cache"  # Mimir Text Encode's cache, under ComfyUI's user directory
FOLDER_MARKERS = ("model_index.json", "config.json")  # a folder holding one of these is one model
_fallback = {"models_dir": None, "output_dir": None}


# ---- model folders --------------------------------------------------------------------------------------

def register_model_folders() -> None:
    """Add models/LLM, models/mimir and output/mimir_prompts to ComfyUI's model folders (idempotent)."""
    if not IN_COMFYUI:
        return
    for name, sub in PACK_FOLDERS.items():
        _folder_paths.add_model_folder_path(name, os.path.join(_folder_paths.models_dir, sub), is_default=True)
    prompts = os.path.join(_folder_paths.get_output_directory(), PROMPTS_FOLDER)
    _folder_paths.add_model_folder_path(PROMPTS_FOLDER, prompts, is_default=True)


def use_models_dir(models_dir, output_dir=None) -> None:
    """Fallback only: read model folders from `models_dir/<folder name>` and save prompts under `output_dir`."""
    _fallback["models_dir"] = None if models_dir is None else Path(models_dir)
    _fallback["output_dir"] = None if output_dir is None else Path(output_dir)


def model_roots(folder: str) -> list[Path]:
    """The directories ComfyUI searches for a model folder name such as "diffusion_models" or "LLM"."""
    if IN_COMFYUI:
        try:
            return [Path(p) for p in _folder_paths.get_folder_paths(folder)]
        except KeyError:
            return []
    if folder == PROMPTS_FOLDER:
        base = _fallback["output_dir"]
        return [] if base is None else [base / PROMPTS_FOLDER]
    base = _fallback["models_dir"]
    return [] if base is None else [base / folder]


def list_models(folder: str, extensions=(".safetensors",), folders: bool = True) -> list[str]:
    """Names (relative paths with "/") of the model files and, with `folders`, model folders (a folder holding
    config.json or model_index.json) under every root of `folder`. Files inside a model folder are its parts,
    not listed on their own."""
    names = set()
    for root in model_roots(folder):
        for path, dirs, files in os.walk(root, followlinks=True):
            rel = Path(path).relative_to(root).as_posix()
            if rel != "." and any(marker in files for marker in FOLDER_MARKERS):
                if folders:
                    names.add(rel)
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            names.update((f if rel == "." else f"{rel}/{f}") for f in files if f.lower().endswith(extensions))
    return sorted(names)


def resolve_model(folder: str, name: str, input_name: str) -> Path:
    """The file or folder `name` (as listed by `list_models`) under the roots of `folder`. Names cannot
    leave their root: absolute paths and ".." are refused."""
    relative = Path(os.path.normpath(name or ""))
    if not name or relative.is_absolute() or relative.parts[:1] == ("..",):
        raise ValueError(f"{input_name}: {name!r} is not a name inside the '{folder}' model folder")
    for root in model_roots(folder):
        candidate = root / relative
        if candidate.exists():
            return candidate
    searched = ", ".join(str(r) for r in model_roots(folder)) or "no folder is registered"
    raise FileNotFoundError(f"{input_name}: {name!r} was not found in the '{folder}' model folder ({searched})")


def prompts_dir() -> Path:
    """Where encoded prompts are saved: the first root of the mimir_prompts folder (created if needed)."""
    roots = model_roots(PROMPTS_FOLDER)
    if not roots:
        raise RuntimeError("no folder for encoded prompts: the mimir_prompts model folder has no path")
    roots[0].mkdir(parents=True, exist_ok=True)
    return roots[0]


def prompt_cache_dir() -> Path:
    """Where Mimir Text Encode caches encoded prompts: ComfyUI's user directory (kept across restarts, unlike
    its temp directory, which ComfyUI empties at start). Outside ComfyUI: mimir's own default cache folder
    ($MIMIR_PROMPT_CACHE or ~/.cache/mimir/prompts)."""
    if IN_COMFYUI:
        return Path(_folder_paths.get_user_directory()) / PROMPT_CACHE_FOLDER
    return default_folder()


def bundled_t5_tokenizer() -> Path | None:
    """ComfyUI ships the T5 v1.1 tokenizer (the one CogVideoX uses) for its own T5 files; single-file T5
    checkpoints hold no tokenizer, so they use this one."""
    if not IN_COMFYUI:
        return None
    folder = Path(_comfy_utils.__file__).parent / "text_encoders" / "t5_tokenizer"
    return folder if folder.is_dir() else None


# ---- devices and memory ---------------------------------------------------------------------------------

def compute_device():
    return _mm.get_torch_device() if IN_COMFYUI else "cpu"


def offload_device():
    """Where idle models wait: the CPU, unless ComfyUI runs with --highvram/--gpu-only."""
    return _mm.unet_offload_device() if IN_COMFYUI else "cpu"


class ComfyPlacement(Placement):
    """Placement that first asks ComfyUI to unload its own models to make room for a stage, and lets
    ComfyUI empty its caches after."""

    @contextlib.contextmanager
    def stage(self, *modules):
        if IN_COMFYUI and self.device != self.offload_device:
            needed = sum(_module_bytes(m) for m in modules if m is not None)
            _mm.free_memory(needed * 1.2, self.device)
        try:
            with super().stage(*modules) as device:
                yield device
        finally:
            if IN_COMFYUI and self.device != self.offload_device:
                _mm.soft_empty_cache()


def _module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def placement() -> ComfyPlacement:
    """Models compute on ComfyUI's device (the CPU with --cpu) only during their stage, then go back."""
    return ComfyPlacement(compute_device(), offload_device())


# ---- progress and interruption --------------------------------------------------------------------------

class _RecordedProgress:
    """Stands in for comfy.utils.ProgressBar outside ComfyUI; keeps the updates for tests."""

    def __init__(self, total: int):
        self.total, self.current, self.updates = total, 0, []

    def update_absolute(self, value: int, total: int | None = None) -> None:
        self.total = total if total is not None else self.total
        self.current = min(value, self.total)
        self.updates.append((self.current, self.total))


def progress_bar(total: int):
    """ComfyUI's progress bar for the running node (shown on the node and sent to API clients)."""
    return _comfy_utils.ProgressBar(total) if IN_COMFYUI else _RecordedProgress(total)


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel or POSTed /interrupt."""
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()
