"""Diffusion Autoencoders (Preechakul et al., CVPR 2022) for Hugging Face diffusers."""

from diffusers import ConfigMixin, ModelMixin, SchedulerMixin  # noqa: F401  (see models/__init__.py)

from .image_processor import DiffAEImageProcessor
from .models import (
    CELEBAHQ_ATTRIBUTES,
    AttributeClassifier,
    AttributeClassifierOutput,
    DiffAEUNet2DModel,
    DiffAEUNet2DOutput,
    LatentMLPDenoiser,
    LatentMLPDenoiserOutput,
    SemanticEncoder,
    SemanticEncoderOutput,
)
from .pipelines import DiffAELatents, DiffAEPipeline
from .precision import resolve_dtype
from .presets import OFFICIAL_CONFIGS, official_component_configs, preset_config
from .schedulers import DiffAEInverseScheduler


__version__ = "0.1.0"

__all__ = [
    "AttributeClassifier",
    "AttributeClassifierOutput",
    "CELEBAHQ_ATTRIBUTES",
    "DiffAEImageProcessor",
    "DiffAEInverseScheduler",
    "DiffAELatents",
    "DiffAEPipeline",
    "DiffAEUNet2DModel",
    "DiffAEUNet2DOutput",
    "LatentMLPDenoiser",
    "LatentMLPDenoiserOutput",
    "OFFICIAL_CONFIGS",
    "SemanticEncoder",
    "SemanticEncoderOutput",
    "official_component_configs",
    "preset_config",
    "resolve_dtype",
]
