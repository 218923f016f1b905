"""Training scripts on bad input, NaN losses, time limits, and the bookkeeping of checkpoints and settings."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import _checkpoints
import _common
import train_attribute_classifier
import train_diffae
from training_helpers import QUIET, OneProcess, _reset_accelerate, run_main


# ------------------------------------------------------------------------------------------------------------------
# Bad input, NaN loss, checkpoint selection
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "is empty"),
        ("empty_folder", "holds no image files"),
        ("missing_column", "no image column 'picture'"),
        ("not_image_column", "holds Value"),
        ("broken_file", "0003.png) is not a readable image"),
        ("too_small", "smaller than --resolution 32"),
        ("resume_missing", "no such checkpoint folder"),
        ("resolution_mismatch", "does not match the unet's sample_size"),
        ("missing_dataset", "is neither a saved dataset folder, a folder of data files, nor a reachable Hub dataset"),
    ],
)
def test_train_diffae_rejects_bad_input_before_training(case, message, data, bad_data, tmp_path):
    out = tmp_path / "out"
    args = {
        "empty": ["--dataset_name", bad_data["empty"]],
        "empty_folder": ["--train_data_dir", bad_data["empty_folder"], "--cache_dir", data["cache"]],
        "missing_column": ["--dataset_name", data["saved"], "--image_column", "picture"],
        "not_image_column": ["--dataset_name", data["saved"], "--image_column", "size"],
        "broken_file": ["--train_data_dir", bad_data["broken"], "--cache_dir", data["cache"]],
        "too_small": ["--dataset_name", data["saved"], "--resolution", 32],
        "resume_missing": ["--dataset_name", data["saved"], "--resume_from_checkpoint", "checkpoint-7"],
        "resolution_mismatch": ["--dataset_name", data["saved"], "--resolution", 8],
        "missing_dataset": ["--dataset_name", str(tmp_path / "no_such_dataset"), "--cache_dir", data["cache"]],
    }[case]
    config = data["config"]
    if case == "too_small":  # a 32x32 model, so the only problem is the 16x16 images
        big = json.loads(Path(config).read_text())
        big["unet"]["sample_size"] = big["encoder"]["sample_size"] = 32
        config = tmp_path / "model32.json"
        config.write_text(json.dumps(big))
    with pytest.raises(_common.TrainingInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_main(train_diffae, [*args, "--model_config", config, "--max_train_steps", 2, "--output_dir", out])
    assert not list(out.glob("checkpoint-*")) and not (out / "model_index.json").exists()


@pytest.mark.parametrize(
    "columns, extra, message",
    [
        ("name", [], "label column 'name' has type"),
        ("count", [], "holds 4 distinct integers"),
        ("missing", [], "no label column 'missing'"),
    ],
)
def test_classifier_rejects_bad_label_columns(columns, extra, message, trained_pipeline, bad_data, tmp_path):
    with pytest.raises(_common.TrainingInputError, match=message):
        run_main(
            train_attribute_classifier,
            ["--pipeline", trained_pipeline, "--dataset_name", bad_data["counts"], "--label_columns", columns,
             "--output_dir", tmp_path / "out", *extra],
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_max_train_minutes_stops_with_a_checkpoint_and_the_pipeline(data, tmp_path, caplog):
    """A run lent a fixed time stops at the first logging step past its budget (here 0 minutes: step 2), saves a
    checkpoint there although it is off the checkpointing grid, exports the pipeline, and resumes from it (with
    another EMA decay, for a machine that trains at another batch size)."""
    caplog.set_level("INFO")
    out = tmp_path / "timed"
    common = ["--dataset_name", data["saved"], "--model_config", data["config"], "--train_batch_size", 8,
              "--use_ema", "--checkpointing_steps", 5, "--validation_steps", 0, "--seed", 0, "--output_dir", out,
              *QUIET]  # fmt: skip
    assert run_main(train_diffae, [*common, "--max_train_steps", 50, "--max_train_minutes", 0]) == 0
    assert "--max_train_minutes 0 reached at step 2" in caplog.text
    assert [os.path.basename(c) for c in _checkpoints.list_checkpoints(str(out))] == ["checkpoint-2"]
    assert json.loads((out / "training_args.json").read_text())["global_step"] == 2
    assert (out / "model_index.json").exists()
    # The resumed run may change the EMA decay, as it may the learning rate, and the batch (as a GPU would); the
    # checkpoint and the card record both, and count the images seen.
    resume = ["--max_train_steps", 4, "--resume_from_checkpoint", "latest", "--ema_decay", 0.99,
              "--checkpointing_steps", 2, "--train_batch_size", 4]  # fmt: skip
    assert run_main(train_diffae, [*common, *resume]) == 0
    assert json.loads((out / "training_args.json").read_text())["global_step"] == 4
    assert "unet_ema was saved with decay 0.9999; continuing with --ema_decay 0.99" in caplog.text
    assert json.loads((out / "checkpoint-4" / "unet_ema" / "config.json").read_text())["decay"] == 0.99
    state = json.loads((out / "checkpoint-4" / _checkpoints.TRAINING_STATE_FILE).read_text())
    assert state["images_per_step_history"] == [
        {"steps": [0, 2], "images_per_step": 8},
        {"steps": [2, 4], "images_per_step": 4},
    ]
    assert state["ema_decay_history"] == [{"steps": [0, 2], "ema_decay": 0.9999}, {"steps": [2, 4], "ema_decay": 0.99}]
    card = (out / "README.md").read_text()
    assert "- steps: 4 (24 images seen), images per step: 8 (steps 0-2), 4 (steps 2-4)" in card
    assert "decay 0.9999 (steps 0-2), 0.99 (steps 2-4)" in card
    with pytest.raises(_common.TrainingInputError, match="--max_train_minutes must not be negative"):
        run_main(train_diffae, [*common, "--max_train_minutes", -1])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, caplog):
    out = tmp_path / "nan"
    # Adam moves every weight by ~lr per step: 1e36 overflows the forward pass within a couple of steps.
    code = run_main(
        train_diffae,
        ["--dataset_name", data["saved"], "--model_config", data["config"], "--train_batch_size", 8,
         "--max_train_steps", 20, "--learning_rate", 1e36, "--max_grad_norm", 0, "--checkpointing_steps", 1,
         "--output_dir", out, "--seed", 0, *QUIET],
    )  # fmt: skip
    assert code == 2
    assert "NaN or infinite at step" in caplog.text
    assert not (out / "model_index.json").exists()
    for checkpoint in _checkpoints.list_checkpoints(str(out)):
        for part in ("unet", "encoder"):
            weights = load_file(os.path.join(checkpoint, part, "diffusion_pytorch_model.safetensors"))
            assert all(torch.isfinite(w).all() for w in weights.values()), checkpoint


def histories(resume_state, start_step, step, mixed_precision="no", learning_rate=1e-4, images_per_step=8,
              ema_decay=None, resumed_rate=1e-4, resumed_decay=None):  # fmt: skip
    """The settings' records as train_diffae.py writes them into a checkpoint."""
    current = {"mixed_precision": mixed_precision, "learning_rate": learning_rate, "images_per_step": images_per_step,
               "ema_decay": ema_decay}  # fmt: skip
    resumed = {"learning_rate": resumed_rate, "ema_decay": resumed_decay}
    return _checkpoints.setting_histories(resume_state, start_step, step, current, resumed)


