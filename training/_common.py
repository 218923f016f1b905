"""What the training scripts share, apart from data (`_data.py`), checkpoints (`_checkpoints.py`) and model
configs (`_models.py`): options, the accelerator and its CPU threads, the optimizer and LR schedule, one
optimisation step, the loss log with a stop at the first non-finite loss, image grids, model cards, the Hub.
"""

import argparse
import errno
import functools
import logging
import math
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import PIL.Image
import torch
from accelerate.logging import get_logger

from diffusers_diffae.image_utils import image_grid as diffae_image_grid


logger = get_logger(__name__)

# The sections the three stages write into a pipeline's model card, in this order.
CARD_SECTIONS = ("Training", "Latent DDIM", "Attribute classifier")


class TrainingInputError(ValueError):
    """Bad command-line input or data, detected before any training step."""


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or infinite; training stops without writing a checkpoint."""


class OutputWriteError(RuntimeError):
    """A checkpoint, pipeline or report could not be written (full disk, read-only folder); nothing half-written is
    left where a later run or load would take it for complete."""


def stop_on_non_finite_loss(main):
    """Decorates a script's `main`: a `NonFiniteLossError` is logged and makes it return exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except NonFiniteLossError as e:
            logger.error(str(e))
            return 2

    return wrapper


def run_main(main) -> None:
    """Runs a script's `main` and exits with its status; bad input or an output that cannot be written is a
    one-line error and status 1."""
    try:
        sys.exit(main())
    except (TrainingInputError, OutputWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------------------
# Writing outputs
# ----------------------------------------------------------------------------------------------------------------

# Below this many free bytes, a failed write is taken for a full disk: torch's zip writer reports one only as
# "[enforce fail at inline_container.cc] ... unexpected pos", without the errno.
_FULL_DISK_MARGIN = 1 << 20


def _free_bytes(folder: str) -> Optional[int]:
    """Free bytes on the filesystem of `folder` (or of its nearest existing parent), None if unknown."""
    path = Path(folder).absolute()
    try:
        return shutil.disk_usage(next(p for p in [path, *path.parents] if p.is_dir())).free
    except (OSError, StopIteration):
        return None


def describe_write_error(error: BaseException, folder: str, what: str) -> Optional[str]:
    """One line saying why writing `what` into `folder` failed (full disk, read-only or forbidden folder), or None
    when `error` is not a failed write. Call it before deleting the partial output: it measures the free space."""
    chain, seen = [], error
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    codes = {e.errno for e in chain if isinstance(e, OSError)}
    text = " ".join(str(e) for e in chain)
    free = _free_bytes(folder)
    io_error = any(isinstance(e, (OSError, RuntimeError)) for e in chain) or "Error while serializing" in text
    if (
        codes & {errno.ENOSPC, errno.EDQUOT}
        or "os error 28" in text
        or (io_error and free is not None and free < _FULL_DISK_MARGIN)
    ):
        left = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        return f"could not write {what} into {folder}: the disk is full ({left})"
    forbidden = codes & {errno.EROFS, errno.EACCES, errno.EPERM}
    if forbidden:
        return f"could not write {what} into {folder}: {os.strerror(forbidden.pop())}"
    return None


def write_file_atomically(path: str, save: Callable[[str], None], what: Optional[str] = None) -> None:
    """`save(temporary_path)` next to `path`, then one rename: a crash or a full disk never leaves a
    complete-looking `path`. A failed write raises `OutputWriteError` naming the folder and the cause."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, f".tmp-{uuid.uuid4().hex[:8]}-{os.path.basename(path)}")
    try:
        os.makedirs(folder, exist_ok=True)
        save(temporary)
        os.replace(temporary, path)
    except Exception as e:
        message = describe_write_error(e, folder, what or os.path.basename(path))
        if os.path.exists(temporary):
            os.remove(temporary)
        if message is None:
            raise
        raise OutputWriteError(message) from e


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def add_optimization_arguments(parser, train_batch_size: int, optimizer: str, weight_decay: float):
    """Options of the optimisation loop of `train_diffae.py` and `train_latent_ddim.py`; returns their group."""
    group = parser.add_argument_group("optimisation")
    group.add_argument("--train_batch_size", type=int, default=train_batch_size, help="Samples per process and step.")
    group.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_epochs.")
    group.add_argument("--num_epochs", type=int, default=100, help="Epochs when --max_train_steps is not given.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step.")
    group.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate (official: 1e-4).")
    group.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='diffusers schedule: "constant" (official), "constant_with_warmup", "linear", "cosine", ...',
    )
    group.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up optimizer steps.")
    group.add_argument("--optimizer", type=str, default=optimizer, choices=["adam", "adamw"], help="Adam or AdamW.")
    group.add_argument("--weight_decay", "--adam_weight_decay", type=float, default=weight_decay, help="Weight decay.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient-norm clip (0 disables; official 1).")
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Autocast precision (default: accelerate config; train_diffae.py takes bf16 on a CPU-only machine with "
        "native bf16). The official models trained in fp16.",
    )
    group.add_argument("--seed", type=int, default=None, help="Seed of weights, noise, timesteps and data order.")
    group.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="CPU threads per process (default: the cores divided by the local processes, unless OMP_NUM_THREADS).",
    )
    return group


def add_logging_arguments(parser, logging_steps: int):
    """Logging and validation options of `train_diffae.py` and `train_latent_ddim.py`; returns their group."""
    group = parser.add_argument_group("logging and validation")
    group.add_argument(
        "--report_to",
        type=str,
        default="none",
        help='accelerate trackers: "tensorboard", "wandb", "all" or "none" (they must be installed).',
    )
    group.add_argument("--logging_steps", type=int, default=logging_steps, help="Sync and log the loss every N steps.")
    group.add_argument(
        "--validation_steps", type=int, default=0, help="Save validation images every N steps (0: only at the end)."
    )
    group.add_argument("--num_validation_images", type=int, default=8, help="Images in the validation grid.")
    group.add_argument("--validation_inference_steps", type=int, default=20, help="DDIM steps for validation.")
    return group


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub at the end.")
    group.add_argument(
        "--hub_model_id", type=str, default=None, help="Repository id (default: the output folder's name)."
    )
    group.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the cached login).")
    group.add_argument("--hub_private_repo", action="store_true", help="Create the repository as private.")


def check_positive(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Raises a `TrainingInputError` for each named option that is given and not positive."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise TrainingInputError(f"--{name} must be a positive number, got {value}")


def check_report_to(report_to: str) -> None:
    """accelerate silently drops a tracker whose package is missing; fail before training instead."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name in report_to.split(","):
        name = name.strip()
        if name in available and not available[name]():
            raise TrainingInputError(f"--report_to {name}: the {name} package is not installed (pip install {name})")


def resolve_seed(seed: Optional[int], resume_state: Dict[str, Any]) -> int:
    """The run's seed: the checkpoint's on resume (the data order depends on it), else --seed, else a fresh one."""
    if resume_state.get("seed") is not None:
        if seed is not None and seed != resume_state["seed"]:
            # Called before the accelerator exists, hence the plain logger.
            logging.getLogger(__name__).warning(
                f"--seed {seed} differs from the checkpoint's seed {resume_state['seed']}; using the checkpoint's so "
                "that the data order continues unchanged"
            )
        return int(resume_state["seed"])
    if seed is not None:
        return seed
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------------------------
# Accelerator, optimizer, schedule
# ----------------------------------------------------------------------------------------------------------------


def no_accelerator_device() -> bool:
    """True on CPU-only machines, where `Accelerator(cpu=True)` is what makes `accelerate launch --multi_gpu
    --num_processes N` (or torchrun) run N gloo processes (MULTI_CPU) instead of N independent runs."""
    from accelerate.utils import is_mlu_available, is_mps_available, is_npu_available, is_xpu_available

    accelerators = (is_xpu_available, is_npu_available, is_mlu_available, is_mps_available)
    return not (torch.cuda.is_available() or any(available() for available in accelerators))


def make_accelerator(args=None, seed: Optional[int] = None, project_dir=None, logging_dir=None):
    """An `Accelerator` (CPU DDP where there is no accelerator device) with seeded data order and RNGs.

    `args` holds the options of `add_optimization_arguments` and `add_logging_arguments` (threads, precision,
    gradient accumulation, trackers); without it, accelerate's defaults. The CPU cores are split between the
    local processes unless --num_threads or OMP_NUM_THREADS decided: two processes that each use every core slow
    CPU DDP down.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    options = {}
    if args is not None:
        options = {
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "mixed_precision": args.mixed_precision,
            "log_with": None if args.report_to == "none" else args.report_to,
        }
    accelerator = Accelerator(
        cpu=no_accelerator_device(),
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=logging_dir),
        # The data order is a function of (seed, epoch) on every process, so skipping batches on resume lands on
        # exactly the batch an uninterrupted run would see next.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        **options,
    )
    num_threads = None if args is None else args.num_threads
    if num_threads is None and not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    logger.info(
        f"{accelerator.state.distributed_type} with {accelerator.num_processes} process(es), "
        f"{torch.get_num_threads()} thread(s) each"
    )
    if seed is not None:
        # Each process draws its own noise and timesteps (official: seed * world_size + rank).
        set_seed(seed, device_specific=True)
    return accelerator


def make_optimizer(args: argparse.Namespace, parameters: Iterable[torch.nn.Parameter], learning_rate: float):
    optimizer_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    parameters = list(parameters)
    # torch's fused kernel updates every parameter in one pass (the same Adam up to fp32 rounding); on a CPU its
    # default is a per-parameter loop, twice as slow (docs/results/speed_vs_official.md).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return optimizer_cls(
        parameters,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.weight_decay,
        eps=args.adam_epsilon,
        fused=fused or None,
    )


def plan_steps_and_lr_schedule(args, optimizer, num_batches: int, num_processes: int):
    """Steps per epoch, total steps and epochs from a (prepared, per-process) loader of `num_batches` batches, and
    the diffusers LR schedule over them. Returns (steps_per_epoch, max_train_steps, num_epochs, lr_scheduler)."""
    from diffusers.optimization import get_scheduler

    steps_per_epoch = math.ceil(num_batches / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        # accelerate steps a prepared scheduler once per process, hence the scaling (as diffusers' examples)
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
    )
    return steps_per_epoch, max_train_steps, num_epochs, lr_scheduler


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def epoch_batches(accelerator, dataloader, epoch: int, skip_batches: int):
    """The loader of `epoch` without its first `skip_batches` batches (those a resumed run has trained on)."""
    loader = accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader
    loader.set_epoch(epoch)
    return loader


def backward_and_step(accelerator, loss, parameters, optimizer, lr_scheduler, max_grad_norm: float) -> None:
    """Backward pass; at the last micro-step of an optimizer step, gradient-norm clipping; then the steps."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class LossMonitor:
    """The mean loss and the throughput over each logging interval, and the first step whose loss was NaN or
    infinite, with one device sync per logging step instead of one per step.

    `observe` only queues device ops. `check` syncs across processes, ends the trackers' runs (keeping their logs up
    to here) and raises a `NonFiniteLossError` naming the step and `last_checkpoint`; call it before writing a
    checkpoint, so that the newest one always holds finite weights. `log` checks, then logs the interval's mean
    loss and rates and starts a new interval.
    """

    def __init__(self, accelerator, step: int, samples_per_step: int, last_checkpoint: Optional[str]):
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.count, self.last_loss = 0, None
        self.time, self.step, self.samples_per_step = time.perf_counter(), step, samples_per_step
        self.last_checkpoint = last_checkpoint

    def observe(self, loss: torch.Tensor, step: int) -> None:
        self.loss_sum += loss.detach()
        self.count += 1
        bad = ~torch.isfinite(loss.detach()).all() & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, torch.full_like(self.first_bad_step, step), self.first_bad_step)

    def check(self, accelerator, step: int, parameters: Optional[Iterable[torch.nn.Parameter]] = None) -> None:
        """Raises for a non-finite loss so far and, with `parameters`, for non-finite weights (a huge update can
        leave inf weights while that step's loss, computed before the update, was still finite)."""
        where = "no checkpoint was saved"
        if self.last_checkpoint:
            where = f"the last good checkpoint is {self.last_checkpoint}"
        steps = accelerator.gather(self.first_bad_step.reshape(1))
        bad = steps[steps >= 0]
        message = None
        if bad.numel():
            message = (
                f"the loss became NaN or infinite at step {int(bad.min())}; training stopped and no further "
                f"checkpoint was written ({where}). Lower --learning_rate, check the data, or use --mixed_precision no"
            )
        elif parameters is not None and not all(torch.isfinite(p.detach()).all() for p in parameters):
            message = (
                f"the weights became NaN or infinite at step {step}; training stopped without writing a checkpoint "
                f"({where}). Lower --learning_rate or check --max_grad_norm."
            )
        if message is not None:
            accelerator.end_training()
            raise NonFiniteLossError(message)

    def log(self, accelerator, step: int, progress, **extra: float) -> float:
        """Checks, then logs the mean loss and the rates since the last call (trackers and progress bar)."""
        self.check(accelerator, step)
        self.last_loss = accelerator.reduce(self.loss_sum, reduction="mean").item() / max(self.count, 1)
        self.loss_sum.zero_()
        self.count = 0
        now = time.perf_counter()
        steps_per_s = (step - self.step) / max(now - self.time, 1e-9)
        self.time, self.step = now, step
        samples_per_s = steps_per_s * self.samples_per_step
        progress.set_postfix(
            loss=f"{self.last_loss:.4f}", steps_s=f"{steps_per_s:.2f}", samples_s=f"{samples_per_s:.1f}"
        )
        accelerator.log(
            {"loss": self.last_loss, "step/s": steps_per_s, "samples/s": samples_per_s, **extra}, step=step
        )
        return self.last_loss


