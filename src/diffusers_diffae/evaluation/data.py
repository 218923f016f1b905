"""The evaluation's inputs: the pipeline under test, its DDIM baseline, and labelled images of a dataset split."""

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..models import DiffAEUNet2DModel
from ..pipelines.pipeline_diffae import DiffAEPipeline
from . import metrics


@dataclass
class EvaluationData:
    """Images (N, C, H, W) in [0, 1] at the model's resolution, binary labels (N,) per attribute, and raw values (N,)
    of other columns the evaluation needs (the probes' groups, the edits' selector)."""

    images: torch.Tensor
    labels: Dict[str, np.ndarray] = field(default_factory=dict)
    columns: Dict[str, np.ndarray] = field(default_factory=dict)


def parse_list(text: Optional[str], cast: Callable = str) -> List:
    """ "a, b,c" -> [cast("a"), cast("b"), cast("c")]; None or blank -> []."""
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
        return metrics.as_binary_labels(array, name=f"attribute column {spec!r}")
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


def load_baseline(path: str, pipe: DiffAEPipeline) -> DiffAEPipeline:
    """The paper's DDIM baseline as a `DiffAEPipeline` without encoder: a UNet without z_sem (`z_sem_channels=None`)
    from `path/unet_ema`, `path/unet` or `path` (a training checkpoint, a saved DDIMPipeline folder, a model folder),
    with the DDIM schedulers saved beside it or, when there are none, copies of `pipe`'s. Its `invert` and `decode`
    take `z_sem=None`."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    candidates = [os.path.join(path, name) for name in ("unet_ema", "unet")]
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
    config = DDIMScheduler.load_config(scheduler_dir) if os.path.isdir(scheduler_dir) else pipe.scheduler.config
    baseline = DiffAEPipeline(
        unet=unet.eval(),
        encoder=None,
        scheduler=DDIMScheduler.from_config(config),
        inverse_scheduler=DDIMInverseScheduler.from_config(config),
    )
    baseline.set_progress_bar_config(disable=True)
    return baseline.to(pipe.device)
