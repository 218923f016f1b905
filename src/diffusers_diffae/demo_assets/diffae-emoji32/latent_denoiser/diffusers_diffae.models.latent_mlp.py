"""Loader shim written by diffusers-diffae: re-exports the installed class (`pip install diffusers-diffae`)."""

from diffusers_diffae.models.latent_mlp import LatentMLPDenoiser  # noqa: F401