def test_precision_history_merges_stretches_and_marks_unrecorded_steps():
    describe = _checkpoints.describe_history
    history = histories({}, 0, 5, mixed_precision="no")["precision_history"]
    assert history == [{"steps": [0, 5], "mixed_precision": "no"}]
    assert describe(history, "mixed_precision", "?") == "no"
    history = histories({"precision_history": history}, 5, 9)["precision_history"]  # same precision: one stretch
    assert history == [{"steps": [0, 9], "mixed_precision": "no"}]
    history = histories({"precision_history": history}, 9, 12, mixed_precision="bf16")["precision_history"]
    assert describe(history, "mixed_precision", "?") == "no (steps 0-9), bf16 (steps 9-12)"
    no_steps = histories({"precision_history": history}, 12, 12, mixed_precision="fp16")["precision_history"]
    assert no_steps == history
    # A checkpoint from before the record:
    legacy = histories({"global_step": 40}, 40, 50, mixed_precision="bf16")["precision_history"]
    assert describe(legacy, "mixed_precision", "?") == "not recorded (steps 0-40), bf16 (steps 40-50)"
    assert describe([], "mixed_precision", "accelerate default") == "accelerate default"


def test_learning_rate_history_fills_legacy_steps_with_the_restored_rate():
    legacy = histories({"global_step": 40}, 40, 50, learning_rate=1e-4, resumed_rate=3e-4)["learning_rate_history"]
    assert legacy == [{"steps": [0, 40], "learning_rate": 3e-4}, {"steps": [40, 50], "learning_rate": 1e-4}]
    describe = _checkpoints.describe_history
    assert describe(legacy, "learning_rate", "?") == "0.0003 (steps 0-40), 0.0001 (steps 40-50)"
    again = histories({"learning_rate_history": legacy}, 50, 60, learning_rate=1e-4, resumed_rate=1e-4)
    assert again["learning_rate_history"] == [
        {"steps": [0, 40], "learning_rate": 3e-4},
        {"steps": [40, 60], "learning_rate": 1e-4},
    ]


def test_batch_and_ema_histories_fill_legacy_steps_from_the_checkpoint():
    # A checkpoint from before the records: its saved layout and its EMA's decay stand for the steps it ran.
    legacy = {"global_step": 100, "num_processes": 2, "train_batch_size": 16}
    batches = histories(legacy, 100, 110, images_per_step=256)["images_per_step_history"]
    assert batches == [{"steps": [0, 100], "images_per_step": 32}, {"steps": [100, 110], "images_per_step": 256}]
    assert _checkpoints.images_seen(batches) == 100 * 32 + 10 * 256
    unknown = histories({"global_step": 5}, 5, 6, images_per_step=8)["images_per_step_history"]
    assert _checkpoints.images_seen(unknown) is None
    decays = histories(legacy, 100, 110, ema_decay=0.996, resumed_decay=0.9995)["ema_decay_history"]
    assert decays == [{"steps": [0, 100], "ema_decay": 0.9995}, {"steps": [100, 110], "ema_decay": 0.996}]


