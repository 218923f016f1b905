"""Evaluation of Diffusion Autoencoders: metrics, offline feature networks and the evaluation command.

`python -m diffusers_diffae.evaluation --help` runs the suite (see `suite.py`).
"""

from .fid import InceptionFeatures, LPIPSDistance, MetricUnavailable, inception_status, lpips_status
from .metrics import (
    auroc,
    fid_from_features,
    fit_logistic_probe,
    frechet_distance,
    linear_probe_auroc,
    linear_probe_scores,
    mse,
    perceptual_path_length,
    pixel_change,
    probe_scores,
    psnr,
    ssim,
)
from .sampling import ddim_decode, ddim_invert

__all__ = [
    "InceptionFeatures",
    "LPIPSDistance",
    "MetricUnavailable",
    "auroc",
    "ddim_decode",
    "ddim_invert",
    "fid_from_features",
    "fit_logistic_probe",
    "frechet_distance",
    "inception_status",
    "linear_probe_auroc",
    "linear_probe_scores",
    "lpips_status",
    "mse",
    "perceptual_path_length",
    "pixel_change",
    "probe_scores",
    "psnr",
    "ssim",
]
