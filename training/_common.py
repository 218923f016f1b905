"""Helpers shared by the three training scripts: data, checkpoints, guards, images, model cards.

Every script reads top to bottom on its own (parse args -> accelerator -> data -> models -> loop -> save); what
lives here is the plumbing that would otherwise be repeated three times:

- loading a `datasets` dataset (hub name, `save_to_disk` folder or `imagefolder`) and checking it before training;
- decoding images once into uint8 arrays, with augmentation that is a pure function of (seed, epoch, index) so
  that a resumed run sees exactly the batches an uninterrupted run would have seen;
- crash-safe checkpoints (`checkpoint-<step>` folders that appear atomically, `latest` skips broken ones);
- a non-finite-loss guard that does not synchronise with the device every step;
- z_sem encoding with an on-disk safetensors cache (latent DDIM and classifier scripts);
- image grids, model cards, folder replacement and Hub upload.

Nothing here imports torchvision (it breaks beside the CPU torch build these scripts are tested with).
"""

import argparse
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import PIL.Image
import torch

logger = logging.getLogger("diffae_training")

CHECKPOINT_PREFIX = "checkpoint-"
# Written last into a checkpoint before it is renamed into place; a folder without it is never resumed from.
TRAINING_STATE_FILE = "training_state.json"
_INTERPOLATIONS = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
}


class TrainingInputError(ValueError):
    """Bad command-line input or data, detected before any training step."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def add_dataset_arguments(parser: argparse.ArgumentParser, resolution_default: Optional[int] = 64) -> None:
    """Data arguments in the style of diffusers' `train_unconditional.py` (no torchvision)."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A `datasets` Hub name, a local dataset script/folder, or a folder written by `Dataset.save_to_disk` "
        "(loaded with `datasets.load_from_disk`).",
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="The config of a Hub dataset.")
    group.add_argument(
        "--dataset_split",
        type=str,
        default="train",
        help="Split to train on (for Hub datasets and saved `DatasetDict`s).",
    )
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder of images, loaded with the `imagefolder` builder (a `metadata.jsonl`/`metadata.csv` next to "
        "the images adds label columns).",
    )
    group.add_argument("--image_column", type=str, default="image", help="The column holding the images.")
    group.add_argument(
        "--cache_dir", type=str, default=None, help="Where `datasets` caches downloads and arrow files."
    )
    group.add_argument(
        "--resolution",
        type=int,
        default=resolution_default,
        help="Training resolution; images are resized so that their shorter side equals it, then cropped square.",
    )
    group.add_argument(
        "--center_crop",
        action="store_true",
        help="Crop the centre of non-square images (official recipe for LSUN); otherwise crop at a random offset.",
    )
    group.add_argument(
        "--image_interpolation",
        type=str,
        default="bilinear",
        choices=sorted(_INTERPOLATIONS),
        help="Resampling filter of the resize (PIL; antialiased when downscaling, like torchvision's Resize).",
    )
    group.add_argument(
        "--alpha_background",
        type=int,
        default=255,
        help="Grey level (0-255) that transparent pixels are composited onto before dropping the alpha channel.",
    )
    group.add_argument(
        "--allow_upscaling",
        action="store_true",
        help="Accept images smaller than --resolution and upsample them (by default they are an error).",
    )
    group.add_argument(
        "--max_train_samples", type=int, default=None, help="Use only the first N rows of the dataset (debugging)."
    )
    group.add_argument(
        "--cache_images_in_memory",
        type=str,
        default="auto",
        choices=["auto", "always", "never"],
        help="Decode and resize every image once and keep uint8 arrays in memory (`auto`: when they fit in "
        "--max_image_cache_mb). Otherwise images are decoded on the fly in the data loader.",
    )
    group.add_argument(
        "--max_image_cache_mb", type=int, default=4096, help="Memory budget of the in-memory image cache (`auto`)."
    )
    group.add_argument(
        "--skip_image_check",
        action="store_true",
        help="Without the in-memory cache, skip the pre-training pass that opens every image to find unreadable "
        "files and images smaller than --resolution (for very large datasets).",
    )
    group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Data loader worker processes (0: load in the main process, best for in-memory caches).",
    )


def add_checkpoint_arguments(parser: argparse.ArgumentParser, checkpointing_default: int = 500) -> None:
    group = parser.add_argument_group("checkpoints")
    group.add_argument(
        "--checkpointing_steps",
        type=int,
        default=checkpointing_default,
        help="Save the full training state (models, EMA, optimizer, LR scheduler, RNG) every N optimizer steps "
        "into `<output_dir>/checkpoint-<step>`; 0 disables checkpoints.",
    )
    group.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoints (the oldest are deleted after a newer one is complete).",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='Resume from a checkpoint folder (absolute, or relative to --output_dir) or "latest" (the newest '
        "complete checkpoint in --output_dir; a fresh start if there is none).",
    )


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub at the end.")
    group.add_argument(
        "--hub_model_id", type=str, default=None, help="Repository id (default: the output folder's name)."
    )
    group.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the cached login).")
    group.add_argument("--hub_private_repo", action="store_true", help="Create the repository as private.")


