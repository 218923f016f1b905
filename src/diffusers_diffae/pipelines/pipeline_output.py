from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.utils import BaseOutput


@dataclass
class DiffAELatents(BaseOutput):
    """
    The two-part code of Diffusion Autoencoders.

    Args:
        z_sem (`torch.Tensor` of shape `(B, D)`): semantic subcode.
        x_T (`torch.Tensor` of shape `(B, C, H, W)`, *optional*): stochastic subcode (`None` if not computed).
    """

    z_sem: torch.Tensor
    x_T: Optional[torch.Tensor] = None
