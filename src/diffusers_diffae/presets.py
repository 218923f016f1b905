"""Official Diffusion Autoencoders release configurations, and their translation to diffusers configs.

An official configuration is a `TrainConfig` of github.com/phizaz/diffae (`templates.py`,
`templates_latent.py`). `OFFICIAL_CONFIGS` holds, for every released model, the `TrainConfig` fields that decide
the architecture and the diffusion settings (the other fields only matter to the official trainer).
`official_component_configs` turns such a dict (or a full `TrainConfig` JSON, enums written as
`{"__enum__": ..., "value": ...}`) into the configs of `DiffAEUNet2DModel`, `SemanticEncoder`,
`LatentMLPDenoiser` and the schedulers. `preset_config` gives one component's config by a short name:

```py
unet = DiffAEUNet2DModel.from_config(preset_config("ffhq256"))
encoder = SemanticEncoder.from_config(preset_config("ffhq256", "encoder"))
latent = LatentMLPDenoiser.from_config(preset_config("ffhq256", "latent_denoiser"))
```
"""

import copy
import json
import os
from typing import Any, Dict, Optional, Union


# Defaults of the official `TrainConfig` for every field used here (config.py), plus `autoenc_base()`.
_TRAIN_CONFIG_DEFAULTS: Dict[str, Any] = {
    "model_name": "beatgans_autoenc",
    "img_size": 64,
    "net_ch": 64,
    "net_ch_mult": [1, 2, 4, 8],
    "net_enc_channel_mult": [1, 2, 4, 8, 8],
    "net_attn": [16],
    "net_enc_attn": None,
    "net_beatgans_attn_head": 1,
    "net_beatgans_embed_channels": 512,
    "net_beatgans_resnet_two_cond": True,
    "net_beatgans_resnet_use_zero_module": True,
    "net_beatgans_resnet_cond_channels": None,
    "net_resblock_updown": True,
    "net_enc_use_time": False,
    "net_enc_pool": "adaptivenonzero",
    "net_num_res_blocks": 2,
    "net_num_input_res_blocks": None,
    "net_enc_num_res_blocks": 2,
    "style_ch": 512,
    "dropout": 0.1,
    "net_latent_net_type": "none",
    "net_latent_layers": None,
    "net_latent_skip_layers": None,
    "net_latent_num_hid_channels": 1024,
    "net_latent_time_emb_channels": 64,
    "net_latent_num_time_layers": 2,
    "net_latent_time_last_act": False,
    "net_latent_activation": "silu",
    "net_latent_use_norm": False,
    "net_latent_condition_bias": 0,
    "net_latent_dropout": 0,
    "net_latent_net_last_act": "none",
    "T": 1000,
    "T_eval": 20,
    "beta_scheduler": "linear",
    "beatgans_model_mean_type": "eps",
    "beatgans_model_var_type": "fixed_large",
    "beatgans_rescale_timesteps": False,
    "latent_beta_scheduler": "linear",
    "latent_T_eval": 1000,
    "latent_clip_sample": False,
    "latent_znormalize": False,
    "latent_model_mean_type": "eps",
    "latent_rescale_timesteps": False,
    "latent_loss_type": "mse",
    "optimizer": "adam",
    "lr": 1e-4,
    "weight_decay": 0.0,
    "ema_decay": 0.9999,
    "grad_clip": 1.0,
    "batch_size": 32,
}

_FFHQ64 = {"img_size": 64, "net_ch": 64, "net_ch_mult": [1, 2, 4, 8], "net_enc_channel_mult": [1, 2, 4, 8, 8]}
_RES128 = {"img_size": 128, "net_ch": 128, "net_ch_mult": [1, 1, 2, 3, 4], "net_enc_channel_mult": [1, 1, 2, 3, 4, 4]}
_RES256 = {
    "img_size": 256,
    "net_ch": 128,
    "net_ch_mult": [1, 1, 2, 2, 4, 4],
    "net_enc_channel_mult": [1, 1, 2, 2, 4, 4, 4],
    "batch_size": 64,
}
_LATENT_BASE = {  # templates_latent.latent_diffusion_config + latent_mlp_2048_norm_10layers
    "net_latent_net_type": "skip",
    "net_latent_layers": 10,
    "net_latent_skip_layers": list(range(1, 10)),
    "net_latent_activation": "silu",
    "net_latent_num_hid_channels": 2048,
    "net_latent_use_norm": True,
    "net_latent_condition_bias": 1,
    "latent_znormalize": True,
    "latent_clip_sample": False,
    "latent_T_eval": 20,
    "latent_loss_type": "l1",
    "latent_beta_scheduler": "const0.008",
}
_LATENT_ADAMW = {"optimizer": "adamw", "weight_decay": 0.01, "batch_size": 256}
_LATENT_20_LAYERS = {"net_latent_layers": 20, "net_latent_skip_layers": list(range(1, 20)), "batch_size": 2048}