def check_report_to(report_to: str) -> None:
    """accelerate silently drops a tracker whose package is missing; fail before training instead."""
    if report_to in ("none", "all"):
        return
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name in report_to.split(","):
        name = name.strip()
        if name in available and not available[name]():
            raise TrainingInputError(f"--report_to {name}: the {name} package is not installed (pip install {name})")


def check_positive(args: argparse.Namespace, names: Sequence[str], allow_none: bool = True) -> None:
    for name in names:
        value = getattr(args, name)
        if value is None and allow_none:
            continue
        if value is None or value <= 0:
            raise TrainingInputError(f"--{name} must be a positive number, got {value}")


# ----------------------------------------------------------------------------------------------------------------
# Threads and seeds
# ----------------------------------------------------------------------------------------------------------------


def configure_cpu_threads(num_threads: Optional[int], num_local_processes: int) -> int:
    """Splits the CPU cores between the local processes unless the user or OMP_NUM_THREADS decided.

    Oversubscription (two processes each using every core) makes CPU DDP several times slower.
    """
    if num_threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_threads = max(1, cores // max(1, num_local_processes))
    torch.set_num_threads(num_threads)
    return num_threads


def no_accelerator_device() -> bool:
    """True on CPU-only machines, where `Accelerator(cpu=True)` is what makes `accelerate launch --multi_gpu
    --num_processes N` (or torchrun) run N gloo processes (MULTI_CPU) instead of N independent runs."""
    from accelerate.utils import is_mlu_available, is_mps_available, is_npu_available, is_xpu_available

    return not (
        torch.cuda.is_available()
        or is_xpu_available()
        or is_npu_available()
        or is_mlu_available()
        or is_mps_available()
    )


def resolve_seed(seed: Optional[int], checkpoint_state: Optional[Dict[str, Any]]) -> int:
    """The run's seed: the checkpoint's on resume (the data order depends on it), else --seed, else a fresh one."""
    if checkpoint_state is not None and checkpoint_state.get("seed") is not None:
        if seed is not None and seed != checkpoint_state["seed"]:
            logger.warning(
                "--seed %s differs from the checkpoint's seed %s; using the checkpoint's so that the data order "
                "continues unchanged",
                seed,
                checkpoint_state["seed"],
            )
        return int(checkpoint_state["seed"])
    if seed is not None:
        return seed
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------


def _is_saved_dataset_dir(path: str) -> bool:
    """`Dataset.save_to_disk` writes state.json + dataset_info.json; `DatasetDict` writes dataset_dict.json."""
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json"))
        or (
            os.path.isfile(os.path.join(path, "state.json"))
            and os.path.isfile(os.path.join(path, "dataset_info.json"))
        )
    )


def load_dataset_from_args(args: argparse.Namespace, split: Optional[str] = None):
    """Loads the training table (a `datasets.Dataset`) named by --dataset_name or --train_data_dir.

    Raises a `TrainingInputError` for a missing source, an unknown split and an empty dataset.
    """
    import datasets

    split = split or args.dataset_split
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise TrainingInputError("give exactly one of --dataset_name and --train_data_dir")
    if args.train_data_dir is not None:
        if not os.path.isdir(args.train_data_dir):
            raise TrainingInputError(f"--train_data_dir {args.train_data_dir!r} is not a folder")
        try:
            dataset = datasets.load_dataset(
                "imagefolder", data_dir=args.train_data_dir, split="train", cache_dir=args.cache_dir
            )
        except datasets.data_files.EmptyDatasetError as e:
            raise TrainingInputError(
                f"--train_data_dir {args.train_data_dir!r} is empty: it holds no image files"
            ) from e
        except (FileNotFoundError, ValueError) as e:
            raise TrainingInputError(
                f"could not read images from --train_data_dir {args.train_data_dir!r}: {e}"
            ) from e
        source = args.train_data_dir
    elif _is_saved_dataset_dir(args.dataset_name):
        try:
            dataset = datasets.load_from_disk(args.dataset_name)
        except (IndexError, ValueError, OSError) as e:  # e.g. a dataset saved with zero shards cannot be read back
            raise TrainingInputError(
                f"could not load the saved dataset {args.dataset_name!r} (empty or damaged): {e}"
            ) from e
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise TrainingInputError(
                    f"the saved DatasetDict {args.dataset_name!r} has no split {split!r} (it has {list(dataset)})"
                )
            dataset = dataset[split]
        source = args.dataset_name
    else:
        if os.path.exists(args.dataset_name) and not os.path.isdir(args.dataset_name):
            raise TrainingInputError(f"--dataset_name {args.dataset_name!r} is a file, not a dataset folder or name")
        try:
            dataset = datasets.load_dataset(
                args.dataset_name, args.dataset_config_name, split=split, cache_dir=args.cache_dir
            )
        except ValueError as e:
            raise TrainingInputError(f"could not load split {split!r} of dataset {args.dataset_name!r}: {e}") from e
        except (FileNotFoundError, ConnectionError) as e:  # datasets' DatasetNotFoundError is a FileNotFoundError
            raise TrainingInputError(
                f"--dataset_name {args.dataset_name!r} is neither a saved dataset folder, a folder of data files, "
                f"nor a reachable Hub dataset: {e}"
            ) from e
        source = args.dataset_name
    if isinstance(dataset, datasets.IterableDataset):
        raise TrainingInputError("streaming datasets are not supported; load a map-style dataset")
    if len(dataset) == 0:
        raise TrainingInputError(f"the dataset {source!r} (split {split!r}) is empty")
    if getattr(args, "max_train_samples", None):
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    return dataset


