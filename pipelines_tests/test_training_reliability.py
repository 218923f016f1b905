"""Training never loses work: kill -9 at random moments, full disks, stale or damaged checkpoints, and bad output
folders or resume options, each refused in one line before any training step (issue: Reliability)."""

import errno
import io
import json
import shutil
import subprocess
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

import _checkpoints
import _common
import _data
import train_attribute_classifier
import train_diffae
import train_latent_ddim
from training_helpers import BUNDLED_PIPELINE, QUIET, kill_and_resume, max_abs_diff, run_main


WEIGHTS = "diffusion_pytorch_model.safetensors"


def train_args(data, out, steps, *extra):
    """A tiny train_diffae.py run on one thread (several threads on a shared small machine are far slower)."""
    return ["--dataset_name", data["saved"], "--model_config", data["config"], "--train_batch_size", 8,
            "--max_train_steps", steps, "--checkpointing_steps", 1, "--validation_steps", 0, "--seed", 5,
            "--num_threads", 1, "--output_dir", out, *QUIET, *map(str, extra)]  # fmt: skip


def names(folder) -> list:
    return [Path(c).name for c in _checkpoints.list_checkpoints(str(folder))]


def leftovers(folder) -> list:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith((".tmp-", ".trash-")))


@pytest.fixture(scope="module")
def short_run(data, tmp_path_factory):
    """A 3-step run with a checkpoint at every step (checkpoint-1, -2, -3), copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("reliability") / "short"
    assert run_main(train_diffae, train_args(data, out, 3)) == 0
    return out


def copy_run(short_run, tmp_path) -> Path:
    return Path(shutil.copytree(short_run, tmp_path / "run"))


# ------------------------------------------------------------------------------------------------------------------
# kill -9
# ------------------------------------------------------------------------------------------------------------------


def test_ten_kills_at_random_moments_resume_bit_identical(data, tmp_path):
    """SIGKILL 10 times at random moments (half of them inside a checkpoint write), with a checkpoint at every step
    and --checkpoints_total_limit 2; each time resumed from `latest`. The weights, EMA and optimizer state after 20
    steps are bit-identical to an uninterrupted run's, and only complete checkpoints are left."""
    argv = ["--dataset_name", data["saved"], "--model_config", data["config"], "--train_batch_size", 8,
            "--max_train_steps", 20, "--use_ema", "--ema_warmup", "--random_flip", "--checkpointing_steps", 1,
            "--checkpoints_total_limit", 2, "--validation_steps", 10, "--seed", 3, "--num_threads", 1, *QUIET]  # fmt: skip
    result = kill_and_resume(argv, tmp_path, kills=10, seed=0, timeout=240)
    assert result["reference_exit_code"] == 0
    assert len(result["kills"]) == 10, result
    assert result["exit_codes"] == [-9] * 10 + [0], result
    assert sum(kill["mid_save"] for kill in result["kills"]) >= 1, result  # a kill left a partial checkpoint

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for part in ("unet", "encoder", "unet_ema", "encoder_ema"):
        assert (
            max_abs_diff(reference / "checkpoint-20" / part / WEIGHTS, killed / "checkpoint-20" / part / WEIGHTS) == 0
        )
    for part in ("unet", "encoder"):  # the published (EMA) pipeline
        assert max_abs_diff(reference / part / WEIGHTS, killed / part / WEIGHTS) == 0
    optimizers = [
        torch.load(run / "checkpoint-20" / "optimizer.bin", weights_only=True) for run in (reference, killed)
    ]
    for a, b in zip(optimizers[0]["state"].values(), optimizers[1]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # The limit's two newest, plus the checkpoint the last run resumed from; nothing partial.
    last_resume = f"checkpoint-{result['kills'][-1]['resumed_at'] + 1}"
    assert set(names(killed)) == {last_resume, "checkpoint-19", "checkpoint-20"}
    assert leftovers(killed) == []


# ------------------------------------------------------------------------------------------------------------------
# The training rows of the issue's table
# ------------------------------------------------------------------------------------------------------------------


def _fail_checkpoint_write(monkeypatch, error: Exception, at: str) -> None:
    """Makes accelerate's writer of optimizer and schedule states raise `error` inside `at` (a checkpoint name)."""
    import accelerate.checkpointing

    save = accelerate.checkpointing.save

    def failing_save(obj, path, *args, **kwargs):
        if f".tmp-{at}" in str(path):
            Path(path).write_bytes(b"partial")  # what a full disk leaves: a truncated file
            raise error
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", failing_save)


def row_full_disk_checkpoint_torch_writer(data, tmp_path, monkeypatch):
    # torch's zip writer reports a full disk without an errno; the free space tells it apart.
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    _fail_checkpoint_write(monkeypatch, torch_error, "checkpoint-3")
    monkeypatch.setattr(
        _common.shutil, "disk_usage", lambda path: SimpleNamespace(total=2**30, used=2**30 - 4096, free=4096)
    )
    out = tmp_path / "out"
    with pytest.raises(_common.OutputWriteError) as info:
        run_main(train_diffae, train_args(data, out, 4))
    message = str(info.value)
    assert f"could not write checkpoint-3 into {out}: the disk is full (0.0 MiB free)" in message
    assert f"the last complete checkpoint is {out / 'checkpoint-2'}" in message and "\n" not in message
    assert names(out) == ["checkpoint-1", "checkpoint-2"] and leftovers(out) == []
    monkeypatch.undo()  # space again: the resume picks the last complete checkpoint and finishes
    assert run_main(train_diffae, train_args(data, out, 4, "--resume_from_checkpoint", "latest")) == 0
    assert names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]


