"""Loader shim written by diffusers-diffae: re-exports the installed class (`pip install diffusers-diffae`)."""

from diffusers_diffae.models.unet_diffae import DiffAEUNet2DModel  # noqa: F401