def check_image_column(dataset, column: str):
    """Returns the dataset with `column` as an undecoded `Image` feature; paths in a string column are accepted.

    Undecoded access (`{"bytes", "path"}`) lets us name the row and file of an unreadable image instead of failing
    inside `datasets`.
    """
    import datasets

    if column not in dataset.column_names:
        raise TrainingInputError(
            f"the dataset has no image column {column!r}; its columns are {dataset.column_names} "
            "(choose one with --image_column)"
        )
    feature = dataset.features[column]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        feature = datasets.Image()  # a column of file paths
    if not isinstance(feature, datasets.Image):
        raise TrainingInputError(
            f"column {column!r} holds {feature!r}, not images; pass the image column with --image_column"
        )
    return dataset.cast_column(column, datasets.Image(decode=False))


def _describe(entry: Any, row: int) -> str:
    path = entry.get("path") if isinstance(entry, dict) else entry if isinstance(entry, str) else None
    return f"row {row}" + (f" ({path})" if path else "")


def open_image(entry: Any, row: int) -> PIL.Image.Image:
    """Opens an undecoded `datasets.Image` entry (`{"bytes", "path"}`) or a path; errors name the row and file."""
    if entry is None:
        raise TrainingInputError(f"row {row} of the image column is empty (None)")
    if isinstance(entry, str):
        entry = {"path": entry, "bytes": None}
    try:
        if entry.get("bytes"):
            return PIL.Image.open(io.BytesIO(entry["bytes"]))
        if entry.get("path"):
            return PIL.Image.open(entry["path"])
    except (PIL.UnidentifiedImageError, OSError) as e:
        raise TrainingInputError(f"{_describe(entry, row)} is not a readable image: {e}") from e
    raise TrainingInputError(f"{_describe(entry, row)} has neither bytes nor a path")