def test_set_peak_learning_rate_keeps_the_schedule_shape():
    from diffusers.optimization import get_scheduler

    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([parameter], lr=3e-4)
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert _checkpoints.set_peak_learning_rate(scheduler, 3e-4) == 3e-4  # same rate: nothing changes
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-4)
    assert _checkpoints.set_peak_learning_rate(scheduler, 1e-4) == 3e-4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-4)  # half-way down the linear decay, new peak
    assert scheduler.get_last_lr() == [pytest.approx(0.5e-4)]
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4e-4)  # later steps follow the new peak


def test_checkpoint_selection_skips_incomplete_folders(tmp_path):
    for step, complete in ((2, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / _checkpoints.TRAINING_STATE_FILE).write_text(json.dumps({"global_step": step}))
    (tmp_path / ".tmp-checkpoint-14").mkdir()
    assert _checkpoints.resolve_resume_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert _checkpoints.resolve_resume_checkpoint("checkpoint-2", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert _checkpoints.resolve_resume_checkpoint("latest", str(tmp_path / "nothing")) is None
    with pytest.raises(_common.TrainingInputError, match="not a complete checkpoint"):
        _checkpoints.resolve_resume_checkpoint("checkpoint-12", str(tmp_path))
    with pytest.raises(_common.TrainingInputError, match="no such checkpoint folder"):
        _checkpoints.resolve_resume_checkpoint(str(tmp_path / "checkpoint-99"), str(tmp_path))


def test_checkpoint_rotation_keeps_the_newest_the_one_just_written_and_the_resumed_one(tmp_path):
    """--checkpoints_total_limit prunes only after the new checkpoint is complete; it keeps the newest by step, the
    one just written (even below newer ones) and the one the run resumed from (`keep`)."""
    from accelerate import PartialState

    def save(step, keep=None):
        _checkpoints.save_checkpoint(OneProcess(), str(tmp_path), step, {"global_step": step}, 2, keep=keep)
        return [Path(c).name for c in _checkpoints.list_checkpoints(str(tmp_path))]

    _reset_accelerate()
    PartialState()  # the checkpoint module logs through accelerate
    try:
        assert save(2) == ["checkpoint-2"]
        assert save(8) == ["checkpoint-2", "checkpoint-8"]
        assert save(10) == ["checkpoint-8", "checkpoint-10"]
        resumed = str(tmp_path / "checkpoint-8")
        assert save(11, keep=resumed) == ["checkpoint-8", "checkpoint-10", "checkpoint-11"]
        assert save(12, keep=resumed) == ["checkpoint-8", "checkpoint-11", "checkpoint-12"]
        assert save(6) == ["checkpoint-6", "checkpoint-11", "checkpoint-12"]
        assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".trash-*"))
    finally:
        _reset_accelerate()


def test_a_failed_checkpoint_write_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    """A write that fails deletes its partial folder; the message names the folder and the cause."""
    import errno
    import shutil

    from accelerate import PartialState

    def full_disk(folder):
        Path(folder, "optimizer.bin").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    def read_only(folder):
        raise PermissionError(errno.EROFS, "Read-only file system")

    def bug(folder):
        raise KeyError("not a write error")

    _reset_accelerate()
    PartialState()
    try:
        _checkpoints.save_checkpoint(OneProcess(), str(tmp_path), 1, {"global_step": 1}, None)
        for save_state, expected in (
            (full_disk, f"could not write checkpoint-2 into {tmp_path}: the disk is full ("),
            (read_only, f"could not write checkpoint-2 into {tmp_path}: Read-only file system."),
        ):
            with pytest.raises(_common.OutputWriteError) as info:
                _checkpoints.save_checkpoint(OneProcess(save_state), str(tmp_path), 2, {"global_step": 2}, None)
            assert str(info.value).startswith(expected)
            assert str(info.value).endswith(f"(the last complete checkpoint is {tmp_path / 'checkpoint-1'})")
            assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
        with pytest.raises(KeyError, match="not a write error"):  # a bug is no write error: it keeps its traceback
            _checkpoints.save_checkpoint(OneProcess(bug), str(tmp_path), 2, {"global_step": 2}, None)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    finally:
        _reset_accelerate()
    # torch's zip writer gives no errno: a nearly empty disk identifies it.
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert _common.describe_write_error(torch_error, str(tmp_path), "x") is None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=0))
    assert _common.describe_write_error(torch_error, str(tmp_path), "x") == (
        f"could not write x into {tmp_path}: the disk is full (0.0 MiB free)"
    )
    assert _common.describe_write_error(KeyError("k"), str(tmp_path), "x") is None  # not a write error
