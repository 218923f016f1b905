"""Image helpers shared by the `diffae` command, the evaluation reports and the training scripts.

Images are `(B, C, H, W)` float tensors in [0, 1], the pipeline's `output_type="pt"` convention.
"""

from typing import List, Optional, Sequence

import numpy as np
import PIL.Image
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [0, 1] -> (B, H, W, C) uint8, clamped and rounded to the nearest level."""
    if images.ndim != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got shape {tuple(images.shape)}")
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def _from_array(array: np.ndarray) -> PIL.Image.Image:
    # One channel becomes a greyscale ("L") image, three an RGB one.
    return PIL.Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)


def to_pil(images: torch.Tensor) -> List[PIL.Image.Image]:
    """(B, C, H, W) floats in [0, 1] -> B PIL images."""
    return [_from_array(array) for array in to_uint8(images)]


def image_grid(
    rows: Sequence[torch.Tensor], scale: int = 1, padding: int = 0, num_columns: Optional[int] = None
) -> PIL.Image.Image:
    r"""
    Lays out rows of images as one PIL image: grid row i shows the images of `rows[i]` from left to right.

    Args:
        rows (sequence of `torch.Tensor` of shape `(N_i, C, H, W)`): images in [0, 1], all of the same size.
        scale (`int`): each image is enlarged `scale` times by repeating its pixels (nearest neighbour), so small
            images stay crisp.
        padding (`int`): white pixels between the images and around the grid (not scaled).
        num_columns (`int`, *optional*): images per grid row; defaults to the longest row.

    Returns:
        `PIL.Image.Image` of size `(num_columns * (scale W + padding) + padding, len(rows) * (scale H + padding) +
        padding)`; greyscale when C is 1, else RGB. A flat batch `images` (N, C, H, W) with `nrow` images per row
        is `image_grid(list(images.split(nrow)), padding=2, num_columns=nrow)`.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row")
    if scale < 1 or padding < 0:
        raise ValueError(f"scale must be >= 1 and padding >= 0, got {scale} and {padding}")
    arrays = [to_uint8(row) for row in rows]
    _, h, w, c = arrays[0].shape
    if any(a.shape[1:] != (h, w, c) for a in arrays):
        raise ValueError(f"every image of a grid must have the shape of the first, {(c, h, w)}")
    columns = num_columns if num_columns is not None else max(len(a) for a in arrays)
    if any(len(a) > columns for a in arrays):
        raise ValueError(f"a row holds more than num_columns={columns} images")
    h, w = h * scale, w * scale
    grid = np.full((len(arrays) * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    for i, row in enumerate(arrays):
        for j, image in enumerate(row):
            top, left = padding + i * (h + padding), padding + j * (w + padding)
            grid[top : top + h, left : left + w] = image.repeat(scale, axis=0).repeat(scale, axis=1)
    return _from_array(grid)
