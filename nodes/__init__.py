"""Thin ComfyUI node classes over the `mimir` library."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
