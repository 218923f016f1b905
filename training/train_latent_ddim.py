#!/usr/bin/env python
"""Train the latent DDIM of a Diffusion Autoencoder: a DDIM over the semantic codes z_sem (paper §4, Table 6).

The frozen (EMA) semantic encoder of a trained `DiffAEPipeline` encodes the dataset once (centre crop, no flip;
cached in a safetensors file). The codes are normalised to zero mean and unit variance with the training set's
statistics, and an MLP denoiser (`LatentMLPDenoiser`, official `MLPSkipNet`) is trained with the L1 noise loss
(Eq. 9 as in the official code) on the constant-0.008 beta schedule, AdamW 1e-4 with weight decay 0.01.

    accelerate launch training/train_latent_ddim.py --pipeline diffae-emoji32 --dataset_name ./emoji32 \
        --hidden_channels 1024 --num_layers 10 --train_batch_size 256 --max_train_steps 20000 --use_ema

The statistics are stored in the denoiser and in the encoder, and `latent_denoiser` + `latent_scheduler` are added
to the pipeline folder, which can then sample: `DiffAEPipeline.from_pretrained(folder)(batch_size=4)`.
"""

import argparse
import logging
import os

import torch
from accelerate.logging import get_logger

import _checkpoints
import _common
import _data
import _models
from _common import TrainingInputError


logger = get_logger("train_latent_ddim")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the latent DDIM of a Diffusion Autoencoder.")
    _data.add_encoding_arguments(parser)
    _data.add_dataset_arguments(parser)

    group = parser.add_argument_group("model")
    group.add_argument(
        "--latent_config",
        type=str,
        default=None,
        help="A JSON file with a LatentMLPDenoiser config (overrides below).",
    )
    group.add_argument(
        "--preset", type=str, default=None, help="An official latent net (ffhq128, ffhq256, ...); needs 512-d z_sem."
    )
    group.add_argument("--hidden_channels", type=int, default=2048, help="Hidden width (official: 2048).")
    group.add_argument("--num_layers", type=int, default=10, help="Layers (official: 10; 20 for LSUN).")
    group.add_argument("--time_embed_channels", type=int, default=64, help="Sinusoidal timestep features.")
    group.add_argument("--latent_dropout", type=float, default=0.0, help="Dropout in hidden layers (official 0).")
    group.add_argument(
        "--latent_beta_schedule",
        type=str,
        default="const0.008",
        help='Beta schedule of the latent diffusion: "const<beta>" (official const0.008) or "linear".',
    )

    # The default --num_epochs 100 is a quick fit; the paper's latent DDIMs train far longer (see the README).
    _common.add_optimization_arguments(parser, train_batch_size=256, optimizer="adamw", weight_decay=0.01)
    _checkpoints.add_ema_arguments(parser)
    _checkpoints.add_checkpoint_arguments(parser, checkpointing_default=1000)

    group = _common.add_logging_arguments(parser, logging_steps=100)
    group.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help="Where the complete pipeline (with latent_denoiser) is written; default: --pipeline itself, updated "
        "in place component by component.",
    )
    group.add_argument(
        "--checkpoint_dir",
        type=str,
        default=None,
        help="Training checkpoints (default: <output_dir>/latent_training).",
    )
    group.add_argument("--latent_validation_inference_steps", type=int, default=20, help="Latent DDIM steps.")
    _common.add_hub_arguments(parser)
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or args.pipeline
    args.checkpoint_dir = args.checkpoint_dir or os.path.join(args.output_dir, "latent_training")
    args.z_sem_cache = args.z_sem_cache or os.path.join(args.checkpoint_dir, "z_sem.safetensors")

    _common.check_positive(
        args,
        ["train_batch_size", "encode_batch_size", "gradient_accumulation_steps", "learning_rate", "logging_steps"]
        + ["max_train_steps", "num_epochs", "num_validation_images"],
    )
    _common.check_report_to(args.report_to)
    return args


@torch.no_grad()
def sample_grid(args, pipe, denoiser, ema) -> tuple:
    """Unconditional samples (latent DDIM -> image DDIM) with the EMA weights, as a grid, and the mean and std
    of the sampled normalised codes (a trained latent DDIM reproduces their unit moments)."""
    with _checkpoints.averaged_weights([(denoiser, ema)]):
        pipe.register_modules(latent_denoiser=denoiser)
        generator = torch.Generator(device="cpu").manual_seed(0)
        z_n = pipe.sample_z_sem(
            max(args.num_validation_images, 64),
            num_inference_steps=args.latent_validation_inference_steps,
            generator=generator,
            return_normalized=True,
        )
        z_sem = denoiser.denormalize_z_sem(z_n[: args.num_validation_images])
        images = pipe.decode(
            z_sem.to(pipe.unet.dtype), None, args.validation_inference_steps, generator=generator, output_type="pt"
        ).images
    grid = _common.image_grid(images.cpu(), nrow=min(8, images.shape[0]))
    return grid, z_n.mean().item(), z_n.std().item()