OFFICIAL_CONFIGS: Dict[str, Dict[str, Any]] = {
    "ffhq64_autoenc": {**_FFHQ64},
    "celeba64d2c_autoenc": {**_FFHQ64},
    "ffhq128_autoenc_72M": {**_RES128},
    "ffhq128_autoenc_130M": {**_RES128},
    "horse128_autoenc": {**_RES128},
    "bedroom128_autoenc": {**_RES128},
    "ffhq256_autoenc": {**_RES256},
    "celeba64d2c_autoenc_latent": {**_FFHQ64, **_LATENT_BASE, **_LATENT_ADAMW, "batch_size": 512},
    "ffhq128_autoenc_latent": {**_RES128, **_LATENT_BASE, **_LATENT_ADAMW},
    "ffhq256_autoenc_latent": {**_RES256, **_LATENT_BASE, **_LATENT_ADAMW},
    "horse128_autoenc_latent": {**_RES128, **_LATENT_BASE, **_LATENT_20_LAYERS},
    "bedroom128_autoenc_latent": {**_RES128, **_LATENT_BASE, **_LATENT_20_LAYERS},
}

# Short architecture names -> the official release whose architecture they denote.
_SHORT_NAMES = {
    "ffhq64": "ffhq64_autoenc_latent_arch",
    "celeba64": "celeba64d2c_autoenc_latent",
    "ffhq128": "ffhq128_autoenc_latent",
    "horse128": "horse128_autoenc_latent",
    "bedroom128": "bedroom128_autoenc_latent",
    "ffhq256": "ffhq256_autoenc_latent",
}
# FFHQ-64 was never released with a latent DDIM; its preset uses the 10-layer latent net of the others.
OFFICIAL_CONFIGS["ffhq64_autoenc_latent_arch"] = {**_FFHQ64, **_LATENT_BASE, **_LATENT_ADAMW}

COMPONENTS = ("unet", "encoder", "latent_denoiser", "scheduler", "latent_scheduler")


def _plain(value):
    """Official enums are written as {"__enum__": name, "value": v}; tuples as lists."""
    if isinstance(value, dict) and "__enum__" in value:
        return value["value"]
    if isinstance(value, tuple):
        return list(value)
    return value


