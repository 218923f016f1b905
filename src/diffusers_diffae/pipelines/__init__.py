from .pipeline_diffae import DiffAELatents, DiffAEPipeline, edit_strength_for_target, slerp

__all__ = ["DiffAELatents", "DiffAEPipeline", "edit_strength_for_target", "slerp"]
