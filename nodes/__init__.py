"""Thin ComfyUI node classes over the `mimir` library (classic node API: INPUT_TYPES / RETURN_TYPES / FUNCTION).

Loaded by ComfyUI as a subpackage of the pack folder, so everything here imports relatively; ComfyUI's own
top-level module is also called `nodes`.
"""

from . import comfy_services, loaders, sampling, text_encode

comfy_services.register_model_folders()

NODE_CLASS_MAPPINGS = {**loaders.NODE_CLASS_MAPPINGS, **text_encode.NODE_CLASS_MAPPINGS,
                       **sampling.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**loaders.NODE_DISPLAY_NAME_MAPPINGS, **text_encode.NODE_DISPLAY_NAME_MAPPINGS,
                              **sampling.NODE_DISPLAY_NAME_MAPPINGS}
