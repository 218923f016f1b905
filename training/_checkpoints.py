"""Checkpoints of the training scripts: crash-safe `checkpoint-<step>` folders, resume, EMA, and output folders.

A checkpoint is written by `accelerator.save_state` into a hidden folder and renamed into place once complete, with
`training_state.json` written last; `--resume_from_checkpoint latest` only picks folders that have it. A resumed
run may change some settings (precision, learning rate, batch, EMA decay): `training_state.json` records each as
`[{"steps": [first, last], <key>: value}, ...]` so that the model card reports the whole run.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import uuid
import warnings
from typing import Any, Dict, Iterator, List, Optional

from accelerate.logging import get_logger

from _common import TrainingInputError, write_pipeline_card


logger = get_logger(__name__)


CHECKPOINT_PREFIX = "checkpoint-"
# Written last into a checkpoint before it is renamed into place; a folder without it is never resumed from.
TRAINING_STATE_FILE = "training_state.json"
# The settings a resumed run may change, and the name of each one's record in `training_state.json`.
HISTORIES = {
    "mixed_precision": "precision_history",
    "learning_rate": "learning_rate_history",
    "images_per_step": "images_per_step_history",
    "ema_decay": "ema_decay_history",
}


def add_checkpoint_arguments(parser: argparse.ArgumentParser, checkpointing_default: int) -> None:
    group = parser.add_argument_group("checkpoints")
    group.add_argument(
        "--checkpointing_steps",
        type=int,
        default=checkpointing_default,
        help="Save the full training state (models, EMA, optimizer, LR scheduler, RNG) every N optimizer steps "
        "into `checkpoint-<step>`; 0 disables checkpoints.",
    )
    group.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoints (the oldest are deleted after a newer one is complete).",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='Resume from a checkpoint folder (absolute, or relative to the checkpoint folder) or "latest" (the '
        "newest complete checkpoint; a fresh start if there is none).",
    )


def add_ema_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of diffusers' `EMAModel`."""
    group = parser.add_argument_group("EMA")
    group.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights.")
    group.add_argument("--ema_decay", type=float, default=0.9999, help="The (maximum) EMA decay (official 0.9999).")
    group.add_argument(
        "--ema_min_decay",
        type=float,
        default=None,
        help="Lower bound of the decay. Default: --ema_decay without --ema_warmup (the official constant decay), "
        "0 with it.",
    )
    group.add_argument(
        "--ema_warmup",
        action="store_true",
        help="diffusers EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power (better for short runs).",
    )
    group.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up inverse gamma.")
    group.add_argument("--ema_power", type=float, default=0.75, help="EMA warm-up power (3/4 suits < 200k steps).")
    group.add_argument("--ema_update_after_step", type=int, default=0, help="Start averaging after this step.")


def make_ema(args: argparse.Namespace, model, model_cls, device):
    """diffusers' `EMAModel` of `model` on `device`, configured by the options of `add_ema_arguments`."""
    from diffusers.training_utils import EMAModel

    min_decay = args.ema_min_decay if args.ema_min_decay is not None else (0.0 if args.ema_warmup else args.ema_decay)
    ema = EMAModel(
        model.parameters(),
        decay=args.ema_decay,
        min_decay=float(min_decay),
        update_after_step=args.ema_update_after_step,
        use_ema_warmup=args.ema_warmup,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
        foreach=True,
        model_cls=model_cls,
        model_config=model.config,
    )
    ema.to(device)
    return ema


def load_ema(ema, folder: str, model_cls, device) -> None:
    """Restores `ema` (shadow weights and decay state) from the folder its `save_pretrained` wrote."""
    from diffusers.training_utils import EMAModel

    with warnings.catch_warnings():
        # EMAModel.from_pretrained itself passes the folder to from_config, which diffusers deprecates.
        warnings.filterwarnings("ignore", "It is deprecated to pass a pretrained model name or path", FutureWarning)
        saved = EMAModel.from_pretrained(folder, model_cls=model_cls, foreach=True)
    ema.load_state_dict(saved.state_dict())
    ema.to(device)


@contextlib.contextmanager
def averaged_weights(models_and_emas) -> Iterator[None]:
    """For validation: puts each model of the `(model, EMAModel or None)` pairs in eval mode with its EMA's
    weights; on exit restores its training weights and mode."""
    for model, ema in models_and_emas:
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
    modes = [model.training for model, _ in models_and_emas]
    for model, _ in models_and_emas:
        model.eval()
    try:
        yield
    finally:
        for (model, ema), mode in zip(models_and_emas, modes):
            if ema is not None:
                ema.restore(model.parameters())
            model.train(mode)


