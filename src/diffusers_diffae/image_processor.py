"""Pixel-space image processing for DiffAE pipelines: user images in, model tensors out, and back."""

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor


ImageInput = Union[
    PIL.Image.Image, np.ndarray, torch.Tensor, List[PIL.Image.Image], List[np.ndarray], List[torch.Tensor]
]


class DiffAEImageProcessor(VaeImageProcessor):
    r"""
    diffusers' `VaeImageProcessor` for a model that works on pixels (no VAE, no resize by multiples of 8).

    `postprocess` is diffusers' own (`"pil"`, `"np"`, `"pt"`); `preprocess` accepts what diffusers pipelines accept
    (PIL images, numpy arrays `(H, W, C)` / `(B, H, W, C)` and tensors `(C, H, W)` / `(B, C, H, W)` with values in
    [0, 1], or lists of these) and brings every image to the model resolution as the official preprocessing does
    (`Resize(size)` + `CenterCrop(size)`: the shorter side to `size`, bilinear with antialiasing when shrinking,
    then the centre). This happens without a warning: an image of another size than the model's is encoded as its
    resized and cropped version, and the reconstruction comes back at the model resolution (`resize_notice` words
    it for a user interface; the `diffae` command prints it once per run).

    PIL images of every mode are read as what they show: 16-bit ones (`I;16`, `I`) are scaled from 0..65535, not
    clipped at 255, and transparent pixels (RGBA, LA, palette transparency) are composited on `background`, the
    grey level the model's training images were composited on.

    Args:
        num_channels (`int`): 3 for RGB models, 1 for grayscale ones.
        background (`int`): 0..255 grey level under transparent pixels (255: white).
    """

    def __init__(self, num_channels: int = 3, background: int = 255):
        super().__init__(vae_scale_factor=1, do_resize=False, do_normalize=True)
        self.num_channels = num_channels
        self.background = background

    def preprocess(self, images: ImageInput, resolution: int) -> torch.Tensor:
        """Images -> (B, C, resolution, resolution) float32 tensor in [-1, 1], each of another size resized (shorter
        side to `resolution`) and centre-cropped; a clear `ValueError` otherwise."""
        items = images if isinstance(images, (list, tuple)) else [images]
        if len(items) == 0:
            raise ValueError("no images given")
        batches = [self.to_unit_tensor(item) for item in items]
        if len({tuple(b.shape[1:]) for b in batches}) > 1:
            batches = [resize_center_crop(b, resolution) for b in batches]
        x = torch.cat(batches)
        if x.shape[1] != self.num_channels:
            raise ValueError(f"images have {x.shape[1]} channels but the model expects {self.num_channels}")
        return resize_center_crop(x, resolution) * 2 - 1

    def to_unit_tensor(self, image) -> torch.Tensor:
        """One image or batch -> (B, C, H, W) float32 tensor in [0, 1] on the CPU."""
        if isinstance(image, PIL.Image.Image):
            if min(image.size) < 1:
                raise ValueError(f"images have an unusable size {image.size[::-1]}")
            array = pil_to_array(image, self.num_channels, self.background)
            return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]
        if isinstance(image, np.ndarray):
            if not np.issubdtype(image.dtype, np.floating):
                raise ValueError(
                    f"numpy images must be floats in [0, 1] (diffusers convention), got dtype {image.dtype}; "
                    "convert uint8 arrays with `array / 255` or pass PIL images"
                )
            if image.ndim == 3:
                image = image[None]
            if image.ndim != 4:
                raise ValueError(f"numpy images must have shape (H, W, C) or (B, H, W, C), got {image.shape}")
            tensor = torch.from_numpy(np.ascontiguousarray(image)).float()
            if tensor.shape[-1] not in (1, 3, 4) and tensor.shape[1] in (1, 3, 4):
                tensor = tensor.permute(0, 2, 3, 1)  # a (B, C, H, W) array
            tensor = tensor.permute(0, 3, 1, 2)
        elif isinstance(image, torch.Tensor):
            if not image.is_floating_point():
                raise ValueError(f"image tensors must be floating point in [0, 1], got dtype {image.dtype}")
            tensor = image[None] if image.ndim == 3 else image
            if tensor.ndim != 4:
                raise ValueError(f"image tensors must have shape (C, H, W) or (B, C, H, W), got {tuple(image.shape)}")
            tensor = tensor.detach().float().cpu()
        else:
            raise ValueError(f"unsupported image type {type(image).__name__}; pass PIL images, arrays or tensors")
        if tensor.numel() == 0 or min(tensor.shape[-2:]) < 1:
            raise ValueError(f"images have an unusable size {tuple(tensor.shape[-2:])}")
        if not torch.isfinite(tensor).all():
            raise ValueError("images contain NaN or infinite values")
        lo, hi = tensor.min().item(), tensor.max().item()
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"image values must lie in [0, 1] (diffusers convention), got range [{lo:.3g}, {hi:.3g}]; "
                "for [-1, 1] data pass `(x + 1) / 2`"
            )
        return tensor


def pil_to_array(image: PIL.Image.Image, num_channels: int, background: int = 255) -> np.ndarray:
    """A PIL image of any mode -> (H, W, num_channels) float32 in [0, 1]: 16-bit modes scaled, transparency
    composited on the grey level `background` (0..255)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float32) / 65535.0  # PIL reads 16-bit PNGs as I;16 or I
        array = np.clip(array, 0.0, 1.0)[..., None]
        return np.repeat(array, num_channels, axis=-1) if num_channels == 3 else array
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        flat = PIL.Image.new("RGBA", image.size, (background, background, background, 255))
        image = PIL.Image.alpha_composite(flat, image.convert("RGBA"))
    converted = image.convert("RGB") if num_channels == 3 else image.convert("L")
    return np.asarray(converted, dtype=np.float32).reshape(image.size[1], image.size[0], -1) / 255.0


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): torchvision's `Resize(size)` then `CenterCrop(size)`, on tensors."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if min(h, w) != size:  # the shorter side to `size`, aspect ratio kept
        scale = size / min(h, w)
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=scale < 1, align_corners=False)
        h, w = new_h, new_w
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def resize_notice(sizes: Sequence[Tuple[int, int]], resolution: int) -> Optional[str]:
    """One line saying how many of the images of `(width, height)` `sizes` `preprocess` resizes or crops to
    `resolution` and from which sizes; `None` when all are already `resolution` x `resolution`."""
    other = [size for size in sizes if tuple(size) != (resolution, resolution)]
    if not other:
        return None
    shown = ", ".join(f"{w}x{h}" for w, h in sorted(set(map(tuple, other)))[:4])
    more = ", ..." if len(set(map(tuple, other))) > 4 else ""
    which = "the image is" if len(sizes) == 1 else f"{len(other)} of {len(sizes)} images are"
    return (
        f"{which} not {resolution}x{resolution} ({shown}{more}): resized (shorter side to {resolution}) and "
        f"centre-cropped to the model's {resolution}x{resolution}"
    )
