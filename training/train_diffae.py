#!/usr/bin/env python
"""Train a Diffusion Autoencoder: the semantic encoder and the conditional DDIM decoder, end to end.

Paper §3 (Eq. 6), official recipe: `|| eps_theta(x_t, t, Enc(x_0)) - eps ||^2` with uniform t, linear betas
1e-4..0.02 over 1000 steps, Adam 1e-4, gradient-norm clipping at 1.0, EMA 0.9999 and random horizontal flips.
`--no_semantic_encoder` trains the paper's DDIM baseline (the same UNet without z_sem) on the same data.

    accelerate launch training/train_diffae.py --dataset_name ./emoji32 --resolution 32 \
        --model_config training/configs/emoji32.json --train_batch_size 32 --max_train_steps 50000 \
        --use_ema --checkpointing_steps 1000 --validation_steps 1000 --output_dir diffae-emoji32

`--init_from PIPELINE_FOLDER` starts from a trained pipeline's weights (for instance the bundled
`src/diffusers_diffae/demo_assets/diffae-emoji32`) with a fresh optimizer; `--resume_from_checkpoint latest`
continues an interrupted run exactly. The result is a `DiffAEPipeline` folder
(`DiffAEPipeline.from_pretrained(output_dir)`) with a model card; `train_latent_ddim.py` and
`train_attribute_classifier.py` add the later stages to it.

Speed: by default the models train in the contiguous layout with torch's fused Adam, and on a CPU-only machine with
native bf16 (AVX512-BF16 or AMX) under bf16 autocast with fp32 weights (`--mixed_precision no` trains in fp32); the
loss of these defaults stays within a stated tolerance of the official code's (pipelines_tests/test_training_speed.py,
benchmarks/bench_vs_official.py).
"""

import argparse
import json
import logging
import os
import shutil
import time

import torch
from accelerate.logging import get_logger
from torch import nn

import _checkpoints
import _common
import _data
import _models
from _common import TrainingInputError


logger = get_logger("train_diffae")

