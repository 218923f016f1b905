"""The semantic encoder of Diffusion Autoencoders (paper §3.2; Appendix A, Table 5)."""

from dataclasses import dataclass
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .blocks import DiffAEMidBlock2D, contracting_path, normalization
from .checks import check_image_batch
from .statistics import ZSemStatisticsMixin


@dataclass
class SemanticEncoderOutput(BaseOutput):
    """
    Args:
        z_sem (`torch.Tensor` of shape `(B, out_channels)`): the semantic code.
    """

    z_sem: torch.Tensor


class SemanticEncoder(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin, ZSemStatisticsMixin):
    r"""
    Maps an image in [-1, 1] to the semantic code `z_sem` (official `BeatGANsEncoderModel`, pool
    `adaptivenonzero`): the contracting half of a UNet with unconditioned residual blocks, a bottleneck, then
    `GroupNorm -> SiLU -> global average pool -> linear`. z_sem is unbounded (no tanh, no normalisation).

    The model also stores the training set's z_sem statistics (`z_sem_mean`, `z_sem_std`; official `latent.pkl`)
    for tools that need normalised codes.

    Parameters:
        sample_size (`int`, defaults to 64): training resolution; attention placement is decided from it.
        in_channels (`int`, defaults to 3): image channels.
        model_channels (`int`, defaults to 64): base width; level `l` has `model_channels * channel_mult[l]`.
        channel_mult (`Tuple[int]`, defaults to `(1, 2, 4, 8, 8)`): one more level than the decoder officially.
        num_res_blocks (`int`, defaults to 2): residual blocks per level.
        attention_resolutions (`Tuple[int]`, defaults to `(16,)`): resolutions with self-attention.
        num_heads (`int`, defaults to 1): attention heads.
        out_channels (`int`, defaults to 512): width of z_sem.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiffAEResBlock"]
    # float32 under `torch_dtype=` and skipped by layerwise casting: the GroupNorm32 layers and the z_sem statistics
    _keep_in_fp32_modules = ["norm1", "norm_out", "z_sem_mean", "z_sem_std"]
    main_input_name = "images"

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 3,
        model_channels: int = 64,
        channel_mult: Tuple[int, ...] = (1, 2, 4, 8, 8),
        num_res_blocks: int = 2,
        attention_resolutions: Tuple[int, ...] = (16,),
        num_heads: int = 1,
        out_channels: int = 512,
    ):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        block_kwargs = dict(temb_channels=None, z_sem_channels=None, dropout=0.0)

        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks, _, _ = contracting_path(
            widths, sample_size, num_res_blocks, attention_resolutions, num_heads, **block_kwargs
        )
        channels = widths[-1]
        self.mid_block = DiffAEMidBlock2D(channels, num_heads=num_heads, **block_kwargs)
        self.norm_out = normalization(channels)
        self.proj_out = nn.Linear(channels, out_channels)
        self._register_z_sem_statistics(out_channels)

    @property
    def downsample_factor(self) -> int:
        """Height and width of inputs must be multiples of this."""
        return 2 ** (len(self.config.channel_mult) - 1)

    def forward(
        self, images: torch.Tensor, return_dict: bool = True
    ) -> Union[SemanticEncoderOutput, Tuple[torch.Tensor]]:
        r"""
        Args:
            images (`torch.Tensor` of shape `(B, C, H, W)`): images scaled to [-1, 1].
            return_dict (`bool`): return a [`SemanticEncoderOutput`] instead of a tuple.

        Returns:
            [`SemanticEncoderOutput`] or `(z_sem,)` with z_sem of shape `(B, out_channels)`.
        """
        check_image_batch(images, "images", self.config.in_channels, self.downsample_factor)
        h = self.conv_in(images)
        for block in self.down_blocks:
            h, _ = block(h)
        h = self.mid_block(h)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        # layerwise casting leaves "proj_out" in float32 (a diffusers default pattern): compute it in its dtype
        weight_dtype = self.proj_out.weight.dtype
        z_sem = self.proj_out(h.to(weight_dtype if weight_dtype.itemsize > 1 else h.dtype))
        if not return_dict:
            return (z_sem,)
        return SemanticEncoderOutput(z_sem=z_sem)