def to_rgb(image: PIL.Image.Image, background: int) -> PIL.Image.Image:
    """RGB with transparency composited onto a flat background (emoji and icons are mostly transparent)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        canvas = PIL.Image.new("RGBA", image.size, (background, background, background, 255))
        return PIL.Image.alpha_composite(canvas, image).convert("RGB")
    return image.convert("RGB")


def resize_shorter_side(image: PIL.Image.Image, resolution: int, interpolation: str) -> PIL.Image.Image:
    """Resizes so that the shorter side equals `resolution` (torchvision `Resize(int)` semantics)."""
    w, h = image.size
    if min(w, h) == resolution:
        return image
    if w <= h:
        size = (resolution, max(resolution, int(round(h * resolution / w))))
    else:
        size = (max(resolution, int(round(w * resolution / h))), resolution)
    return image.resize(size, resample=_INTERPOLATIONS[interpolation])


def center_crop_array(array: np.ndarray, resolution: int) -> np.ndarray:
    h, w = array.shape[:2]
    top, left = (h - resolution) // 2, (w - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


def decode_image(entry: Any, row: int, args: argparse.Namespace, center_crop: bool) -> np.ndarray:
    """One dataset entry -> uint8 (H, W, 3) with min(H, W) == resolution (square if `center_crop`)."""
    image = open_image(entry, row)
    try:
        if min(image.size) < args.resolution and not args.allow_upscaling:
            raise TrainingInputError(
                f"{_describe(entry, row)} is {image.size[0]}x"
                f"{image.size[1]}, smaller than --resolution {args.resolution}; remove such images or pass "
                "--allow_upscaling"
            )
        try:
            image.load()
        except OSError as e:
            raise TrainingInputError(f"{_describe(entry, row)} is a damaged image: {e}") from e
        array = np.asarray(
            resize_shorter_side(to_rgb(image, args.alpha_background), args.resolution, args.image_interpolation)
        )
    finally:
        image.close()
    return center_crop_array(array, args.resolution) if center_crop else array


def scan_images(dataset, column: str, args: argparse.Namespace) -> None:
    """Opens every image header (cheap) to find unreadable files and images smaller than the resolution."""
    for start in range(0, len(dataset), 512):
        rows = dataset[start : start + 512][column]
        for offset, entry in enumerate(rows):
            image = open_image(entry, start + offset)
            try:
                size = image.size
                image.verify()  # reads the file through: truncated or corrupt files fail here, not mid-training
            except Exception as e:  # PIL raises many types from verify()
                raise TrainingInputError(f"{_describe(entry, start + offset)} is a damaged image: {e}") from e
            finally:
                image.close()
            if min(size) < args.resolution and not args.allow_upscaling:
                raise TrainingInputError(
                    f"{_describe(entry, start + offset)} is {size[0]}x{size[1]}, smaller than --resolution "
                    f"{args.resolution}; remove such images or pass --allow_upscaling"
                )


def should_cache_in_memory(num_images: int, args: argparse.Namespace) -> bool:
    if args.cache_images_in_memory == "always":
        return True
    if args.cache_images_in_memory == "never":
        return False
    # Non-square images keep their long side when random crops are used; budget for 1.5x.
    approx_mb = num_images * 3 * args.resolution**2 * (1.0 if args.center_crop else 1.5) / 2**20
    return approx_mb <= args.max_image_cache_mb


class ImageDataset(torch.utils.data.Dataset):
    """Training images as `(3, R, R)` uint8 tensors, from an in-memory cache or decoded on the fly.

    Random crops and flips are a pure function of `(seed, epoch, index)`, not of a process-global RNG: a run resumed
    from a checkpoint (or a data-loader worker) therefore produces exactly the batches of an uninterrupted run.
    Call `set_epoch` before iterating over an epoch.

    Args:
        args: parsed arguments with `resolution`, `center_crop`, `random_flip`, ...
        seed (`int`): augmentation seed.
        dataset: the `datasets.Dataset` (undecoded image column) when decoding on the fly.
        cache (`np.ndarray` of shape `(N, R, R, 3)` or list of `(H, W, 3)` arrays): pre-decoded images.
    """

    def __init__(self, args, seed: int, dataset=None, column: str = "image", cache=None, random_flip=None):
        self.args = args
        self.seed = seed
        self.dataset = dataset
        self.column = column
        self.cache = cache
        self.random_flip = args.random_flip if random_flip is None else random_flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cache) if self.cache is not None else len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.cache is not None:
            array = self.cache[index]
        else:
            array = decode_image(self.dataset[index][self.column], index, self.args, self.args.center_crop)
        rng = np.random.default_rng((self.seed, self.epoch, index))
        size = self.args.resolution
        h, w = array.shape[:2]
        if (h, w) != (size, size):
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            array = array[top : top + size, left : left + size]
        if self.random_flip and rng.random() < 0.5:
            array = array[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def build_image_dataset(args: argparse.Namespace, seed: int, log=logger.info):
    """Loads, checks and (when it fits) decodes the training images. Returns `(ImageDataset, datasets.Dataset)`."""
    dataset = load_dataset_from_args(args)
    dataset = check_image_column(dataset, args.image_column)
    images_only = dataset.select_columns([args.image_column])
    started = time.perf_counter()
    if should_cache_in_memory(len(dataset), args):
        arrays = []
        for start in range(0, len(images_only), 512):
            rows = images_only[start : start + 512][args.image_column]
            arrays += [decode_image(e, start + i, args, args.center_crop) for i, e in enumerate(rows)]
        shapes = {a.shape for a in arrays}
        cache = np.stack(arrays) if len(shapes) == 1 else arrays
        log(f"decoded {len(arrays)} images into memory in {time.perf_counter() - started:.1f}s")
        return ImageDataset(args, seed, cache=cache), dataset
    if not args.skip_image_check:
        scan_images(images_only, args.image_column, args)
        log(f"checked {len(dataset)} images in {time.perf_counter() - started:.1f}s")
    return ImageDataset(args, seed, dataset=images_only, column=args.image_column), dataset


def load_validation_images(args: argparse.Namespace, dataset, count: int) -> torch.Tensor:
    """The first `count` images, centre-cropped and unflipped: `(count, 3, R, R)` floats in [0, 1]."""
    column = dataset.select_columns([args.image_column])[: min(count, len(dataset))][args.image_column]
    arrays = [decode_image(entry, row, args, center_crop=True) for row, entry in enumerate(column)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_step(path: str) -> Optional[int]:
    match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRAINING_STATE_FILE))


def list_checkpoints(output_dir: str) -> List[str]:
    """Complete `checkpoint-<step>` folders, oldest first. Temporary and unfinished folders are ignored."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        step = checkpoint_step(name)
        if step is not None and os.path.isdir(path) and is_complete_checkpoint(path):
            found.append((step, path))
    return [path for _, path in sorted(found)]


