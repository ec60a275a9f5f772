"""Reading weights: safetensors files only, their tensors known from the headers until they are loaded, every
bad file (pickled, truncated, corrupt, unmatched keys) named with its fault, and the dtypes they are read in.

Pickled checkpoints (.bin, .pt, .ckpt, ...) are refused because loading one can run code. ComfyUI's "scaled
fp8" files are dequantised here (weight x scale), wherever they are read from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .configs import read_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def resolve_dtype(dtype) -> torch.dtype | None:
    """Map "fp32" / "fp16" / "bf16" (or long names, or a torch dtype) to a torch dtype; None or "auto" -> None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() == "auto":
        return None
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)} or a torch dtype")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def existing(path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return path


def safetensors_fault(file: Path) -> str:
    """What is wrong with a file safetensors cannot open, told from its header: truncated (an interrupted
    download or copy) or not a safetensors file at all."""
    if not file.is_file():
        return "no such file"
    size = file.stat().st_size
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if size < 8 or header_len > 100_000_000:  # safetensors refuses larger headers
            return "corrupt: not a .safetensors file"
        if size < 8 + header_len:
            return f"truncated: {size} bytes, cut inside its {header_len}-byte header"
        header = f.read(header_len)
    try:
        ends = [e["data_offsets"][1] for k, e in json.loads(header).items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "corrupt: not a .safetensors file (its header is not a safetensors header)"
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"truncated: {size} bytes, but its header describes {expected} (an incomplete download or copy?)"
    return "corrupt: not a readable .safetensors file"


@dataclass
class Weights:
    """The tensors of one component across its safetensors file(s), known from the headers until `load`."""

    sources: dict[str, tuple[Path, str]]  # model key -> (file, key in that file)
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors dtype names: "F32", "BF16", ...
    metadata: dict[str, str] = field(default_factory=dict)  # of the first file
    scales: dict[str, tuple[Path, str]] = field(default_factory=dict)  # scaled-fp8 weight key -> its scale

    @classmethod
    def read(cls, files: list[Path]) -> Weights:
        weights = cls({}, {}, {})
        for i, file in enumerate(files):
            try:
                with safe_open(str(file), framework="pt") as f:
                    if i == 0:
                        weights.metadata = f.metadata() or {}
                    for key in f.keys():
                        tensor = f.get_slice(key)
                        weights.sources[key] = (file, key)
                        weights.shapes[key] = tuple(tensor.get_shape())
                        weights.dtypes[key] = tensor.get_dtype()
            except Exception as exc:  # safetensors raises its own error types for corrupt and truncated files
                raise ValueError(f"{file}: {safetensors_fault(file)} ({exc})") from exc
        weights.read_scaled_fp8()
        return weights

    def read_scaled_fp8(self) -> None:
        """ComfyUI's "scaled fp8" files (a `scaled_fp8` marker; fp8 Linear weights, each with a `scale_weight`
        and a `scale_input`) hold weight / scale_weight: they load as weight * scale_weight, as ComfyUI computes
        them. scale_input only serves ComfyUI's fp8 matrix products."""
        if "scaled_fp8" not in self.sources:
            return
        self.pop("scaled_fp8")
        for key in [k for k in self.sources if k.endswith((".scale_weight", ".scale_input"))]:
            source = self.pop(key)
            if key.endswith(".scale_weight"):
                self.scales[key.removesuffix("scale_weight") + "weight"] = source

    def pop(self, key: str) -> tuple[Path, str]:
        del self.shapes[key], self.dtypes[key]
        return self.sources.pop(key)

    def alias(self, key: str, source_key: str) -> None:
        """Make `key` read the same tensor as `source_key` (a tied weight the file stores once)."""
        self.sources[key], self.shapes[key], self.dtypes[key] = (
            self.sources[source_key], self.shapes[source_key], self.dtypes[source_key])

    def drop(self, prefixes: tuple[str, ...]) -> None:
        for key in [k for k in self.sources if k.startswith(prefixes)]:
            self.pop(key)

    def stored_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the weights; float8 storage computes in bfloat16."""
        counts: dict[str, int] = {}
        for key, name in self.dtypes.items():
            if name in _SAFETENSORS_DTYPES:
                counts[name] = counts.get(name, 0) + math.prod(self.shapes[key])
        if not counts:
            return torch.float32
        dtype = _SAFETENSORS_DTYPES[max(counts, key=counts.get)]
        return torch.bfloat16 if dtype.itemsize == 1 else dtype

    def load(self) -> dict[str, torch.Tensor]:
        by_file: dict[Path, set[str]] = {}
        for file, name in [*self.sources.values(), *self.scales.values()]:
            by_file.setdefault(file, set()).add(name)
        tensors = {}
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                tensors.update({(file, name): f.get_tensor(name) for name in names})
        for key, scale in self.scales.items():  # in fp32: the caller casts to the dtype the model computes in
            tensors[self.sources[key]] = tensors[self.sources[key]].float() * tensors[scale].float()
        return {key: tensors[source] for key, source in self.sources.items()}  # aliases share one tensor


def read_file(path: Path) -> Weights:
    """The weights of one .safetensors file; a pickled checkpoint is refused by its suffix, before it is opened."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: {path.suffix} files are pickled PyTorch checkpoints; Mimir loads .safetensors "
                         f"only (they cannot run code when loaded)")
    return Weights.read([path])


def read_folder(folder: Path) -> Weights:
    """The weights of a diffusers/transformers component folder (one file or the shards its index names)."""
    return Weights.read(weight_files(folder))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors file of a diffusers/transformers component folder, or the shards its index names."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = read_json(indexes[0]).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{indexes[0]}: no weight_map (tensor name -> shard file) in this index")
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files
    if files:
        raise ValueError(f"{folder}: several .safetensors files ({', '.join(f.name for f in files)}) and no "
                         f"*.safetensors.index.json saying which belong together")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder}: only pickled PyTorch weights ({', '.join(pickles)}); Mimir loads .safetensors "
                         f"only: convert them (e.g. load and `save_pretrained(..., safe_serialization=True)`)")
    raise ValueError(f"{folder}: no .safetensors weights in this folder")


def few(names: list[str], n: int = 8) -> str:
    """The first `n` names, and how many more: error messages name examples, not thousands of keys."""
    shown = ", ".join(names[:n])
    return shown + (f" (and {len(names) - n} more)" if len(names) > n else "")


def check_keys(expected: dict[str, tuple], found: dict[str, tuple], where: str) -> None:
    """Every tensor name and shape a model expects against those a file holds, all mismatches named at once."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {list(found[k])} (expected {list(expected[k])})"
             for k in sorted(expected) if k in found and tuple(found[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {few(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with other shapes: {few(wrong)}")
    if problems:
        raise ValueError(f"{where}: the weights do not match the model config: " + "; ".join(problems))
