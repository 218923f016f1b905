"""Per-dimension z_sem statistics that travel with the network trained on normalised z_sem."""

import torch
from torch import nn


class ZSemStatisticsMixin:
    """Adds persistent `z_sem_mean` / `z_sem_std` buffers of shape (D,) and the normalisation of paper §4.

    The latent DDIM and the attribute classifiers work on `z_n = (z_sem - mean) / std`, with the mean and the
    unbiased std of the training set's z_sem (official `conds_mean` / `conds_std`). The buffers live in the
    model's state dict, so `save_pretrained` / `from_pretrained` keep them. Fresh models hold mean 0 and std 1.
    """

    def _register_z_sem_statistics(self: nn.Module, dim: int) -> None:
        self.register_buffer("z_sem_mean", torch.zeros(dim))
        self.register_buffer("z_sem_std", torch.ones(dim))

    @torch.no_grad()
    def set_z_sem_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Stores the statistics; accepts (D,) or the official (1, D) shapes."""
        mean, std = torch.as_tensor(mean).reshape(-1), torch.as_tensor(std).reshape(-1)
        dim = self.z_sem_mean.shape[0]
        if mean.shape[0] != dim or std.shape[0] != dim:
            raise ValueError(f"z_sem statistics must have {dim} entries, got mean {mean.shape[0]}, std {std.shape[0]}")
        if not torch.isfinite(mean).all() or not torch.isfinite(std).all() or (std <= 0).any():
            raise ValueError("z_sem statistics must be finite with a strictly positive std")
        self.z_sem_mean.copy_(mean)
        self.z_sem_std.copy_(std)

    def normalize_z_sem(self, z_sem: torch.Tensor) -> torch.Tensor:
        """(B, D) z_sem -> (B, D) normalised z_sem, on z_sem's device and in its dtype (the module may sit elsewhere,
        e.g. offloaded to the CPU)."""
        return (z_sem - self.z_sem_mean.to(z_sem)) / self.z_sem_std.to(z_sem)

    def denormalize_z_sem(self, z_normalized: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised z_sem -> (B, D) z_sem."""
        return z_normalized * self.z_sem_std.to(z_normalized) + self.z_sem_mean.to(z_normalized)
