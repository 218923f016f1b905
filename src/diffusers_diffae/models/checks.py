"""Input checks shared by the DiffAE networks: each raises a `ValueError` that names the problem."""

from typing import Union

import torch


def check_image_batch(x: torch.Tensor, name: str, channels: int, divisor: int) -> None:
    """Checks a (B, C, H, W) floating tensor whose H and W can be halved `log2(divisor)` times."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got a {x.ndim}-d tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels but the model expects {channels}")
    h, w = x.shape[-2:]
    if h % divisor or w % divisor or h == 0 or w == 0:
        raise ValueError(
            f"{name} has spatial size {h}x{w}, which this model cannot downsample: height and width must be "
            f"positive multiples of {divisor}"
        )


def check_vector_batch(x: torch.Tensor, name: str, width: int, batch_size: int = None) -> None:
    """Checks a (B, D) floating tensor with D == width (and B == batch_size when given)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, {width}), got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"{name} must have shape (B, {width}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if batch_size is not None and x.shape[0] != batch_size:
        raise ValueError(f"batch size mismatch: {name} has {x.shape[0]} rows but sample has batch size {batch_size}")


def timesteps_for_batch(
    timestep: Union[int, float, torch.Tensor], batch_size: int, device: torch.device
) -> torch.Tensor:
    """Turns an int, a 0-d tensor, a (1,) or a (B,) tensor of timesteps (original 0..T-1 scale) into (B,)."""
    if not isinstance(timestep, torch.Tensor):
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
            raise ValueError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        timestep = torch.tensor([timestep], device=device)
    if timestep.ndim == 0:
        timestep = timestep[None]
    if timestep.ndim != 1:
        raise ValueError(f"timestep must be a scalar or a (B,) tensor, got shape {tuple(timestep.shape)}")
    if timestep.shape[0] == 1:
        timestep = timestep.expand(batch_size)
    elif timestep.shape[0] != batch_size:
        raise ValueError(
            f"batch size mismatch: timestep has {timestep.shape[0]} entries but sample has batch size {batch_size}"
        )
    return timestep.to(device)
