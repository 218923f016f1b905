"""Training objectives of Diffusion Autoencoders (paper Eq. 6 and Eq. 9) and the weight average, shared by the
training scripts.

Noise is added with a diffusers scheduler's `add_noise` (`x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`), so any
scheduler config (the official one: linear betas 1e-4..0.02 over 1000 steps) defines the forward process.
"""

from typing import Iterable, Optional

import torch
from diffusers.training_utils import EMAModel

from .models import DiffAEUNet2DModel, LatentMLPDenoiser, SemanticEncoder


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def diffae_loss(
    unet: DiffAEUNet2DModel,
    encoder: Optional[SemanticEncoder],
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    noise_scheduler,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""
    The autoencoder objective (Eq. 6): `|| eps_theta(x_t, t, Enc(x0)) - eps ||^2`, averaged over C, H, W per image
    (official `mean_flat`), then over the batch. The encoder sees the clean image and is trained end to end by
    this loss alone. With `encoder=None` it is the DDIM baseline's objective (the UNet must have no z_sem).

    Args:
        x0 (`torch.Tensor` of shape `(B, C, H, W)`): clean images in [-1, 1].
        timesteps (`torch.Tensor` of shape `(B,)`, integers): uniform in `[0, num_train_timesteps)`.
        noise (`torch.Tensor` of shape `(B, C, H, W)`): standard Gaussian noise.
        noise_scheduler: a diffusers scheduler with `add_noise` (e.g. `DDPMScheduler`).
        reduction (`str`): `"mean"` (a scalar) or `"none"` (shape `(B,)`).
    """
    z_sem = encoder(x0).z_sem if encoder is not None else None
    x_t = noise_scheduler.add_noise(x0, noise, timesteps)
    pred = unet(x_t, timesteps, z_sem).sample
    per_sample = (noise.float() - pred.float()).pow(2).mean(dim=(1, 2, 3))
    return _reduce(per_sample, reduction)


def latent_ddim_loss(
    denoiser: LatentMLPDenoiser,
    z_normalized: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    noise_scheduler,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""
    The latent DDIM objective (Eq. 9 with the official L1 loss): `| eps_omega(z_t, t) - eps |_1`, averaged over
    the D dimensions, then over the batch (official: the constant-0.008 beta schedule).

    Args:
        z_normalized (`torch.Tensor` of shape `(B, D)`): z_sem normalised with the training set's statistics.
        timesteps (`torch.Tensor` of shape `(B,)`, integers): uniform in `[0, num_train_timesteps)`.
        noise (`torch.Tensor` of shape `(B, D)`): standard Gaussian noise.
        noise_scheduler: a diffusers scheduler with `add_noise`.
        reduction (`str`): `"mean"` (a scalar) or `"none"` (shape `(B,)`).
    """
    z_t = noise_scheduler.add_noise(z_normalized, noise, timesteps)
    pred = denoiser(z_t, timesteps).sample
    per_sample = (noise.float() - pred.float()).abs().mean(dim=1)
    return _reduce(per_sample, reduction)


class LerpEMAModel(EMAModel):
    r"""
    diffusers' `EMAModel` whose `foreach` update is one `torch._foreach_lerp_`: `s <- s + (1 - decay) (p - s)` over
    all shadow weights in one pass. `EMAModel`'s own foreach update computes the same `s - (1 - decay) (s - p)` in
    two passes through a temporary copy of every weight, several times slower on a CPU for a large model (the
    numbers are in docs/results/speed_vs_official.md); the two agree up to fp32 rounding. Decay schedule, saving,
    loading and every other method are `EMAModel`'s; without `foreach` it is `EMAModel` unchanged.
    """

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        parameters = list(parameters)
        if not self.foreach:
            return super().step(parameters)
        if len(parameters) != len(self.shadow_params):
            raise ValueError(f"got {len(parameters)} parameters for {len(self.shadow_params)} shadow weights")
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        pairs = list(zip(self.shadow_params, parameters))
        frozen = [(s, p) for s, p in pairs if not p.requires_grad]
        trained = [(s, p) for s, p in pairs if p.requires_grad]
        if frozen:
            torch._foreach_copy_(*map(list, zip(*frozen)))
        if trained:
            torch._foreach_lerp_(*map(list, zip(*trained)), 1 - decay)
