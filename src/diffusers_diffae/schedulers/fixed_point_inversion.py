"""Exact inversion of DDIM decoding by fixed-point refinement of each step (in the spirit of AIDI / ReNoise).

DDIM inversion approximates the noise at level t by the noise predicted one level lower, so decoding its x_T only
approximately returns the image. Here each step instead solves for the `x` that the decoder's own step maps onto
the lower level, `decoder.step(eps(x, t), t, x).prev_sample == target`. With eps held fixed that step is, pixel by
pixel, a continuous increasing piecewise-affine function of x (slope `sqrt(alpha_bar_prev / alpha_bar_t)` where the
predicted x0 lies inside the clipping range, `sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t))` where it is clipped),
so it has one exact inverse; each network call re-evaluates eps at the new x, and Anderson mixing of the last two
iterates cancels most of the remaining error.
"""

from typing import Callable, Optional, Tuple

import torch
from diffusers import DDIMScheduler


def _alpha_bars(decoder: DDIMScheduler, timestep: int) -> Tuple[float, float]:
    """alpha_bar at `timestep` and at the level the decoder's step from it lands on."""
    previous = timestep - decoder.config.num_train_timesteps // decoder.num_inference_steps
    alpha_prev = decoder.alphas_cumprod[previous] if previous >= 0 else decoder.final_alpha_cumprod
    return float(decoder.alphas_cumprod[timestep]), float(alpha_prev)


def _invert_fixed_eps(decoder: DDIMScheduler, timestep: int, eps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The x with `decoder.step(eps, timestep, x, use_clipped_model_output=True).prev_sample == target` for this
    fixed eps (eta 0): the unclipped branch's solution where its x0 lies inside the clipping range, the clipped
    branch's elsewhere (the step is continuous and increasing in x, so exactly one branch is consistent)."""
    alpha, alpha_prev = _alpha_bars(decoder, timestep)
    a, b, a_prev, b_prev = alpha**0.5, (1 - alpha) ** 0.5, alpha_prev**0.5, (1 - alpha_prev) ** 0.5
    # unclipped: prev = a_prev * x0 + b_prev * eps with x0 = (x - b * eps) / a
    x = (a * target - (a * b_prev - a_prev * b) * eps) / a_prev
    if not decoder.config.clip_sample or b_prev == 0:
        return x  # without clipping, or on the last step (prev = x0, so a target inside the range is never clipped)
    limit = decoder.config.clip_sample_range
    x0 = (x - b * eps) / a
    # clipped at c: eps is re-derived from c, prev = a_prev * c + b_prev * (x - a * c) / b
    c = x0.clamp(-limit, limit)
    clipped = b * (target - a_prev * c) / b_prev + a * c
    return torch.where(x0.abs() > limit, clipped, x)


@torch.no_grad()
def invert_step(
    eps_fn: Callable[[torch.Tensor], torch.Tensor],
    decoder: DDIMScheduler,
    timestep: int,
    target: torch.Tensor,
    eps: Optional[torch.Tensor] = None,
    num_iterations: int = 3,
    tolerance: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""
    Finds x (B, C, H, W) at level `timestep` with `decoder.step(eps_fn(x), timestep, x).prev_sample == target`.

    Args:
        eps_fn: the noise predictor at `timestep`, x -> eps (B, C, H, W).
        decoder: the `DDIMScheduler` that decodes, after `set_timesteps` (eta 0, eps re-derived from the clipped x0
            as the official sampler does).
        target: what this decoding step must output (B, C, H, W); the image itself for the last decoding step.
        eps: a guess of eps at the solution (the previous step's last prediction); `None` evaluates it at `target`,
            which counts as one of the `num_iterations` calls.
        num_iterations (`int`): network calls for this step.
        tolerance (`float`): stop early once the largest |step(x) - target| of the batch is at most this.

    Returns:
        `(x, eps at the last evaluated iterate)`.
    """
    first = 0  # the first iteration; evaluating eps at the target uses up iteration 0
    if eps is None:
        eps, first = eps_fn(target), 1
    x, history = target, None
    exact_pair = first == 1  # whether eps was evaluated at x (a guess is not, so it cannot join the mixing)
    for iteration in range(first, num_iterations + 1):
        if exact_pair and tolerance > 0:
            residual = decoder.step(eps, timestep, x, use_clipped_model_output=True).prev_sample - target
            if residual.abs().max() <= tolerance:
                break  # eps was evaluated at x, so x solves the step within the tolerance
        solved = _invert_fixed_eps(decoder, timestep, eps, target)
        x_next = solved
        if history is not None:
            # Anderson(1): the mix of the last two solutions that cancels the linear part of their residuals.
            f, f_prev = (solved - x).flatten(1), (history[1] - history[0]).flatten(1)
            theta = (f * (f - f_prev)).sum(1) / ((f - f_prev) ** 2).sum(1).clamp_min(1e-30)
            x_next = solved - theta.view(-1, *([1] * (x.ndim - 1))) * (solved - history[1])
        history = (x, solved) if exact_pair else None
        x = x_next
        if iteration == num_iterations:
            break
        eps, exact_pair = eps_fn(x), True
    return x, eps