def resolve_resume_checkpoint(resume: Optional[str], output_dir: str) -> Optional[str]:
    """Maps --resume_from_checkpoint to a complete checkpoint folder (None: fresh start). Raises for bad paths."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = resume if os.path.isabs(resume) or os.path.isdir(resume) else os.path.join(output_dir, resume)
    if not os.path.isdir(path):
        raise TrainingInputError(f"--resume_from_checkpoint {resume!r}: no such checkpoint folder ({path})")
    if not is_complete_checkpoint(path):
        raise TrainingInputError(
            f"--resume_from_checkpoint {resume!r} is not a complete checkpoint (no {TRAINING_STATE_FILE}); it was "
            "probably interrupted while being written"
        )
    return path


def read_training_state(checkpoint: Optional[str]) -> Optional[Dict[str, Any]]:
    if checkpoint is None:
        return None
    with open(os.path.join(checkpoint, TRAINING_STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def setting_history(
    earlier: Optional[List[Dict[str, Any]]], key: str, start_step: int, step: int, value: Any, unrecorded: Any = None
) -> List[Dict[str, Any]]:
    """What value a training setting had over each stretch of steps: `[{"steps": [first, last], key: value}, ...]`.

    `earlier` is the record the resumed checkpoint carries; this invocation ran steps `start_step`-`step` with
    `value`. A checkpoint written before the record existed gives `unrecorded` for the steps before `start_step`.
    Adjacent stretches with the same value merge; empty ones are dropped.
    """
    earlier = list(earlier or [])
    if not earlier and start_step > 0:
        earlier = [{"steps": [0, start_step], key: unrecorded}]
    history: List[Dict[str, Any]] = []
    for stretch in earlier + [{"steps": [start_step, step], key: value}]:
        first, last = stretch["steps"]
        if last <= first:
            continue
        previous = history[-1] if history else None
        if previous and previous[key] == stretch[key] and previous["steps"][1] == first:
            history[-1] = {"steps": [previous["steps"][0], last], key: stretch[key]}
        else:
            history.append({"steps": [first, last], key: stretch[key]})
    return history


def precision_history(
    resume_state: Optional[Dict[str, Any]], start_step: int, step: int, mixed_precision: str
) -> List[Dict[str, Any]]:
    """The precision each stretch of steps ran in: `[{"steps": [first, last], "mixed_precision": ...}, ...]`.

    A run resumed over several invocations may change `--mixed_precision` between them (bf16 only pays on hosts
    with native bf16), so the checkpoint carries the whole record and the model card reports it, not just the
    last invocation's flag. Checkpoints written before this record existed give `None` ("not recorded").
    """
    earlier = (resume_state or {}).get("precision_history")
    return setting_history(earlier, "mixed_precision", start_step, step, mixed_precision)


def learning_rate_history(
    resume_state: Optional[Dict[str, Any]], start_step: int, step: int, learning_rate: float, resumed_rate: float
) -> List[Dict[str, Any]]:
    """The peak learning rate of each stretch of steps: `[{"steps": [first, last], "learning_rate": ...}, ...]`.

    `resumed_rate` is the peak rate the resumed checkpoint's LR schedule carried: a checkpoint written before this
    record existed ran all its steps at it (the script could not change it on resume before).
    """
    earlier = (resume_state or {}).get("learning_rate_history")
    return setting_history(earlier, "learning_rate", start_step, step, learning_rate, unrecorded=resumed_rate)


def images_per_step_history(
    resume_state: Optional[Dict[str, Any]], start_step: int, step: int, images_per_step: int
) -> List[Dict[str, Any]]:
    """Images per optimizer step (processes x batch x accumulation) of each stretch of steps.

    A run continued on a GPU at a larger batch makes "steps x batch" wrong, so the checkpoint carries the record and
    `images_seen` sums it. A checkpoint written before the record existed ran at its saved `num_processes x
    train_batch_size` (it did not record gradient accumulation, which its runs did not use).
    """
    earlier = (resume_state or {}).get("images_per_step_history")
    unrecorded = None
    if resume_state and resume_state.get("train_batch_size"):
        unrecorded = int(resume_state.get("num_processes", 1)) * int(resume_state["train_batch_size"])
    return setting_history(earlier, "images_per_step", start_step, step, images_per_step, unrecorded=unrecorded)


def ema_decay_history(
    resume_state: Optional[Dict[str, Any]],
    start_step: int,
    step: int,
    ema_decay: Optional[float],
    resumed_decay: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """The EMA decay of each stretch of steps (`None` without EMA); a resumed run may change `--ema_decay`, for
    instance to keep the EMA's window in images when the batch grows. A checkpoint written before the record existed
    ran at `resumed_decay`, the decay its saved EMA carries."""
    earlier = (resume_state or {}).get("ema_decay_history")
    return setting_history(earlier, "ema_decay", start_step, step, ema_decay, unrecorded=resumed_decay)


def images_seen(history: List[Dict[str, Any]]) -> Optional[int]:
    """Total images of an `images_per_step_history`, or None where a stretch is unrecorded."""
    if any(h["images_per_step"] is None for h in history):
        return None
    return sum((h["steps"][1] - h["steps"][0]) * h["images_per_step"] for h in history)


def describe_history(history: List[Dict[str, Any]], key: str, fallback: str) -> str:
    """One line for a model card: `bf16`, or `no (steps 0-42250), bf16 (steps 42250-51750)` where it changed."""
    if not history:
        return fallback
    names = ["not recorded" if h[key] is None else str(h[key]) for h in history]
    if len(history) == 1:
        return names[0]
    return ", ".join(f"{name} (steps {h['steps'][0]}-{h['steps'][1]})" for name, h in zip(names, history))


def set_peak_learning_rate(lr_scheduler, learning_rate: float) -> float:
    """Makes a restored LR schedule go on at peak `learning_rate`; returns the peak rate it carried before.

    `accelerator.load_state` restores the optimizer's and the schedule's learning rates from the checkpoint, so
    without this a changed `--learning_rate` would be silently ignored on resume. The schedule's shape (its factor
    at the current step) is kept; only its peak changes.
    """
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper holds the torch schedule
    previous = float(scheduler.base_lrs[0])
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        factor = group["lr"] / base if base else 1.0
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor
    scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr() reports
    return previous


def _fsync_tree(path: str) -> None:
    """Flushes a folder's files to stable storage, so a power loss cannot leave a renamed but empty checkpoint."""
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass


