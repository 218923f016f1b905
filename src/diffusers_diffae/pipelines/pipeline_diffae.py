"""DiffAEPipeline: §3.2 `encode`, §3.3 `invert`, §3.1 `decode`, §5.2 `interpolate`, §5.3 and Appendix G `edit`,
§4 and §5.6 (latent DDIM, few-shot conditional sampling) `sample_z_sem*` / `__call__`."""

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..image_processor import DiffAEImageProcessor, ImageInput
from ..models import AttributeClassifier, DiffAEUNet2DModel, LatentMLPDenoiser, SemanticEncoder
from ..schedulers import DiffAEInverseScheduler, invert_step
from .denoising import DenoisingLoopMixin, check_chunk_size, chunked, default_chunk_size
from .latent_ops import edit_strength_for_target, move_along, slerp
from .latent_sampling import LatentSamplingMixin
from .loading import DiffAELoadingMixin
from .pipeline_output import DiffAELatents
from .pipeline_utils import (
    check_batch,
    check_codes,
    check_count,
    check_decoded,
    check_direction,
    check_edit_inputs,
    check_eta,
    check_inversion,
    check_steps,
    step_kwargs,
)


class DiffAEPipeline(DiffAELoadingMixin, LatentSamplingMixin, DenoisingLoopMixin, DiffusionPipeline):
    r"""
    Diffusion Autoencoders (Preechakul et al., CVPR 2022): a semantic encoder and a conditional DDIM decoder.

    Args:
        unet ([`DiffAEUNet2DModel`]): the conditional noise predictor (decoder). A UNet without z_sem
            (`z_sem_channels=None`, the paper's DDIM baseline) runs `invert` and `decode` with `z_sem=None`.
        encoder ([`SemanticEncoder`]): image -> z_sem (`None` only for the DDIM baseline).
        scheduler ([`SchedulerMixin`]): the decoding sampler; the official sampler is a `DDIMScheduler` with
            "leading" spacing, offset 0, `set_alpha_to_one=True` and x0 clipped to [-1, 1]. Any diffusers scheduler
            (DPM-Solver++, UniPC, Euler, DDPM, ...) can be swapped in with `from_config`.
        inverse_scheduler ([`DiffAEInverseScheduler`]): drives the stochastic encoder; a `DDIMInverseScheduler`
            (as older folders hold) is turned into one with the same config.
        latent_denoiser ([`LatentMLPDenoiser`], *optional*): the latent DDIM network, needed by `sample`.
        latent_scheduler ([`SchedulerMixin`], *optional*): the latent DDIM sampler (official: constant 0.008 betas).
        classifier ([`AttributeClassifier`], *optional*): linear attribute heads on normalised z_sem, for `edit`
            and conditional `sample`.
        image_background (`int`): 0..255 grey level transparent input pixels are composited on (255: white).
    """

    # every network that runs; the encoder next to the UNet, so encode -> decode offloads it as the UNet loads
    model_cpu_offload_seq = "latent_denoiser->classifier->encoder->unet"
    _optional_components = ["encoder", "latent_denoiser", "latent_scheduler", "classifier"]

    def __init__(
        self,
        unet: DiffAEUNet2DModel,
        encoder: Optional[SemanticEncoder],
        scheduler: SchedulerMixin,
        inverse_scheduler: DiffAEInverseScheduler,
        latent_denoiser: Optional[LatentMLPDenoiser] = None,
        latent_scheduler: Optional[SchedulerMixin] = None,
        classifier: Optional[AttributeClassifier] = None,
        image_background: int = 255,
    ):
        super().__init__()
        inverse_scheduler = DiffAEInverseScheduler.from_inverse_scheduler(inverse_scheduler)
        self.register_modules(
            unet=unet,
            encoder=encoder,
            scheduler=scheduler,
            inverse_scheduler=inverse_scheduler,
            latent_denoiser=latent_denoiser,
            latent_scheduler=latent_scheduler,
            classifier=classifier,
        )
        self.register_to_config(image_background=image_background)
        self.image_processor = DiffAEImageProcessor(unet.config.in_channels, background=image_background)

    @classmethod
    def from_official_configs(cls, configs: Dict, unet, encoder, latent_denoiser=None, classifier=None):
        """Builds the pipeline with schedulers configured like the official samplers (see `presets.py`)."""
        latent_scheduler = DDIMScheduler.from_config(configs["latent_scheduler"]) if latent_denoiser else None
        scheduler = DDIMScheduler.from_config(configs["scheduler"])
        inverse_scheduler = DiffAEInverseScheduler.from_config(configs["scheduler"])
        return cls(unet, encoder, scheduler, inverse_scheduler, latent_denoiser, latent_scheduler, classifier)

    def set_memory_format(self, memory_format: torch.memory_format = torch.channels_last) -> "DiffAEPipeline":
        """Lays out the UNet's and the encoder's 4-D weights in `memory_format` (in place); activations follow.

        `torch.channels_last` (the default of `from_pretrained` from 64 px up) sums fp32 in another order than the
        official layout."""
        if memory_format not in (torch.channels_last, torch.contiguous_format):
            raise ValueError(
                f"memory_format must be torch.channels_last or torch.contiguous_format, got {memory_format}"
            )
        for model in (self.unet, self.encoder):
            if isinstance(model, torch.nn.Module):
                model.to(memory_format=memory_format)
        return self

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size

    @property
    def image_shape(self) -> tuple:
        """(C, H, W) of the images and of x_T."""
        return (self.unet.config.in_channels, self.resolution, self.resolution)

    @property
    def z_sem_width(self) -> Optional[int]:
        """D of z_sem; `None` for a UNet without z_sem (the DDIM baseline)."""
        if self.encoder is not None:
            return self.encoder.config.out_channels
        return self.unet.config.get("z_sem_channels")

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images in [0, 1] -> (B, C, H, W) in [-1, 1] at the model resolution (see `DiffAEImageProcessor`)."""
        return self.image_processor.preprocess(images, self.resolution)

    def _as_latents(self, images_or_latents, num_inference_steps: int) -> DiffAELatents:
        if isinstance(images_or_latents, DiffAELatents):
            if images_or_latents.x_T is None:
                raise ValueError("these latents have no x_T; encode with stochastic=True")
            return images_or_latents
        return self.encode(images_or_latents, num_inference_steps=num_inference_steps)

    @torch.no_grad()
    def encode(
        self,
        images: ImageInput,
        num_inference_steps: int = 100,
        stochastic: bool = True,
        return_dict: bool = True,
        chunk_size: Optional[int] = None,
        **inversion_kwargs,
    ) -> Union[DiffAELatents, tuple]:
        r"""
        Encodes images into the semantic code z_sem and, with `stochastic=True`, the stochastic code x_T.

        Args:
            images: PIL image(s), numpy array(s) or tensor(s) with values in [0, 1] (see [`DiffAEImageProcessor`]).
            num_inference_steps (`int`): DDIM inversion steps (the official notebooks use 250).
            stochastic (`bool`): also run the stochastic encoder (DDIM inversion conditioned on z_sem).
            chunk_size (`int`, *optional*): images per network call (see [`~DiffAEPipeline.invert`]).
            inversion_kwargs: `inversion`, `inversion_iterations`, `inversion_tolerance` and the step callbacks of
                [`~DiffAEPipeline.invert`].

        Returns:
            [`DiffAELatents`] with `z_sem` (B, D) and `x_T` (B, C, H, W) (or `None`), or a tuple.
        """
        if self.encoder is None:
            raise ValueError("encode needs the encoder component; a DDIM baseline inverts with invert(x0, None)")
        check_chunk_size(chunk_size)
        # 1. images -> (B, C, H, W) in [-1, 1]
        x0 = self.preprocess(images).to(device=self._execution_device)
        # 2. semantic encoder
        chunk = chunk_size or default_chunk_size(self.resolution)
        z_sem = chunked(lambda x: self.encoder(x.to(self.encoder.dtype)).z_sem, chunk, x0).to(self.unet.dtype)
        # 3. stochastic encoder
        x_T = None
        if stochastic:
            x_T = self.invert(x0, z_sem, num_inference_steps, chunk_size=chunk, **inversion_kwargs)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (z_sem, x_T)
        return DiffAELatents(z_sem=z_sem, x_T=x_T)

    @torch.no_grad()
    def invert(
        self,
        x0: torch.Tensor,
        z_sem: Optional[torch.Tensor],
        num_inference_steps: int = 100,
        inversion: str = "ddim",
        inversion_iterations: int = 3,
        inversion_tolerance: float = 0.0,
        chunk_size: Optional[int] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> torch.Tensor:
        r"""
        The stochastic encoder (paper Eq. 8): x_T (B, C, H, W) of `x0` (B, C, H, W) in [-1, 1], conditioned on z_sem
        (B, D) (`None` for a UNet without z_sem).

        - `inversion="ddim"`: deterministic DDIM run backwards, exactly as the official `ddim_reverse_sample_loop`
          ([`DiffAEInverseScheduler`]); `num_inference_steps` network calls.
        - `inversion="exact"`: each step solved so that DDIM decoding (`DDIMScheduler` with the inverse scheduler's
          config, the official sampler) at the same `num_inference_steps` returns to `x0` up to its x0 clipping
          (each step by [`~schedulers.fixed_point_inversion.invert_step`]); at most
          `num_inference_steps * inversion_iterations` calls, fewer when every step's residual falls to
          `inversion_tolerance` (pixels in [-1, 1]).

        The UNet sees at most `chunk_size` images per call (default: `default_chunk_size(resolution)`); the result
        does not depend on it. `callback_on_step_end(pipe, i, t, tensors)` runs after each step with the tensors
        named in `callback_on_step_end_tensor_inputs` ("latents": x at the level reached, "z_sem"); an interrupt
        (`pipe._interrupt = True`) returns the x reached so far. x_T is float32 for half-precision UNets (the DDIM
        arithmetic runs in float32; only the UNet computes in its dtype).
        """
        check_steps(num_inference_steps, self.inverse_scheduler)
        check_codes(z_sem, x0, self.z_sem_width, self.image_shape)
        check_inversion(inversion, inversion_iterations, inversion_tolerance)
        check_chunk_size(chunk_size)
        callback, names = callback_on_step_end, callback_on_step_end_tensor_inputs
        names = self._callback_inputs(callback, names, self._callback_tensor_inputs)
        device, dtype = self._execution_device, self.unet.dtype
        z_sem = z_sem.to(device=device, dtype=dtype) if z_sem is not None else None
        state = {"latents": x0.to(device=device, dtype=self._state_dtype(dtype)), "z_sem": z_sem}
        if inversion == "exact":
            decoder = DDIMScheduler.from_config(self.inverse_scheduler.config)
            decoder.set_timesteps(num_inference_steps, device=device)
            eps = None  # each step starts from the previous step's last prediction
            for _, t in self._loop(decoder.timesteps.flip(0), state, callback, names):
                state["latents"], eps = invert_step(
                    lambda x: self._noise(x, t, state["z_sem"], chunk_size), decoder, int(t), state["latents"], eps,
                    inversion_iterations, inversion_tolerance,
                )  # fmt: skip
        else:
            self.inverse_scheduler.set_timesteps(num_inference_steps, device=device)
            for _, t in self._loop(self.inverse_scheduler.timesteps, state, callback, names):
                eps = self._noise(state["latents"], t, state["z_sem"], chunk_size)
                state["latents"] = self.inverse_scheduler.step(eps, t, state["latents"]).prev_sample
        self.maybe_free_model_hooks()
        return state["latents"]

    @torch.no_grad()
    def decode(
        self,
        z_sem: Optional[torch.Tensor],
        x_T: Optional[torch.Tensor] = None,
        num_inference_steps: int = 100,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        batch_size: Optional[int] = None,
        chunk_size: Optional[int] = None,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Decodes `(z_sem, x_T)` into images with the conditional sampler (paper §3.1).

        Args:
            z_sem (`torch.Tensor` of shape `(B, D)`): semantic codes (`None` for a UNet without z_sem).
            x_T (`torch.Tensor` of shape `(B, C, H, W)`, *optional*): stochastic codes; fresh Gaussian noise when
                `None` (then `batch_size` fixes B if z_sem is `None`), which gives the variations of the paper's Fig. 3.
            num_inference_steps (`int`): sampler steps (official notebooks: 20 to reconstruct, 100 to edit).
            generator: `torch.Generator` (or one per image) for the noise.
            eta (`float`): DDIM eta (0 = deterministic, as the paper).
            output_type (`str`): `"pil"`, `"np"` (B, H, W, C) in [0, 1], `"pt"` (B, C, H, W) in [0, 1], or
                `"latent"`, the sampler's x_0 (B, C, H, W) in [-1, 1].
            callback_on_step_end: `fn(pipe, step, timestep, tensors) -> dict`, called after each step with the
                tensors named in `callback_on_step_end_tensor_inputs` ("latents": x_t, "z_sem"); the returned ones
                replace them. `pipe._interrupt = True` skips the remaining steps.
            chunk_size (`int`, *optional*): images per UNet call (default `default_chunk_size(resolution)`).

        Returns:
            [`~diffusers.ImagePipelineOutput`] or `(images,)`.
        """
        # 1. check inputs
        check_steps(num_inference_steps, self.scheduler)
        check_codes(z_sem, x_T, self.z_sem_width, self.image_shape)
        check_eta(eta)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        callback, names = callback_on_step_end, callback_on_step_end_tensor_inputs
        names = self._callback_inputs(callback, names, self._callback_tensor_inputs)
        check_chunk_size(chunk_size)
        batch_size = check_batch(z_sem, x_T, batch_size, generator)
        device, dtype = self._execution_device, self.unet.dtype
        z_sem = z_sem.to(device=device, dtype=dtype) if z_sem is not None else None

        # 2. prepare x_T; the DDIM state stays float32 for half-precision UNets
        state_dtype = self._state_dtype(dtype)
        if x_T is None:
            x_T = randn_tensor((batch_size, *self.image_shape), generator=generator, device=device, dtype=state_dtype)
        state = {"latents": x_T.to(device=device, dtype=state_dtype) * self.scheduler.init_noise_sigma, "z_sem": z_sem}

        # 3. denoising loop
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        kwargs = step_kwargs(self.scheduler, generator, eta)
        for _, t in self._loop(self.scheduler.timesteps, state, callback, names):
            eps = self._noise(self.scheduler.scale_model_input(state["latents"], t), t, state["z_sem"], chunk_size)
            state["latents"] = self.scheduler.step(eps, t, state["latents"], **kwargs).prev_sample

        # 4. post-process
        latents = state["latents"]
        check_decoded(latents, state["z_sem"])
        images = latents if output_type == "latent" else self.image_processor.postprocess(latents.float(), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @torch.no_grad()
    def interpolate(
        self,
        a: Union[ImageInput, DiffAELatents],
        b: Union[ImageInput, DiffAELatents],
        num_frames: int = 10,
        num_inference_steps: int = 20,
        encode_num_inference_steps: int = 100,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Interpolates between two images (or their latents): lerp on z_sem, slerp on x_T, `alpha = linspace(0, 1)`.

        Args:
            a, b: images or [`DiffAELatents`] with the same batch size B.
            num_frames (`int`): frames per pair, endpoints included.
            num_inference_steps (`int`): decoding steps (official notebook: 20).
            encode_num_inference_steps (`int`): inversion steps when images are given.

        Returns:
            [`~diffusers.ImagePipelineOutput`] with B * num_frames images, pair after pair.
        """
        check_count("num_frames", num_frames, minimum=2)
        la = self._as_latents(a, encode_num_inference_steps)
        lb = self._as_latents(b, encode_num_inference_steps)
        if la.z_sem.shape != lb.z_sem.shape:
            raise ValueError(f"batch size mismatch: a has {la.z_sem.shape[0]} items, b has {lb.z_sem.shape[0]}")
        alpha = torch.linspace(0, 1, num_frames, device=la.z_sem.device)
        z = torch.lerp(la.z_sem[:, None], lb.z_sem[:, None], alpha[None, :, None].to(la.z_sem.dtype))
        x_T = slerp(la.x_T, lb.x_T, alpha)
        return self.decode(
            z.flatten(0, 1), x_T.flatten(0, 1), num_inference_steps, output_type=output_type, return_dict=return_dict
        )

    @torch.no_grad()
    def edit(
        self,
        images_or_latents: Union[ImageInput, DiffAELatents],
        attribute: Optional[Union[str, int]] = None,
        strength: Union[float, torch.Tensor] = 0.3,
        direction: Optional[torch.Tensor] = None,
        target_logit: Optional[float] = None,
        target_probability: Optional[float] = None,
        num_inference_steps: int = 100,
        encode_num_inference_steps: int = 100,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Moves normalised z_sem along an attribute direction and decodes with the image's own x_T:
        `z_n' = z_n + strength * sqrt(D) * w / |w|` (official manipulation; the notebook uses strength 0.3).

        Args:
            images_or_latents: images, or [`DiffAELatents`] from `encode`.
            attribute (`str` or `int`): an output of `classifier` (binary logit or continuous regression head).
            strength (`float` or `(B,)` tensor): alpha; negative values move away from the attribute.
            direction (`torch.Tensor` of shape `(D,)` or `(B, D)`, *optional*): a raw direction in normalised z_sem
                space (or one per image), used instead of a classifier head (normalised with the classifier's
                statistics if there is a classifier, else with the encoder's).
            target_logit (`float`, *optional*): instead of `strength`, pick a per-image alpha so that every edited
                code reaches this head output (Eq. 11); for continuous heads it is the target value.
            target_probability (`float`, *optional*): the same as a probability for binary heads.

        Returns:
            [`~diffusers.ImagePipelineOutput`] with one edited image per input.
        """
        # 1. check what can be checked before the (expensive) encode
        attribute_type = None
        if direction is None and self.classifier is not None and attribute is not None:
            attribute_type = self.classifier.attribute_type(attribute)
        target_logit = check_edit_inputs(strength, target_logit, target_probability, attribute_type)

        # 2. codes
        latents = self._as_latents(images_or_latents, encode_num_inference_steps)
        z_sem = latents.z_sem

        # 3. the direction w in normalised z_sem space, the head's bias, and the statistics that normalise z_sem
        if direction is None:
            if self.classifier is None:
                raise ValueError("edit needs a classifier component (with an attribute name) or a direction vector")
            if attribute is None:
                raise ValueError(
                    f"name the attribute to edit; the classifier knows: {', '.join(self.classifier.attribute_names)}"
                )
            stats, w = self.classifier, self.classifier.direction(attribute)
            bias = self.classifier.linear.bias[self.classifier.attribute_index(attribute)]
        else:
            direction = check_direction(direction, z_sem.shape)
            stats, w, bias = (self.classifier or self.encoder), direction, torch.zeros(())
        w = w.to(device=z_sem.device, dtype=torch.float32)
        z_n = stats.normalize_z_sem(z_sem.float())

        # 4. alpha: given, or per image so that the head reaches target_logit (Eq. 11)
        if target_logit is not None:
            logit = (z_n * w).sum(-1) + bias.to(w.device).float()
            alpha = edit_strength_for_target(logit, w, float(target_logit))
        else:
            alpha = torch.as_tensor(strength, dtype=torch.float32, device=z_sem.device).reshape(-1)
            if alpha.numel() not in (1, z_sem.shape[0]):
                raise ValueError(f"strength must be a number or have one value per image ({z_sem.shape[0]})")

        # 5. move and decode with the image's own x_T
        edited = stats.denormalize_z_sem(move_along(z_n, alpha, w)).to(z_sem.dtype)
        return self.decode(edited, latents.x_T, num_inference_steps, output_type=output_type, return_dict=return_dict)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 20,
        latent_num_inference_steps: int = 20,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        attribute: Optional[Union[str, int]] = None,
        min_probability: float = 0.5,
        z_noise: Optional[torch.Tensor] = None,
        x_T: Optional[torch.Tensor] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        latent_callback_on_step_end: Optional[Callable] = None,
        latent_callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Unconditional sampling (paper §4): latent DDIM on normalised z_sem, de-normalise, decode from fresh x_T.
        With `attribute`, conditional sampling by rejection with the classifier (paper §5.6).

        Args:
            batch_size (`int`): number of images.
            num_inference_steps (`int`): image sampler steps.
            latent_num_inference_steps (`int`): latent DDIM steps.
            generator: `torch.Generator` (or one per image).
            attribute (`str`, *optional*): a binary classifier head to condition on.
            min_probability (`float`): rejection threshold (paper: 0.5).
            z_noise (`(B, D)`, *optional*) / x_T (`(B, C, H, W)`, *optional*): fixed starting noise.
            callback_on_step_end / latent_callback_on_step_end: step callbacks of the image loop (see `decode`) and
                of the latent DDIM loop (see `sample_z_sem`), as diffusers' combined pipelines name them.

        Returns:
            [`~diffusers.ImagePipelineOutput`] or `(images,)`.
        """
        check_count("batch_size", batch_size)
        self._callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        latent_callbacks = dict(
            callback_on_step_end=latent_callback_on_step_end,
            callback_on_step_end_tensor_inputs=latent_callback_on_step_end_tensor_inputs,
        )
        if attribute is not None:
            if isinstance(generator, list):
                raise ValueError("conditional sampling takes a single generator")
            z_sem = self.sample_z_sem_with_attribute(
                batch_size, attribute, min_probability, latent_num_inference_steps, generator, **latent_callbacks
            )
        else:
            check_batch(None, None, batch_size, generator)
            # One generator per image draws that image's z_noise and then its x_T: each image reproduces alone.
            z_sem = self.sample_z_sem(batch_size, latent_num_inference_steps, generator, z_noise, **latent_callbacks)
        return self.decode(
            z_sem.to(self.unet.dtype), x_T, num_inference_steps, generator=generator, eta=eta, output_type=output_type,
            return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )  # fmt: skip

    sample = __call__