def load_official_config(config: Union[str, os.PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    """Returns the full official `TrainConfig` fields (defaults filled in) for a release name, a JSON file or a dict.

    A JSON file may hold the `TrainConfig` itself or wrap it as `{"train_config": {...}}` (the fixture format).
    """
    if isinstance(config, (str, os.PathLike)) and str(config) in OFFICIAL_CONFIGS:
        fields = OFFICIAL_CONFIGS[str(config)]
    elif isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            raise ValueError(
                f"config {str(config)!r} is neither an official release name ({', '.join(sorted(OFFICIAL_CONFIGS))}) "
                "nor an existing JSON file"
            )
        try:
            with open(config, encoding="utf-8") as f:
                fields = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"config file {str(config)!r} is not valid JSON: {e}") from e
    elif isinstance(config, dict):
        fields = config
    else:
        raise ValueError(f"config must be a release name, a JSON path or a dict, got {type(config).__name__}")
    if not isinstance(fields, dict):
        raise ValueError("an official config must be a JSON object of TrainConfig fields")
    if isinstance(fields.get("train_config"), dict):
        fields = fields["train_config"]
    merged = copy.deepcopy(_TRAIN_CONFIG_DEFAULTS)
    merged.update({k: _plain(v) for k, v in fields.items() if k in _TRAIN_CONFIG_DEFAULTS})
    return merged


def _require(cfg: Dict[str, Any], key: str, allowed) -> None:
    if cfg[key] not in allowed:
        raise ValueError(
            f"official config field {key}={cfg[key]!r} is not supported (supported: {list(allowed)}); "
            "only the Diffusion Autoencoder architecture of the official releases can be converted"
        )


def _ddim_config(num_train_timesteps: int, beta_schedule: str, clip_sample: bool) -> Dict[str, Any]:
    if beta_schedule == "linear":  # official: linspace(1e-4, 0.02) scaled by 1000 / T
        scale = 1000 / num_train_timesteps
        beta_start, beta_end = scale * 1e-4, scale * 0.02
    elif beta_schedule.startswith("const"):  # official "const0.008": every beta equal
        beta_start = beta_end = float(beta_schedule[len("const") :])
    else:
        raise ValueError(f"official beta schedule {beta_schedule!r} is not supported (linear, constX)")
    # The official DDIM sampler: steps {0, T/N, ...} ("leading", offset 0), ends at alpha_bar = 1, network called
    # with the original timestep, x0 clipped to [-1, 1] for images and not for the latent DDIM.
    return {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": "linear",
        "beta_start": beta_start,
        "beta_end": beta_end,
        "prediction_type": "epsilon",
        "clip_sample": clip_sample,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "leading",
    }


def official_component_configs(config: Union[str, os.PathLike, Dict[str, Any]]) -> Dict[str, Optional[dict]]:
    """Translates an official configuration into diffusers configs.

    Returns a dict with keys `unet`, `encoder`, `latent_denoiser` (`None` for autoencoder-only configs),
    `scheduler`, `latent_scheduler` (`None` without a latent net) and `official` (the merged official fields).
    """
    cfg = load_official_config(config)
    _require(cfg, "model_name", ["beatgans_autoenc"])
    _require(cfg, "net_beatgans_resnet_two_cond", [True])
    _require(cfg, "net_resblock_updown", [True])
    _require(cfg, "net_enc_use_time", [False])
    _require(cfg, "net_enc_pool", ["adaptivenonzero"])
    _require(cfg, "net_num_input_res_blocks", [None, cfg["net_num_res_blocks"]])
    _require(cfg, "beatgans_model_mean_type", ["eps"])
    _require(cfg, "beatgans_model_var_type", ["fixed_large", "fixed_small"])
    _require(cfg, "beatgans_rescale_timesteps", [False])
    _require(cfg, "net_latent_net_type", ["none", "skip"])

    z_sem_channels = cfg["net_beatgans_resnet_cond_channels"] or cfg["net_beatgans_embed_channels"]
    if z_sem_channels != cfg["style_ch"]:
        raise ValueError(
            f"inconsistent official config: the encoder outputs style_ch={cfg['style_ch']} channels but the UNet's "
            f"residual blocks take {z_sem_channels} (net_beatgans_resnet_cond_channels or embed channels)"
        )
    attention = list(cfg["net_attn"])
    unet = {
        "sample_size": cfg["img_size"],
        "in_channels": 3,
        "out_channels": 3,
        "model_channels": cfg["net_ch"],
        "channel_mult": list(cfg["net_ch_mult"]),
        "num_res_blocks": cfg["net_num_res_blocks"],
        "attention_resolutions": attention,
        "num_heads": cfg["net_beatgans_attn_head"],
        "embed_channels": cfg["net_beatgans_embed_channels"],
        "time_embed_channels": None,
        "z_sem_channels": z_sem_channels,
        "dropout": float(cfg["dropout"]),
        "zero_init": bool(cfg["net_beatgans_resnet_use_zero_module"]),
    }
    encoder = {
        "sample_size": cfg["img_size"],
        "in_channels": 3,
        "model_channels": cfg["net_ch"],
        "channel_mult": list(cfg["net_enc_channel_mult"] or cfg["net_ch_mult"]),
        "num_res_blocks": cfg["net_enc_num_res_blocks"],
        "attention_resolutions": list(cfg["net_enc_attn"] or attention),
        "num_heads": cfg["net_beatgans_attn_head"],
        "out_channels": cfg["style_ch"],
    }
    latent = None
    if cfg["net_latent_net_type"] == "skip":
        _require(cfg, "latent_model_mean_type", ["eps"])
        _require(cfg, "latent_rescale_timesteps", [False])
        layers = cfg["net_latent_layers"]
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"official config field net_latent_layers={layers!r} must be a positive integer")
        latent = {
            "num_channels": cfg["style_ch"],
            "hidden_channels": cfg["net_latent_num_hid_channels"],
            "num_layers": layers,
            "skip_layers": list(cfg["net_latent_skip_layers"] or []),
            "time_embed_channels": cfg["net_latent_time_emb_channels"],
            "num_time_layers": cfg["net_latent_num_time_layers"],
            "time_last_act": bool(cfg["net_latent_time_last_act"]),
            "activation": cfg["net_latent_activation"],
            "use_norm": bool(cfg["net_latent_use_norm"]),
            "condition_bias": float(cfg["net_latent_condition_bias"]),
            "dropout": float(cfg["net_latent_dropout"]),
            "last_act": cfg["net_latent_net_last_act"],
        }
    return {
        "unet": unet,
        "encoder": encoder,
        "latent_denoiser": latent,
        "scheduler": _ddim_config(cfg["T"], cfg["beta_scheduler"], clip_sample=True),
        "latent_scheduler": (
            _ddim_config(cfg["T"], cfg["latent_beta_scheduler"], clip_sample=bool(cfg["latent_clip_sample"]))
            if latent is not None
            else None
        ),
        "official": cfg,
    }


def preset_config(name: str, component: str = "unet") -> dict:
    """One component's config for a preset.

    Args:
        name: a short architecture name (`ffhq64`, `ffhq128`, `ffhq256`, `horse128`, `bedroom128`, `celeba64`) or
            an official release name (`ffhq256_autoenc`, `ffhq128_autoenc_latent`, ...).
        component: `unet`, `encoder`, `latent_denoiser`, `scheduler` or `latent_scheduler`.
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; choose one of {COMPONENTS}")
    release = _SHORT_NAMES.get(name, name)
    if release not in OFFICIAL_CONFIGS:
        names = sorted(set(_SHORT_NAMES) | {k for k in OFFICIAL_CONFIGS if not k.endswith("_arch")})
        raise ValueError(f"unknown preset {name!r}; choose one of {names}")
    configs = official_component_configs(release)
    if configs[component] is None:
        raise ValueError(f"preset {name!r} has no {component} (it is an autoencoder-only release)")
    return copy.deepcopy(configs[component])
