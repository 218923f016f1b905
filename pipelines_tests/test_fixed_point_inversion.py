"""The per-step solve of exact inversion: with eps held fixed, `invert_step` must return the one x that the
decoder's own DDIM step (with its x0 clipping) maps onto the target, clipped pixels included."""

import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_diffae.schedulers import invert_step


def _decoder(num_inference_steps: int, clip_sample: bool = True) -> DDIMScheduler:
    decoder = DDIMScheduler(
        beta_schedule="linear", clip_sample=clip_sample, set_alpha_to_one=True, timestep_spacing="leading"
    )
    decoder.set_timesteps(num_inference_steps)
    return decoder


@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("step_index", [0, 1, 5, 9])
def test_one_call_inverts_the_step_for_a_fixed_eps(step_index, clip_sample):
    decoder = _decoder(10, clip_sample)
    timestep = int(decoder.timesteps.flip(0)[step_index])
    generator = torch.Generator().manual_seed(step_index)
    eps = torch.randn(2, 3, 8, 8, generator=generator)
    x0 = 3 * torch.rand(2, 3, 8, 8, generator=generator) - 1.5  # a third outside [-1, 1]: clipped at the solution
    alpha_prev = decoder.alphas_cumprod[timestep - 1000 // 10] if step_index > 0 else decoder.final_alpha_cumprod
    target = alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps
    if step_index == 0:
        target = target.clamp(-1, 1)  # the last decoding step outputs the clipped x0: only [-1, 1] is reachable

    x, _ = invert_step(lambda _: eps, decoder, timestep, target, eps=eps, num_iterations=1)

    out = decoder.step(eps, timestep, x, use_clipped_model_output=True)
    assert (out.prev_sample - target).abs().max() < 1e-5
    alpha = decoder.alphas_cumprod[timestep]
    clipped = ((x - (1 - alpha) ** 0.5 * eps) / alpha**0.5).abs() > 1
    if clip_sample and step_index > 0:
        assert 0.2 < clipped.float().mean() < 0.5  # both branches of the step were inverted
