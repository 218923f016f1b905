"""Tiny generated image datasets for the training-script tests.

Each image is a red or blue disc or square of random size and position on a grey background, so the labels have a
real, learnable relation to the pixels: `red` (bool), `circle` (int 0/1), `size` (float radius), `name` (string).
"""

import json
import os
from typing import Dict, List, Tuple

import numpy as np
import PIL.Image


def make_images(n: int, size: int, seed: int = 0) -> Tuple[List[PIL.Image.Image], Dict[str, list]]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels = [], {"red": [], "circle": [], "size": [], "name": []}
    for i in range(n):
        red, circle = bool(rng.random() < 0.5), int(rng.random() < 0.5)
        radius = float(rng.uniform(0.15, 0.35) * size)
        cy, cx = rng.uniform(radius, size - radius, 2)
        if circle:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        else:
            mask = (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius)
        array = np.full((size, size, 3), 128, dtype=np.uint8)
        array[mask] = (220, 40, 40) if red else (40, 40, 220)
        array = np.clip(array.astype(np.int16) + rng.integers(-8, 9, array.shape), 0, 255).astype(np.uint8)
        images.append(PIL.Image.fromarray(array))
        labels["red"].append(red)
        labels["circle"].append(circle)
        labels["size"].append(radius / size)
        labels["name"].append(f"img{i}")
    return images, labels


def write_imagefolder(folder: str, n: int, size: int, seed: int = 0, metadata: bool = True) -> str:
    """PNG files plus a `metadata.jsonl` (label columns for the `imagefolder` builder)."""
    os.makedirs(folder, exist_ok=True)
    images, labels = make_images(n, size, seed)
    rows = []
    for i, image in enumerate(images):
        name = f"{i:04d}.png"
        image.save(os.path.join(folder, name))
        rows.append({"file_name": name, **{k: v[i] for k, v in labels.items()}})
    if metadata:
        with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return folder


def write_saved_dataset(folder: str, n: int, size: int, seed: int = 0, extra_columns: Dict[str, list] = None) -> str:
    """A `Dataset.save_to_disk` folder with an `image` column and the label columns."""
    import datasets

    images, labels = make_images(n, size, seed)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "red": datasets.Value("bool"),
            "circle": datasets.Value("int64"),
            "size": datasets.Value("float32"),
            "name": datasets.Value("string"),
            **{k: datasets.Value("float32") for k in (extra_columns or {})},
        }
    )
    dataset = datasets.Dataset.from_dict({"image": images, **labels, **(extra_columns or {})}, features=features)
    dataset.save_to_disk(folder)
    return folder
