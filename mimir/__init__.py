"""Mimir: CogVideoX text-to-video conditioned on T5 + a decoder-only LLM through a token fuser."""