def save_checkpoint(accelerator, output_dir: str, step: int, state: Dict[str, Any], total_limit: Optional[int]) -> str:
    """Writes `checkpoint-<step>` so that it is either complete or absent, on every process.

    `accelerator.save_state` writes into a hidden temporary folder (every process writes its RNG state there);
    the main process then adds `training_state.json`, flushes and renames the folder into place. A crash at any
    moment leaves at most a `.tmp-*` folder, which `latest` never picks. Old checkpoints are pruned only after
    the new one is in place.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    temporary = os.path.join(output_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process:
        if os.path.exists(temporary):
            shutil.rmtree(temporary)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(temporary, TRAINING_STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
        _fsync_tree(temporary)
        if os.path.exists(final):  # e.g. the same step saved again after a resume
            trash = os.path.join(output_dir, f".trash-{uuid.uuid4().hex}")
            os.replace(final, trash)
            os.replace(temporary, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(temporary, final)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(output_dir):  # leftovers of runs killed mid-save
            if name.startswith((".tmp-", ".trash-")) and name != os.path.basename(temporary):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def replace_folder_contents(source: str, destination: str) -> None:
    """Moves every entry of `source` into `destination`, replacing entries of the same name one rename at a time.

    Used to write a finished pipeline next to checkpoints (or into an existing pipeline folder): a crash leaves
    each component either old or new, never half-written, and unrelated entries (checkpoints, logs) stay.
    """
    os.makedirs(destination, exist_ok=True)
    # model_index.json last: it names the components, so it must only point at ones already in place.
    names = sorted(os.listdir(source), key=lambda n: (n == "model_index.json", n))
    for name in names:
        target = os.path.join(destination, name)
        if os.path.isdir(target) and not os.path.islink(target):
            trash = os.path.join(destination, f".trash-{uuid.uuid4().hex}")
            os.replace(target, trash)
            os.replace(os.path.join(source, name), target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(os.path.join(source, name), target)
    shutil.rmtree(source, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Loss guard and progress
# ----------------------------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteLossGuard:
    """Remembers the first optimizer step whose loss was NaN/inf without a device sync per step.

    `observe` only queues device ops; `check` (called at logging and checkpoint steps, and at the end) syncs once,
    across processes, and raises a `NonFiniteLossError` naming the step. A checkpoint is only written after a
    passing `check`, so the newest checkpoint always holds finite weights.
    """

    def __init__(self, device: torch.device):
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        unset = self.first_bad_step < 0
        self.first_bad_step = torch.where(bad & unset, torch.full_like(self.first_bad_step, step), self.first_bad_step)

    def check(self, accelerator, last_checkpoint: Optional[str]) -> None:
        steps = accelerator.gather(self.first_bad_step.reshape(1))
        bad = steps[steps >= 0]
        if bad.numel():
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
            raise NonFiniteLossError(
                f"the loss became NaN or infinite at step {int(bad.min())}; training stopped and no further "
                f"checkpoint was written ({where}). Lower --learning_rate, check the data, or use --mixed_precision no"
            )


def check_finite_weights(parameters: Iterable[torch.nn.Parameter], step: int, last_checkpoint: Optional[str]) -> None:
    """Refuses to checkpoint non-finite weights (a huge update can leave inf weights while that step's loss,
    computed before the update, was still finite)."""
    if not all(torch.isfinite(p.detach()).all() for p in parameters):
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
        raise NonFiniteLossError(
            f"the weights became NaN or infinite at step {step}; training stopped without writing a checkpoint "
            f"({where}). Lower --learning_rate or check --max_grad_norm."
        )


class Throughput:
    """Steps/s and images/s over the last logging interval, for the progress bar."""

    def __init__(self):
        self.time, self.steps = time.perf_counter(), 0

    def rates(self, steps: int, images_per_step: int) -> Tuple[float, float]:
        now = time.perf_counter()
        elapsed = max(now - self.time, 1e-9)
        steps_per_s = (steps - self.steps) / elapsed
        self.time, self.steps = now, steps
        return steps_per_s, steps_per_s * images_per_step


def deadline_passed(accelerator, deadline: float) -> bool:
    """True on every process once any process's `time.monotonic()` has passed `deadline`, so that all of them stop
    at the same step (a collective: call it at the same steps on every process)."""
    passed = torch.tensor(float(time.monotonic() >= deadline), device=accelerator.device)
    return bool(accelerator.reduce(passed, reduction="sum").item() > 0)


# ----------------------------------------------------------------------------------------------------------------
# Images and model cards
# ----------------------------------------------------------------------------------------------------------------


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> PIL.Image.Image:
    """`(N, C, H, W)` floats in [0, 1] -> one PIL image with `nrow` images per row."""
    images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = images[i].transpose(1, 2, 0)
    return PIL.Image.fromarray(grid.squeeze(-1) if c == 1 else grid)


def log_images(accelerator, images: Dict[str, PIL.Image.Image], step: int) -> None:
    """Sends image grids to the trackers that take images (TensorBoard, Weights & Biases)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for name, image in images.items():
                tracker.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(image) for name, image in images.items()}, step=step)


