"""The latent DDIM network of Diffusion Autoencoders (paper §4; Appendix A.1, Table 6)."""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .checks import check_vector_batch, timesteps_for_batch
from .statistics import ZSemStatisticsMixin


_ACTIVATIONS = {
    "none": nn.Identity,
    "relu": nn.ReLU,
    "lrelu": lambda: nn.LeakyReLU(negative_slope=0.2),
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


@dataclass
class LatentMLPDenoiserOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(B, D)`): the predicted noise in normalised z_sem space.
    """

    sample: torch.Tensor


class LatentMLPLayer(nn.Module):
    """`act(norm(linear(h) * (condition_bias + cond_proj(act(t_emb)))))`: time scale first, then LayerNorm.

    The last layer of the network is a plain linear map (`use_condition=False`, no norm, no activation)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_channels: int,
        activation: str,
        use_norm: bool,
        use_condition: bool,
        condition_bias: float,
        dropout: float,
    ):
        super().__init__()
        self.condition_bias = condition_bias
        self.linear = nn.Linear(in_channels, out_channels)
        self.act = _activation(activation)
        self.cond_proj = nn.Linear(cond_channels, out_channels) if use_condition else None
        self.norm = nn.LayerNorm(out_channels) if use_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Official init: He-normal (ReLU gain) for the linear maps of rectifier-style layers, PyTorch default else.
        gains = {"relu": 0.0, "silu": 0.0, "lrelu": 0.2}
        if activation in gains:
            nonlinearity = "leaky_relu" if activation == "lrelu" else "relu"
            for layer in (self.linear, self.cond_proj):
                if layer is not None:
                    nn.init.kaiming_normal_(layer.weight, a=gains[activation], nonlinearity=nonlinearity)

    def forward(self, h: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.linear(h)
        if self.cond_proj is not None:
            h = h * (self.condition_bias + self.cond_proj(self.act(t_emb)))
        return self.dropout(self.act(self.norm(h)))


class LatentMLPDenoiser(ModelMixin, ConfigMixin, PeftAdapterMixin, ZSemStatisticsMixin):
    r"""
    The latent DDIM's noise predictor: an MLP with skip connections that re-inject the input into the hidden
    layers (official `MLPSkipNet`). It works on normalised z_sem and stores the statistics it was trained with
    (`z_sem_mean`, `z_sem_std`), so [`~LatentMLPDenoiser.denormalize_z_sem`] maps its samples back to z_sem.

    Parameters:
        num_channels (`int`, defaults to 512): width of z_sem.
        hidden_channels (`int`, defaults to 2048): hidden width.
        num_layers (`int`, defaults to 10): number of layers (20 for the official LSUN models).
        skip_layers (`Tuple[int]`, *optional*): layers whose input is `cat([h, x])`; every layer but the first
            (`range(1, num_layers)`) when `None`, as in all official models.
        time_embed_channels (`int`, defaults to 64): width of the sinusoidal timestep features.
        num_time_layers (`int`, defaults to 2): linear layers of the time MLP.
        time_last_act (`bool`, defaults to `False`): activation after the last time layer.
        activation (`str`, defaults to `"silu"`): one of `none`, `relu`, `lrelu`, `silu`, `tanh`.
        use_norm (`bool`, defaults to `True`): LayerNorm in the hidden layers.
        condition_bias (`float`, defaults to 1.0): the `1` in `h * (1 + scale)`.
        dropout (`float`, defaults to 0.0): dropout in the hidden layers.
        last_act (`str`, defaults to `"none"`): activation applied to the output.
    """

    # float32 under `torch_dtype=` and skipped by layerwise casting: the time MLP and the z_sem statistics
    _keep_in_fp32_modules = ["time_embedding", "z_sem_mean", "z_sem_std"]
    main_input_name = "sample"

    @register_to_config
    def __init__(
        self,
        num_channels: int = 512,
        hidden_channels: int = 2048,
        num_layers: int = 10,
        skip_layers: Optional[Tuple[int, ...]] = None,
        time_embed_channels: int = 64,
        num_time_layers: int = 2,
        time_last_act: bool = False,
        activation: str = "silu",
        use_norm: bool = True,
        condition_bias: float = 1.0,
        dropout: float = 0.0,
        last_act: str = "none",
    ):
        super().__init__()
        if num_layers < 1 or num_time_layers < 1:
            raise ValueError("num_layers and num_time_layers must be at least 1")
        self.skip_layers = set(range(1, num_layers) if skip_layers is None else skip_layers)

        self.time_proj = Timesteps(time_embed_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        time_layers = []
        for i in range(num_time_layers):
            time_layers.append(nn.Linear(time_embed_channels if i == 0 else num_channels, num_channels))
            if i < num_time_layers - 1 or time_last_act:
                time_layers.append(_activation(activation))
        self.time_embedding = nn.Sequential(*time_layers)

        self.layers = nn.ModuleList()
        for i in range(num_layers):
            is_last = i == num_layers - 1
            in_channels = num_channels if i == 0 else hidden_channels
            if i in self.skip_layers:
                in_channels += num_channels
            self.layers.append(
                LatentMLPLayer(
                    in_channels,
                    num_channels if is_last else hidden_channels,
                    cond_channels=num_channels,
                    activation="none" if is_last else activation,
                    use_norm=use_norm and not is_last,
                    use_condition=not is_last,
                    condition_bias=condition_bias,
                    dropout=0.0 if is_last else dropout,
                )
            )
        self.output_act = _activation(last_act)
        self._register_z_sem_statistics(num_channels)

    def forward(
        self, sample: torch.Tensor, timestep: Union[torch.Tensor, int, float], return_dict: bool = True
    ) -> Union[LatentMLPDenoiserOutput, Tuple[torch.Tensor]]:
        r"""
        Args:
            sample (`torch.Tensor` of shape `(B, num_channels)`): noisy normalised z_sem.
            timestep (`int`, `float` or `torch.Tensor` of shape `()`, `(1,)` or `(B,)`): original-scale timestep.
            return_dict (`bool`): return a [`LatentMLPDenoiserOutput`] instead of a tuple.

        Returns:
            [`LatentMLPDenoiserOutput`] or `(sample,)`: the predicted noise, shape `(B, num_channels)`.
        """
        check_vector_batch(sample, "sample", self.config.num_channels)
        timesteps = timesteps_for_batch(timestep, sample.shape[0], sample.device)
        weight_dtype = self.time_embedding[0].weight.dtype  # float32 when kept so; never an fp8 storage dtype
        features = self.time_proj(timesteps).to(weight_dtype if weight_dtype.itemsize > 1 else sample.dtype)
        t_emb = self.time_embedding(features).to(sample.dtype)
        h = sample
        for i, layer in enumerate(self.layers):
            if i in self.skip_layers:
                h = torch.cat([h, sample], dim=1)
            h = layer(h, t_emb)
        out = self.output_act(h)
        if not return_dict:
            return (out,)
        return LatentMLPDenoiserOutput(sample=out)
