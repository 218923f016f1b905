"""Model configs of the training scripts, from `--preset`, a JSON file or a trained pipeline folder.

Each config is a plain dict for a diffusers `from_config` (keys starting with `_` dropped) and is checked before
any data is read, so that a mismatch (z_sem widths, image size, channels) fails early with a clear message.
"""

import argparse
import json
import os
from typing import Dict, Optional, Sequence

import torch

from _common import TrainingInputError


def read_json_config(path: str, option: str) -> dict:
    if not os.path.isfile(path):
        raise TrainingInputError(f"{option} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainingInputError(f"{option} {path!r} is not valid JSON: {e}") from e


def preset_configs(name: str, components: Sequence[str]) -> Dict[str, dict]:
    """The configs of `components` of an official model (`diffusers_diffae.presets`)."""
    from diffusers_diffae.presets import preset_config

    try:
        return {component: preset_config(name, component) for component in components}
    except ValueError as e:
        raise TrainingInputError(f"--preset: {e}") from e


def _public(config: Optional[dict]) -> Optional[dict]:
    return None if config is None else {k: v for k, v in dict(config).items() if not k.startswith("_")}


def diffae_configs(args) -> Dict[str, Optional[dict]]:
    """`{"unet", "encoder" (None for the baseline), "scheduler"}` from --preset, --model_config or --init_from.

    --model_config holds `{"unet": {...}, "encoder": {...}, "scheduler": {...} (optional)}` or an official
    TrainConfig. The configs are checked against each other and against --resolution, which defaults to the UNet's
    sample_size.
    """
    from diffusers import DDIMScheduler

    from diffusers_diffae import DiffAEUNet2DModel, SemanticEncoder
    from diffusers_diffae.presets import _ddim_config, official_component_configs

    components = ("unet", "encoder", "scheduler")
    sources = [name for name in ("preset", "model_config", "init_from") if getattr(args, name)]
    if len(sources) != 1:
        raise TrainingInputError(
            "give exactly one of --preset, --model_config and --init_from" + (f" (got {sources})" if sources else "")
        )
    if args.preset:
        configs = preset_configs(args.preset, components)
    elif args.model_config:
        configs = read_json_config(args.model_config, "--model_config")
        if not (isinstance(configs, dict) and "unet" in configs):
            try:
                configs = official_component_configs(args.model_config)
            except ValueError as e:
                raise TrainingInputError(
                    f'--model_config must hold {{"unet": ..., "encoder": ...}} or an official TrainConfig: {e}'
                ) from e
    else:
        if not os.path.isdir(os.path.join(args.init_from, "unet")):
            raise TrainingInputError(f"--init_from {args.init_from!r} is not a pipeline folder with a unet/ subfolder")
        classes = (DiffAEUNet2DModel, SemanticEncoder, DDIMScheduler)
        configs = {
            name: cls.load_config(args.init_from, subfolder=name)
            for name, cls in zip(components, classes)
            if os.path.isdir(os.path.join(args.init_from, name))
        }
    configs = {name: _public(configs.get(name)) for name in components}
    configs["scheduler"] = configs["scheduler"] or _ddim_config(1000, "linear", clip_sample=True)
    unet, encoder = configs["unet"], configs["encoder"]

    if args.no_semantic_encoder:
        if args.init_from and unet.get("z_sem_channels") is not None:
            raise TrainingInputError(
                f"--init_from {args.init_from!r} holds a DiffAE UNet with z_sem; --no_semantic_encoder needs a "
                "baseline UNet (z_sem_channels=None)"
            )
        unet["z_sem_channels"], configs["encoder"] = None, None
    elif encoder is None:
        raise TrainingInputError("the model config has no encoder; add one or pass --no_semantic_encoder")
    elif unet.get("z_sem_channels", 512) is None:
        raise TrainingInputError(
            "the UNet config has z_sem_channels=None (a DDIM baseline); pass --no_semantic_encoder to train it"
        )
    elif unet.get("z_sem_channels", 512) != encoder.get("out_channels", 512):
        raise TrainingInputError(
            f"the encoder outputs {encoder.get('out_channels', 512)} channels but the UNet takes z_sem_channels="
            f"{unet.get('z_sem_channels', 512)}"
        )
    if args.resolution is None:
        args.resolution = unet.get("sample_size", 64)
    for name in ("unet", "encoder"):
        config = configs[name]
        if config is not None and config.get("in_channels", 3) != 3:
            raise TrainingInputError(f"the {name} takes {config['in_channels']} channels; these scripts feed RGB")
        if config is not None and config.get("sample_size", 64) != args.resolution:
            raise TrainingInputError(
                f"--resolution {args.resolution} does not match the {name}'s sample_size "
                f"{config.get('sample_size', 64)} (attention placement depends on it); change one of them"
            )
    return configs


def resolve_memory_format(choice: str, resolution: int) -> torch.memory_format:
    """`--memory_format` -> a torch memory format (auto: channels_last from 64 px up, as the pipeline's default)."""
    if choice == "auto":
        choice = "channels_last" if resolution >= 64 else "contiguous"
    return torch.channels_last if choice == "channels_last" else torch.contiguous_format


def prepare_for_training(args: argparse.Namespace, models: Sequence) -> torch.memory_format:
    """Puts `models` (a UNet, an encoder; `None` entries skipped) in the layout `--memory_format` picks, in place, and
    returns the memory format the inputs must take."""
    models = [model for model in models if model is not None]
    memory_format = resolve_memory_format(args.memory_format, models[0].config.sample_size)
    for model in models:
        model.to(memory_format=memory_format)
    return memory_format


def resolve_mixed_precision(choice: Optional[str]) -> Optional[str]:
    """`--mixed_precision` when given; otherwise bf16 autocast (fp32 weights) on a CPU-only machine with native bf16,
    where it is the fastest setting that keeps the official loss (docs/results/speed_vs_official.md), else `None`
    (accelerate's configured default)."""
    from diffusers_diffae.precision import cpu_has_native_bf16

    if choice is not None:
        return choice
    return "bf16" if not torch.cuda.is_available() and cpu_has_native_bf16() else None


def build_diffae(args: argparse.Namespace, configs: dict):
    """The UNet and the encoder (None for the baseline): from --init_from's weights, or freshly initialised."""
    from diffusers_diffae import DiffAEUNet2DModel, SemanticEncoder

    try:
        if args.init_from:
            unet = DiffAEUNet2DModel.from_pretrained(args.init_from, subfolder="unet")
            encoder = None
            if not args.no_semantic_encoder:
                encoder = SemanticEncoder.from_pretrained(args.init_from, subfolder="encoder")
        else:
            unet = DiffAEUNet2DModel.from_config(configs["unet"])
            encoder = None if configs["encoder"] is None else SemanticEncoder.from_config(configs["encoder"])
    except (TypeError, ValueError) as e:
        raise TrainingInputError(f"could not build the models from the given config: {e}") from e
    return unet, encoder


def add_lora_adapters(args: argparse.Namespace, unet, encoder) -> None:
    """Freezes the base weights and adds trainable LoRA adapters (peft) to the UNet and optionally the encoder."""
    from peft import LoraConfig

    def lora_config(targets: str) -> LoraConfig:
        modules = [m.strip() for m in targets.split(",") if m.strip()]
        return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=modules, init_lora_weights=True)

    unet.requires_grad_(False)
    unet.add_adapter(lora_config(args.lora_target_modules))
    if encoder is not None:
        encoder.requires_grad_(False)
        if args.lora_encoder:
            encoder.add_adapter(lora_config(args.lora_encoder_target_modules))


