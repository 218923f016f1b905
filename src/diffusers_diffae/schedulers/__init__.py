"""Schedulers of Diffusion Autoencoders.

`SchedulerMixin` is re-exported on purpose: diffusers' pipeline loader looks up the loading method on the module
named in `model_index.json`.
"""

from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from .fixed_point_inversion import invert_step
from .scheduling_diffae_inverse import DiffAEInverseScheduler


__all__ = ["DiffAEInverseScheduler", "invert_step"]
