"""Checkpoints of the training scripts: crash-safe `checkpoint-<step>` folders, resume, EMA, and output folders.

`accelerator.save_state` writes each checkpoint into a hidden folder, renamed into place once complete with
`training_state.json` last (`--resume_from_checkpoint latest` picks only folders that have it); a failed write (a full
disk) deletes it and stops the run with one line naming the folder and the cause. `prepare_resume` checks a resume
before any data is read and refuses a folder holding checkpoints newer than the run's start step (they would mix with
its own): so the newest checkpoint by step is the newest written, and rotation keeps it plus the one resumed from.

A resumed run may change some settings (precision, learning rate, batch, EMA decay): `training_state.json` records
each as `[{"steps": [first, last], <key>: value}, ...]` so that the model card reports the whole run.
"""

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from accelerate.logging import get_logger

from _common import OutputWriteError, TrainingInputError, describe_write_error, write_pipeline_card


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
        help="Keep the newest N checkpoints (older ones are deleted once a newer one is complete), and the one the "
        "run resumed from. Default: keep all.",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='Resume from a checkpoint folder (absolute, or relative to the checkpoint folder) or "latest" (the '
        "newest complete checkpoint; a fresh start if there is none).",
    )
    group.add_argument(
        "--delete_newer_checkpoints",
        action="store_true",
        help="Delete the checkpoints of the checkpoint folder newer than the step the run starts from (all of them "
        "for a fresh start) before training. Without it such a folder is refused: its checkpoints would mix with "
        "the run's, and `latest` could pick one of them after a crash.",
    )
    group.add_argument(
        "--ignore_unloadable_random_states",
        action="store_true",
        help="Resume even when a random_states_<process>.pkl of the checkpoint is missing or cannot be loaded: the "
        "run goes on with other random states and no longer matches an uninterrupted one. Default: refuse.",
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
        help="Lower bound of the decay (default: --ema_decay, the official constant; 0 with --ema_warmup).",
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
    """A `LerpEMAModel` (diffusers' `EMAModel`, one-pass update) of `model` on `device`, per `add_ema_arguments`."""
    from diffusers_diffae.training_utils import LerpEMAModel

    min_decay = args.ema_min_decay if args.ema_min_decay is not None else (0.0 if args.ema_warmup else args.ema_decay)
    ema = LerpEMAModel(
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
    """The checkpoint's `training_state.json` (`{}` without a checkpoint); a damaged one is a `TrainingInputError`."""
    if checkpoint is None:
        return {}
    path = os.path.join(checkpoint, TRAINING_STATE_FILE)
    state = _read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise TrainingInputError(f"{path} is damaged (no integer global_step); resume from another checkpoint")
    return state


def check_output_folder(path: str, option: str) -> None:
    """Raises unless `path` is a folder this process can write into, or one it can create (nothing is created)."""
    absolute = Path(path).absolute()
    existing = next(p for p in [absolute, *absolute.parents] if p.exists())
    if existing == absolute and not existing.is_dir():
        raise TrainingInputError(f"{option} {path!r} is a file, not a folder")
    if not existing.is_dir():
        raise TrainingInputError(f"{option} {path!r} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainingInputError(f"{option} {path!r}: cannot write into {existing}")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainingInputError(f"{path} is damaged ({e}); resume from another checkpoint") from e


def _check_models(checkpoint: str, models: Dict[str, Optional[dict]], use_ema: bool) -> None:
    """Each model of `models` (and its EMA with `use_ema`) is in the checkpoint, with the config the run builds."""
    for name, config in models.items():
        for folder in [name, f"{name}_ema"] if use_ema else [name]:
            if config is None:
                continue
            path = os.path.join(checkpoint, folder, "config.json")
            if not os.path.isfile(path):
                why = "it was written without --use_ema" if folder != name else "the checkpoint is damaged"
                raise TrainingInputError(
                    f"{checkpoint} has no {folder}/ ({why}); resume with the options it was written with"
                )
            saved = _read_json(path)
            for key, value in config.items():
                if key in saved and json.loads(json.dumps(saved[key])) != json.loads(json.dumps(value)):
                    raise TrainingInputError(
                        f"{checkpoint}/{folder} was trained with {key}={saved[key]!r}, but this run builds "
                        f"{key}={value!r}; resume with the model config the checkpoint was trained with"
                    )


def _check_files(checkpoint: str) -> None:
    """Cheap integrity checks: safetensors headers cover their files, torch's zip files have their central
    directory (a truncated file has neither), accelerate's optimizer and schedule states are there."""
    from safetensors import safe_open

    for name in ("optimizer.bin", "scheduler.bin"):
        if not os.path.isfile(os.path.join(checkpoint, name)):
            raise TrainingInputError(f"{checkpoint} has no {name}: the checkpoint is damaged; resume from another one")
    for path in sorted(Path(checkpoint).rglob("*")):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif path.suffix == ".bin" and not zipfile.is_zipfile(path):  # random states: see below
                raise ValueError("truncated or not a torch file")
        except Exception as e:
            raise TrainingInputError(f"{path} is damaged ({e}); resume from another checkpoint") from e


def _check_random_states(checkpoint: str, state: Dict[str, Any], ignore: bool) -> None:
    """accelerate's `load_state` only logs (at INFO) a random state it cannot load and goes on with others, which
    breaks the exact resume; refuse instead, unless `ignore`."""
    import random

    import accelerate.utils
    import numpy as np
    import torch

    for process in range(int(state.get("num_processes", 1))):
        path = os.path.join(checkpoint, f"random_states_{process}.pkl")
        try:
            if not os.path.isfile(path):
                raise FileNotFoundError("missing")
            states = accelerate.utils.load(path)  # as accelerate loads it, applied to throwaway generators
            random.Random().setstate(states["random_state"])
            np.random.RandomState().set_state(states["numpy_random_seed"])
            torch.Generator().set_state(states["torch_manual_seed"])
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if ignore:
                logging.getLogger(__name__).warning(
                    f"{path} cannot be loaded ({reason}); --ignore_unloadable_random_states: going on with other "
                    "random states, so this run will not match an uninterrupted one"
                )
                continue
            raise TrainingInputError(
                f"{path} cannot be loaded ({reason}), so the resumed run would not match an uninterrupted one; "
                "resume from another checkpoint, or pass --ignore_unloadable_random_states"
            ) from e


def _newer_checkpoints(checkpoint_dir: str, start_step: int, delete: bool) -> None:
    """Refuses (or, with `delete`, deletes) the complete checkpoints of `checkpoint_dir` newer than `start_step`."""
    newer = [path for path in list_checkpoints(checkpoint_dir) if checkpoint_step(path) > start_step]
    if not newer:
        return
    names = ", ".join(os.path.basename(path) for path in newer[-3:])
    start = f"starts at step {start_step}" if start_step else "starts from scratch"
    if not delete:
        raise TrainingInputError(
            f"{checkpoint_dir} holds {len(newer)} checkpoint(s) newer than this run, which {start} (up to {names}); "
            "they would mix with its checkpoints. Resume from the newest (--resume_from_checkpoint latest), use "
            "another folder, or pass --delete_newer_checkpoints"
        )
    for path in newer:  # every process may run this: whoever renames a folder first deletes it
        _discard(path, checkpoint_dir)
    logging.getLogger(__name__).warning(
        f"--delete_newer_checkpoints: deleted {len(newer)} checkpoint(s) up to {names}"
    )


def prepare_resume(
    args: argparse.Namespace, checkpoint_dir: str, models: Optional[Dict[str, Optional[dict]]] = None
) -> Tuple[Optional[str], Dict[str, Any]]:
    """The checkpoint to resume from (None: a fresh start) and its `training_state.json`, after every check that
    needs no data or model, so that a bad resume fails in one line before the long work:

    - --checkpointing_steps is not negative, --checkpoints_total_limit is at least 1;
    - --output_dir and the checkpoint folder can be written;
    - the checkpoint is complete and undamaged and holds each of `models` (folder name -> the config this run
      builds, or None to skip; their EMA folders too with --use_ema) with the same config;
    - its random states load (unless --ignore_unloadable_random_states);
    - `checkpoint_dir` holds no complete checkpoint newer than the step the run starts from (with
      --delete_newer_checkpoints they are deleted).
    """
    if args.checkpointing_steps < 0:
        raise TrainingInputError(
            f"--checkpointing_steps must not be negative (0: no checkpoints), got {args.checkpointing_steps}"
        )
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise TrainingInputError(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}")
    check_output_folder(args.output_dir, "--output_dir")
    if os.path.abspath(checkpoint_dir) != os.path.abspath(args.output_dir):
        check_output_folder(checkpoint_dir, "the checkpoint folder")
    checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, checkpoint_dir)
    state = read_training_state(checkpoint)
    if checkpoint is not None:
        _check_files(checkpoint)
        _check_models(checkpoint, models or {}, getattr(args, "use_ema", False))
        _check_random_states(checkpoint, state, args.ignore_unloadable_random_states)
    _newer_checkpoints(checkpoint_dir, int(state.get("global_step", 0)), args.delete_newer_checkpoints)
    return checkpoint, state


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


def _discard(path: str, folder: str) -> None:
    """Deletes the folder `path`, renamed first to a hidden `.trash-*` in `folder`: a kill mid-deletion leaves only a
    folder that no checkpoint lookup lists. Nothing happens when `path` is already gone (another process took it)."""
    trash = os.path.join(folder, f".trash-{uuid.uuid4().hex}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _replace(source: str, target: str, trash_dir: str) -> None:
    """Moves `source` to `target`; an existing folder there is renamed away first and then deleted."""
    if os.path.isdir(target) and not os.path.islink(target):
        trash = os.path.join(trash_dir, f".trash-{uuid.uuid4().hex}")
        os.replace(target, trash)
        os.replace(source, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, target)


def _any_process(accelerator, failed: bool) -> bool:
    """True on every process when any process failed (a collective: every process calls it at the same point)."""
    import torch

    if accelerator.num_processes == 1:
        return failed
    flag = torch.tensor(float(failed), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    state: Dict[str, Any],
    total_limit: Optional[int],
    keep: Optional[str] = None,
) -> str:
    """Writes `checkpoint-<step>` so that it is either complete or absent, on every process.

    `accelerator.save_state` writes into a hidden temporary folder (every process writes its RNG state there);
    the main process then adds `training_state.json`, flushes and renames the folder into place, and only then
    prunes old checkpoints: it keeps the `total_limit` newest by step, the one just written and `keep` (the one the
    run resumed from). A crash at any moment leaves at most a `.tmp-*` folder, which `latest` never picks; a write
    that fails (a full disk) deletes it and raises `OutputWriteError` on every process.
    """
    # Not ProjectConfiguration(total_limit=...): accelerate deletes old checkpoints before writing the new one in
    # place, so a kill -9 mid-save could leave only a partial checkpoint (and numbers them by save, not by step).
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    temporary = os.path.join(output_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
    error = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            os.makedirs(temporary)
    except OSError as e:
        error = e
    if not _any_process(accelerator, error is not None):
        try:
            accelerator.save_state(temporary)
        except Exception as e:
            error = e
    if not _any_process(accelerator, error is not None) and accelerator.is_main_process:
        try:
            with open(os.path.join(temporary, TRAINING_STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=2)
            _fsync_tree(temporary)
            _replace(temporary, final, output_dir)  # the same step may be saved again after a resume
        except Exception as e:
            error = e
    if _any_process(accelerator, error is not None):
        _checkpoint_failed(accelerator, error, output_dir, f"{CHECKPOINT_PREFIX}{step}", temporary)
    if accelerator.is_main_process:
        if total_limit is not None:
            checkpoints = list_checkpoints(output_dir)
            kept = {os.path.realpath(path) for path in checkpoints[-total_limit:] + [final] + ([keep] if keep else [])}
            for old in checkpoints:
                if os.path.realpath(old) not in kept:
                    _discard(old, output_dir)
        for name in os.listdir(output_dir):  # leftovers of runs killed mid-save
            if name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info(f"saved {final}")
    return final


def _checkpoint_failed(accelerator, error: Optional[BaseException], output_dir: str, name: str, temporary: str):
    """Deletes the partial checkpoint, then raises: `OutputWriteError` for a failed write (full disk, read-only
    folder) or on a process whose peer failed, the error itself otherwise (a bug keeps its traceback)."""
    message = None if error is None else describe_write_error(error, output_dir, name)  # before the deletion
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    if error is not None and message is None:
        raise error
    previous = list_checkpoints(output_dir)
    last = f"the last complete checkpoint is {previous[-1]}" if previous else "no complete checkpoint was written"
    message = message or f"another process could not write {name} into {output_dir}"
    raise OutputWriteError(f"{message}. Nothing half-written was left ({last})") from error


@contextlib.contextmanager
def staged_output(output_dir: str) -> Iterator[str]:
    """Yields a hidden staging folder inside `output_dir`; on exit moves its entries into `output_dir`.

    Each entry replaces the one of the same name with one rename, so a crash leaves each component either old or
    new, never half-written, and unrelated entries (checkpoints, logs) stay. `model_index.json` moves last: it
    names the components, so it must only point at ones already in place. If writing fails, the staging folder is
    deleted and the folder keeps its old content; a full disk or a read-only folder is an `OutputWriteError`.
    """
    staging = os.path.join(output_dir, f".tmp-pipeline-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(staging)
        yield staging
        for name in sorted(os.listdir(staging), key=lambda n: (n == "model_index.json", n)):
            _replace(os.path.join(staging, name), os.path.join(output_dir, name), output_dir)
    except Exception as e:
        message = describe_write_error(e, output_dir, "the pipeline")  # before the deletion frees space
        shutil.rmtree(staging, ignore_errors=True)
        if message is None:
            raise
        raise OutputWriteError(f"{message}; the folder keeps its previous content") from e
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
