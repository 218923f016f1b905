"""Training data of the three scripts: load a `datasets` table, check it, decode its images, encode it to z_sem.

- `load_dataset_from_args` reads a Hub dataset, a `save_to_disk` folder or an `imagefolder`, and
  `check_image_column` makes sure its image column holds images before any model is built.
- `decode_image` turns one entry into uint8 `(H, W, 3)` with PIL and numpy (no torchvision: it does not import
  beside the CPU torch build these scripts are tested with).
- `ImageDataset` serves `(3, R, R)` uint8 training images whose crops and flips are a pure function of
  `(seed, epoch, index)`, so a resumed run sees exactly the batches an uninterrupted run would have seen.
- `encode_dataset` turns a dataset into `(N, D)` z_sem with a frozen encoder, cached in a safetensors file.
"""

import argparse
import hashlib
import io
import json
import math
import os
import time
import uuid
from typing import Any, Optional

import numpy as np
import PIL.Image
import torch
from accelerate.logging import get_logger

from _common import TrainingInputError


logger = get_logger(__name__)

_INTERPOLATIONS = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
}


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Data arguments in the style of diffusers' `train_unconditional.py`."""
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
        "--dataset_split", type=str, default="train", help="Split to train on (Hub datasets, saved DatasetDicts)."
    )
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder of images, loaded with the `imagefolder` builder (a `metadata.jsonl`/`metadata.csv` next to "
        "the images adds label columns).",
    )
    group.add_argument("--image_column", type=str, default="image", help="The column holding the images.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where `datasets` caches downloads.")
    group.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Training resolution (default: the model's sample_size); images are resized so that their shorter "
        "side equals it, then cropped square.",
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
    group.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N rows (debugging).")
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


def add_encoding_arguments(parser: argparse.ArgumentParser) -> None:
    """The trained autoencoder and the z_sem cache of the later stages (latent DDIM, attribute classifier)."""
    parser.add_argument("--pipeline", type=str, required=True, help="The trained autoencoder (a pipeline folder).")
    parser.add_argument(
        "--z_sem_cache",
        type=str,
        default=None,
        help="safetensors file caching the encoded dataset; reused only when the data, preprocessing and encoder "
        "weights match.",
    )
    parser.add_argument("--encode_batch_size", type=int, default=64, help="Images per encoder batch.")


# ----------------------------------------------------------------------------------------------------------------
# Loading and checking
# ----------------------------------------------------------------------------------------------------------------


def _is_saved_dataset_dir(path: str) -> bool:
    """`Dataset.save_to_disk` writes state.json + dataset_info.json; `DatasetDict` writes dataset_dict.json."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))
    )


def load_dataset_from_args(args: argparse.Namespace, split: Optional[str] = None):
    """The `datasets.Dataset` named by --dataset_name or --train_data_dir (`split` overrides --dataset_split).

    Raises a `TrainingInputError` for a missing source, an unknown split and an empty dataset.
    """
    import datasets

    split = split or args.dataset_split
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise TrainingInputError("give exactly one of --dataset_name and --train_data_dir")
    source = args.train_data_dir or args.dataset_name
    if args.train_data_dir is not None:
        if not os.path.isdir(args.train_data_dir):
            raise TrainingInputError(f"--train_data_dir {source!r} is not a folder")
        try:
            dataset = datasets.load_dataset("imagefolder", data_dir=source, split="train", cache_dir=args.cache_dir)
        except datasets.data_files.EmptyDatasetError as e:
            raise TrainingInputError(f"--train_data_dir {source!r} is empty: it holds no image files") from e
        except (FileNotFoundError, ValueError) as e:
            raise TrainingInputError(f"could not read images from --train_data_dir {source!r}: {e}") from e
    elif os.path.isdir(source) and _is_saved_dataset_dir(source):
        try:
            dataset = datasets.load_from_disk(source)
        except (IndexError, ValueError, OSError) as e:  # e.g. a dataset saved with zero shards cannot be read back
            raise TrainingInputError(f"could not load the saved dataset {source!r} (empty or damaged): {e}") from e
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise TrainingInputError(
                    f"the saved DatasetDict {source!r} has no split {split!r} (it has {list(dataset)})"
                )
            dataset = dataset[split]
    else:
        if os.path.exists(source) and not os.path.isdir(source):
            raise TrainingInputError(f"--dataset_name {source!r} is a file, not a dataset folder or name")
        try:
            dataset = datasets.load_dataset(source, args.dataset_config_name, split=split, cache_dir=args.cache_dir)
        except ValueError as e:
            raise TrainingInputError(f"could not load split {split!r} of dataset {source!r}: {e}") from e
        except (FileNotFoundError, ConnectionError) as e:  # datasets' DatasetNotFoundError is a FileNotFoundError
            raise TrainingInputError(
                f"--dataset_name {source!r} is neither a saved dataset folder, a folder of data files, "
                f"nor a reachable Hub dataset: {e}"
            ) from e
    if isinstance(dataset, datasets.IterableDataset):
        raise TrainingInputError("streaming datasets are not supported; load a map-style dataset")
    if len(dataset) == 0:
        raise TrainingInputError(f"the dataset {source!r} (split {split!r}) is empty")
    if args.max_train_samples:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    return check_image_column(dataset, args.image_column)


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


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


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


def _check_size(size, entry: Any, row: int, args: argparse.Namespace) -> None:
    if min(size) < args.resolution and not args.allow_upscaling:
        raise TrainingInputError(
            f"{_describe(entry, row)} is {size[0]}x{size[1]}, smaller than --resolution {args.resolution}; remove "
            "such images or pass --allow_upscaling"
        )


def to_rgb(image: PIL.Image.Image, background: int) -> PIL.Image.Image:
    """RGB with transparency composited onto a flat background (emoji and icons are mostly transparent); 16-bit
    images are scaled to 8 bits (PIL's `convert` would clip them at 255: all white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        from diffusers_diffae.image_processor import pil_to_array

        return PIL.Image.fromarray(np.rint(pil_to_array(image, 3) * 255).astype(np.uint8))
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


def decode_image(entry: Any, row: int, args: argparse.Namespace, center_crop: bool) -> np.ndarray:
    """One dataset entry -> uint8 `(H, W, 3)` with min(H, W) == resolution (`(R, R, 3)` if `center_crop`)."""
    image = open_image(entry, row)
    try:
        _check_size(image.size, entry, row, args)
        try:
            image.load()
        except OSError as e:
            raise TrainingInputError(f"{_describe(entry, row)} is a damaged image: {e}") from e
        rgb = to_rgb(image, args.alpha_background)
        array = np.asarray(resize_shorter_side(rgb, args.resolution, args.image_interpolation))
    finally:
        image.close()
    if not center_crop:
        return array
    h, w = array.shape[:2]
    top, left = (h - args.resolution) // 2, (w - args.resolution) // 2
    return array[top : top + args.resolution, left : left + args.resolution]


def scan_images(dataset, args: argparse.Namespace) -> None:
    """Opens every image header (cheap) to find unreadable files and images smaller than the resolution."""
    for start in range(0, len(dataset), 512):
        for offset, entry in enumerate(dataset[start : start + 512][args.image_column]):
            image = open_image(entry, start + offset)
            try:
                size = image.size
                image.verify()  # reads the file through: truncated or corrupt files fail here, not mid-training
            except Exception as e:  # PIL raises many types from verify()
                raise TrainingInputError(f"{_describe(entry, start + offset)} is a damaged image: {e}") from e
            finally:
                image.close()
            _check_size(size, entry, start + offset, args)


# ----------------------------------------------------------------------------------------------------------------
# Training images (autoencoder stage)
# ----------------------------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """Training images as `(3, R, R)` uint8 tensors, from an in-memory cache or decoded on the fly.

    Random crops and flips are a pure function of `(seed, epoch, index)`, not of a process-global RNG: a run resumed
    from a checkpoint (or a data-loader worker) therefore produces exactly the batches of an uninterrupted run.
    Call `set_epoch` before iterating over an epoch.

    Args:
        args: parsed arguments (`resolution`, `center_crop`, `random_flip`, `image_column`, ...).
        seed (`int`): augmentation seed.
        dataset: the `datasets.Dataset` (undecoded image column) when decoding on the fly.
        cache (`np.ndarray` of shape `(N, R, R, 3)` or list of `(H, W, 3)` arrays): pre-decoded images.
    """

    def __init__(self, args: argparse.Namespace, seed: int, dataset=None, cache=None):
        self.args = args
        self.seed = seed
        self.dataset = dataset
        self.cache = cache
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cache) if self.cache is not None else len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        args = self.args
        if self.cache is not None:
            array = self.cache[index]
        else:
            array = decode_image(self.dataset[index][args.image_column], index, args, args.center_crop)
        rng = np.random.default_rng((self.seed, self.epoch, index))
        size = args.resolution
        h, w = array.shape[:2]
        if (h, w) != (size, size):
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            array = array[top : top + size, left : left + size]
        if args.random_flip and rng.random() < 0.5:
            array = array[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def build_image_dataset(args: argparse.Namespace, seed: int):
    """Loads, checks and (when it fits) decodes the training images. Returns `(ImageDataset, datasets.Dataset)`."""
    dataset = load_dataset_from_args(args).select_columns([args.image_column])
    started = time.perf_counter()
    # Non-square images keep their long side when random crops are used; budget for 1.5x.
    approx_mb = len(dataset) * 3 * args.resolution**2 * (1.0 if args.center_crop else 1.5) / 2**20
    mode = args.cache_images_in_memory
    if mode == "always" or (mode == "auto" and approx_mb <= args.max_image_cache_mb):
        arrays = []
        for start in range(0, len(dataset), 512):
            rows = dataset[start : start + 512][args.image_column]
            arrays += [decode_image(e, start + i, args, args.center_crop) for i, e in enumerate(rows)]
        cache = np.stack(arrays) if len({a.shape for a in arrays}) == 1 else arrays
        logger.info(f"decoded {len(arrays)} images into memory in {time.perf_counter() - started:.1f}s")
        return ImageDataset(args, seed, cache=cache), dataset
    if not args.skip_image_check:
        scan_images(dataset, args)
        logger.info(f"checked {len(dataset)} images in {time.perf_counter() - started:.1f}s")
    return ImageDataset(args, seed, dataset=dataset), dataset


def load_validation_images(args: argparse.Namespace, dataset, count: int) -> torch.Tensor:
    """The first `count` images, centre-cropped and unflipped: `(count, 3, R, R)` floats in [0, 1]."""
    column = dataset[: min(count, len(dataset))][args.image_column]
    arrays = [decode_image(entry, row, args, center_crop=True) for row, entry in enumerate(column)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


# ----------------------------------------------------------------------------------------------------------------
# z_sem (latent DDIM and classifier stages)
# ----------------------------------------------------------------------------------------------------------------


def state_dict_fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_dataset(accelerator, encoder, dataset, args, cache_path: Optional[str], batch_size: int) -> torch.Tensor:
    """Encodes every image of `dataset` (centre crop, no flip) with `encoder`: returns `(N, D)` float32 z_sem.

    The work is split between processes and gathered in dataset order. The result is cached in a safetensors
    file whose metadata records the dataset fingerprint, the preprocessing and a hash of the encoder weights, so a
    second run (or the next stage) reuses it only when all of these match.
    """
    from safetensors import safe_open
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
        with safe_open(cache_path, framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                logger.info(f"using cached z_sem from {cache_path}")
                return load_file(cache_path)["z_sem"]
        logger.info(f"cache {cache_path} was made for other data or weights; encoding again")

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
        chunks.append(encoder(x.to(encoder.dtype) / 127.5 - 1).z_sem.float())
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
        logger.info(f"cached z_sem of {n} images in {cache_path}")
    accelerator.wait_for_everyone()
    return z_sem
