"""Evaluation of Diffusion Autoencoders: metrics, offline feature networks and the evaluation command.

`python -m diffusers_diffae.evaluation --help` runs the suite (see `suite.py`): one module per section of the
paper's measurements (`reconstruction`, `representation`, `interpolation`, `manipulation`, `sampling`, `latent`)
over the shared codes of `context.Evaluation`; the numbers come from `metrics` and `fid`, the files from `report`.
"""

from .fid import InceptionFeatures, LPIPSDistance, MetricUnavailable, inception_status, lpips_status
from .metrics import (
    as_binary_labels,
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
    reconstruction_scores,
    ssim,
)


__all__ = [
    "InceptionFeatures",
    "LPIPSDistance",
    "MetricUnavailable",
    "as_binary_labels",
    "auroc",
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
    "reconstruction_scores",
    "ssim",
]
