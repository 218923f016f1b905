"""The conditional DDIM decoder of Diffusion Autoencoders (paper §3.1, Eq. 5-7; Appendix A, Table 5)."""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .blocks import DiffAEMidBlock2D, DiffAEUpBlock2D, contracting_path, normalization
from .checks import check_image_batch, check_vector_batch, timesteps_for_batch


@dataclass
class DiffAEUNet2DOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(B, out_channels, H, W)`): the predicted noise epsilon.
    """

    sample: torch.Tensor


class DiffAEUNet2DModel(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin):
    r"""
    The DiffAE decoder: a UNet predicting the noise of `x_t`, modulated in every residual block by the timestep
    (scale and shift) and then by the semantic code `z_sem` (scale), `h -> (1 + z_s) * ((1 + t_s) * GN(h) + t_b)`.
    Layout and numerics follow the official `BeatGANsAutoencModel` (without its encoder, which is
    [`SemanticEncoder`]). With `z_sem_channels=None` it is the paper's DDIM baseline (the same UNet without z_sem).

    Parameters:
        sample_size (`int`, defaults to 64): training resolution; attention placement is decided from it.
        in_channels (`int`, defaults to 3): channels of the noisy image.
        out_channels (`int`, defaults to 3): channels of the predicted noise.
        model_channels (`int`, defaults to 64): base width `C`; level `l` has `C * channel_mult[l]` channels.
        channel_mult (`Tuple[int]`, defaults to `(1, 2, 4, 8)`): width multiplier per resolution level.
        num_res_blocks (`int`, defaults to 2): residual blocks per level on the way down (one more on the way up).
        attention_resolutions (`Tuple[int]`, defaults to `(16,)`): resolutions (relative to `sample_size`) with
            self-attention after each residual block.
        num_heads (`int`, defaults to 1): attention heads.
        embed_channels (`int`, defaults to 512): width of the time embedding MLP output.
        time_embed_channels (`int`, *optional*): width of the sinusoidal timestep features; `model_channels` when
            `None` (official default).
        z_sem_channels (`int`, *optional*, defaults to 512): width of z_sem. `None` builds the DDIM baseline.
        dropout (`float`, defaults to 0.1): dropout inside residual blocks.
        zero_init (`bool`, defaults to `True`): zero-initialise the residual-branch and output convolutions.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiffAEResBlock"]
    # float32 under `torch_dtype=` and skipped by layerwise casting: the GroupNorm32 layers and the time MLP
    _keep_in_fp32_modules = ["time_embedding", "norm1", "norm2", "conv_norm_out"]
    main_input_name = "sample"

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 3,
        out_channels: int = 3,
        model_channels: int = 64,
        channel_mult: Tuple[int, ...] = (1, 2, 4, 8),
        num_res_blocks: int = 2,
        attention_resolutions: Tuple[int, ...] = (16,),
        num_heads: int = 1,
        embed_channels: int = 512,
        time_embed_channels: Optional[int] = None,
        z_sem_channels: Optional[int] = 512,
        dropout: float = 0.1,
        zero_init: bool = True,
    ):
        super().__init__()
        time_embed_channels = time_embed_channels or model_channels
        widths = [model_channels * m for m in channel_mult]
        block_kwargs = dict(
            temb_channels=embed_channels, z_sem_channels=z_sem_channels, dropout=dropout, zero_init=zero_init
        )

        # 1. time: sinusoid with cos first and the raw 0..T-1 timestep, then Linear-SiLU-Linear (no final act)
        self.time_proj = Timesteps(time_embed_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_embed_channels, embed_channels)

        # 2. contracting path; `skip_channels` mirrors the stack of states handed to the expanding path
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks, skip_channels, resolution = contracting_path(
            widths, sample_size, num_res_blocks, attention_resolutions, num_heads, **block_kwargs
        )
        channels = widths[-1]

        # 3. bottleneck
        self.mid_block = DiffAEMidBlock2D(channels, num_heads=num_heads, **block_kwargs)

        # 4. expanding path: every level takes num_res_blocks + 1 skip states
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            level_skips = [skip_channels.pop() for _ in range(num_res_blocks + 1)]
            self.up_blocks.append(
                DiffAEUpBlock2D(
                    channels,
                    widths[level],
                    level_skips,
                    add_attention=resolution in attention_resolutions,
                    num_heads=num_heads,
                    add_upsample=level > 0,
                    **block_kwargs,
                )
            )
            channels = widths[level]
            if level > 0:
                resolution *= 2

        # 5. output head
        self.conv_norm_out = normalization(channels)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)
        if zero_init:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    @property
    def downsample_factor(self) -> int:
        """Height and width of inputs must be multiples of this."""
        return 2 ** (len(self.config.channel_mult) - 1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, int, float],
        z_sem: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[DiffAEUNet2DOutput, Tuple[torch.Tensor]]:
        r"""
        Args:
            sample (`torch.Tensor` of shape `(B, C, H, W)`): the noisy image `x_t`.
            timestep (`int`, `float` or `torch.Tensor` of shape `()`, `(1,)` or `(B,)`): the diffusion step on the
                original training scale (0..999 for the official models), never a respaced index.
            z_sem (`torch.Tensor` of shape `(B, z_sem_channels)`): the semantic code. Must be `None` for the DDIM
                baseline (`z_sem_channels=None`).
            return_dict (`bool`): return a [`DiffAEUNet2DOutput`] instead of a tuple.

        Returns:
            [`DiffAEUNet2DOutput`] or `(sample,)`: the predicted noise, shape `(B, out_channels, H, W)`.
        """
        check_image_batch(sample, "sample", self.config.in_channels, self.downsample_factor)
        batch_size = sample.shape[0]
        if self.config.z_sem_channels is None:
            if z_sem is not None:
                raise ValueError("this UNet was built without z_sem (z_sem_channels=None); pass z_sem=None")
        else:
            if z_sem is None:
                raise ValueError(f"z_sem of shape (B, {self.config.z_sem_channels}) is required")
            check_vector_batch(z_sem, "z_sem", self.config.z_sem_channels, batch_size)
            z_sem = z_sem.to(sample.dtype)

        # 1. time
        timesteps = timesteps_for_batch(timestep, batch_size, sample.device)
        weight_dtype = self.time_embedding.linear_1.weight.dtype  # float32 when kept so; never an fp8 storage dtype
        features = self.time_proj(timesteps).to(weight_dtype if weight_dtype.itemsize > 1 else sample.dtype)
        temb = self.time_embedding(features).to(sample.dtype)

        # 2. pre-process
        h = self.conv_in(sample)
        skips = [h]

        # 3. down
        for block in self.down_blocks:
            h, states = block(h, temb, z_sem)
            skips += states

        # 4. mid
        h = self.mid_block(h, temb, z_sem)

        # 5. up
        for block in self.up_blocks:
            n = len(block.resnets)
            h = block(h, skips[-n:], temb, z_sem)
            del skips[-n:]

        # 6. post-process
        out = self.conv_out(F.silu(self.conv_norm_out(h)))
        if not return_dict:
            return (out,)
        return DiffAEUNet2DOutput(sample=out)
