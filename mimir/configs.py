"""Reading config files: a JSON object or an error naming the file and the fault, a warning for each field the
model class does not know, the class defaults filled in, and the component folder a config lives in."""

from __future__ import annotations

import difflib
import inspect
import json
import logging
from pathlib import Path

import transformers

logger = logging.getLogger(__name__)

_JSON_TYPES = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false",
               type(None): "null"}


def parse_json_object(text: str, where) -> dict:
    """A JSON object ({...}) from text, else a ValueError naming `where` and the fault (line and column)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object ({{...}}), found {_JSON_TYPES.get(type(data), 'JSON')}")
    return data


def read_json(file: Path) -> dict:
    """A config file's JSON object; every fault (not UTF-8, invalid JSON, not an object) names the file."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return parse_json_object(text, file)


# Fields published configs carry besides their class's own: bookkeeping (as are all keys starting with "_", such
# as _class_name and _name_or_path), transformers' older names (torch_dtype became dtype; rope_theta and
# rope_scaling became rope_parameters in v5), and T5's output_past and Phi-3's attention_bias, which only the
# models' original code read.
_BOOKKEEPING_FIELDS = frozenset({"architectures", "auto_map", "model_type", "transformers_version", "torch_dtype",
                                 "rope_theta", "rope_scaling", "output_past", "attention_bias"})


def config_fields(cls) -> set[str]:
    """The fields a config of `cls` may hold: a diffusers class's __init__ parameters; for a transformers
    config class its fields, their aliases and the generation settings older configs carry."""
    if issubclass(cls, transformers.PretrainedConfig):
        fields = set(cls().to_dict()) | set(cls.attribute_map) | set(transformers.GenerationConfig().to_dict())
    else:
        fields = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return fields | _BOOKKEEPING_FIELDS


def warn_unknown_fields(config: dict, cls, where) -> list[str]:
    """Log each field `cls` does not know, naming the nearest known one: a typo such as
    use_rotary_positional_embedding would otherwise build another architecture from the defaults.
    Returns the unknown fields."""
    known = config_fields(cls)
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    for name in unknown:
        near = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; the nearest known field is {near[0]!r}" if near else ""
        logger.warning("%s: unknown field %r (%s has no such field, so it is ignored)%s", where, name,
                       cls.__name__, hint)
    return unknown


def full_config(cls, config: dict) -> dict:
    """A diffusers config with the class defaults filled in and private keys dropped."""
    params = inspect.signature(cls.__init__).parameters
    full = {n: p.default for n, p in params.items() if n != "self" and p.default is not inspect.Parameter.empty}
    full.update({k: v for k, v in config.items() if k in full})
    return full


def component_folder(path: Path, subfolder: str, accepts, what: str, config_name: str = "config.json"):
    """(folder, config) for a component given a pipeline root or the component's own folder."""
    for folder in (path / subfolder, path):
        file = folder / config_name
        if file.is_file():
            config = read_json(file)
            if accepts(config):
                return folder, config
    raise ValueError(f"{path}: not a {what}: expected a .safetensors file, a diffusers pipeline folder with "
                     f"{subfolder}/, or a folder holding the {what}'s {config_name}")


def is_class(name: str):
    """A `component_folder` test: the config's diffusers class is `name`."""
    return lambda config: config.get("_class_name") == name
