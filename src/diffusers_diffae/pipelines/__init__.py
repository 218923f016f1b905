from .latent_ops import edit_strength_for_target, slerp
from .pipeline_diffae import DiffAEPipeline
from .pipeline_output import DiffAELatents


__all__ = ["DiffAELatents", "DiffAEPipeline", "edit_strength_for_target", "slerp"]
