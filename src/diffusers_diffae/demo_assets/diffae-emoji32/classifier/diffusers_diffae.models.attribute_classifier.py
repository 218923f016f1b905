"""Loader shim written by diffusers-diffae: re-exports the installed class (`pip install diffusers-diffae`)."""

from diffusers_diffae.models.attribute_classifier import AttributeClassifier  # noqa: F401