def row_full_disk_checkpoint_oserror(data, tmp_path, monkeypatch):
    _fail_checkpoint_write(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), "checkpoint-2")
    out = tmp_path / "out"
    with pytest.raises(_common.OutputWriteError, match=r"could not write checkpoint-2 into .*: the disk is full"):
        run_main(train_diffae, train_args(data, out, 3))
    assert names(out) == ["checkpoint-1"] and leftovers(out) == [] and not (out / "model_index.json").exists()


def row_full_disk_final_pipeline(data, tmp_path, monkeypatch):
    """The disk fills while the pipeline is exported: its weights are written, its model card is not."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_common, "write_pipeline_card", full)
    out = tmp_path / "out"
    with pytest.raises(_common.OutputWriteError, match=r"could not write the pipeline into .*: the disk is full"):
        run_main(train_diffae, train_args(data, out, 2))
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()  # nothing that looks complete
    assert names(out) == ["checkpoint-1", "checkpoint-2"] and leftovers(out) == []


def row_full_disk_tmpfs(data, tmp_path, monkeypatch):
    """A real full disk: a 2 MiB tmpfs holds one checkpoint of the tiny model (1.1 MB) but not two."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the simulated full-disk cases run everywhere)")
    try:
        with pytest.raises(_common.OutputWriteError, match=r"could not write checkpoint-2 into .*: the disk is full"):
            run_main(train_diffae, train_args(data, small, 3))
        assert names(small) == ["checkpoint-1"] and leftovers(small) == []
    finally:
        subprocess.run(["umount", "--lazy", str(small)], check=True)  # the traceback may hold a file open


def row_stale_checkpoint_with_total_limit(data, tmp_path, monkeypatch):
    """Resuming from checkpoint-1 with --checkpoints_total_limit 1 while checkpoint-2 and -3 (an older run's, newer
    by step) are in the folder: refused, nothing deleted. With --delete_newer_checkpoints they go, the run resumes,
    keeps the checkpoint it resumed from and its newest, and reaches the same weights as before."""
    out = tmp_path / "out"
    assert run_main(train_diffae, train_args(data, out, 3)) == 0
    before = shutil.copytree(out / "checkpoint-3", tmp_path / "first-checkpoint-3")
    resume = ["--resume_from_checkpoint", "checkpoint-1", "--checkpoints_total_limit", 1]
    with pytest.raises(_common.TrainingInputError, match=r"holds 2 checkpoint\(s\) newer than this run, which starts "
                       r"at step 1 \(up to checkpoint-2, checkpoint-3\)"):  # fmt: skip
        run_main(train_diffae, train_args(data, out, 3, *resume))
    assert names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert run_main(train_diffae, train_args(data, out, 3, *resume, "--delete_newer_checkpoints")) == 0
    assert names(out) == ["checkpoint-1", "checkpoint-3"] and leftovers(out) == []
    for part in ("unet", "encoder"):
        assert max_abs_diff(before / part / WEIGHTS, out / "checkpoint-3" / part / WEIGHTS) == 0


