"""DDIM inversion and decoding for any noise predictor, with or without z_sem (the DDIM baseline).

`DiffAEPipeline.invert` / `denoise` need a semantic code, so the paper's DDIM baseline (the same UNet trained
without z_sem, `z_sem_channels=None`) cannot run through them. These two loops are the same algorithms, step for
step, with `z_sem` optional; with a z_sem they reproduce the pipeline's outputs (tested), which keeps the DiffAE and
baseline numbers of the evaluation comparable.
"""

from typing import List, Optional, Union

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..pipelines.pipeline_diffae import DiffAEPipeline


def _check_unet_condition(unet, z_sem: Optional[torch.Tensor]) -> None:
    wants = unet.config.z_sem_channels
    if wants is None and z_sem is not None:
        raise ValueError("this UNet is a DDIM baseline without z_sem (z_sem_channels=None); pass z_sem=None")
    if wants is not None and z_sem is None:
        raise ValueError(f"this UNet is conditioned on z_sem; pass z_sem of shape (B, {wants})")


@torch.no_grad()
def ddim_invert(
    unet, inverse_scheduler, x0: torch.Tensor, z_sem: Optional[torch.Tensor], num_inference_steps: int
) -> torch.Tensor:
    r"""
    Deterministic DDIM inversion of `x0` (B, C, H, W) in [-1, 1] (the stochastic encoder, paper Eq. 8), as
    `DiffAEPipeline.invert`: the model is evaluated at the current level, x0 is clipped and eps re-derived when the
    scheduler clips, and the last step goes to alpha_bar = 0. Returns x_T (B, C, H, W).
    """
    _check_unet_condition(unet, z_sem)
    if not 1 <= num_inference_steps <= inverse_scheduler.config.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, {inverse_scheduler.config.num_train_timesteps}], got {num_inference_steps}"
        )
    device, dtype = unet.device, unet.dtype
    x = x0.to(device=device, dtype=dtype)
    z_sem = z_sem.to(device=device, dtype=dtype) if z_sem is not None else None
    inverse_scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = inverse_scheduler.timesteps
    for i, t in enumerate(timesteps):
        eps = unet(x, t, z_sem).sample
        if inverse_scheduler.config.clip_sample:
            eps = DiffAEPipeline._eps_from_clipped_x0(x, eps, t, inverse_scheduler)
        if i + 1 < len(timesteps):
            x = inverse_scheduler.step(eps, timesteps[i + 1], x).prev_sample
        else:
            x = eps  # official last step to alpha_bar = 0 (see DiffAEPipeline.invert)
    return x


@torch.no_grad()
def ddim_decode(
    unet,
    scheduler,
    x_T: Optional[torch.Tensor],
    z_sem: Optional[torch.Tensor],
    num_inference_steps: int,
    batch_size: Optional[int] = None,
    generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
) -> torch.Tensor:
    r"""
    Runs `scheduler` from x_T (B, C, H, W) (fresh noise from `generator` when `None`, then `batch_size` is needed
    unless z_sem gives it), as `DiffAEPipeline.denoise` with eta 0. Returns x_0 (B, C, H, W) in [-1, 1].
    """
    _check_unet_condition(unet, z_sem)
    device, dtype = unet.device, unet.dtype
    if x_T is None:
        size = unet.config.sample_size
        batch = batch_size if batch_size is not None else (z_sem.shape[0] if z_sem is not None else None)
        if batch is None:
            raise ValueError("pass x_T, z_sem or batch_size to fix the batch size")
        x_T = randn_tensor(
            (batch, unet.config.in_channels, size, size), generator=generator, device=device, dtype=dtype
        )
    latents = x_T.to(device=device, dtype=dtype) * scheduler.init_noise_sigma
    z_sem = z_sem.to(device=device, dtype=dtype) if z_sem is not None else None
    scheduler.set_timesteps(num_inference_steps, device=device)
    step_kwargs = DiffAEPipeline._step_kwargs(scheduler, generator, 0.0)
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(latents, t), t, z_sem).sample
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    return latents
