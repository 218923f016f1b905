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
import json
import logging
import os
import shutil
import sys
import uuid

import torch

import _common
from _common import TrainingInputError

logger = logging.getLogger("train_latent_ddim")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the latent DDIM of a Diffusion Autoencoder.")
    parser.add_argument(
        "--pipeline", type=str, required=True, help="The trained autoencoder (a DiffAEPipeline folder)."
    )
    _common.add_dataset_arguments(parser, resolution_default=None)
    parser.add_argument(
        "--z_sem_cache",
        type=str,
        default=None,
        help="safetensors file caching the encoded dataset (default: <output_dir>/latent_training/z_sem.safetensors); "
        "reused only when the data, preprocessing and encoder weights match.",
    )
    parser.add_argument("--encode_batch_size", type=int, default=64, help="Images per encoder batch.")

    group = parser.add_argument_group("model")
    group.add_argument(
        "--latent_config",
        type=str,
        default=None,
        help="A JSON file with a LatentMLPDenoiser config (overrides the arguments below).",
    )
    group.add_argument(
        "--preset",
        type=str,
        default=None,
        help="Use an official latent net (ffhq128, ffhq256, horse128, ...); needs 512-d z_sem.",
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

    group = parser.add_argument_group("optimisation")
    group.add_argument("--train_batch_size", type=int, default=256, help="Codes per process and micro-step.")
    group.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_epochs.")
    group.add_argument(
        "--num_epochs", type=int, default=100, help="Epochs without --max_train_steps (a quick fit; the paper: ~1,400)."
    )
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=1e-4, help="Official: 1e-4.")
    group.add_argument("--lr_scheduler", type=str, default="constant", help="diffusers LR schedule name.")
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument(
        "--optimizer", type=str, default="adamw", choices=["adam", "adamw"], help="Official: adamw (LSUN: adam)."
    )
    group.add_argument("--weight_decay", type=float, default=0.01, help="Official: 0.01 with adamw.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient-norm clip (0 disables).")
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--num_threads", type=int, default=None, help="CPU threads per process.")

    _common.add_ema_arguments(parser)

    _common.add_checkpoint_arguments(parser, checkpointing_default=1000)
    group = parser.add_argument_group("output")
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
        help="Folder of the training checkpoints (default: <output_dir>/latent_training).",
    )
    group.add_argument("--logging_steps", type=int, default=100)
    group.add_argument("--report_to", type=str, default="none", help='"tensorboard", "wandb", "all" or "none".')
    group.add_argument(
        "--validation_steps", type=int, default=0, help="Save a grid of samples every N steps (0: only at the end)."
    )
    group.add_argument("--num_validation_images", type=int, default=8)
    group.add_argument("--validation_inference_steps", type=int, default=20, help="Image DDIM steps.")
    group.add_argument("--latent_validation_inference_steps", type=int, default=20, help="Latent DDIM steps.")
    _common.add_hub_arguments(parser)
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or args.pipeline
    args.checkpoint_dir = args.checkpoint_dir or os.path.join(args.output_dir, "latent_training")
    args.z_sem_cache = args.z_sem_cache or os.path.join(args.checkpoint_dir, "z_sem.safetensors")
    args.random_flip = False  # codes are encoded once, unflipped (official latent inference)
    return args


