"""Operations on DiffAE codes, one small function per quantity of the paper."""

import math
from typing import Callable

import torch
import torch.nn.functional as F


def slerp(x0: torch.Tensor, x1: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of flattened noise maps (paper §5.2, official `interpolate.ipynb`).

    `theta = arccos(<x0/|x0|, x1/|x1|>)`, `x(a) = (sin((1-a) theta) x0 + sin(a theta) x1) / sin(theta)`.
    x0, x1: (B, ...); alpha: (F,). Returns (B, F, ...).
    """
    a, b = x0.flatten(1).double(), x1.flatten(1).double()
    cos = (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).clamp(-1, 1)
    theta = torch.arccos(cos)[:, None]  # (B, 1)
    alpha = alpha.double()[None, :]  # (1, F)
    sin_theta = torch.sin(theta)
    parallel = sin_theta.abs() < 1e-6  # identical directions: slerp degenerates to lerp
    w0 = torch.where(parallel, 1 - alpha, torch.sin((1 - alpha) * theta) / sin_theta.clamp_min(1e-12))
    w1 = torch.where(parallel, alpha, torch.sin(alpha * theta) / sin_theta.clamp_min(1e-12))
    out = w0[..., None] * a[:, None] + w1[..., None] * b[:, None]
    return out.reshape(x0.shape[0], alpha.shape[1], *x0.shape[1:]).to(x0.dtype)


def move_along(z_normalized: torch.Tensor, alpha: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The attribute edit (Appendix G): `z_n + alpha * sqrt(D) * w / |w|`.

    z_normalized: (B, D); alpha: (B,) or (1,); w: (D,) or one direction per image (B, D). Returns (B, D).
    """
    return z_normalized + alpha[:, None] * math.sqrt(w.shape[-1]) * w / w.norm(dim=-1, keepdim=True)


def edit_strength_for_target(logit: torch.Tensor, w: torch.Tensor, target: float) -> torch.Tensor:
    """Per-image strength alpha such that the edited code reaches `target` (paper Appendix G, Eq. 11).

    The edit is `z_n + alpha * sqrt(D) * w / |w|`; the linear head gives `logit + alpha * sqrt(D) * |w|`, so
    `alpha = (target - logit) / (sqrt(D) * |w|)`. logit: (B,), w: (D,) or one direction per image (B, D). Returns (B,).
    """
    return (target - logit) / (math.sqrt(w.shape[-1]) * w.norm(dim=-1))


def rejection_sample(
    draw: Callable[[int], torch.Tensor],
    probability: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    min_probability: float,
    max_candidates: int,
    generator=None,
    name: str = "the attribute",
) -> torch.Tensor:
    """Rejection sampling of paper §5.6 (following D2C): a candidate with classifier probability p is kept when
    `p >= min_probability` and then with probability p.

    `draw(n)` returns n candidates (n, D), `probability(z)` their p (n,). Draws in chunks of at least 16 until
    `batch_size` are kept or `max_candidates` are drawn. Returns (batch_size, D); a `ValueError` when fewer are kept.
    """
    if not 0 <= min_probability < 1:
        raise ValueError(f"min_probability must be in [0, 1), got {min_probability}")
    accepted, drawn = [], 0
    chunk = max(batch_size, 16)
    while sum(len(a) for a in accepted) < batch_size and drawn < max_candidates:
        n = min(chunk, max_candidates - drawn)
        z = draw(n)
        p = probability(z)
        u = torch.rand(n, generator=generator, device=generator.device if generator else "cpu").to(p.device)
        accepted.append(z[(p >= min_probability) & (u < p)])
        drawn += n
    z = torch.cat(accepted)
    if z.shape[0] < batch_size:
        raise ValueError(
            f"rejection sampling accepted {z.shape[0]} of {drawn} candidates for {name} (rate {z.shape[0] / drawn:.2%}); "
            f"cannot reach {batch_size} samples. Lower min_probability, raise max_candidates, or check the classifier"
        )
    return z[:batch_size]
