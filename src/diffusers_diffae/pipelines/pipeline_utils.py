"""Input checks and scheduler plumbing of `DiffAEPipeline`; each check raises a `ValueError` naming the problem."""

import inspect
import math
import numbers
from typing import Dict, Optional, Union

import torch


def step_kwargs(scheduler, generator, eta: float) -> Dict:
    """The keyword arguments `scheduler.step` takes, for any diffusers scheduler."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "use_clipped_model_output" in params:
        kwargs["use_clipped_model_output"] = True  # official DDIM re-derives eps from the clipped x0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def check_steps(num_inference_steps: int, scheduler) -> None:
    limit = scheduler.config.num_train_timesteps
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
    if not 1 <= num_inference_steps <= limit:
        raise ValueError(
            f"num_inference_steps must be between 1 and {limit} (training steps), got {num_inference_steps}"
        )


def check_finite(name: str, tensor: torch.Tensor) -> None:
    # A NaN code would decode silently into garbage (and a uint8 cast warning), an integer one is a mix-up.
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def shape_of(value) -> Union[tuple, str]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def check_eta(eta: float) -> None:
    # DDIM's sigma_t = eta * sqrt(posterior variance); above 1 the direction term's square root goes negative.
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a number in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}")


def check_edit_inputs(
    strength, target_logit: Optional[float], target_probability: Optional[float], attribute_type: Optional[str]
) -> Optional[float]:
    """Checks an edit's strength or target before any encoding; returns the target as a logit (or `None`).

    `attribute_type` is the classifier head's ("binary" / "continuous"), `None` for a raw direction.
    """
    if target_probability is not None:
        if target_logit is not None:
            raise ValueError("pass either target_logit or target_probability, not both")
        if not 0 < target_probability < 1:
            raise ValueError(f"target_probability must be in (0, 1), got {target_probability}")
        if attribute_type not in (None, "binary"):
            raise ValueError("target_probability needs a binary attribute; use target_logit for continuous heads")
        target_logit = math.log(target_probability / (1 - target_probability))
    if target_logit is not None:
        if not math.isfinite(float(target_logit)):
            raise ValueError(f"target_logit must be finite, got {target_logit}")
        return float(target_logit)
    if isinstance(strength, bool) or not isinstance(strength, (numbers.Real, torch.Tensor)):
        raise ValueError(f"strength must be a number or a (B,) tensor, got {type(strength).__name__}")
    if not torch.isfinite(torch.as_tensor(strength, dtype=torch.float32)).all():
        raise ValueError(f"strength must be finite, got {strength}")
    return None


def check_vectors(name: str, value, width: int) -> None:
    """Checks a finite floating (B, width) tensor."""
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[1] != width:
        raise ValueError(f"{name} must have shape (B, {width}), got {shape_of(value)}")
    if value.shape[0] == 0:
        raise ValueError(f"{name} is empty: it must hold at least one row")
    check_finite(name, value)


def check_codes(z_sem: Optional[torch.Tensor], x_T: Optional[torch.Tensor], width: Optional[int], image_shape) -> None:
    """Checks z_sem (B, width) (`None` when `width` is `None`, a UNet without z_sem) and x_T (B, *image_shape)."""
    if width is None and z_sem is not None:
        raise ValueError("this UNet is a DDIM baseline without z_sem (z_sem_channels=None); pass z_sem=None")
    if width is not None:
        check_vectors("z_sem", z_sem, width)
    if x_T is None:
        return
    if not isinstance(x_T, torch.Tensor) or x_T.ndim != 4 or tuple(x_T.shape[1:]) != tuple(image_shape):
        raise ValueError(f"x_T must have shape (B, {', '.join(map(str, image_shape))}), got {shape_of(x_T)}")
    if z_sem is not None and x_T.shape[0] != z_sem.shape[0]:
        raise ValueError(f"batch size mismatch: z_sem has {z_sem.shape[0]} rows, x_T has {x_T.shape[0]}")
    check_finite("x_T", x_T)


def check_latent_noise(z_noise: Optional[torch.Tensor], batch_size, width: int) -> None:
    """Checks a given latent noise z_noise (B, width), or else the `batch_size` of the noise to draw."""
    if z_noise is None:
        check_count("batch_size", batch_size)
    else:
        check_vectors("z_noise", z_noise, width)


def check_count(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_batch(
    z_sem: Optional[torch.Tensor], x_T: Optional[torch.Tensor], batch_size: Optional[int], generator
) -> int:
    """The batch size that z_sem, else x_T, else `batch_size` fixes; a list of generators must have one per image."""
    if z_sem is not None:
        batch_size = z_sem.shape[0]
    elif x_T is not None:
        batch_size = x_T.shape[0]
    elif batch_size is None:
        raise ValueError("pass x_T or batch_size to fix the batch size")
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
    return batch_size


def check_direction(direction, z_sem_shape) -> torch.Tensor:
    """An edit direction of shape (D,) or one per image (B, D), finite and non-zero; returned as a tensor."""
    direction = torch.as_tensor(direction)
    if direction.shape not in ((z_sem_shape[1],), tuple(z_sem_shape)):
        raise ValueError(
            f"direction must have shape ({z_sem_shape[1]},) or one row per image {tuple(z_sem_shape)}, "
            f"got {tuple(direction.shape)}"
        )
    if not torch.isfinite(direction).all() or (direction.norm(dim=-1) == 0).any():
        raise ValueError("direction must be a finite, non-zero vector (every row, for one per image)")
    return direction


def check_inversion(inversion: str, iterations: int, tolerance: float) -> None:
    if inversion not in ("ddim", "exact"):
        raise ValueError(f"inversion must be 'ddim' or 'exact', got {inversion!r}")
    check_count("inversion_iterations", iterations)
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not tolerance >= 0:
        raise ValueError(f"inversion_tolerance must be a number >= 0, got {tolerance!r}")


def check_decoded(latents: torch.Tensor, z_sem: Optional[torch.Tensor]) -> None:
    """A decode that left finite codes but ends in NaN/inf had codes far outside what the model knows: name them."""
    if not torch.isfinite(latents).all():
        largest = f"; largest |z_sem| is {z_sem.abs().max().item():.3g}" if z_sem is not None else ""
        raise ValueError(
            f"decoding gave non-finite pixels: z_sem or x_T is far outside the model's range{largest} (in edit: "
            "a strength or target_logit far too large)"
        )