def latent_config(args: argparse.Namespace, width: int) -> dict:
    """The LatentMLPDenoiser config from --latent_config, --preset or the width arguments; checks the width."""
    from diffusers_diffae import preset_config

    if args.latent_config and args.preset:
        raise TrainingInputError("give at most one of --latent_config and --preset")
    if args.latent_config:
        if not os.path.isfile(args.latent_config):
            raise TrainingInputError(f"--latent_config {args.latent_config!r} does not exist")
        try:
            with open(args.latent_config, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise TrainingInputError(f"--latent_config is not valid JSON: {e}") from e
        config = config.get("latent_denoiser", config)
        config.setdefault("num_channels", width)
    elif args.preset:
        try:
            config = preset_config(args.preset, "latent_denoiser")
        except ValueError as e:
            raise TrainingInputError(f"--preset: {e}") from e
    else:
        config = {
            "num_channels": width,
            "hidden_channels": args.hidden_channels,
            "num_layers": args.num_layers,
            "time_embed_channels": args.time_embed_channels,
            "dropout": args.latent_dropout,
        }
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if config["num_channels"] != width:
        raise TrainingInputError(
            f"the latent denoiser takes {config['num_channels']}-d codes but the encoder outputs {width}-d z_sem"
        )
    return config


@torch.no_grad()
def sample_grid(args, pipe, denoiser, emas, step: int) -> dict:
    """Unconditional samples (latent DDIM -> image DDIM) with the EMA weights, plus the sampled codes' moments."""
    for ema in emas:
        ema.store(denoiser.parameters())
        ema.copy_to(denoiser.parameters())
    was_training = denoiser.training
    denoiser.eval()
    try:
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
    finally:
        for ema in emas:
            ema.restore(denoiser.parameters())
        denoiser.train(was_training)
    folder = os.path.join(args.checkpoint_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:07d}-samples.png")
    _common.image_grid(images.cpu(), nrow=min(8, images.shape[0])).save(path)
    # A trained latent DDIM reproduces the unit moments of the normalised codes.
    return {"path": path, "sample_mean": z_n.mean().item(), "sample_std": z_n.std().item()}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    _common.check_positive(
        args,
        [
            "train_batch_size",
            "encode_batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "logging_steps",
            "max_train_steps",
            "num_epochs",
            "num_validation_images",
        ],
    )
    _common.check_report_to(args.report_to)
    if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        raise TrainingInputError(f"--pipeline {args.pipeline!r} is not a saved pipeline folder (no model_index.json)")
    resume_checkpoint = _common.resolve_resume_checkpoint(args.resume_from_checkpoint, args.checkpoint_dir)
    resume_state = _common.read_training_state(resume_checkpoint)

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers import DDIMScheduler, DDPMScheduler
    from tqdm.auto import tqdm

    from diffusers_diffae import DiffAEPipeline, LatentMLPDenoiser
    from diffusers_diffae.presets import _ddim_config
    from diffusers_diffae.training_utils import latent_ddim_loss

    pipe = DiffAEPipeline.from_pretrained(args.pipeline)
    width = pipe.encoder.config.out_channels
    config = latent_config(args, width)
    if args.resolution is None:
        args.resolution = pipe.unet.config.sample_size
    if args.resolution != pipe.encoder.config.sample_size:
        raise TrainingInputError(
            f"--resolution {args.resolution} differs from the encoder's sample_size {pipe.encoder.config.sample_size}"
        )
    try:
        scheduler_config = _ddim_config(
            pipe.scheduler.config.num_train_timesteps, args.latent_beta_schedule, clip_sample=False
        )
    except ValueError as e:
        raise TrainingInputError(f"--latent_beta_schedule: {e}") from e

    # 1. accelerator
    seed = _common.resolve_seed(args.seed, resume_state)
    accelerator = Accelerator(
        cpu=_common.no_accelerator_device(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.checkpoint_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
    )
    _common.configure_cpu_threads(args.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    log = (lambda msg: logger.info(msg)) if accelerator.is_main_process else (lambda msg: None)
    set_seed(seed, device_specific=True)

    # 2. data: encode once with the (EMA) encoder, normalise with the training set's statistics
    dataset = _common.check_image_column(_common.load_dataset_from_args(args), args.image_column)
    if len(dataset) < 2:
        raise TrainingInputError("the latent DDIM needs at least 2 images to estimate the z_sem statistics")
    encoder = pipe.encoder.to(accelerator.device)
    z_sem = _common.encode_dataset(
        accelerator, encoder, dataset, args, args.z_sem_cache, args.encode_batch_size, log=log
    ).double()
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

    # 3. model, optimizer, EMA, schedule
    denoiser = LatentMLPDenoiser.from_config(config)
    denoiser.set_z_sem_statistics(mean.float(), std.float())
    denoiser.train()
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    optimizer_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(
        denoiser.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.weight_decay,
        eps=args.adam_epsilon,
    )
    emas = [_common.make_ema(args, denoiser, LatentMLPDenoiser)] if args.use_ema else []
    steps_per_epoch, max_train_steps, num_epochs, lr_scheduler = _common.plan_steps_and_lr_schedule(
        args, optimizer, len(train_dataloader), accelerator.num_processes
    )
    denoiser, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
    for ema in emas:
        ema.to(accelerator.device)

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_pretrained(os.path.join(output_dir, "latent_denoiser"))
            for ema in emas:
                ema.save_pretrained(os.path.join(output_dir, "latent_denoiser_ema"))
        while weights:
            weights.pop()

    def load_model_hook(models, input_dir):
        inner = accelerator.unwrap_model(models.pop())
        inner.load_state_dict(LatentMLPDenoiser.from_pretrained(input_dir, subfolder="latent_denoiser").state_dict())
        for ema in emas:
            _common.load_ema_folder(ema, os.path.join(input_dir, "latent_denoiser_ema"), inner, accelerator.device)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    global_step = 0
    if resume_checkpoint is not None:
        log(f"resuming from {resume_checkpoint}")
        accelerator.load_state(resume_checkpoint)
        global_step = int(resume_state["global_step"])
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("train_latent_ddim")

    # 4. loop
    log(
        f"{len(z_normalized)} codes of width {width}, denoiser "
        f"{sum(p.numel() for p in denoiser.parameters()) / 1e6:.2f}M parameters, {max_train_steps} steps"
    )
    inner = accelerator.unwrap_model(denoiser)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    guard = _common.NonFiniteLossGuard(accelerator.device)
    last_checkpoint = resume_checkpoint
    loss_sum, loss_count, last_loss = torch.zeros((), device=accelerator.device), 0, None
    meter = _common.Throughput()
    meter.steps = global_step
    images_per_step = global_batch * args.gradient_accumulation_steps
    progress = tqdm(
        total=max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
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
            result = sample_grid(args, validation_pipe, inner, emas, global_step)
            log(
                f"samples: {result['path']} (sampled z_n mean {result['sample_mean']:.3f}, "
                f"std {result['sample_std']:.3f})"
            )
            accelerator.log(
                {"sample_mean": result["sample_mean"], "sample_std": result["sample_std"]}, step=global_step
            )
        accelerator.wait_for_everyone()

    try:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= max_train_steps:
                break
            loader = train_dataloader
            if epoch == first_epoch and skip_batches:
                loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
            loader.set_epoch(epoch)
            for (z_n,) in loader:
                with accelerator.accumulate(denoiser):
                    noise = torch.randn_like(z_n)
                    timesteps = torch.randint(0, num_train_timesteps, (z_n.shape[0],), device=z_n.device)
                    loss = latent_ddim_loss(denoiser, z_n, timesteps, noise, noise_scheduler)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(denoiser.parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                loss_count += 1
                guard.observe(loss, global_step + 1)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                for ema in emas:
                    ema.step(inner.parameters())
                progress.update(1)
                if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                    guard.check(accelerator, last_checkpoint)
                    last_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(loss_count, 1)
                    loss_sum.zero_()
                    loss_count = 0
                    steps_per_s, codes_per_s = meter.rates(global_step, images_per_step)
                    progress.set_postfix(
                        loss=f"{last_loss:.4f}", steps_s=f"{steps_per_s:.1f}", codes_s=f"{codes_per_s:.0f}"
                    )
                    accelerator.log({"loss": last_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    guard.check(accelerator, last_checkpoint)
                    _common.check_finite_weights(inner.parameters(), global_step, last_checkpoint)
                    state = {"global_step": global_step, "seed": seed, "num_processes": accelerator.num_processes}
                    last_checkpoint = _common.save_checkpoint(
                        accelerator, args.checkpoint_dir, global_step, state, args.checkpoints_total_limit
                    )
                    log(f"saved {last_checkpoint}")
                if args.validation_steps and global_step % args.validation_steps == 0:
                    validate()
                if global_step >= max_train_steps:
                    break
        guard.check(accelerator, last_checkpoint)
        _common.check_finite_weights(inner.parameters(), global_step, last_checkpoint)
    except _common.NonFiniteLossError as e:
        progress.close()
        if accelerator.is_main_process:
            logger.error(str(e))
        return 2
    progress.close()
    if args.validation_steps == 0 or global_step % args.validation_steps != 0:
        validate()

    # 5. add latent_denoiser + latent_scheduler (and the statistics) to the pipeline folder
    if accelerator.is_main_process:
        for ema in emas:
            ema.copy_to(inner.parameters())
        final = LatentMLPDenoiser.from_config(inner.config)
        final.load_state_dict(inner.state_dict())
        pipe.encoder.set_z_sem_statistics(mean.float(), std.float())
        pipe.register_modules(
            latent_denoiser=final.to("cpu"), latent_scheduler=DDIMScheduler.from_config(scheduler_config)
        )
        staging = os.path.join(args.output_dir, f".tmp-pipeline-{uuid.uuid4().hex[:8]}")
        os.makedirs(args.output_dir, exist_ok=True)
        pipe.to("cpu").save_pretrained(staging)
        if os.path.abspath(args.output_dir) != os.path.abspath(args.pipeline):
            card = os.path.join(args.pipeline, "README.md")
            if os.path.isfile(card):
                shutil.copyfile(card, os.path.join(staging, "README.md"))
        _common.replace_folder_contents(staging, args.output_dir)
        body = (
            "A latent DDIM over normalised z_sem (paper §4) makes the autoencoder a generative model:\n\n"
            "```py\nfrom diffusers_diffae import DiffAEPipeline\n\n"
            f'pipe = DiffAEPipeline.from_pretrained("{args.hub_model_id or args.output_dir}")\n'
            "images = pipe(batch_size=8, num_inference_steps=20, latent_num_inference_steps=20).images\n```\n\n"
            f"- codes: {len(z_normalized)} images of `{args.dataset_name or args.train_data_dir}`, encoded once "
            "(centre crop, no flip); statistics stored in `latent_denoiser` and `encoder`\n"
            f"- denoiser: {config.get('num_layers')} layers, hidden {config.get('hidden_channels')}; "
            f"beta schedule {args.latent_beta_schedule}; L1 loss\n"
            f"- optimiser: {args.optimizer}, lr {args.learning_rate}, weight decay {args.weight_decay}, "
            f"batch {args.train_batch_size}, {global_step} steps, EMA {'on' if emas else 'off'}\n"
            + (f"- final loss: {last_loss:.4f}\n" if last_loss is not None else "")
        )
        _common.update_card_section(
            os.path.join(args.output_dir, "README.md"),
            "Latent DDIM",
            body,
            _common.front_matter(["diffae", "diffusion-autoencoder", "diffusers"], "mit"),
        )
        log(f"added latent_denoiser and latent_scheduler to {args.output_dir}")
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            _common.push_folder_to_hub(args.output_dir, repo_id, args.hub_token, args.hub_private_repo, "latent DDIM")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TrainingInputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
