"""Diffusion Autoencoders pipeline (community entry point).

Requires `pip install diffusers-diffae`; the classes live in that package (the pipeline's components are
DiffAE-specific models), this file only makes `custom_pipeline="diffae"` resolve to them.
"""

from diffusers_diffae import DiffAEPipeline  # noqa: F401