def front_matter(tags: Iterable[str], license_name: str, base_model: Optional[str] = None) -> str:
    lines = ["---", "library_name: diffusers", f"license: {license_name}", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines.append("---")
    return "\n".join(lines) + "\n"


def update_card_section(card_path: str, title: str, body: str, header_if_new: str) -> None:
    """Adds or replaces the `## title` section of a model card, keeping the rest (used by the later stages)."""
    text = header_if_new
    if os.path.isfile(card_path):
        with open(card_path, encoding="utf-8") as f:
            text = f.read()
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(r"^## " + re.escape(title) + r"\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    )
    with open(card_path, "w", encoding="utf-8") as f:
        f.write(text)


def push_folder_to_hub(folder: str, repo_id: str, token: Optional[str], private: bool, message: str) -> str:
    """Creates the repository if needed and uploads the folder (checkpoints and temporary files excluded)."""
    from huggingface_hub import create_repo, upload_folder

    repo = create_repo(repo_id, token=token, private=private, exist_ok=True)
    upload_folder(
        repo_id=repo.repo_id if hasattr(repo, "repo_id") else repo_id,
        folder_path=folder,
        token=token,
        commit_message=message,
        ignore_patterns=[
            f"{CHECKPOINT_PREFIX}*",
            "*/" + f"{CHECKPOINT_PREFIX}*",
            ".tmp-*",
            ".trash-*",
            "logs/*",
            "*_training/*",
            "validation/*",
        ],
    )
    return repo_id


# ----------------------------------------------------------------------------------------------------------------
# z_sem encoding (latent DDIM and classifier stages)
# ----------------------------------------------------------------------------------------------------------------


def state_dict_fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_dataset(
    accelerator,
    encoder,
    dataset,
    args: argparse.Namespace,
    cache_path: Optional[str],
    batch_size: int,
    log=logger.info,
) -> torch.Tensor:
    """Encodes every image of `dataset` (centre crop, no flip) with `encoder`: returns `(N, D)` float32 z_sem.

    The work is split between processes and gathered in dataset order. The result is cached in a safetensors
    file whose metadata records the dataset fingerprint, the preprocessing and a hash of the encoder weights, so a
    second run (or the next stage) reuses it only when all of these match.
    """
    from safetensors.torch import load_file, save_file

    key = json.dumps(
        {
            "dataset": getattr(dataset, "_fingerprint", None),
            "rows": len(dataset),
            "column": args.image_column,
            "resolution": args.resolution,
            "interpolation": args.image_interpolation,
            "background": args.alpha_background,
            "encoder": state_dict_fingerprint(encoder),
        },
        sort_keys=True,
    )
    if cache_path and os.path.isfile(cache_path):
        from safetensors import safe_open

        with safe_open(cache_path, framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                log(f"using cached z_sem from {cache_path}")
                return load_file(cache_path)["z_sem"]
        log(f"cache {cache_path} was made for other data or weights; encoding again")

    column = dataset.select_columns([args.image_column])
    n = len(column)
    per_process = math.ceil(n / accelerator.num_processes)
    start = accelerator.process_index * per_process
    indices = list(range(start, min(n, start + per_process)))
    encoder.eval()
    chunks = []
    for i in range(0, len(indices), batch_size):
        rows = indices[i : i + batch_size]
        entries = column[rows[0] : rows[-1] + 1][args.image_column]
        arrays = [decode_image(e, r, args, center_crop=True) for e, r in zip(entries, rows)]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(accelerator.device)
        x = x.to(encoder.dtype) / 127.5 - 1
        chunks.append(encoder(x).z_sem.float())
    width = encoder.config.out_channels
    local = torch.cat(chunks) if chunks else torch.zeros(0, width, device=accelerator.device)
    padded = torch.zeros(per_process, width, device=accelerator.device)  # gather needs equal shapes
    padded[: local.shape[0]] = local
    z_sem = accelerator.gather(padded)[:n].cpu()
    if cache_path and accelerator.is_main_process:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        temporary = f"{cache_path}.tmp-{uuid.uuid4().hex}"
        save_file({"z_sem": z_sem.contiguous()}, temporary, metadata={"key": key})
        os.replace(temporary, cache_path)
        log(f"cached z_sem of {n} images in {cache_path}")
    accelerator.wait_for_everyone()
    return z_sem


def add_ema_arguments(parser: argparse.ArgumentParser) -> None:
    """The --use_ema / --ema_* options of diffusers' `EMAModel`, shared by the training scripts."""
    group = parser.add_argument_group("EMA")
    group.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights.")
    group.add_argument("--ema_decay", type=float, default=0.9999, help="The (maximum) EMA decay (official 0.9999).")
    group.add_argument(
        "--ema_min_decay",
        type=float,
        default=None,
        help="Lower bound of the decay. Default: --ema_decay without --ema_warmup (the official constant decay), "
        "0 with it.",
    )
    group.add_argument(
        "--ema_warmup",
        action="store_true",
        help="diffusers EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power (better for short runs).",
    )
    group.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up inverse gamma.")
    group.add_argument("--ema_power", type=float, default=0.75, help="EMA warm-up power (3/4 suits < 200k steps).")
    group.add_argument("--ema_update_after_step", type=int, default=0, help="Start averaging after this step.")


def make_ema(args: argparse.Namespace, model: torch.nn.Module, model_cls):
    """diffusers' `EMAModel` of `model` configured by the options of `add_ema_arguments`."""
    from diffusers.training_utils import EMAModel

    min_decay = args.ema_min_decay if args.ema_min_decay is not None else (0.0 if args.ema_warmup else args.ema_decay)
    return EMAModel(
        model.parameters(),
        decay=args.ema_decay,
        min_decay=float(min_decay),
        update_after_step=args.ema_update_after_step,
        use_ema_warmup=args.ema_warmup,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
        foreach=True,
        model_cls=model_cls,
        model_config=model.config,
    )


def load_ema_folder(ema, folder: str, model: torch.nn.Module, device) -> None:
    """Restores an `EMAModel` from the folder its `save_pretrained` wrote (weights + EMA state in config.json).

    Reads the files directly: `EMAModel.from_pretrained` would rebuild the model through `from_config` with
    unknown keys (warnings) only to copy its parameters, which are exactly the shadow weights stored here.
    """
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    weights = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in weights]
    if missing:
        raise TrainingInputError(f"EMA weights in {folder} lack {missing[:3]} (a different model config?)")
    keys = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")
    state = {key: config[key] for key in keys if key in config}
    state["shadow_params"] = [weights[name].to(device) for name in names]
    ema.load_state_dict(state)


def statistics_are_set(module) -> bool:
    """False for the fresh buffers (mean 0, std 1) of a model whose z_sem statistics were never stored."""
    return not (torch.all(module.z_sem_mean == 0) and torch.all(module.z_sem_std == 1))


def plan_steps_and_lr_schedule(args, optimizer, num_batches: int, num_processes: int):
    """Steps per epoch, total steps and epochs from a (prepared, per-process) loader of `num_batches` batches, and
    the diffusers LR schedule over them. Returns (steps_per_epoch, max_train_steps, num_epochs, lr_scheduler)."""
    from diffusers.optimization import get_scheduler

    steps_per_epoch = math.ceil(num_batches / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        # accelerate steps a prepared scheduler once per process, hence the scaling (as diffusers' examples)
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
    )
    return steps_per_epoch, max_train_steps, num_epochs, lr_scheduler