DEFAULT_UNET_LORA_TARGETS = "conv1,conv2,time_emb_proj,z_sem_proj,to_q,to_k,to_v,to_out.0"
DEFAULT_ENCODER_LORA_TARGETS = "conv1,to_q,to_k,to_v,to_out.0,proj_out"
LORA_STATE_FILE = "trainable_parameters.safetensors"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a Diffusion Autoencoder (DiffAE) with accelerate.")
    _data.add_dataset_arguments(parser)
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
        help="Start from the unet/ (and encoder/) weights of a saved pipeline folder, e.g. the bundled "
        "src/diffusers_diffae/demo_assets/diffae-emoji32, instead of random weights (optimizer and EMA start fresh).",
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
    group.add_argument("--lora_encoder", action="store_true", help="Also adapt the semantic encoder (encoder_lora/).")
    group.add_argument(
        "--lora_target_modules", type=str, default=DEFAULT_UNET_LORA_TARGETS, help="UNet modules that get adapters."
    )
    group.add_argument(
        "--lora_encoder_target_modules",
        type=str,
        default=DEFAULT_ENCODER_LORA_TARGETS,
        help="Encoder modules that get adapters (with --lora_encoder).",
    )

    group = _common.add_optimization_arguments(parser, train_batch_size=32, optimizer="adam", weight_decay=0.0)
    group.add_argument(
        "--max_train_minutes",
        type=float,
        default=None,
        help="Also stop after this many minutes of training (checked every --logging_steps steps), then save a "
        "checkpoint and the pipeline as at the end: for a machine lent for a fixed time.",
    )
    group.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by batch size x accumulation x processes / 32 (the official batch).",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    group.add_argument(
        "--memory_format",
        type=str,
        default="contiguous",
        choices=["auto", "channels_last", "contiguous"],
        help="Layout of weights and activations. contiguous trains fastest on the CPUs measured "
        "(docs/results/speed_vs_official.md); auto: channels_last from 64 px up, the pipeline's inference default. "
        "Both are exact fp32.",
    )
    _checkpoints.add_ema_arguments(parser)
    _checkpoints.add_checkpoint_arguments(parser, checkpointing_default=500)

    group = _common.add_logging_arguments(parser, logging_steps=50)
    group.add_argument("--output_dir", type=str, default="diffae-model", help="Pipeline and checkpoints go here.")
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    group.add_argument("--validation_interpolation_frames", type=int, default=8, help="Frames of the strip.")
    group.add_argument("--tracker_project_name", type=str, default="train_diffae")
    group.add_argument("--model_card_path", type=str, default=None, help="Also write the model card here.")
    group.add_argument("--license", type=str, default="mit", help="License in the model card metadata.")
    _common.add_hub_arguments(parser)
    args = parser.parse_args(argv)

    # Checks that need nothing heavy: bad input fails before any model or data is loaded.
    _common.check_positive(
        args,
        ["train_batch_size", "gradient_accumulation_steps", "learning_rate", "num_validation_images"]
        + ["validation_inference_steps", "logging_steps", "max_train_steps", "num_epochs", "lora_rank"],
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
    if args.lora_alpha is None:
        args.lora_alpha = float(args.lora_rank)
    args.mixed_precision = _models.resolve_mixed_precision(args.mixed_precision)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


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
# Validation and export
# ----------------------------------------------------------------------------------------------------------------


def build_pipeline(unet, encoder, scheduler_config):
    """A `DiffAEPipeline` of the models, or a `DDIMPipeline` for the baseline (no encoder)."""
    from diffusers import DDIMInverseScheduler, DDIMPipeline, DDIMScheduler

    from diffusers_diffae import DiffAEPipeline

    scheduler = DDIMScheduler.from_config(scheduler_config)
    if encoder is None:
        return DDIMPipeline(unet=unet, scheduler=scheduler)
    inverse_scheduler = DDIMInverseScheduler.from_config(scheduler_config)
    return DiffAEPipeline(unet=unet, encoder=encoder, scheduler=scheduler, inverse_scheduler=inverse_scheduler)


@torch.no_grad()
def run_validation(args, module, emas, scheduler_config, images: torch.Tensor) -> dict:
    """Reconstruction grid (inputs / with inferred x_T / with random x_T) and an interpolation strip.

    Runs with the EMA weights swapped in; random draws use their own generator so the training RNG stream is
    untouched (a resumed run stays identical to an uninterrupted one). `images` are `(N, 3, R, R)` in [0, 1].
    """
    from diffusers_diffae import DiffAELatents

    unet, encoder = module.unet, module.encoder
    models = {"unet": unet, "encoder": encoder}
    with _checkpoints.averaged_weights([(m, emas.get(name)) for name, m in models.items() if m is not None]):
        pipe = build_pipeline(unet, encoder, scheduler_config)
        pipe.set_progress_bar_config(disable=True)
        steps, n = args.validation_inference_steps, images.shape[0]
        generator = torch.Generator(device="cpu").manual_seed(0)
        if encoder is None:
            samples = pipe(batch_size=n, generator=generator, num_inference_steps=steps, output_type="np").images
            return {"samples": _common.image_grid(torch.from_numpy(samples).permute(0, 3, 1, 2), nrow=n)}
        latents = pipe.encode(images, num_inference_steps=steps, stochastic=True)
        recon = pipe.decode(latents.z_sem, latents.x_T, steps, output_type="pt").images
        varied = pipe.decode(latents.z_sem, None, steps, generator=generator, output_type="pt").images
        grids = {"reconstruction": _common.image_grid(torch.cat([images, recon.cpu(), varied.cpu()]), nrow=n)}
        if n >= 2:
            first = DiffAELatents(z_sem=latents.z_sem[:1], x_T=latents.x_T[:1])
            second = DiffAELatents(z_sem=latents.z_sem[1:2], x_T=latents.x_T[1:2])
            frames = args.validation_interpolation_frames
            strip = pipe.interpolate(first, second, num_frames=frames, num_inference_steps=steps, output_type="pt")
            grids["interpolation"] = _common.image_grid(strip.images.cpu(), nrow=len(strip.images))
        return grids


def training_notes(args, configs, num_images: int, global_step: int, final_loss, state: dict) -> str:
    """The model card's `## Training` section; settings a resumed run changed are listed per stretch of steps."""
    describe_history = _checkpoints.describe_history
    batches = state["images_per_step_history"]
    seen = _checkpoints.images_seen(batches)
    seen_text = f" ({seen} images seen)" if seen is not None else ""
    if len(batches) > 1:
        steps = f"{global_step}{seen_text}, images per step: {describe_history(batches, 'images_per_step', '')}"
    else:
        steps = f"{global_step} x {args.train_batch_size * args.gradient_accumulation_steps} images per process"
        steps += seen_text
    learning_rate = describe_history(state["learning_rate_history"], "learning_rate", str(args.learning_rate))
    precision = args.mixed_precision or "accelerate default"
    ema = "none"
    if args.use_ema:
        ema = f"decay {describe_history(state['ema_decay_history'], 'ema_decay', str(args.ema_decay))}"
        if args.ema_warmup:
            ema += f", warm-up (inv_gamma {args.ema_inv_gamma}, power {args.ema_power})"
    lines = [
        f"- data: `{args.dataset_name or args.train_data_dir}` ({num_images} images, {args.resolution}x"
        f"{args.resolution}, {'random flips' if args.random_flip else 'no flips'})",
        f"- steps: {steps}",
        f"- optimiser: {args.optimizer}, learning rate {learning_rate} ({args.lr_scheduler}), gradient clip "
        f"{args.max_grad_norm}",
        f"- EMA: {ema}",
        f"- mixed precision: {describe_history(state['precision_history'], 'mixed_precision', precision)}",
    ]
    if final_loss is not None:
        lines.append(f"- final loss (last logging window): {final_loss:.5f}")
    if args.init_from:
        lines.append(f"- initialised from: `{args.init_from}`")
    configs_json = json.dumps({k: configs[k] for k in ("unet", "encoder", "scheduler")}, indent=2, default=str)
    return (
        "\n".join(lines) + f"\n\n<details><summary>Model configs</summary>\n\n```json\n{configs_json}\n```\n</details>"
    )


def export(args, configs, module, folder: str, notes: str) -> None:
    """Writes the pipeline (or the LoRA adapters) of `module` and its model card into `folder`."""
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    repo = args.hub_model_id or args.output_dir
    if not (args.use_lora or args.no_semantic_encoder):
        pipe = build_pipeline(module.unet, module.encoder, configs["scheduler"])
        pipe.save_pretrained(folder)
        tags = ["diffusers-training", "representation-learning"]
        _common.write_pipeline_card(pipe, folder, "Training", notes, repo_id=repo, license=args.license, tags=tags)
        return
    paper = "[Diffusion Autoencoders](https://arxiv.org/abs/2111.15640) (Preechakul et al., CVPR 2022)"
    if args.use_lora:
        adapted = ["unet", "encoder"] if args.lora_encoder else ["unet"]
        load = ""
        for name in adapted:
            getattr(module, name).save_lora_adapter(os.path.join(folder, f"{name}_lora"), adapter_name="default")
            load += (
                f'pipe.{name}.load_lora_adapter("{args.output_dir}/{name}_lora", prefix=None, use_safetensors=True)\n'
            )
        title, tags = "Diffusion Autoencoder LoRA", ["image-to-image", "representation-learning", "lora"]
        usage = (
            f"A LoRA adapter for a Diffusion Autoencoder of {paper} (base pipeline: `{args.init_from}`).\n\n"
            f'```py\nfrom diffusers_diffae import DiffAEPipeline\n\npipe = DiffAEPipeline.from_pretrained("'
            f'{args.init_from}")\n{load}```'
        )
    else:
        build_pipeline(module.unet, None, configs["scheduler"]).save_pretrained(folder)
        title, tags = "DDIM baseline", ["unconditional-image-generation"]
        usage = (
            f"The DDIM baseline of {paper}: the same UNet without the semantic code, for comparisons.\n\n```py\n"
            "import diffusers_diffae  # registers the model classes\nfrom diffusers import DDIMPipeline\n\n"
            f'pipe = DDIMPipeline.from_pretrained("{repo}")\n'
            "images = pipe(batch_size=4, num_inference_steps=50).images\n```"
        )
    dataset = args.dataset_name or args.train_data_dir
    text = f"# {title} trained on {dataset}\n\n{usage}\n\n## Training\n\n{notes}\n"
    card = ModelCard(f"---\n{ModelCardData(license=args.license).to_yaml()}\n---\n\n{text}")
    tags = ["diffae", "diffusion-autoencoder", "diffusers-training", *tags]
    populate_model_card(card, tags=tags).save(os.path.join(folder, "README.md"))


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


@_common.stop_on_non_finite_loss
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # 0. the checkpoint to resume from and the model configs, checked before any data
    configs = _models.diffae_configs(args)
    models = {} if args.use_lora else {"unet": configs["unet"], "encoder": configs["encoder"]}
    resume_checkpoint, resume_state = _checkpoints.prepare_resume(args, args.output_dir, models)

    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from diffusers_diffae import DiffAEUNet2DModel, SemanticEncoder

    # 1. accelerator
    seed = _common.resolve_seed(args.seed, resume_state)
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = _common.make_accelerator(args, seed, project_dir=args.output_dir, logging_dir=logging_dir)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # 2. data (checked completely before any model is built)
    train_dataset, hf_dataset = _data.build_image_dataset(args, seed)
    global_batch = args.train_batch_size * accelerator.num_processes
    if len(train_dataset) < global_batch:
        raise TrainingInputError(
            f"the dataset has {len(train_dataset)} images, fewer than one global batch "
            f"({args.train_batch_size} x {accelerator.num_processes} processes); lower --train_batch_size"
        )
    validation_images = _data.load_validation_images(args, hf_dataset, args.num_validation_images)
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
    unet, encoder = _models.build_diffae(args, configs)
    memory_format = _models.prepare_for_training(args, [unet, encoder])
    if args.use_lora:
        _models.add_lora_adapters(args, unet, encoder)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if encoder is not None:
            encoder.enable_gradient_checkpointing()
    noise_scheduler = DDPMScheduler.from_config(configs["scheduler"])
    module = DiffAETrainingModule(unet, encoder, noise_scheduler)
    module.train()
    parameters = [p for p in module.parameters() if p.requires_grad]
    logger.info(f"{sum(p.numel() for p in parameters) / 1e6:.3f}M trainable parameters")

    # 4. optimizer, LR schedule, EMA
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes / 32
    optimizer = _common.make_optimizer(args, parameters, learning_rate)
    # The sharded loader's length decides the epoch: (N // batch) // processes batches with drop_last.
    train_dataloader = accelerator.prepare(train_dataloader)
    steps_per_epoch, max_train_steps, num_epochs, lr_scheduler = _common.plan_steps_and_lr_schedule(
        args, optimizer, len(train_dataloader), accelerator.num_processes
    )
    module, optimizer, lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
    inner = accelerator.unwrap_model(module)
    # The trained models by their attribute name in the training module (and folder name in checkpoints).
    classes = {"unet": DiffAEUNet2DModel, "encoder": SemanticEncoder} if encoder else {"unet": DiffAEUNet2DModel}
    emas = {}
    if args.use_ema:
        emas = {
            name: _checkpoints.make_ema(args, getattr(inner, name), cls, accelerator.device)
            for name, cls in classes.items()
        }

    # 5. checkpoint hooks (diffusers folders instead of accelerate's pickled models), resume
    resumed_decay = None  # the EMA decay the resumed checkpoint ran at, for its record

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            inner = accelerator.unwrap_model(models[0])
            if args.use_lora:
                from safetensors.torch import save_file

                save_file(trainable_state(inner), os.path.join(output_dir, LORA_STATE_FILE))
            else:
                for name in classes:
                    getattr(inner, name).save_pretrained(os.path.join(output_dir, name))
            for name, ema in emas.items():
                ema.save_pretrained(os.path.join(output_dir, f"{name}_ema"))
        weights.clear()  # the folders above replace accelerate's own model files

    def load_model_hook(models, input_dir):
        nonlocal resumed_decay
        inner = accelerator.unwrap_model(models.pop())
        if args.use_lora:
            from safetensors.torch import load_file

            state = load_file(os.path.join(input_dir, LORA_STATE_FILE))
            missing = set(trainable_state(inner)) - set(state)
            if missing:
                raise TrainingInputError(f"checkpoint {input_dir} lacks adapter weights {sorted(missing)[:3]}...")
            inner.load_state_dict(state, strict=False)
        else:
            for name, cls in classes.items():
                getattr(inner, name).load_state_dict(cls.from_pretrained(input_dir, subfolder=name).state_dict())
        for name, ema in emas.items():
            _checkpoints.load_ema(ema, os.path.join(input_dir, f"{name}_ema"), classes[name], accelerator.device)
            resumed_decay = resumed_decay or ema.decay
            if ema.decay != args.ema_decay:  # as with --learning_rate, the resumed run's --ema_decay wins
                logger.info(
                    f"{name}_ema was saved with decay {ema.decay:g}; continuing with --ema_decay {args.ema_decay:g}"
                )
                ema.decay = args.ema_decay

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    global_step, resumed_rate = 0, learning_rate
    if resume_checkpoint is not None:
        logger.info(f"resuming from {resume_checkpoint}")
        accelerator.load_state(resume_checkpoint)
        global_step = int(resume_state["global_step"])
        resumed_rate = _checkpoints.set_peak_learning_rate(lr_scheduler, learning_rate)
        if resumed_rate != learning_rate:
            logger.info(f"the checkpoint ran at peak learning rate {resumed_rate:g}; continuing at {learning_rate:g}")
        saved_layout = (resume_state.get("num_processes"), resume_state.get("train_batch_size"))
        if saved_layout != (accelerator.num_processes, args.train_batch_size):
            logger.warning(
                f"the checkpoint was written with {saved_layout[0]} process(es) x batch {saved_layout[1]}; continuing "
                f"with {accelerator.num_processes} x {args.train_batch_size}, so the data order (not the "
                "optimisation state) differs from an uninterrupted run"
            )
    elif args.resume_from_checkpoint == "latest":
        logger.info(f"no complete checkpoint in {args.output_dir}; starting a new run")
    start_step = global_step  # where this invocation's stretch of the settings' records begins
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=config)

    # 6. training loop
    images_per_step = global_batch * args.gradient_accumulation_steps
    logger.info(
        f"{len(train_dataset)} images, {steps_per_epoch} steps per epoch, {max_train_steps} steps, "
        f"{images_per_step} images per step"
    )
    monitor = _common.LossMonitor(accelerator, global_step, images_per_step, last_checkpoint=resume_checkpoint)
    deadline = None if args.max_train_minutes is None else time.monotonic() + 60 * args.max_train_minutes
    time_up = False
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    def checkpoint_state() -> dict:
        current = {
            "mixed_precision": accelerator.mixed_precision,
            "learning_rate": learning_rate,
            "images_per_step": images_per_step,
            "ema_decay": args.ema_decay if args.use_ema else None,
        }
        resumed = {"learning_rate": resumed_rate, "ema_decay": resumed_decay}
        return {
            "global_step": global_step,
            "seed": seed,
            "epoch": global_step // steps_per_epoch,
            "num_processes": accelerator.num_processes,
            "train_batch_size": args.train_batch_size,
            **_checkpoints.setting_histories(resume_state, start_step, global_step, current, resumed),
        }

    def validate():
        if accelerator.is_main_process:
            grids = run_validation(
                args, accelerator.unwrap_model(module), emas, configs["scheduler"], validation_images
            )
            folder = os.path.join(args.output_dir, "validation")
            paths = _common.save_validation_images(accelerator, grids, folder, global_step)
            logger.info(f"validation images: {', '.join(paths)}")
        accelerator.wait_for_everyone()

    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process)
    with progress:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= max_train_steps or time_up:
                break
            train_dataset.set_epoch(epoch)
            skip = skip_batches if epoch == first_epoch else 0
            for batch in _common.epoch_batches(accelerator, train_dataloader, epoch, skip):
                with accelerator.accumulate(module):
                    x0 = batch.to(torch.float32) / 127.5 - 1  # uint8 -> [-1, 1] on the device
                    noise = torch.randn_like(x0)  # drawn before the layout change: the same noise in any layout
                    x0 = x0.contiguous(memory_format=memory_format)
                    noise = noise.contiguous(memory_format=memory_format)
                    timesteps = torch.randint(0, num_train_timesteps, (x0.shape[0],), device=x0.device)
                    loss = module(x0, timesteps, noise).mean()
                    _common.backward_and_step(
                        accelerator, loss, parameters, optimizer, lr_scheduler, args.max_grad_norm
                    )
                monitor.observe(loss, global_step + 1)
                if not accelerator.sync_gradients:
                    continue

                global_step += 1
                for name, ema in emas.items():
                    ema.step(getattr(inner, name).parameters())
                progress.update(1)

                if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                    extra = {"ema_decay": emas["unet"].cur_decay_value} if emas else {}
                    monitor.log(accelerator, global_step, progress, lr=lr_scheduler.get_last_lr()[0], **extra)
                    if deadline is not None and _common.deadline_passed(accelerator, deadline):
                        time_up = True
                        logger.info(f"--max_train_minutes {args.max_train_minutes:g} reached at step {global_step}")
                if args.checkpointing_steps and (global_step % args.checkpointing_steps == 0 or time_up):
                    monitor.check(accelerator, global_step, parameters)  # a checkpoint never holds NaN weights
                    monitor.last_checkpoint = _checkpoints.save_checkpoint(
                        accelerator,
                        args.output_dir,
                        global_step,
                        checkpoint_state(),
                        args.checkpoints_total_limit,
                        keep=resume_checkpoint,
                    )
                if args.validation_steps and global_step % args.validation_steps == 0:
                    validate()
                if global_step >= max_train_steps or time_up:
                    break
    monitor.check(accelerator, global_step, parameters)

    # 7. final validation, then the pipeline with the EMA weights (official `ema_model`) and its model card
    if args.validation_steps == 0 or global_step % args.validation_steps != 0:
        validate()
    if accelerator.is_main_process:
        for name, ema in emas.items():
            ema.copy_to(getattr(inner, name).parameters())
        notes = training_notes(args, configs, len(train_dataset), global_step, monitor.last_loss, checkpoint_state())
        with _checkpoints.staged_output(args.output_dir) as staging:
            export(args, configs, inner, staging, notes)
            with open(os.path.join(staging, "training_args.json"), "w", encoding="utf-8") as f:
                json.dump({**vars(args), "seed": seed, "global_step": global_step}, f, indent=2, default=str)
        if args.model_card_path:
            shutil.copyfile(os.path.join(args.output_dir, "README.md"), args.model_card_path)
        logger.info(f"saved the {'adapter' if args.use_lora else 'pipeline'} to {args.output_dir}")
        if args.push_to_hub:
            _common.push_to_hub(args, args.output_dir, f"train_diffae: step {global_step}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    _common.run_main(main)
