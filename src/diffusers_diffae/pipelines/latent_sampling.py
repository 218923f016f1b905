"""The latent DDIM of Diffusion Autoencoders (paper §4) and conditional sampling by rejection (paper §5.6)."""

from typing import Callable, List, Optional, Sequence, Union

import torch
from diffusers.utils.torch_utils import randn_tensor

from .latent_ops import rejection_sample
from .pipeline_utils import check_count, check_latent_noise, check_steps, step_kwargs


class LatentSamplingMixin:
    """`sample_z_sem` and `sample_z_sem_with_attribute` of `DiffAEPipeline`: semantic codes from the
    `latent_denoiser` / `latent_scheduler` components, filtered by the `classifier` for conditional sampling."""

    @torch.no_grad()
    def sample_z_sem(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 20,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        z_noise: Optional[torch.Tensor] = None,
        return_normalized: bool = False,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> torch.Tensor:
        r"""
        Samples semantic codes with the latent DDIM: DDIM on normalised z_sem from `z_noise` (B, D) (fresh Gaussian
        noise when `None`), then de-normalised with the latent denoiser's statistics. Returns (B, D) z_sem, or the
        normalised codes with `return_normalized=True`. The step callback sees "latents", the normalised (B, D)
        codes being denoised.
        """
        if self.latent_denoiser is None or self.latent_scheduler is None:
            raise ValueError("sampling needs the latent_denoiser and latent_scheduler components (a *_latent model)")
        check_steps(num_inference_steps, self.latent_scheduler)
        callback, names = callback_on_step_end, callback_on_step_end_tensor_inputs
        names = self._callback_inputs(callback, names, self._latent_callback_tensor_inputs)
        device, dtype = self._execution_device, self.latent_denoiser.dtype
        state_dtype = self._state_dtype(dtype)  # the DDIM state stays float32 for a half-precision denoiser
        width = self.latent_denoiser.config.num_channels
        check_latent_noise(z_noise, batch_size, width)
        if z_noise is None:
            z_noise = randn_tensor((batch_size, width), generator=generator, device=device, dtype=state_dtype)
        state = {"latents": z_noise.to(device=device, dtype=state_dtype) * self.latent_scheduler.init_noise_sigma}
        self.latent_scheduler.set_timesteps(num_inference_steps, device=device)
        kwargs = step_kwargs(self.latent_scheduler, generator, 0.0)
        for _, t in self._loop(self.latent_scheduler.timesteps, state, callback, names):
            z_t = self.latent_scheduler.scale_model_input(state["latents"], t).to(dtype)
            eps = self.latent_denoiser(z_t, t).sample.to(state_dtype)
            state["latents"] = self.latent_scheduler.step(eps, t, state["latents"], **kwargs).prev_sample
        z = state["latents"]
        z = z if return_normalized else self.latent_denoiser.denormalize_z_sem(z)
        self.maybe_free_model_hooks()
        return z

    @torch.no_grad()
    def sample_z_sem_with_attribute(
        self,
        batch_size: int,
        attribute: Union[str, int],
        min_probability: float = 0.5,
        num_inference_steps: int = 20,
        generator: Optional[torch.Generator] = None,
        max_candidates: Optional[int] = None,
        **latent_callbacks,
    ) -> torch.Tensor:
        r"""
        Conditional sampling by rejection (paper §5.6, following D2C): draw z_sem from the latent DDIM, reject
        candidates whose classifier probability p is below `min_probability` (0.5 in the paper), then accept each
        remaining one with probability p. Returns (batch_size, D) z_sem. Raises a `ValueError` when fewer than
        `batch_size` are accepted among `max_candidates` (default `200 * batch_size`) draws. `latent_callbacks`
        (the step callbacks of `sample_z_sem`) run in every latent DDIM run.
        """
        if self.classifier is None:
            raise ValueError("conditional sampling needs a classifier component")
        index = self.classifier.attribute_index(attribute)
        if self.classifier.attribute_type(index) != "binary":
            raise ValueError(f"attribute {attribute!r} is a continuous head; rejection sampling needs a binary one")
        check_count("batch_size", batch_size)
        if max_candidates is not None:
            check_count("max_candidates", max_candidates)
        z_sem = rejection_sample(
            draw=lambda n: self.sample_z_sem(n, num_inference_steps, generator=generator, **latent_callbacks),
            probability=lambda z: torch.sigmoid(self.classifier(z.float()).logits[:, index]),
            batch_size=batch_size,
            min_probability=min_probability,
            max_candidates=max_candidates or 200 * batch_size,
            generator=generator,
            name=repr(attribute),
        )
        self.maybe_free_model_hooks()
        return z_sem