@_common.stop_on_non_finite_loss
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # 0. the trained autoencoder, the denoiser's config and the latent noise schedule, checked before any data
    pipe = _models.load_autoencoder(args)
    width = pipe.encoder.config.out_channels
    config = _models.latent_config(args, width)
    models = {"latent_denoiser": config}
    resume_checkpoint, resume_state = _checkpoints.prepare_resume(args, args.checkpoint_dir, models)

    from diffusers import DDIMScheduler, DDPMScheduler
    from tqdm.auto import tqdm

    from diffusers_diffae import DiffAEPipeline, LatentMLPDenoiser
    from diffusers_diffae.presets import _ddim_config
    from diffusers_diffae.training_utils import latent_ddim_loss

    try:
        scheduler_config = _ddim_config(
            pipe.scheduler.config.num_train_timesteps, args.latent_beta_schedule, clip_sample=False
        )
    except ValueError as e:
        raise TrainingInputError(f"--latent_beta_schedule: {e}") from e

    # 1. accelerator
    seed = _common.resolve_seed(args.seed, resume_state)
    accelerator = _common.make_accelerator(args, seed, project_dir=args.checkpoint_dir)

    # 2. data: encode once with the (EMA) encoder, normalise with the training set's statistics
    dataset = _data.load_dataset_from_args(args)
    if len(dataset) < 2:
        raise TrainingInputError("the latent DDIM needs at least 2 images to estimate the z_sem statistics")
    encoder = pipe.encoder.to(accelerator.device)
    z_sem = _data.encode_dataset(accelerator, encoder, dataset, args, args.z_sem_cache, args.encode_batch_size)
    z_sem = z_sem.double()
    mean, std = z_sem.mean(0), z_sem.std(0)  # unbiased std, as the official conds_std
    if not torch.all(std > 0):
        raise TrainingInputError(
            f"{int((std <= 0).sum())} z_sem dimensions are constant over the dataset; the encoder is degenerate or "
            "the images are identical"
        )
    z_normalized = ((z_sem - mean) / std).float()
    global_batch = args.train_batch_size * accelerator.num_processes
    if len(z_normalized) < global_batch:
        raise TrainingInputError(
            f"the dataset has {len(z_normalized)} codes, fewer than one global batch ({args.train_batch_size} x "
            f"{accelerator.num_processes} processes); lower --train_batch_size"
        )
    train_dataloader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(z_normalized),
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    train_dataloader = accelerator.prepare(train_dataloader)

    # 3. model, optimizer, EMA, LR schedule
    denoiser = LatentMLPDenoiser.from_config(config)
    denoiser.set_z_sem_statistics(mean.float(), std.float())
    denoiser.train()
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    optimizer = _common.make_optimizer(args, denoiser.parameters(), args.learning_rate)
    steps_per_epoch, max_train_steps, num_epochs, lr_scheduler = _common.plan_steps_and_lr_schedule(
        args, optimizer, len(train_dataloader), accelerator.num_processes
    )
    denoiser, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
    inner = accelerator.unwrap_model(denoiser)
    ema = _checkpoints.make_ema(args, inner, LatentMLPDenoiser, accelerator.device) if args.use_ema else None

    # 4. checkpoint hooks (diffusers folders instead of accelerate's pickled models), resume
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_pretrained(os.path.join(output_dir, "latent_denoiser"))
            if ema is not None:
                ema.save_pretrained(os.path.join(output_dir, "latent_denoiser_ema"))
        weights.clear()  # the folders above replace accelerate's own model files

    def load_model_hook(models, input_dir):
        inner = accelerator.unwrap_model(models.pop())
        inner.load_state_dict(LatentMLPDenoiser.from_pretrained(input_dir, subfolder="latent_denoiser").state_dict())
        if ema is not None:
            folder = os.path.join(input_dir, "latent_denoiser_ema")
            _checkpoints.load_ema(ema, folder, LatentMLPDenoiser, accelerator.device)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    global_step = 0
    if resume_checkpoint is not None:
        logger.info(f"resuming from {resume_checkpoint}")
        accelerator.load_state(resume_checkpoint)
        global_step = int(resume_state["global_step"])
    if accelerator.is_main_process:
        accelerator.init_trackers("train_latent_ddim")

    # 5. training loop
    logger.info(
        f"{len(z_normalized)} codes of width {width}, denoiser "
        f"{sum(p.numel() for p in denoiser.parameters()) / 1e6:.2f}M parameters, {max_train_steps} steps"
    )
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    codes_per_step = global_batch * args.gradient_accumulation_steps
    monitor = _common.LossMonitor(accelerator, global_step, codes_per_step, last_checkpoint=resume_checkpoint)
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    validation_pipe = DiffAEPipeline(
        unet=pipe.unet,
        encoder=pipe.encoder,
        scheduler=pipe.scheduler,
        inverse_scheduler=pipe.inverse_scheduler,
        latent_scheduler=DDIMScheduler.from_config(scheduler_config),
    )
    validation_pipe.set_progress_bar_config(disable=True)

    def validate():
        if accelerator.is_main_process:
            grid, sample_mean, sample_std = sample_grid(args, validation_pipe, inner, ema)
            folder = os.path.join(args.checkpoint_dir, "validation")
            paths = _common.save_validation_images(accelerator, {"samples": grid}, folder, global_step)
            logger.info(f"samples: {paths[0]} (sampled z_n mean {sample_mean:.3f}, std {sample_std:.3f})")
            accelerator.log({"sample_mean": sample_mean, "sample_std": sample_std}, step=global_step)
        accelerator.wait_for_everyone()

    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process)
    with progress:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= max_train_steps:
                break
            skip = skip_batches if epoch == first_epoch else 0
            for (z_n,) in _common.epoch_batches(accelerator, train_dataloader, epoch, skip):
                with accelerator.accumulate(denoiser):
                    noise = torch.randn_like(z_n)
                    timesteps = torch.randint(0, num_train_timesteps, (z_n.shape[0],), device=z_n.device)
                    loss = latent_ddim_loss(denoiser, z_n, timesteps, noise, noise_scheduler)
                    _common.backward_and_step(
                        accelerator, loss, denoiser.parameters(), optimizer, lr_scheduler, args.max_grad_norm
                    )
                monitor.observe(loss, global_step + 1)
                if not accelerator.sync_gradients:
                    continue

                global_step += 1
                if ema is not None:
                    ema.step(inner.parameters())
                progress.update(1)

                if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                    monitor.log(accelerator, global_step, progress, lr=lr_scheduler.get_last_lr()[0])
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    monitor.check(accelerator, global_step, inner.parameters())  # a checkpoint never holds NaN weights
                    state = {"global_step": global_step, "seed": seed, "num_processes": accelerator.num_processes}
                    monitor.last_checkpoint = _checkpoints.save_checkpoint(
                        accelerator,
                        args.checkpoint_dir,
                        global_step,
                        state,
                        args.checkpoints_total_limit,
                        keep=resume_checkpoint,
                    )
                if args.validation_steps and global_step % args.validation_steps == 0:
                    validate()
                if global_step >= max_train_steps:
                    break
    monitor.check(accelerator, global_step, inner.parameters())

    # 6. final validation, then latent_denoiser + latent_scheduler (and the statistics) into the pipeline folder
    if args.validation_steps == 0 or global_step % args.validation_steps != 0:
        validate()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(inner.parameters())
        final = LatentMLPDenoiser.from_config(inner.config)
        final.load_state_dict(inner.state_dict())
        pipe.encoder.set_z_sem_statistics(mean.float(), std.float())
        pipe.register_modules(
            latent_denoiser=final.to("cpu"), latent_scheduler=DDIMScheduler.from_config(scheduler_config)
        )
        notes = (
            "A latent DDIM over normalised z_sem (paper §4) makes the autoencoder a generative model.\n\n"
            f"- codes: {len(z_normalized)} images of `{args.dataset_name or args.train_data_dir}`, encoded once "
            "(centre crop, no flip); statistics stored in `latent_denoiser` and `encoder`\n"
            f"- denoiser: {config.get('num_layers')} layers, hidden {config.get('hidden_channels')}; "
            f"beta schedule {args.latent_beta_schedule}; L1 loss\n"
            f"- optimiser: {args.optimizer}, lr {args.learning_rate}, weight decay {args.weight_decay}, "
            f"batch {args.train_batch_size}, {global_step} steps, EMA {'off' if ema is None else 'on'}\n"
            + (f"- final loss: {monitor.last_loss:.4f}\n" if monitor.last_loss is not None else "")
        )
        _checkpoints.save_stage(pipe, args, "Latent DDIM", notes)
        logger.info(f"added latent_denoiser and latent_scheduler to {args.output_dir}")
        if args.push_to_hub:
            _common.push_to_hub(args, args.output_dir, "latent DDIM")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    _common.run_main(main)
