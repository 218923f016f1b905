#!/usr/bin/env python
"""Train a Diffusion Autoencoder: the semantic encoder and the conditional DDIM decoder, end to end.

Paper §3 (Eq. 6), official recipe: `|| eps_theta(x_t, t, Enc(x_0)) - eps ||^2` with uniform t, linear betas
1e-4..0.02 over 1000 steps, Adam 1e-4, gradient-norm clipping at 1.0, EMA 0.9999 and random horizontal flips.
`--no_semantic_encoder` trains the paper's DDIM baseline (the same UNet without z_sem) on the same data.

    accelerate launch training/train_diffae.py --dataset_name ./emoji32 --resolution 32 \
        --model_config training/configs/emoji32.json --train_batch_size 32 --max_train_steps 50000 \
        --use_ema --checkpointing_steps 1000 --validation_steps 1000 --output_dir diffae-emoji32

The result is a `DiffAEPipeline` folder (`DiffAEPipeline.from_pretrained(output_dir)`) with a model card;
`train_latent_ddim.py` and `train_attribute_classifier.py` add the later stages to it.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time
import uuid
from typing import Any, Dict, Optional

import torch
from torch import nn

import _common
from _common import TrainingInputError

logger = logging.getLogger("train_diffae")

DEFAULT_UNET_LORA_TARGETS = "conv1,conv2,time_emb_proj,z_sem_proj,to_q,to_k,to_v,to_out.0"
DEFAULT_ENCODER_LORA_TARGETS = "conv1,to_q,to_k,to_v,to_out.0,proj_out"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a Diffusion Autoencoder (DiffAE) with accelerate.")
    _common.add_dataset_arguments(parser, resolution_default=None)
    parser.add_argument(
        "--random_flip", action="store_true", help="Flip training images horizontally with probability 0.5 (official)."
    )

    group = parser.add_argument_group("model")
    group.add_argument(
        "--preset",
        type=str,
        default=None,
        help="An official architecture: ffhq64, ffhq128, ffhq256, horse128, bedroom128, celeba64, or a release "
        "name such as ffhq128_autoenc_72M.",
    )
    group.add_argument(
        "--model_config",
        type=str,
        default=None,
        help='A JSON file with {"unet": {...}, "encoder": {...}} (configs of DiffAEUNet2DModel and '
        'SemanticEncoder; optionally "scheduler") or an official TrainConfig JSON.',
    )
    group.add_argument(
        "--init_from",
        type=str,
        default=None,
        help="Start from the unet/ (and encoder/) of a saved pipeline folder instead of random weights.",
    )
    group.add_argument(
        "--no_semantic_encoder",
        action="store_true",
        help="Train the DDIM baseline: the same UNet without z_sem (z_sem_channels=None) and no encoder. The "
        "output folder is a DDIMPipeline layout (unet/ + scheduler/).",
    )
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")

    group = parser.add_argument_group("LoRA")
    group.add_argument(
        "--use_lora",
        action="store_true",
        help="Fine-tune a peft LoRA adapter on the UNet of --init_from; the base weights stay frozen and only the "
        "adapter is saved (unet_lora/pytorch_lora_weights.safetensors).",
    )
    group.add_argument("--lora_rank", type=int, default=8, help="LoRA rank r.")
    group.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1).")
    group.add_argument(
        "--lora_encoder", action="store_true", help="Also add an adapter to the semantic encoder (encoder_lora/)."
    )
    group.add_argument(
        "--lora_target_modules",
        type=str,
        default=DEFAULT_UNET_LORA_TARGETS,
        help="Comma-separated UNet module names that get adapters.",
    )
    group.add_argument(
        "--lora_encoder_target_modules",
        type=str,
        default=DEFAULT_ENCODER_LORA_TARGETS,
        help="Comma-separated encoder module names that get adapters (with --lora_encoder).",
    )

    group = parser.add_argument_group("optimisation")
    group.add_argument("--train_batch_size", type=int, default=32, help="Images per process and micro-step.")
    group.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_epochs.")
    group.add_argument("--num_epochs", type=int, default=100, help="Epochs when --max_train_steps is not given.")
    group.add_argument(
        "--max_train_minutes",
        type=float,
        default=None,
        help="Also stop after this many minutes of training (checked every --logging_steps steps), then save a "
        "checkpoint and the pipeline as at the end: for a machine lent for a fixed time.",
    )
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step.")
    group.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate (official: 1e-4).")
    group.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by batch size x accumulation x processes / 32 (the official batch).",
    )
    group.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='diffusers schedule: "constant" (official), "constant_with_warmup", "linear", "cosine", ...',
    )
    group.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up optimizer steps.")
    group.add_argument("--optimizer", type=str, default="adam", choices=["adam", "adamw"], help="Official: adam.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=0.0)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="Gradient-norm clip (0 disables; official 1.0)."
    )
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Autocast precision (default: accelerate config). The official models trained in fp16.",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    group.add_argument(
        "--memory_format",
        type=str,
        default="auto",
        choices=["auto", "channels_last", "contiguous"],
        help="Layout of weights and activations. auto: channels_last from 64 px up (measured faster there on CPU, "
        "docs/results/speed.md), contiguous below (no faster at 32 px). Both are exact fp32.",
    )
    group.add_argument("--seed", type=int, default=None, help="Seed of weights, noise, timesteps and data order.")
    group.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="CPU threads per process (default: the cores divided by the local processes, unless OMP_NUM_THREADS).",
    )

    _common.add_ema_arguments(parser)

    _common.add_checkpoint_arguments(parser, checkpointing_default=500)

    group = parser.add_argument_group("logging and validation")
    group.add_argument("--output_dir", type=str, default="diffae-model", help="Pipeline and checkpoints go here.")
    group.add_argument(
        "--report_to",
        type=str,
        default="none",
        help='accelerate trackers: "tensorboard", "wandb", "all" or "none" (they must be installed).',
    )
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    group.add_argument("--logging_steps", type=int, default=50, help="Sync and log the loss every N steps.")
    group.add_argument(
        "--validation_steps",
        type=int,
        default=0,
        help="Every N steps save (and log) a reconstruction grid and an interpolation strip; 0: only at the end.",
    )
    group.add_argument("--num_validation_images", type=int, default=8, help="Images in the reconstruction grid.")
    group.add_argument("--validation_inference_steps", type=int, default=20, help="DDIM steps for validation.")
    group.add_argument("--validation_interpolation_frames", type=int, default=8, help="Frames of the strip.")
    group.add_argument("--tracker_project_name", type=str, default="train_diffae")
    group.add_argument("--model_card_path", type=str, default=None, help="Also write the model card here.")
    group.add_argument("--license", type=str, default="mit", help="License in the model card metadata.")
    _common.add_hub_arguments(parser)

    args = parser.parse_args(argv)
    if args.lora_alpha is None:
        args.lora_alpha = float(args.lora_rank)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def resolve_model_configs(args: argparse.Namespace) -> dict:
    """Returns {"unet", "encoder" (or None), "scheduler"} configs from --preset, --model_config or --init_from."""
    from diffusers_diffae.presets import _ddim_config, official_component_configs, preset_config

    sources = [name for name in ("preset", "model_config", "init_from") if getattr(args, name)]
    if len(sources) != 1:
        raise TrainingInputError(
            "give exactly one of --preset, --model_config and --init_from" + (f" (got {sources})" if sources else "")
        )
    default_scheduler = _ddim_config(1000, "linear", clip_sample=True)
    if args.preset:
        try:
            configs = {c: preset_config(args.preset, c) for c in ("unet", "encoder", "scheduler")}
        except ValueError as e:
            raise TrainingInputError(f"--preset: {e}") from e
    elif args.model_config:
        if not os.path.isfile(args.model_config):
            raise TrainingInputError(f"--model_config {args.model_config!r} does not exist")
        try:
            with open(args.model_config, encoding="utf-8") as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TrainingInputError(f"--model_config {args.model_config!r} is not valid JSON: {e}") from e
        if isinstance(raw, dict) and "unet" in raw:
            configs = {"unet": raw["unet"], "encoder": raw.get("encoder"), "scheduler": raw.get("scheduler")}
        else:
            try:
                official = official_component_configs(args.model_config)
            except ValueError as e:
                raise TrainingInputError(
                    f'--model_config must hold {{"unet": ..., "encoder": ...}} or an official TrainConfig: {e}'
                ) from e
            configs = {c: official[c] for c in ("unet", "encoder", "scheduler")}
    else:
        from diffusers import DDIMScheduler

        from diffusers_diffae import DiffAEUNet2DModel, SemanticEncoder

        if not os.path.isdir(os.path.join(args.init_from, "unet")):
            raise TrainingInputError(f"--init_from {args.init_from!r} is not a pipeline folder with a unet/ subfolder")
        configs = {"unet": dict(DiffAEUNet2DModel.load_config(args.init_from, subfolder="unet"))}
        has_encoder = os.path.isdir(os.path.join(args.init_from, "encoder"))
        configs["encoder"] = (
            dict(SemanticEncoder.load_config(args.init_from, subfolder="encoder")) if has_encoder else None
        )
        has_scheduler = os.path.isdir(os.path.join(args.init_from, "scheduler"))
        configs["scheduler"] = (
            dict(DDIMScheduler.load_config(args.init_from, subfolder="scheduler")) if has_scheduler else None
        )
    configs = {
        k: (None if v is None else {n: x for n, x in dict(v).items() if not n.startswith("_")})
        for k, v in configs.items()
    }
    configs["scheduler"] = configs["scheduler"] or default_scheduler

    if args.no_semantic_encoder:
        if args.init_from and configs["unet"].get("z_sem_channels") is not None:
            raise TrainingInputError(
                f"--init_from {args.init_from!r} holds a DiffAE UNet with z_sem; --no_semantic_encoder needs a "
                "baseline UNet (z_sem_channels=None)"
            )
        configs["unet"]["z_sem_channels"] = None
        configs["encoder"] = None
    else:
        if configs["encoder"] is None:
            raise TrainingInputError("the model config has no encoder; add one or pass --no_semantic_encoder")
        if configs["unet"].get("z_sem_channels", 512) is None:
            raise TrainingInputError(
                "the UNet config has z_sem_channels=None (a DDIM baseline); pass --no_semantic_encoder to train it"
            )
        width = configs["encoder"].get("out_channels", 512)
        if configs["unet"].get("z_sem_channels", 512) != width:
            raise TrainingInputError(
                f"the encoder outputs {width} channels but the UNet takes z_sem_channels="
                f"{configs['unet'].get('z_sem_channels', 512)}"
            )

    for name in ("unet", "encoder"):
        if configs[name] is not None and configs[name].get("in_channels", 3) != 3:
            raise TrainingInputError(
                f"the {name} takes {configs[name]['in_channels']} channels; these scripts feed RGB"
            )
    size = configs["unet"].get("sample_size", 64)
    if args.resolution is None:
        args.resolution = size
    for name in ("unet", "encoder"):
        if configs[name] is not None and configs[name].get("sample_size", 64) != args.resolution:
            raise TrainingInputError(
                f"--resolution {args.resolution} does not match the {name}'s sample_size "
                f"{configs[name].get('sample_size', 64)} (attention placement depends on it); change one of them"
            )
    return configs


def resolve_memory_format(choice: str, resolution: int) -> torch.memory_format:
    """`--memory_format` -> a torch memory format (auto: channels_last from 64 px up, as the pipeline's default)."""
    if choice == "auto":
        choice = "channels_last" if resolution >= 64 else "contiguous"
    return torch.channels_last if choice == "channels_last" else torch.contiguous_format


def build_models(args: argparse.Namespace, configs: dict):
    from diffusers_diffae import DiffAEUNet2DModel, SemanticEncoder

    try:
        if args.init_from:
            unet = DiffAEUNet2DModel.from_pretrained(args.init_from, subfolder="unet")
            encoder = (
                None
                if args.no_semantic_encoder
                else SemanticEncoder.from_pretrained(args.init_from, subfolder="encoder")
            )
        else:
            unet = DiffAEUNet2DModel.from_config(configs["unet"])
            encoder = None if configs["encoder"] is None else SemanticEncoder.from_config(configs["encoder"])
    except (TypeError, ValueError) as e:
        raise TrainingInputError(f"could not build the models from the given config: {e}") from e
    return unet, encoder


def add_lora_adapters(args: argparse.Namespace, unet, encoder) -> None:
    """Freezes the base weights and adds trainable LoRA adapters (peft) to the UNet and optionally the encoder."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            target_modules=[m.strip() for m in args.lora_target_modules.split(",") if m.strip()],
            init_lora_weights=True,
        )
    )
    if encoder is not None:
        encoder.requires_grad_(False)
        if args.lora_encoder:
            encoder.add_adapter(
                LoraConfig(
                    r=args.lora_rank,
                    lora_alpha=args.lora_alpha,
                    target_modules=[m.strip() for m in args.lora_encoder_target_modules.split(",") if m.strip()],
                    init_lora_weights=True,
                )
            )


class DiffAETrainingModule(nn.Module):
    """The decoder and the encoder under one module, so that one DDP wrapper, one autocast context and one
    optimizer see both: the encoder is trained only through the decoder's loss (paper §3.2)."""

    def __init__(self, unet, encoder, noise_scheduler):
        super().__init__()
        self.unet = unet
        self.encoder = encoder
        self.noise_scheduler = noise_scheduler  # a plain attribute: not a module, not in the state dict

    def forward(self, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1], (B,) timesteps, (B, C, H, W) noise -> (B,) per-image Eq. 6 loss."""
        from diffusers_diffae.training_utils import diffae_loss

        return diffae_loss(self.unet, self.encoder, x0, timesteps, noise, self.noise_scheduler, reduction="none")


def trainable_state(module: nn.Module) -> dict:
    return {name: p.detach().contiguous() for name, p in module.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------------------
# Validation and saving
# ----------------------------------------------------------------------------------------------------------------


def build_pipeline(unet, encoder, scheduler_config):
    from diffusers import DDIMInverseScheduler, DDIMPipeline, DDIMScheduler

    from diffusers_diffae import DiffAEPipeline

    if encoder is None:
        return DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler_config))
    return DiffAEPipeline(
        unet=unet,
        encoder=encoder,
        scheduler=DDIMScheduler.from_config(scheduler_config),
        inverse_scheduler=DDIMInverseScheduler.from_config(scheduler_config),
    )


@torch.no_grad()
def run_validation(args, accelerator, module, emas, scheduler_config, images: torch.Tensor, step: int) -> dict:
    """Reconstruction grid (inputs / with inferred x_T / with random x_T) and an interpolation strip, as PNGs.

    Runs on the main process with the EMA weights swapped in; random draws use their own generator so the
    training RNG stream is untouched (a resumed run stays identical to an uninterrupted one).
    """
    unet, encoder = module.unet, module.encoder
    parts = [m for m in (unet, encoder) if m is not None]
    for ema, part in zip(emas, parts):
        ema.store(part.parameters())
        ema.copy_to(part.parameters())
    modes = [m.training for m in parts]
    for m in parts:
        m.eval()
    try:
        pipe = build_pipeline(unet, encoder, scheduler_config)
        pipe.set_progress_bar_config(disable=True)
        steps = args.validation_inference_steps
        generator = torch.Generator(device="cpu").manual_seed(0)
        grids = {}
        if encoder is None:
            samples = pipe(
                batch_size=images.shape[0], generator=generator, num_inference_steps=steps, output_type="np"
            ).images
            grids["samples"] = _common.image_grid(torch.from_numpy(samples).permute(0, 3, 1, 2), nrow=images.shape[0])
        else:
            latents = pipe.encode(images, num_inference_steps=steps, stochastic=True)
            recon = pipe.decode(latents.z_sem, latents.x_T, steps, output_type="pt").images
            varied = pipe.decode(latents.z_sem, None, steps, generator=generator, output_type="pt").images
            grids["reconstruction"] = _common.image_grid(
                torch.cat([images, recon.cpu(), varied.cpu()]), nrow=images.shape[0]
            )
            if images.shape[0] >= 2:
                from diffusers_diffae import DiffAELatents

                first = DiffAELatents(z_sem=latents.z_sem[:1], x_T=latents.x_T[:1])
                second = DiffAELatents(z_sem=latents.z_sem[1:2], x_T=latents.x_T[1:2])
                strip = pipe.interpolate(
                    first,
                    second,
                    num_frames=args.validation_interpolation_frames,
                    num_inference_steps=steps,
                    output_type="pt",
                ).images
                grids["interpolation"] = _common.image_grid(strip.cpu(), nrow=strip.shape[0])
    finally:
        for ema, part in zip(emas, parts):
            ema.restore(part.parameters())
        for m, mode in zip(parts, modes):
            m.train(mode)
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, grid in grids.items():
        paths[name] = os.path.join(folder, f"step-{step:07d}-{name}.png")
        grid.save(paths[name])
    _common.log_images(accelerator, {f"validation/{k}": v for k, v in grids.items()}, step)
    return paths


def model_card(
    args,
    configs,
    dataset_name: str,
    num_images: int,
    global_step: int,
    final_loss: Optional[float],
    state: Optional[Dict[str, Any]] = None,
) -> str:
    """The exported folder's README; `state` is the checkpoint state, whose step-range records (precision,
    learning rate) the card lists."""
    from diffusers_diffae.hub_utils import OFFICIAL_CODE_URL

    baseline = args.no_semantic_encoder
    tags = ["diffae", "diffusion-autoencoder", "diffusers", "diffusers-training"]
    tags += ["unconditional-image-generation"] if baseline else ["image-to-image", "representation-learning"]
    if args.use_lora:
        tags.append("lora")
    text = _common.front_matter(tags, args.license, base_model=args.init_from if args.init_from else None)
    title = (
        "DDIM baseline" if baseline else ("Diffusion Autoencoder LoRA" if args.use_lora else "Diffusion Autoencoder")
    )
    text += f"\n# {title} trained on {dataset_name}\n\n"
    if baseline:
        text += (
            "The DDIM baseline of [Diffusion Autoencoders](https://arxiv.org/abs/2111.15640) (Preechakul et al., "
            "CVPR 2022): the same UNet without the semantic code, for comparisons.\n\n```py\n"
            "import diffusers_diffae  # registers the model classes\nfrom diffusers import DDIMPipeline\n\n"
            f'pipe = DDIMPipeline.from_pretrained("{args.hub_model_id or args.output_dir}")\n'
            "images = pipe(batch_size=4, num_inference_steps=50).images\n```\n"
        )
    elif args.use_lora:
        text += (
            "A LoRA adapter for a [Diffusion Autoencoder](https://arxiv.org/abs/2111.15640) "
            f"(base pipeline: `{args.init_from}`).\n\n```py\nfrom diffusers_diffae import DiffAEPipeline\n\n"
            f'pipe = DiffAEPipeline.from_pretrained("{args.init_from}")\n'
            f'pipe.unet.load_lora_adapter("{args.output_dir}/unet_lora", prefix=None, use_safetensors=True)\n'
            + (
                f'pipe.encoder.load_lora_adapter("{args.output_dir}/encoder_lora", prefix=None, '
                "use_safetensors=True)\n"
                if args.lora_encoder
                else ""
            )
            + "```\n"
        )
    else:
        text += (
            "A [Diffusion Autoencoder](https://arxiv.org/abs/2111.15640) (Preechakul et al., CVPR 2022): a "
            "semantic encoder that maps an image to `z_sem` and a conditional DDIM that decodes `(z_sem, x_T)`. "
            "Trained with `training/train_diffae.py` of diffusers-diffae (a diffusers port of the "
            f"[official code]({OFFICIAL_CODE_URL})).\n\n"
            "```py\nfrom diffusers_diffae import DiffAEPipeline\n\n"
            f'pipe = DiffAEPipeline.from_pretrained("{args.hub_model_id or args.output_dir}")\n'
            "latents = pipe.encode(images, num_inference_steps=50)          # z_sem (B, D), x_T (B, 3, H, W)\n"
            "recon = pipe.decode(latents.z_sem, latents.x_T, num_inference_steps=50).images\n```\n\n"
            "Unconditional sampling needs the latent DDIM (`training/train_latent_ddim.py`); attribute editing "
            "needs a classifier (`training/train_attribute_classifier.py`).\n"
        )
    state = state or {}
    precision = _common.describe_history(
        state.get("precision_history", []), "mixed_precision", args.mixed_precision or "accelerate default"
    )
    learning_rate = _common.describe_history(
        state.get("learning_rate_history", []), "learning_rate", str(args.learning_rate)
    )
    batches = state.get("images_per_step_history", [])
    seen = _common.images_seen(batches)
    seen_text = f" ({seen} images seen)" if seen is not None else ""
    if len(batches) > 1:
        per_step = _common.describe_history(batches, "images_per_step", "")
        steps = f"{global_step}{seen_text}, images per step: {per_step}"
    else:
        batch = args.train_batch_size * args.gradient_accumulation_steps
        steps = f"{global_step} x {batch} images per process{seen_text}"
    ema = "none"
    if args.use_ema:
        decay = _common.describe_history(state.get("ema_decay_history", []), "ema_decay", str(args.ema_decay))
        ema = f"decay {decay}" + (
            f", warm-up (inv_gamma {args.ema_inv_gamma}, power {args.ema_power})" if args.ema_warmup else ""
        )
    text += (
        "\n## Training\n\n"
        f"- data: `{dataset_name}` ({num_images} images, {args.resolution}x{args.resolution}, "
        f"{'random flips' if args.random_flip else 'no flips'})\n"
        f"- steps: {steps}\n"
        f"- optimiser: {args.optimizer}, learning rate {learning_rate} ({args.lr_scheduler}), "
        f"gradient clip {args.max_grad_norm}\n"
        f"- EMA: {ema}\n"
        f"- mixed precision: {precision}\n"
        + (f"- final loss (last logging window): {final_loss:.5f}\n" if final_loss is not None else "")
        + "\n<details><summary>Model configs</summary>\n\n```json\n"
        + json.dumps({k: configs[k] for k in ("unet", "encoder", "scheduler")}, indent=2, default=str)
        + "\n```\n</details>\n"
    )
    return text


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)

    # 0. checks that need nothing heavy, so bad input fails in seconds
    _common.check_positive(
        args,
        [
            "train_batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "num_validation_images",
            "validation_inference_steps",
            "logging_steps",
            "max_train_steps",
            "num_epochs",
            "lora_rank",
        ],
    )
    _common.check_report_to(args.report_to)
    if args.use_lora and not args.init_from:
        raise TrainingInputError("--use_lora fine-tunes a pretrained pipeline: give it with --init_from")
    if args.use_lora and args.use_ema:
        raise TrainingInputError("--use_ema is not supported with --use_lora (the adapter is small; average off)")
    if args.lora_encoder and not args.use_lora:
        raise TrainingInputError("--lora_encoder needs --use_lora")
    if args.validation_interpolation_frames < 2:
        raise TrainingInputError("--validation_interpolation_frames must be at least 2")
    if args.max_train_minutes is not None and args.max_train_minutes < 0:
        raise TrainingInputError("--max_train_minutes must not be negative")
    resume_checkpoint = _common.resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    resume_state = _common.read_training_state(resume_checkpoint)
    configs = resolve_model_configs(args)

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from diffusers_diffae import DiffAEUNet2DModel, SemanticEncoder

    # 1. accelerator
    seed = _common.resolve_seed(args.seed, resume_state)
    accelerator = Accelerator(
        cpu=_common.no_accelerator_device(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # The data order is a function of (seed, epoch) on every process, so skipping batches on resume lands on
        # exactly the batch an uninterrupted run would see next.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
    )
    threads = _common.configure_cpu_threads(args.num_threads, _local_world_size(accelerator))
    log = (lambda msg: logger.info(msg)) if accelerator.is_main_process else (lambda msg: None)
    log(f"{accelerator.state.distributed_type} with {accelerator.num_processes} process(es), {threads} thread(s) each")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(seed, device_specific=True)  # each process draws its own noise and timesteps (official: seed*world+rank)

    # 2. data (checked completely before any model is built)
    train_dataset, hf_dataset = _common.build_image_dataset(args, seed, log=log)
    global_batch = args.train_batch_size * accelerator.num_processes
    if len(train_dataset) < global_batch:
        raise TrainingInputError(
            f"the dataset has {len(train_dataset)} images, fewer than one global batch "
            f"({args.train_batch_size} x {accelerator.num_processes} processes); lower --train_batch_size"
        )
    validation_images = _common.load_validation_images(args, hf_dataset, args.num_validation_images)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,  # equal batches on every process, as the official DistributedSampler(drop_last=True)
        num_workers=args.dataloader_num_workers,
        # Its own generator: building the resumed epoch's iterator must not consume the global RNG stream.
        generator=torch.Generator().manual_seed(seed),
    )

    # 3. models
    unet, encoder = build_models(args, configs)
    memory_format = resolve_memory_format(args.memory_format, unet.config.sample_size)
    for part in (unet, encoder):
        if part is not None:
            part.to(memory_format=memory_format)
    if args.use_lora:
        add_lora_adapters(args, unet, encoder)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if encoder is not None:
            encoder.enable_gradient_checkpointing()
    noise_scheduler = DDPMScheduler.from_config(configs["scheduler"])
    module = DiffAETrainingModule(unet, encoder, noise_scheduler)
    module.train()
    parameters = [p for p in module.parameters() if p.requires_grad]
    log(
        f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters"
        + (f", encoder {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M" if encoder is not None else "")
        + f", {sum(p.numel() for p in parameters) / 1e6:.3f}M trainable"
    )

    # 4. optimizer, EMA, LR schedule
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes / 32
    optimizer_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(
        parameters,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    parts = ((unet, DiffAEUNet2DModel), (encoder, SemanticEncoder))
    emas = [_common.make_ema(args, part, cls) for part, cls in parts if part is not None] if args.use_ema else []
    # The sharded loader's length decides the epoch: (N // batch) // processes batches with drop_last.
    train_dataloader = accelerator.prepare(train_dataloader)
    steps_per_epoch, max_train_steps, num_epochs, lr_scheduler = _common.plan_steps_and_lr_schedule(
        args, optimizer, len(train_dataloader), accelerator.num_processes
    )

    # 5. prepare, checkpoint hooks, resume
    module, optimizer, lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
    for ema in emas:
        ema.to(accelerator.device)

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            inner = accelerator.unwrap_model(models[0])
            if args.use_lora:
                from safetensors.torch import save_file

                save_file(trainable_state(inner), os.path.join(output_dir, "trainable_parameters.safetensors"))
            else:
                inner.unet.save_pretrained(os.path.join(output_dir, "unet"))
                if inner.encoder is not None:
                    inner.encoder.save_pretrained(os.path.join(output_dir, "encoder"))
            for ema, name in zip(emas, ("unet_ema", "encoder_ema")):
                ema.save_pretrained(os.path.join(output_dir, name))
        while weights:  # the folders above replace accelerate's own model files
            weights.pop()

    resumed_decay = {}  # the EMA decay the resumed checkpoint ran at, for its history (set by load_model_hook)

    def load_model_hook(models, input_dir):
        inner = accelerator.unwrap_model(models.pop())
        if args.use_lora:
            from safetensors.torch import load_file

            state = load_file(os.path.join(input_dir, "trainable_parameters.safetensors"))
            missing = set(trainable_state(inner)) - set(state)
            if missing:
                raise TrainingInputError(f"checkpoint {input_dir} lacks adapter weights {sorted(missing)[:3]}...")
            inner.load_state_dict(state, strict=False)
        else:
            inner.unet.load_state_dict(DiffAEUNet2DModel.from_pretrained(input_dir, subfolder="unet").state_dict())
            if inner.encoder is not None:
                inner.encoder.load_state_dict(
                    SemanticEncoder.from_pretrained(input_dir, subfolder="encoder").state_dict()
                )
        for ema, name, part in zip(emas, ("unet_ema", "encoder_ema"), (inner.unet, inner.encoder)):
            _common.load_ema_folder(ema, os.path.join(input_dir, name), part, accelerator.device)
            resumed_decay[name] = ema.decay
            if ema.decay != args.ema_decay:  # as with --learning_rate, the resumed run's --ema_decay wins
                log(f"{name} was saved with decay {ema.decay:g}; continuing with --ema_decay {args.ema_decay:g}")
                ema.decay = args.ema_decay

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    global_step = 0
    resumed_rate = learning_rate
    if resume_checkpoint is not None:
        log(f"resuming from {resume_checkpoint}")
        accelerator.load_state(resume_checkpoint)
        global_step = int(resume_state["global_step"])
        resumed_rate = _common.set_peak_learning_rate(lr_scheduler, learning_rate)
        if resumed_rate != learning_rate:
            log(f"the checkpoint ran at peak learning rate {resumed_rate:g}; continuing at {learning_rate:g}")
        saved_layout = (resume_state.get("num_processes"), resume_state.get("train_batch_size"))
        if saved_layout != (accelerator.num_processes, args.train_batch_size):
            logger.warning(
                "the checkpoint was written with %s process(es) x batch %s; continuing with %s x %s, so the data "
                "order (not the optimisation state) differs from an uninterrupted run",
                *saved_layout,
                accelerator.num_processes,
                args.train_batch_size,
            )
    elif args.resume_from_checkpoint == "latest":
        log(f"no complete checkpoint in {args.output_dir}; starting a new run")
    start_step = global_step  # where this invocation's stretch of the precision history begins
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(
            args.tracker_project_name,
            config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
        )

    # 6. loop
    images_per_step = global_batch * args.gradient_accumulation_steps
    log(
        f"{len(train_dataset)} images, {steps_per_epoch} steps per epoch, {max_train_steps} steps, "
        f"{images_per_step} images per step"
    )
    guard = _common.NonFiniteLossGuard(accelerator.device)
    deadline = None if args.max_train_minutes is None else time.monotonic() + 60 * args.max_train_minutes
    time_up = False
    last_checkpoint = resume_checkpoint
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_count, last_logged_loss = 0, None
    meter = _common.Throughput()
    meter.steps = global_step
    progress = tqdm(
        total=max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    def checkpoint_state():
        return {
            "global_step": global_step,
            "seed": seed,
            "epoch": global_step // steps_per_epoch,
            "num_processes": accelerator.num_processes,
            "train_batch_size": args.train_batch_size,
            "precision_history": _common.precision_history(
                resume_state, start_step, global_step, accelerator.mixed_precision
            ),
            "learning_rate_history": _common.learning_rate_history(
                resume_state, start_step, global_step, learning_rate, resumed_rate
            ),
            "images_per_step_history": _common.images_per_step_history(
                resume_state, start_step, global_step, images_per_step
            ),
            "ema_decay_history": _common.ema_decay_history(
                resume_state,
                start_step,
                global_step,
                args.ema_decay if args.use_ema else None,
                resumed_decay.get("unet_ema"),
            ),
        }

    def validate():
        if accelerator.is_main_process:
            paths = run_validation(
                args,
                accelerator,
                accelerator.unwrap_model(module),
                emas,
                configs["scheduler"],
                validation_images,
                global_step,
            )
            log(f"validation images: {', '.join(paths.values())}")
        accelerator.wait_for_everyone()

    try:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= max_train_steps or time_up:
                break
            train_dataset.set_epoch(epoch)
            loader = train_dataloader
            if epoch == first_epoch and skip_batches:
                loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
            loader.set_epoch(epoch)
            for batch in loader:
                with accelerator.accumulate(module):
                    x0 = batch.to(torch.float32) / 127.5 - 1  # uint8 -> [-1, 1] on the device
                    noise = torch.randn_like(x0)  # drawn before the layout change: the same noise in any layout
                    x0, noise = x0.contiguous(memory_format=memory_format), noise.contiguous(memory_format=memory_format)
                    timesteps = torch.randint(0, num_train_timesteps, (x0.shape[0],), device=x0.device)
                    loss = module(x0, timesteps, noise).mean()
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                loss_count += 1
                guard.observe(loss, global_step + 1)
                if not accelerator.sync_gradients:
                    continue

                global_step += 1
                inner = accelerator.unwrap_model(module)
                for ema, part in zip(emas, (inner.unet, inner.encoder)):
                    ema.step(part.parameters())
                progress.update(1)

                if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                    guard.check(accelerator, last_checkpoint)
                    mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(loss_count, 1)
                    loss_sum.zero_()
                    loss_count = 0
                    last_logged_loss = mean_loss
                    steps_per_s, images_per_s = meter.rates(global_step, images_per_step)
                    logs = {
                        "loss": mean_loss,
                        "lr": lr_scheduler.get_last_lr()[0],
                        "step/s": steps_per_s,
                        "img/s": images_per_s,
                    }
                    if emas:
                        logs["ema_decay"] = emas[0].cur_decay_value
                    progress.set_postfix(
                        loss=f"{mean_loss:.4f}", steps_s=f"{steps_per_s:.2f}", img_s=f"{images_per_s:.1f}"
                    )
                    accelerator.log(logs, step=global_step)
                    if deadline is not None and _common.deadline_passed(accelerator, deadline):
                        time_up = True
                        log(f"--max_train_minutes {args.max_train_minutes:g} reached at step {global_step}")

                if args.checkpointing_steps and (global_step % args.checkpointing_steps == 0 or time_up):
                    guard.check(accelerator, last_checkpoint)
                    _common.check_finite_weights(parameters, global_step, last_checkpoint)
                    last_checkpoint = _common.save_checkpoint(
                        accelerator, args.output_dir, global_step, checkpoint_state(), args.checkpoints_total_limit
                    )
                    log(f"saved {last_checkpoint}")

                if args.validation_steps and global_step % args.validation_steps == 0:
                    validate()
                if global_step >= max_train_steps or time_up:
                    break
        guard.check(accelerator, last_checkpoint)
        _common.check_finite_weights(parameters, global_step, last_checkpoint)
    except _common.NonFiniteLossError as e:
        progress.close()
        accelerator.end_training()
        if accelerator.is_main_process:
            logger.error(str(e))
        return 2
    progress.close()

    # 7. final validation, pipeline folder, model card
    if args.validation_steps == 0 or global_step % args.validation_steps != 0:
        validate()
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(module)
        for ema, part in zip(emas, (inner.unet, inner.encoder)):
            ema.copy_to(part.parameters())  # the published weights are the EMA weights (official `ema_model`)
        staging = os.path.join(args.output_dir, f".tmp-pipeline-{uuid.uuid4().hex[:8]}")
        os.makedirs(staging)
        if args.use_lora:
            inner.unet.save_lora_adapter(os.path.join(staging, "unet_lora"), adapter_name="default")
            if args.lora_encoder:
                inner.encoder.save_lora_adapter(os.path.join(staging, "encoder_lora"), adapter_name="default")
        else:
            pipeline = build_pipeline(inner.unet, inner.encoder, configs["scheduler"])
            pipeline.save_pretrained(staging)
        dataset_name = args.dataset_name or args.train_data_dir
        card = model_card(
            args, configs, dataset_name, len(train_dataset), global_step, last_logged_loss, checkpoint_state()
        )
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        with open(os.path.join(staging, "training_args.json"), "w", encoding="utf-8") as f:
            json.dump({**vars(args), "seed": seed, "global_step": global_step}, f, indent=2, default=str)
        _common.replace_folder_contents(staging, args.output_dir)
        if args.model_card_path:
            shutil.copyfile(os.path.join(args.output_dir, "README.md"), args.model_card_path)
        log(f"saved the {'adapter' if args.use_lora else 'pipeline'} to {args.output_dir}")
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            _common.push_folder_to_hub(
                args.output_dir, repo_id, args.hub_token, args.hub_private_repo, f"train_diffae: step {global_step}"
            )
            log(f"uploaded to {repo_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _local_world_size(accelerator) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes if accelerator.num_processes else 1))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TrainingInputError as e:
        logging.getLogger("train_diffae").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
