"""DiffAE networks as diffusers models.

`ModelMixin` is re-exported on purpose: diffusers' pipeline loader looks up the loading method on the module
named in `model_index.json` (here `diffusers_diffae.models`).
"""

from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from .attribute_classifier import CELEBAHQ_ATTRIBUTES, AttributeClassifier, AttributeClassifierOutput
from .latent_mlp import LatentMLPDenoiser, LatentMLPDenoiserOutput
from .semantic_encoder import SemanticEncoder, SemanticEncoderOutput
from .unet_diffae import DiffAEUNet2DModel, DiffAEUNet2DOutput


__all__ = [
    "AttributeClassifier",
    "AttributeClassifierOutput",
    "CELEBAHQ_ATTRIBUTES",
    "DiffAEUNet2DModel",
    "DiffAEUNet2DOutput",
    "LatentMLPDenoiser",
    "LatentMLPDenoiserOutput",
    "SemanticEncoder",
    "SemanticEncoderOutput",
]
