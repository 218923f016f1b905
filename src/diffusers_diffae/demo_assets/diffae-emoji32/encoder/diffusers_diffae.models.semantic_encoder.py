"""Loader shim written by diffusers-diffae: re-exports the installed class (`pip install diffusers-diffae`)."""

from diffusers_diffae.models.semantic_encoder import SemanticEncoder  # noqa: F401