def deadline_passed(accelerator, deadline: float) -> bool:
    """True on every process once any process's `time.monotonic()` has passed `deadline`, so that all of them stop
    at the same step (a collective: call it at the same steps on every process)."""
    passed = torch.tensor(float(time.monotonic() >= deadline), device=accelerator.device)
    return bool(accelerator.reduce(passed, reduction="sum").item() > 0)


# ----------------------------------------------------------------------------------------------------------------
# Images, model cards, Hub
# ----------------------------------------------------------------------------------------------------------------


def image_grid(images: torch.Tensor, nrow: int) -> PIL.Image.Image:
    """`(N, C, H, W)` floats in [0, 1] -> one PIL image with `nrow` images per row, 2 white pixels apart."""
    return diffae_image_grid(list(images.split(nrow)), padding=2, num_columns=nrow)


def save_validation_images(accelerator, grids: Dict[str, PIL.Image.Image], folder: str, step: int) -> List[str]:
    """Saves `folder/step-<step>-<name>.png` and sends the grids to the trackers that take images."""
    paths = []
    for name, grid in grids.items():
        paths.append(os.path.join(folder, f"step-{step:07d}-{name}.png"))
        write_file_atomically(paths[-1], lambda tmp, grid=grid: grid.save(tmp, format="PNG"), "validation images")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for name, grid in grids.items():
                tracker.writer.add_image(f"validation/{name}", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({f"validation/{name}": wandb.Image(grid) for name, grid in grids.items()}, step=step)
    return paths


def write_pipeline_card(pipe, folder: str, title: str, body: str, previous_card: Optional[str] = None, **card_kwargs):
    """Writes `folder/README.md`: the package's model card of `pipe` with the training notes of every stage.

    The card is `diffusers_diffae.hub_utils.create_model_card`, whose description holds the `## title` section with
    `body` and, taken from `previous_card` (a README path), the other sections of `CARD_SECTIONS`; the previous
    card's licence and tags are kept too. `card_kwargs` go to `create_model_card` (`repo_id`, `license`, `tags`).
    """
    from huggingface_hub import ModelCard

    from diffusers_diffae.hub_utils import create_model_card

    sections = {}
    if previous_card and os.path.isfile(previous_card):
        previous = ModelCard.load(previous_card)
        for name in CARD_SECTIONS:
            match = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", previous.text, re.S | re.M)
            if match:
                sections[name] = match.group(1).strip()
        card_kwargs["license"] = previous.data.license or card_kwargs.get("license", "mit")
        card_kwargs["tags"] = [*(previous.data.tags or []), *card_kwargs.get("tags", [])]
    sections[title] = body.strip()
    notes = "\n\n".join(f"## {name}\n\n{sections[name]}" for name in CARD_SECTIONS if name in sections)
    create_model_card(pipe, model_description=notes, **card_kwargs).save(os.path.join(folder, "README.md"))


def push_to_hub(args: argparse.Namespace, folder: str, message: str) -> str:
    """Creates the repository if needed and uploads `folder` (checkpoints, logs and temporary files excluded)."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(folder))
    repo = create_repo(repo_id, token=args.hub_token, private=args.hub_private_repo, exist_ok=True)
    upload_folder(
        repo_id=getattr(repo, "repo_id", repo_id),
        folder_path=folder,
        token=args.hub_token,
        commit_message=message,
        ignore_patterns=[
            "checkpoint-*",
            "*/checkpoint-*",
            ".tmp-*",
            ".trash-*",
            "logs/*",
            "*_training/*",
            "validation/*",
        ],
    )
    logger.info(f"uploaded {folder} to {repo_id}")
    return repo_id