def row_unloadable_random_states(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_main(train_diffae, train_args(data, out, 1)) == 0
    states = out / "checkpoint-1" / "random_states_0.pkl"
    states.write_bytes(states.read_bytes()[:100])
    with pytest.raises(_common.TrainingInputError) as info:
        run_main(train_diffae, train_args(data, out, 2, "--resume_from_checkpoint", "latest"))
    assert str(info.value).startswith(f"{states} cannot be loaded (")
    assert "pass --ignore_unloadable_random_states" in str(info.value) and "\n" not in str(info.value)
    assert names(out) == ["checkpoint-1"]


def row_sixteen_bit_png(data, tmp_path, monkeypatch):
    """A 16-bit grayscale PNG (PIL mode I;16) is scaled to 8 bits, not clipped to white."""
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    buffer = io.BytesIO()
    PIL.Image.fromarray(levels * 257).save(buffer, format="PNG")
    assert PIL.Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
    args = Namespace(resolution=16, allow_upscaling=False, alpha_background=255, image_interpolation="bilinear")
    decoded = _data.decode_image({"bytes": buffer.getvalue(), "path": None}, 0, args, center_crop=True)
    assert decoded.shape == (16, 16, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, np.repeat(levels.astype(np.uint8)[..., None], 3, axis=-1))


ISSUE_ROWS = {
    "full_disk_checkpoint_torch_writer": row_full_disk_checkpoint_torch_writer,
    "full_disk_checkpoint_oserror": row_full_disk_checkpoint_oserror,
    "full_disk_final_pipeline": row_full_disk_final_pipeline,
    "full_disk_tmpfs": row_full_disk_tmpfs,
    "stale_checkpoint_with_total_limit": row_stale_checkpoint_with_total_limit,
    "unloadable_random_states": row_unloadable_random_states,
    "sixteen_bit_png": row_sixteen_bit_png,
}


@pytest.mark.parametrize("row", list(ISSUE_ROWS))
def test_issue_training_rows(row, data, tmp_path, monkeypatch):
    ISSUE_ROWS[row](data, tmp_path, monkeypatch)


def test_unloadable_random_states_can_be_ignored_on_request(short_run, data, tmp_path, caplog):
    """--ignore_unloadable_random_states resumes anyway, with a warning naming the file."""
    out = copy_run(short_run, tmp_path)
    states = out / "checkpoint-3" / "random_states_0.pkl"
    states.write_bytes(b"not a pickle")
    resume = ["--resume_from_checkpoint", "latest", "--ignore_unloadable_random_states"]
    assert run_main(train_diffae, train_args(data, out, 4, *resume)) == 0
    assert f"{states} cannot be loaded" in caplog.text and "will not match an uninterrupted one" in caplog.text
    assert names(out)[-1] == "checkpoint-4"


# ------------------------------------------------------------------------------------------------------------------
# Further bad input: one line, before any training step
# ------------------------------------------------------------------------------------------------------------------


# case: the error's text (the set-up of each case is in the test)
BAD_INPUT = {
    "checkpointing_steps_negative": "--checkpointing_steps must not be negative",
    "checkpoints_total_limit_zero": "--checkpoints_total_limit must be at least 1, got 0",
    "output_dir_is_a_file": "is a file, not a folder",
    "output_dir_inside_a_file": "cannot be created: ",
    "fresh_start_into_a_folder_with_checkpoints": "newer than this run, which starts from scratch",
    "resume_damaged_training_state": "training_state.json is damaged (",
    "resume_truncated_weights": "diffusion_pytorch_model.safetensors is damaged (",
    "resume_missing_optimizer": "has no optimizer.bin: the checkpoint is damaged",
    "resume_other_model_config": "was trained with model_channels=8, but this run builds model_channels=16",
    "resume_with_ema_it_was_written_without": "has no unet_ema/ (it was written without --use_ema)",
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_train_diffae_refuses_before_training(case, short_run, data, tmp_path):
    run = copy_run(short_run, tmp_path)
    out, extra = run, ["--resume_from_checkpoint", "latest"]
    config = data["config"]
    if case == "checkpointing_steps_negative":
        extra = ["--checkpointing_steps", -1]
    elif case == "checkpoints_total_limit_zero":
        extra = ["--checkpoints_total_limit", 0]
    elif case == "output_dir_is_a_file":
        out = tmp_path / "a_file"
        out.write_text("not a folder")
    elif case == "output_dir_inside_a_file":
        (tmp_path / "a_file").write_text("not a folder")
        out = tmp_path / "a_file" / "out"
    elif case == "fresh_start_into_a_folder_with_checkpoints":
        extra = []
    elif case == "resume_damaged_training_state":
        (run / "checkpoint-3" / "training_state.json").write_text('{"global_step": 3,')
    elif case == "resume_truncated_weights":
        weights = run / "checkpoint-3" / "unet" / WEIGHTS
        weights.write_bytes(weights.read_bytes()[:-64])
    elif case == "resume_missing_optimizer":
        (run / "checkpoint-3" / "optimizer.bin").unlink()
    elif case == "resume_other_model_config":
        wider = json.loads(Path(config).read_text())
        wider["unet"]["model_channels"] = 16
        config = tmp_path / "wider.json"
        config.write_text(json.dumps(wider))
    elif case == "resume_with_ema_it_was_written_without":
        extra.append("--use_ema")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    args = train_args(data, out, 5, *extra)
    args[args.index("--model_config") + 1] = config
    with pytest.raises(_common.TrainingInputError) as info:
        run_main(train_diffae, args)
    assert BAD_INPUT[case] in str(info.value) and "\n" not in str(info.value)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written, nothing deleted


def test_later_stages_refuse_bad_outputs_before_encoding(data, tmp_path):
    """The latent DDIM and classifier scripts check their output folders and checkpoint options first."""
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(_common.TrainingInputError, match="--checkpoints_total_limit must be at least 1, got -2"):
        run_main(train_latent_ddim, ["--pipeline", BUNDLED_PIPELINE, "--dataset_name", data["saved"],
                                     "--output_dir", tmp_path / "latent", "--checkpoints_total_limit", -2])  # fmt: skip
    with pytest.raises(_common.TrainingInputError, match="the checkpoint folder .* is a file, not a folder"):
        run_main(train_latent_ddim, ["--pipeline", BUNDLED_PIPELINE, "--dataset_name", data["saved"],
                                     "--output_dir", tmp_path / "latent", "--checkpoint_dir", tmp_path / "a_file"])  # fmt: skip
    (tmp_path / "report_folder").mkdir()
    with pytest.raises(_common.TrainingInputError, match="--report_path .* is a folder; give a JSON file name"):
        run_main(train_attribute_classifier, ["--pipeline", BUNDLED_PIPELINE, "--dataset_name", data["saved"],
                                              "--label_columns", "red", "--output_dir", tmp_path / "classifier",
                                              "--report_path", tmp_path / "report_folder"])  # fmt: skip
    assert not (tmp_path / "latent").exists() and not (tmp_path / "classifier").exists()


def test_a_failed_write_is_one_line_and_exit_status_1(capsys):
    """What a user of the scripts sees: `error: <message>` on one line and exit status 1, no traceback."""

    def main():
        raise _common.OutputWriteError("could not write checkpoint-7 into out: the disk is full (0.0 MiB free)")

    with pytest.raises(SystemExit) as info:
        _common.run_main(main)
    assert info.value.code == 1
    assert capsys.readouterr().err == "error: could not write checkpoint-7 into out: the disk is full (0.0 MiB free)\n"
