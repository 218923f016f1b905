"""Building blocks shared by the DiffAE decoder UNet and the semantic encoder (paper §3.1, Appendix A).

These follow the official BeatGANs/ADM blocks of the Diffusion Autoencoders code exactly; diffusers'
`ResnetBlock2D` cannot express them (it has no second, multiplicative z_sem modulation and no
time-then-z ordering), which is why the residual block is written here. Attention uses diffusers'
`Attention` module with diffusers' processors ([`DiffAEAttnProcessor`] picks one of two by device and dtype).
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as the official `GroupNorm32` (keeps bf16/fp16 runs stable).

    The affine parameters join the float32 computation too, so a model cast to fp16/bf16 still normalises in fp32.
    With float32 parameters, float32 input, and contiguous bf16 input on a CPU (whose group-norm kernel takes bf16
    input with float32 parameters and computes in float32; for channels-last input that kernel is slower on some
    shapes), go to the kernel without the casts.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp32_parameters = self.weight is None or self.weight.dtype == torch.float32
        cpu_bf16 = x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous()
        if fp32_parameters and (x.dtype == torch.float32 or cpu_bf16):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """Official normalisation layer: `min(32, channels)` groups, eps 1e-5, affine."""
    return GroupNorm32(min(32, channels), channels, eps=1e-5)


class DiffAEAttnProcessor:
    r"""
    The default attention processor of DiffAE's attention blocks: diffusers' `AttnProcessor2_0` (PyTorch's fused
    scaled-dot-product attention), except for fp16/bf16 activations on a CPU, which go to diffusers' `AttnProcessor`
    (batched matmuls, softmax in fp32). At the token counts of DiffAE's attention (16x16 maps and smaller) the fused
    CPU kernel runs bf16 no faster than fp32, while the batched matmuls make a bf16 encode + decode at 32 px markedly
    faster (docs/results/speed.md). Both compute the same attention; `set_attn_processor` replaces this one as in
    any diffusers model.
    """

    def __init__(self):
        self.fused, self.batched = AttnProcessor2_0(), AttnProcessor()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        half_on_cpu = hidden_states.device.type == "cpu" and hidden_states.dtype in (torch.float16, torch.bfloat16)
        return (self.batched if half_on_cpu else self.fused)(attn, hidden_states, *args, **kwargs)


def attention_block(channels: int, num_heads: int) -> Attention:
    """Single-scale spatial self-attention with a residual connection (official `AttentionBlock`).

    The official block is `x + proj_out(attention(qkv(norm(x))))` with `1/sqrt(d)` scaling; diffusers'
    `Attention` with `group_norm` and `residual_connection` computes exactly that ([`DiffAEAttnProcessor`]).
    """
    if channels % num_heads != 0:
        raise ValueError(f"attention channels {channels} are not divisible by num_heads={num_heads}")
    attn = Attention(
        query_dim=channels,
        heads=num_heads,
        dim_head=channels // num_heads,
        norm_num_groups=min(32, channels),
        eps=1e-5,
        bias=True,
        out_bias=True,
        upcast_softmax=True,
        residual_connection=True,
        processor=DiffAEAttnProcessor(),
    )
    # The official output projection starts at zero, so every attention block starts as the identity.
    nn.init.zeros_(attn.to_out[0].weight)
    nn.init.zeros_(attn.to_out[0].bias)
    return attn


class DiffAEResBlock(nn.Module):
    """Residual block with time AdaGN followed by the z_sem scale (paper Eq. 7, official `ResBlock`).

    ```
    h = conv1(resample(SiLU(norm1(x))));  x = resample(x)
    h = norm2(h)
    h = h * (1 + t_s) + t_b          # (t_s, t_b) = time_emb_proj(SiLU(temb))
    h = h * (1 + z_s)                # z_s = z_sem_proj(SiLU(z_sem))
    out = shortcut(x) + conv2(dropout(SiLU(h)))
    ```
    With `temb_channels=None` the block is the unconditioned encoder block `shortcut(x) + conv1(SiLU(norm1(x)))`
    (no second half at all), as in the official semantic encoder.

    Args:
        in_channels (`int`): input channels (for decoder blocks: current + skip channels).
        out_channels (`int`): output channels.
        temb_channels (`int`, *optional*): width of the time embedding; `None` for encoder blocks.
        z_sem_channels (`int`, *optional*): width of z_sem; `None` for the DDIM baseline without z_sem.
        dropout (`float`): dropout before the last convolution.
        resample (`str`, *optional*): `"down"` (2x2 average pooling) or `"up"` (nearest x2), applied after the
            first activation, to both the residual branch and the shortcut.
        zero_init (`bool`): zero-initialise the last convolution (official `use_zero_module`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: Optional[int] = None,
        z_sem_channels: Optional[int] = None,
        dropout: float = 0.0,
        resample: Optional[str] = None,
        zero_init: bool = True,
    ):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.norm1 = normalization(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)

        self.conditioned = temb_channels is not None
        if self.conditioned:
            self.time_emb_proj = nn.Linear(temb_channels, 2 * out_channels)
            self.z_sem_proj = nn.Linear(z_sem_channels, out_channels) if z_sem_channels is not None else None
            self.norm2 = normalization(out_channels)
            self.dropout = nn.Dropout(dropout)
            self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
            if zero_init:
                nn.init.zeros_(self.conv2.weight)
                nn.init.zeros_(self.conv2.bias)

        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def _modulate(self, h: torch.Tensor, temb: Optional[torch.Tensor], z_sem: Optional[torch.Tensor]) -> torch.Tensor:
        """`(h * (1 + t_s) + t_b) * (1 + z_s)` for `h` (B, C, H, W), computed as one `addcmul` over `h` with the
        per-channel factors `(1 + t_s)(1 + z_s)` and `t_b (1 + z_s)` (B, C, 1, 1): one pass over the feature map
        instead of three (the official order of operations, up to fp32 rounding)."""
        gain, bias = None, None
        if temb is not None:
            scale, bias = self.time_emb_proj(F.silu(temb)).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
            gain = 1 + scale
        if z_sem is not None and self.z_sem_proj is not None:
            z_gain = 1 + self.z_sem_proj(F.silu(z_sem)).to(h.dtype)[:, :, None, None]
            gain = z_gain if gain is None else gain * z_gain
            bias = None if bias is None else bias * z_gain
        if gain is None:
            return h
        return h * gain if bias is None else torch.addcmul(bias, h, gain)

    def forward(
        self, x: torch.Tensor, temb: Optional[torch.Tensor] = None, z_sem: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        if self.resample is not None:
            h = self._resample(h)
            x = self._resample(x)
        h = self.conv1(h)

        if self.conditioned:
            h = self._modulate(self.norm2(h), temb, z_sem)
            h = self.conv2(self.dropout(F.silu(h)))

        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class _CheckpointedBlock(nn.Module):
    """Runs sub-modules through `self._gradient_checkpointing_func` when diffusers enables checkpointing."""

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False

    def _run(self, module: nn.Module, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    def _attend(self, attention: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Attention over `h` (B, C, H, W), returned in `h`'s memory layout: diffusers' `Attention` hands back a
        channels-last view, which would otherwise spread to every later activation and make each convolution with
        contiguous weights convert its input, its output and its weight gradient."""
        memory_format = torch.contiguous_format if h.is_contiguous() else torch.channels_last
        return self._run(attention, h).contiguous(memory_format=memory_format)


class DiffAEDownBlock2D(_CheckpointedBlock):
    """One resolution level of the contracting path: `num_layers` res blocks (each optionally followed by
    attention) and an optional down-sampling res block. Returns the output and every intermediate state that
    the decoder uses as a skip connection."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        temb_channels: Optional[int],
        z_sem_channels: Optional[int],
        dropout: float,
        add_attention: bool,
        num_heads: int,
        add_downsample: bool,
        zero_init: bool = True,
    ):
        super().__init__()
        kwargs = dict(temb_channels=temb_channels, z_sem_channels=z_sem_channels, dropout=dropout, zero_init=zero_init)
        self.resnets = nn.ModuleList(
            [
                DiffAEResBlock(in_channels if i == 0 else out_channels, out_channels, **kwargs)
                for i in range(num_layers)
            ]
        )
        self.attentions = (
            nn.ModuleList([attention_block(out_channels, num_heads) for _ in range(num_layers)])
            if add_attention
            else None
        )
        self.downsamplers = (
            nn.ModuleList([DiffAEResBlock(out_channels, out_channels, resample="down", **kwargs)])
            if add_downsample
            else None
        )

    def forward(self, h, temb=None, z_sem=None):
        states = []
        for i, resnet in enumerate(self.resnets):
            h = self._run(resnet, h, temb, z_sem)
            if self.attentions is not None:
                h = self._attend(self.attentions[i], h)
            states.append(h)
        if self.downsamplers is not None:
            h = self._run(self.downsamplers[0], h, temb, z_sem)
            states.append(h)
        return h, states


def contracting_path(
    widths: Sequence[int],
    sample_size: int,
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
    num_heads: int,
    **block_kwargs,
) -> Tuple[nn.ModuleList, List[int], int]:
    """The down blocks of the decoder UNet and of the semantic encoder (the same contracting path, Appendix A).

    Level i works at width `widths[i]` and halves the resolution except at the last level; attention is added at
    the resolutions listed. Returns the blocks, the channels of every state handed to an expanding path
    (`conv_in`'s first), and the resolution at the bottom.
    """
    blocks = nn.ModuleList()
    skip_channels = [widths[0]]
    channels, resolution = widths[0], sample_size
    for level, width in enumerate(widths):
        is_last = level == len(widths) - 1
        blocks.append(
            DiffAEDownBlock2D(
                channels,
                width,
                num_res_blocks,
                add_attention=resolution in attention_resolutions,
                num_heads=num_heads,
                add_downsample=not is_last,
                **block_kwargs,
            )
        )
        channels = width
        skip_channels += [width] * (num_res_blocks + (0 if is_last else 1))
        if not is_last:
            resolution //= 2
    return blocks, skip_channels, resolution


class DiffAEMidBlock2D(_CheckpointedBlock):
    """Bottleneck: res block, attention, res block."""

    def __init__(self, channels, temb_channels, z_sem_channels, dropout, num_heads, zero_init=True):
        super().__init__()
        kwargs = dict(temb_channels=temb_channels, z_sem_channels=z_sem_channels, dropout=dropout, zero_init=zero_init)
        self.resnets = nn.ModuleList([DiffAEResBlock(channels, channels, **kwargs) for _ in range(2)])
        self.attention = attention_block(channels, num_heads)

    def forward(self, h, temb=None, z_sem=None):
        h = self._run(self.resnets[0], h, temb, z_sem)
        h = self._attend(self.attention, h)
        return self._run(self.resnets[1], h, temb, z_sem)


class DiffAEUpBlock2D(_CheckpointedBlock):
    """One resolution level of the expanding path: `num_layers` res blocks over `cat([h, skip])` (each optionally
    followed by attention) and an optional up-sampling res block after the last one."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        skip_channels: list,
        temb_channels: Optional[int],
        z_sem_channels: Optional[int],
        dropout: float,
        add_attention: bool,
        num_heads: int,
        add_upsample: bool,
        zero_init: bool = True,
    ):
        super().__init__()
        kwargs = dict(temb_channels=temb_channels, z_sem_channels=z_sem_channels, dropout=dropout, zero_init=zero_init)
        num_layers = len(skip_channels)
        self.resnets = nn.ModuleList(
            [
                DiffAEResBlock((in_channels if i == 0 else out_channels) + skip, out_channels, **kwargs)
                for i, skip in enumerate(skip_channels)
            ]
        )
        self.attentions = (
            nn.ModuleList([attention_block(out_channels, num_heads) for _ in range(num_layers)])
            if add_attention
            else None
        )
        self.upsamplers = (
            nn.ModuleList([DiffAEResBlock(out_channels, out_channels, resample="up", **kwargs)])
            if add_upsample
            else None
        )

    def forward(self, h, skips, temb=None, z_sem=None):
        # `skips` are consumed last-in first-out, matching the order the down path produced them.
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips[-1 - i]], dim=1)
            h = self._run(resnet, h, temb, z_sem)
            if self.attentions is not None:
                h = self._attend(self.attentions[i], h)
        if self.upsamplers is not None:
            h = self._run(self.upsamplers[0], h, temb, z_sem)
        return h