def latent_config(args, width: int) -> dict:
    """The `LatentMLPDenoiser` config from --latent_config, --preset or the width arguments, for `width`-d z_sem."""
    if args.latent_config and args.preset:
        raise TrainingInputError("give at most one of --latent_config and --preset")
    if args.latent_config:
        config = read_json_config(args.latent_config, "--latent_config")
        config = config.get("latent_denoiser", config)
        config.setdefault("num_channels", width)
    elif args.preset:
        config = preset_configs(args.preset, ["latent_denoiser"])["latent_denoiser"]
    else:
        config = {
            "num_channels": width,
            "hidden_channels": args.hidden_channels,
            "num_layers": args.num_layers,
            "time_embed_channels": args.time_embed_channels,
            "dropout": args.latent_dropout,
        }
    config = _public(config)
    if config["num_channels"] != width:
        raise TrainingInputError(
            f"the latent denoiser takes {config['num_channels']}-d codes but the encoder outputs {width}-d z_sem"
        )
    return config


def load_autoencoder(args):
    """The trained `DiffAEPipeline` of --pipeline (later stages); --resolution defaults to its encoder's size."""
    from diffusers_diffae import DiffAEPipeline

    if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        raise TrainingInputError(f"--pipeline {args.pipeline!r} is not a saved pipeline folder (no model_index.json)")
    pipe = DiffAEPipeline.from_pretrained(args.pipeline)
    size = pipe.encoder.config.sample_size
    if args.resolution is None:
        args.resolution = size
    if args.resolution != size:
        raise TrainingInputError(f"--resolution {args.resolution} differs from the encoder's sample_size {size}")
    return pipe


def training_autocast(mixed_precision: Optional[str], device: torch.device):
    """The autocast context accelerate wraps the training module's forward in for `--mixed_precision`."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def make_training_step(args: argparse.Namespace, module):
    """One optimizer step of `train_diffae.py`'s loop, outside accelerate, with the settings `args` gives (for the
    benchmark against the official code): `module` is a `DiffAETrainingModule`, prepared in place (layout, train
    mode); returns `step(x0) -> loss` for `x0` `(B, 3, H, W)` in [-1, 1]."""
    import _checkpoints
    import _common

    memory_format = prepare_for_training(args, [module.unet, module.encoder])
    module.train()
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = _common.make_optimizer(args, parameters, args.learning_rate)
    parts = [name for name in ("unet", "encoder") if getattr(module, name) is not None]
    emas = {
        name: _checkpoints.make_ema(args, getattr(module, name), type(getattr(module, name)), "cpu") for name in parts
    }
    num_train_timesteps = module.noise_scheduler.config.num_train_timesteps

    def step(x0: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x0).contiguous(memory_format=memory_format)
        x0 = x0.contiguous(memory_format=memory_format)
        timesteps = torch.randint(0, num_train_timesteps, (x0.shape[0],))
        with training_autocast(args.mixed_precision, x0.device):
            loss = module(x0, timesteps, noise).mean()
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, ema in emas.items():
            ema.step(getattr(module, name).parameters())
        return loss.detach()

    return step
