"""What every section of the evaluation shares: the models, the test images, and their codes computed once.

Each section (`reconstruction.py`, `representation.py`, ...) is a function `evaluate(ev, ...)` of an
[`Evaluation`] `ev`, and a function `claims(results)` that checks the paper's claims against its results.
"""

import hashlib
import os
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch

from ..pipelines.pipeline_diffae import DiffAELatents, DiffAEPipeline
from . import metrics
from .data import EvaluationData


def log(message: str) -> None:
    print(f"[evaluate {time.strftime('%H:%M:%S')}] {message}", flush=True)


def mean(values) -> float:
    """The mean of a sequence or tensor of numbers, in float64."""
    return float(torch.as_tensor(values, dtype=torch.float64).mean())


def claim(text: str, source: str, holds: Optional[bool], measured: str) -> Dict:
    """One of the paper's claims checked against a measurement: `holds` is True, False or None (not measured)."""
    return {"claim": text, "source": source, "holds": holds, "measured": measured}


class Evaluation:
    r"""
    One pipeline, its test images and optionally a DDIM baseline, with the codes the sections share (z_sem,
    inverted x_T per T, the probes fitted on another split), each computed once on first use.

    Args:
        pipe ([`DiffAEPipeline`]): the model under test.
        data ([`EvaluationData`]): test images and labels.
        baseline ([`DiffAEPipeline`], *optional*): the DDIM baseline, a pipeline whose UNet has no z_sem (see
            `data.load_baseline`).
        train_data ([`EvaluationData`], *optional*): labelled images of another split, for the probes that judge
            reconstructions and edits, and for the Eq. 11 targets.
        batch_size (`int`): images per network call.
        seed (`int`): seeds every random draw (noise, folds, interpolation points).
        features (`callable`, *optional*): image features (B, 3, H, W) in [0, 1] -> (B, F) for FID and the feature
            path length; the bundled Inception-v3 when available (see `fid.py`). Tests pass a small stand-in.
        features_name (`str`, *optional*): how the report names `features`.
        features_reason (`str`, *optional*): why there is no feature network ("skipped: ...").
        lpips (`callable`, *optional*): an LPIPS distance; `None` reports LPIPS as skipped with `lpips_reason`.
        feature_cache (`str`, *optional*): a safetensors file that keeps the feature network's features of
            `train_data` between runs (see `train_image_features`).
    """

    def __init__(
        self,
        pipe: DiffAEPipeline,
        data: EvaluationData,
        baseline: Optional[DiffAEPipeline] = None,
        train_data: Optional[EvaluationData] = None,
        batch_size: int = 32,
        seed: int = 0,
        features: Optional[Callable] = None,
        features_name: Optional[str] = None,
        features_reason: Optional[str] = None,
        lpips: Optional[Callable] = None,
        lpips_reason: Optional[str] = None,
        feature_cache: Optional[str] = None,
        inversion: Optional[Dict] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if data.images.shape[0] < 2:
            raise ValueError("the evaluation needs at least 2 test images")
        self.pipe, self.data, self.baseline, self.train_data = pipe, data, baseline, train_data
        self.batch_size, self.seed = batch_size, seed
        self.features, self.features_name, self.features_reason = features, features_name, features_reason
        self.lpips, self.lpips_reason = lpips, lpips_reason
        self.feature_cache = feature_cache
        self.inversion = inversion or {}  # keyword arguments of DiffAEPipeline.invert: how x_T is inferred
        self._z_sem: Optional[torch.Tensor] = None
        self._x_T: Dict[int, torch.Tensor] = {}
        self._baseline_x_T: Dict[int, torch.Tensor] = {}
        self._noise: Optional[torch.Tensor] = None
        self._train_z_sem: Optional[torch.Tensor] = None
        self._probes: Optional[Dict[str, Dict]] = None
        self._feature_probes_fitted = False

    def batches(self, n: int):
        """Slices of at most `batch_size` that cover range(n)."""
        for start in range(0, n, self.batch_size):
            yield slice(start, min(start + self.batch_size, n))

    # -- codes ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_z_sem(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, D) z_sem."""
        encoder = self.pipe.encoder
        out = [
            encoder((images[s] * 2 - 1).to(encoder.device, encoder.dtype)).z_sem.float().cpu()
            for s in self.batches(len(images))
        ]
        return torch.cat(out)

    def sample_z_sem(self, num_samples: int, steps: int, generator: torch.Generator) -> torch.Tensor:
        """(num_samples, D) float z_sem on the CPU, drawn from the latent DDIM with `steps` DDIM steps in batches."""
        sizes = [min(self.batch_size, num_samples - s) for s in range(0, num_samples, self.batch_size)]
        return torch.cat([self.pipe.sample_z_sem(n, steps, generator=generator).float().cpu() for n in sizes])

    @property
    def z_sem(self) -> torch.Tensor:
        """z_sem (N, D) of the test images."""
        if self._z_sem is None:
            self._z_sem = self.encode_z_sem(self.data.images)
        return self._z_sem

    def _invert(self, pipe: DiffAEPipeline, z_sem: Optional[torch.Tensor], steps: int) -> torch.Tensor:
        x0 = self.data.images * 2 - 1
        device, dtype = pipe.device, pipe.unet.dtype
        out = []
        for s in self.batches(len(x0)):
            z = None if z_sem is None else z_sem[s].to(device, dtype)
            out.append(pipe.invert(x0[s].to(device, dtype), z, steps, **self.inversion).float().cpu())
        return torch.cat(out)

    def x_T(self, steps: int) -> torch.Tensor:
        """DiffAE's x_T (N, C, H, W) of the test images, inverted with `steps` DDIM steps."""
        if steps not in self._x_T:
            self._x_T[steps] = self._invert(self.pipe, self.z_sem, steps)
        return self._x_T[steps]

    def baseline_x_T(self, steps: int) -> torch.Tensor:
        """The DDIM baseline's x_T (N, C, H, W) of the test images, inverted with `steps` DDIM steps."""
        if steps not in self._baseline_x_T:
            self._baseline_x_T[steps] = self._invert(self.baseline, None, steps)
        return self._baseline_x_T[steps]

    @property
    def noise(self) -> torch.Tensor:
        """One fixed Gaussian x_T (N, C, H, W) per test image, shared by every T (random-x_T decoding)."""
        if self._noise is None:
            generator = torch.Generator().manual_seed(self.seed)
            self._noise = torch.randn(self.data.images.shape, generator=generator)
        return self._noise

    @property
    def train_z_sem(self) -> torch.Tensor:
        """z_sem (N_train, D) of the labelled images of the other split."""
        if self._train_z_sem is None:
            self._train_z_sem = self.encode_z_sem(self.train_data.images)
        return self._train_z_sem

    # -- images from codes ----------------------------------------------------------------------------------------

    def decode(
        self, x_T: torch.Tensor, z_sem: Optional[torch.Tensor], steps: int, baseline: bool = False
    ) -> torch.Tensor:
        """Decodes x_T (N, C, H, W) and z_sem (N, D) (`None` for the baseline, `baseline=True`) in batches with
        `steps` DDIM steps. Returns (N, C, H, W) images in [0, 1]."""
        pipe = self.baseline if baseline else self.pipe
        device, dtype = pipe.device, pipe.unet.dtype
        out = []
        for s in self.batches(len(x_T)):
            z = None if z_sem is None else z_sem[s].to(device, dtype)
            x0 = pipe.decode(z, x_T[s].to(device, dtype), steps, output_type="latent").images
            out.append(((x0.float().cpu() + 1) / 2).clamp(0, 1))
        return torch.cat(out)

    def edit(self, latents: DiffAELatents, idx: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
        """`pipeline.edit` of the codes `latents[idx]` in batches -> (len(idx), C, H, W) images in [0, 1]. Every
        tensor among `kwargs` holds one row per image (strength (N,), direction (N, D)) and is batched along."""
        device = self.pipe.device
        out = []
        for s in self.batches(len(idx)):
            sub = DiffAELatents(z_sem=latents.z_sem[idx[s]].to(device), x_T=latents.x_T[idx[s]].to(device))
            batch_kwargs = {k: v[s].to(device) if torch.is_tensor(v) and v.ndim > 0 else v for k, v in kwargs.items()}
            images = self.pipe.edit(sub, num_inference_steps=steps, output_type="pt", **batch_kwargs).images
            out.append(images.float().cpu())
        return torch.cat(out)

    # -- judges: probes fitted on the other split, image features ------------------------------------------------

    @property
    def probes(self) -> Dict[str, Dict]:
        """Independent logistic probes fitted on the other split (`train_data`), one on raw pixels and one on z_sem
        per label that has both classes there; empty without `train_data`. Shared by reconstruction and
        manipulation."""
        if self._probes is None:
            self._probes = {}
            if self.train_data is not None:
                for name, labels in self.train_data.labels.items():
                    if 0 < labels.sum() < len(labels):
                        self._probes[name] = {
                            "pixels": metrics.fit_logistic_probe(self.train_data.images, labels),
                            "z_sem": metrics.fit_logistic_probe(self.train_z_sem, labels),
                        }
        return self._probes

    def attribute_aurocs(
        self, features: torch.Tensor, space: str = "pixels", select: Optional[np.ndarray] = None
    ) -> Dict[str, float]:
        """AUROC against the test labels of each `space` probe's scores on `features` (N_test, ...) of the test
        images, or of the ones the bool mask `select` (N_test,) picks: how well their attributes can be read off these
        features. Attributes with one class among those images are left out."""
        if select is not None:
            features = features[torch.from_numpy(select)]
        out = {}
        for name, labels in self.data.labels.items():
            labels = labels if select is None else labels[select]
            if name in self.probes and 0 < labels.sum() < len(labels):
                out[name] = metrics.auroc(metrics.probe_scores(features, self.probes[name][space]).numpy(), labels)
        return out

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, F) features of the feature network (Inception-v3 by default)."""
        return torch.cat([self.features(images[s]).float().cpu() for s in self.batches(len(images))])

    def train_image_features(self) -> torch.Tensor:
        """(N_train, F) features of the other split's images. With `feature_cache`, they are read from that file
        when it was written for the same images (SHA-256 of the pixel tensor) and the same feature network, else
        computed and written there: Inception-v3 on thousands of upsampled images is the slowest step of an edit
        report on a CPU, and it is the same in every report on one dataset."""
        images = self.train_data.images
        if self.feature_cache is None:
            return self.image_features(images)
        key = {
            "images_sha256": hashlib.sha256(images.float().contiguous().numpy().tobytes()).hexdigest(),
            "images_shape": "x".join(map(str, images.shape)),
            "features": str(self.features_name),
        }
        if os.path.exists(self.feature_cache):
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(self.feature_cache, framework="pt") as f:
                    if f.metadata() == key:
                        log(f"image-feature probes: features read from {self.feature_cache}")
                        return f.get_tensor("features")
            except (SafetensorError, OSError) as e:  # not ours: refuse rather than overwrite someone's file
                raise ValueError(
                    f"--feature_cache {self.feature_cache} is not a safetensors feature cache: {e}"
                ) from e
            log(f"image-feature probes: {self.feature_cache} holds other images or another network; recomputing")
        features = self.image_features(images)
        from safetensors.torch import save_file

        save_file({"features": features.contiguous()}, self.feature_cache, metadata=key)
        return features

    def fit_feature_probes(self) -> bool:
        """Adds a probe on image features (key "features") to every entry of `probes`, fitted on the other split's
        images: a judge of edits that sees the picture as a whole, independent of the model and less literal than raw
        pixels. Returns False (and fits nothing) without a feature network."""
        if self.features is None:
            return False
        if not self._feature_probes_fitted and self.probes:
            log(f"image-feature probes: features of {len(self.train_data.images)} images of the other split")
            train_features = self.train_image_features()
            for name, probe in self.probes.items():
                probe["features"] = metrics.fit_logistic_probe(train_features, self.train_data.labels[name])
        self._feature_probes_fitted = True
        return True