# ----------------------------------------------------------------------------------------------------------------
# Finding, reading and writing checkpoints
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_step(path: str) -> Optional[int]:
    match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRAINING_STATE_FILE))


def list_checkpoints(output_dir: str) -> List[str]:
    """Complete `checkpoint-<step>` folders, oldest first. Temporary and unfinished folders are ignored."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        step = checkpoint_step(name)
        if step is not None and os.path.isdir(path) and is_complete_checkpoint(path):
            found.append((step, path))
    return [path for _, path in sorted(found)]


def resolve_resume_checkpoint(resume: Optional[str], output_dir: str) -> Optional[str]:
    """Maps --resume_from_checkpoint to a complete checkpoint folder (None: fresh start). Raises for bad paths."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = resume if os.path.isabs(resume) or os.path.isdir(resume) else os.path.join(output_dir, resume)
    if not os.path.isdir(path):
        raise TrainingInputError(f"--resume_from_checkpoint {resume!r}: no such checkpoint folder ({path})")
    if not is_complete_checkpoint(path):
        raise TrainingInputError(
            f"--resume_from_checkpoint {resume!r} is not a complete checkpoint (no {TRAINING_STATE_FILE}); it was "
            "probably interrupted while being written"
        )
    return path


def read_training_state(checkpoint: Optional[str]) -> Dict[str, Any]:
    """The checkpoint's `training_state.json` (`{}` without a checkpoint)."""
    if checkpoint is None:
        return {}
    with open(os.path.join(checkpoint, TRAINING_STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def _fsync_tree(path: str) -> None:
    """Flushes a folder's files to stable storage, so a power loss cannot leave a renamed but empty checkpoint."""
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass


def _replace(source: str, target: str, trash_dir: str) -> None:
    """Moves `source` to `target`; an existing folder there is renamed away first and then deleted."""
    if os.path.isdir(target) and not os.path.islink(target):
        trash = os.path.join(trash_dir, f".trash-{uuid.uuid4().hex}")
        os.replace(target, trash)
        os.replace(source, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, target)


def save_checkpoint(accelerator, output_dir: str, step: int, state: Dict[str, Any], total_limit: Optional[int]) -> str:
    """Writes `checkpoint-<step>` so that it is either complete or absent, on every process.

    `accelerator.save_state` writes into a hidden temporary folder (every process writes its RNG state there);
    the main process then adds `training_state.json`, flushes and renames the folder into place, and only then
    prunes old checkpoints. A crash at any moment leaves at most a `.tmp-*` folder, which `latest` never picks.
    """
    # Not ProjectConfiguration(total_limit=...): accelerate deletes old checkpoints before writing the new one in
    # place, so a kill -9 mid-save could leave only a partial checkpoint (and numbers them by save, not by step).
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    temporary = os.path.join(output_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(temporary, TRAINING_STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
        _fsync_tree(temporary)
        _replace(temporary, final, output_dir)  # the same step may be saved again after a resume
        if total_limit is not None and total_limit > 0:
            # The checkpoint just written stays even when newer steps exist (a resume from an older checkpoint).
            others = [path for path in list_checkpoints(output_dir) if path != final]
            for old in others[: max(0, len(others) + 1 - total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(output_dir):  # leftovers of runs killed mid-save
            if name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info(f"saved {final}")
    return final


@contextlib.contextmanager
def staged_output(output_dir: str) -> Iterator[str]:
    """Yields a hidden staging folder inside `output_dir`; on exit moves its entries into `output_dir`.

    Each entry replaces the one of the same name with one rename, so a crash leaves each component either old or
    new, never half-written, and unrelated entries (checkpoints, logs) stay. `model_index.json` moves last: it
    names the components, so it must only point at ones already in place.
    """
    staging = os.path.join(output_dir, f".tmp-pipeline-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    yield staging
    for name in sorted(os.listdir(staging), key=lambda n: (n == "model_index.json", n)):
        _replace(os.path.join(staging, name), os.path.join(output_dir, name), output_dir)
    shutil.rmtree(staging, ignore_errors=True)


def save_stage(pipe, args, title: str, notes: str) -> None:
    """Writes the pipeline of a later stage into --output_dir, component by component (see `staged_output`).

    Its model card's `## title` section holds `notes`; the other stages' sections come from --pipeline's card.
    """
    previous_card = os.path.join(args.pipeline, "README.md")
    with staged_output(args.output_dir) as staging:
        pipe.to("cpu").save_pretrained(staging)
        repo_id = args.hub_model_id or args.output_dir
        write_pipeline_card(pipe, staging, title, notes, previous_card=previous_card, repo_id=repo_id)


# ----------------------------------------------------------------------------------------------------------------
# Settings that a resumed run may change
# ----------------------------------------------------------------------------------------------------------------


def set_peak_learning_rate(lr_scheduler, learning_rate: float) -> float:
    """Makes a restored LR schedule go on at peak `learning_rate`; returns the peak rate it carried before.

    `accelerator.load_state` restores the optimizer's and the schedule's learning rates from the checkpoint, so
    without this a changed `--learning_rate` would be silently ignored on resume. The schedule's shape (its factor
    at the current step) is kept; only its peak changes.
    """
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper holds the torch schedule
    previous = float(scheduler.base_lrs[0])
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        factor = group["lr"] / base if base else 1.0
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor
    scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr() reports
    return previous


def setting_history(
    earlier: Optional[List[Dict[str, Any]]], key: str, start_step: int, step: int, value: Any, unrecorded: Any = None
) -> List[Dict[str, Any]]:
    """What value a training setting had over each stretch of steps: `[{"steps": [first, last], key: value}, ...]`.

    `earlier` is the record the resumed checkpoint carries; this invocation ran steps `start_step`-`step` with
    `value`. A checkpoint written before the record existed gives `unrecorded` for the steps before `start_step`.
    Adjacent stretches with the same value merge; empty ones are dropped.
    """
    earlier = list(earlier or [])
    if not earlier and start_step > 0:
        earlier = [{"steps": [0, start_step], key: unrecorded}]
    history: List[Dict[str, Any]] = []
    for stretch in earlier + [{"steps": [start_step, step], key: value}]:
        first, last = stretch["steps"]
        if last <= first:
            continue
        previous = history[-1] if history else None
        if previous and previous[key] == stretch[key] and previous["steps"][1] == first:
            history[-1] = {"steps": [previous["steps"][0], last], key: stretch[key]}
        else:
            history.append({"steps": [first, last], key: stretch[key]})
    return history


def setting_histories(
    resume_state: Dict[str, Any], start_step: int, step: int, current: Dict[str, Any], resumed: Dict[str, Any]
) -> Dict[str, List[Dict[str, Any]]]:
    """The records of the settings a resumed run may change, as `training_state.json` stores them.

    Args:
        resume_state: the resumed checkpoint's `training_state.json` (`{}` for a fresh run).
        current: this invocation's `mixed_precision`, `learning_rate`, `images_per_step` and `ema_decay` (`None`
            without EMA), used for steps `start_step`-`step`.
        resumed: the `learning_rate` and `ema_decay` the restored schedule and EMA carried: a checkpoint written
            before a record existed ran all its steps at them. Its images per step are its saved
            `num_processes x train_batch_size` (it did not record gradient accumulation, which its runs did not use).

    Returns:
        `{"precision_history": [...], "learning_rate_history": [...], "images_per_step_history": [...],
        "ema_decay_history": [...]}`.
    """
    if resume_state.get("train_batch_size"):
        layout = int(resume_state.get("num_processes", 1)) * int(resume_state["train_batch_size"])
        resumed = {**resumed, "images_per_step": layout}
    return {
        name: setting_history(resume_state.get(name), key, start_step, step, current[key], resumed.get(key))
        for key, name in HISTORIES.items()
    }


def images_seen(history: List[Dict[str, Any]]) -> Optional[int]:
    """Total images of an `images_per_step_history`, or None where a stretch is unrecorded."""
    if any(h["images_per_step"] is None for h in history):
        return None
    return sum((h["steps"][1] - h["steps"][0]) * h["images_per_step"] for h in history)


def describe_history(history: List[Dict[str, Any]], key: str, fallback: str) -> str:
    """One line for a model card: `bf16`, or `no (steps 0-42250), bf16 (steps 42250-51750)` where it changed."""
    if not history:
        return fallback
    names = ["not recorded" if h[key] is None else str(h[key]) for h in history]
    if len(history) == 1:
        return names[0]
    return ", ".join(f"{name} (steps {h['steps'][0]}-{h['steps'][1]})" for name, h in zip(names, history))
