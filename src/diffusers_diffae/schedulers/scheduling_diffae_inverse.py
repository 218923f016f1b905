"""The stochastic encoder's update rule (paper §3.3, Eq. 8) as a diffusers scheduler."""

import torch
from diffusers import DDIMInverseScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers' loader needs it here)


class DiffAEInverseScheduler(DDIMInverseScheduler):
    r"""
    Deterministic DDIM inversion exactly as the official `ddim_reverse_sample_loop` runs it.

    It takes the same config as [`~diffusers.DDIMInverseScheduler`] (and loads from any DDIM scheduler config with
    `from_config`) and differs from it in three ways, each the official code's:

    - `step(model_output, t, sample)` takes the level `t` at which `sample` lies and the model was evaluated (first
      `t = 0`, the clean image) and moves it to the next level; `DDIMInverseScheduler.step` takes the target level.
    - With `clip_sample=True`, x0 is clipped and eps re-derived from the clipped x0 before the update, in the
      official arrangement of the arithmetic (it matters at t = 0, where `sqrt(1 / alpha_bar - 1) = 0.01`).
    - The step from the last level goes to `alpha_bar = 0`, so x_T is the re-derived eps of that level.

    The loop is then the plain diffusers one:

    ```py
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, z_sem).sample, t, x).prev_sample
    ```
    """

    @classmethod
    def from_inverse_scheduler(cls, scheduler: DDIMInverseScheduler) -> "DiffAEInverseScheduler":
        """`scheduler` itself if it is one, else one with its config (folders written before this class existed)."""
        if isinstance(scheduler, cls):
            return scheduler
        if not isinstance(scheduler, DDIMInverseScheduler):
            raise ValueError(f"inverse_scheduler must be a DiffAEInverseScheduler, got {type(scheduler).__name__}")
        return cls.from_config(scheduler.config)

    def clipped_epsilon(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """eps re-derived from the clipped x0 of `sample` (B, C, H, W) at level `timestep`, in the official order.

        Official `p_mean_variance`: `x0 = sqrt(1/a) x - sqrt(1/a - 1) eps`, clipped, then
        `eps = (sqrt(1/a) x - x0) / sqrt(1/a - 1)`, with the coefficients in float64 cast to float32.
        """
        alpha_bar = torch.cumprod(1 - self.betas.double(), dim=0)[int(timestep)]
        recip = torch.sqrt(1 / alpha_bar).float().to(sample.device)
        recip_m1 = torch.sqrt(1 / alpha_bar - 1).float().to(sample.device)
        limit = self.config.clip_sample_range
        x32, eps32 = sample.float(), model_output.float()
        x0 = (recip * x32 - recip_m1 * eps32).clamp(-limit, limit)
        return ((recip * x32 - x0) / recip_m1).to(model_output.dtype)

    def step(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, return_dict: bool = True
    ) -> DDIMSchedulerOutput | tuple:
        """Moves `sample` (B, C, H, W) from level `timestep` to the next level of `self.timesteps`."""
        if self.config.prediction_type != "epsilon":
            raise ValueError(
                f"DiffAEInverseScheduler needs prediction_type='epsilon', got {self.config.prediction_type!r}"
            )
        eps = model_output
        if self.config.clip_sample:
            # The parent clips x0 but keeps the raw eps; the official code re-derives eps from the clipped x0. Handed
            # that eps, the parent's own clip is a no-op.
            eps = self.clipped_epsilon(model_output, timestep, sample)
        if int(timestep) == int(self.timesteps[-1]):
            # x_T = sqrt(0) * x0 + sqrt(1 - 0) * eps: the official last step, which the parent cannot express.
            output = DDIMSchedulerOutput(prev_sample=eps, pred_original_sample=None)
        else:
            target = int(timestep) + self.config.num_train_timesteps // self.num_inference_steps
            output = super().step(eps, target, sample)
        return output if return_dict else (output.prev_sample, output.pred_original_sample)
