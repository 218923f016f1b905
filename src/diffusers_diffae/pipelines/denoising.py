"""What every denoising loop of `DiffAEPipeline` shares: diffusers' step callbacks (`callback_on_step_end`), the
`interrupt` and `num_timesteps` properties, and network calls on chunks of a large batch."""

from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback


# Pixels per network call when `chunk_size` is not given: 256 images at 32 px, 64 at 64 px, 4 at 256 px.
CHUNK_PIXELS = 64 * 64 * 64


def default_chunk_size(resolution: int) -> int:
    """Images per network call for `chunk_size=None`: `CHUNK_PIXELS` pixels, at least one image."""
    return max(1, CHUNK_PIXELS // (resolution * resolution))


def check_chunk_size(chunk_size: Optional[int]) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def chunked(fn: Callable[..., torch.Tensor], chunk_size: int, *batched: Optional[torch.Tensor]) -> torch.Tensor:
    """`fn(*batched)` computed on slices of at most `chunk_size` rows (dim 0) and concatenated.

    `None` arguments pass through unchanged. Every network here is per-image (GroupNorm, no batch statistics), so a
    chunked call gives the unchunked result while holding only one chunk's activations.
    """
    size = next(t.shape[0] for t in batched if t is not None)
    if size <= chunk_size:
        return fn(*batched)
    parts = []
    for start in range(0, size, chunk_size):
        parts.append(fn(*(t[start : start + chunk_size] if t is not None else None for t in batched)))
    return torch.cat(parts)


class DenoisingLoopMixin:
    """Step callbacks, interruption and step count for the pipeline's loops (encode's inversion, decode, the
    latent DDIM of `sample_z_sem`), as diffusers' pipelines have them.

    A callback is `fn(pipe, step_index, timestep, tensors) -> dict` (or a `diffusers.callbacks.PipelineCallback`);
    `tensors` holds the names asked for in `callback_on_step_end_tensor_inputs`, and the tensors it returns replace
    the loop's. Setting `pipe._interrupt = True` (from a callback) skips the remaining steps of the running loop,
    which then returns its current state; each loop starts uninterrupted.
    """

    # image loops (invert, decode): "latents" is x at the current noise level, "z_sem" the semantic code
    _callback_tensor_inputs = ["latents", "z_sem"]
    # the latent DDIM loop (sample_z_sem): "latents" is the normalised z_sem being denoised
    _latent_callback_tensor_inputs = ["latents"]

    @property
    def num_timesteps(self) -> int:
        """Steps of the last denoising loop."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Whether the running loop was asked to stop (`pipe._interrupt = True`)."""
        return getattr(self, "_interrupt", False)

    @staticmethod
    def _callback_inputs(callback, tensor_inputs: Sequence[str], allowed: List[str]) -> List[str]:
        """The tensor names the callback receives, checked against those the loop offers (before any compute)."""
        if callback is not None and not callable(callback):
            raise ValueError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        if isinstance(tensor_inputs, str) or not set(tensor_inputs) <= set(allowed):
            raise ValueError(f"callback_on_step_end_tensor_inputs must be a subset of {allowed}, got {tensor_inputs}")
        return list(tensor_inputs)

    def _loop(
        self,
        timesteps: torch.Tensor,
        state: Dict[str, Optional[torch.Tensor]],
        callback: Optional[Callable],
        tensor_inputs: Sequence[str],
    ) -> Iterator:
        """Yields `(i, t)` for each step; the caller's body updates `state` in place, then the callback runs.

        Stops yielding once `interrupt` is set (the progress bar still completes, as in diffusers).
        """
        self._interrupt = False
        self._num_timesteps = len(timesteps)
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            yield i, t
            if callback is not None:
                outputs = callback(self, i, t, {name: state[name] for name in tensor_inputs})
                for name in state:
                    state[name] = outputs.pop(name, state[name])

    @staticmethod
    def _state_dtype(model_dtype: torch.dtype) -> torch.dtype:
        """The dtype of a loop's state: float32 for half-precision models, so the DDIM arithmetic stays float32."""
        return torch.promote_types(model_dtype, torch.float32)

    def _noise(self, x: torch.Tensor, t, z_sem: Optional[torch.Tensor], chunk_size: Optional[int]) -> torch.Tensor:
        """The UNet's eps (B, C, H, W) for x (B, C, H, W) at timestep t, computed in the UNet's dtype in chunks of
        `chunk_size` images (`None`: `default_chunk_size` of the pipeline's resolution), returned in x's dtype."""
        chunk_size = chunk_size or default_chunk_size(self.resolution)
        dtype = self.unet.dtype
        return chunked(lambda x_, z_: self.unet(x_.to(dtype), t, z_).sample, chunk_size, x, z_sem).to(x.dtype)
