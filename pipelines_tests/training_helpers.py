"""What the training tests share: the tiny model config, in-process runs of the scripts, and their data; a
one-process stand-in for accelerate; and `kill_and_resume`, which kills a training run many times with SIGKILL.

The fixtures built from these (`data`, `trained_pipeline`, `bad_data`) are in conftest.py.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file


REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINING_DIR = REPO_ROOT / "training"
BUNDLED_PIPELINE = REPO_ROOT / "src" / "diffusers_diffae" / "demo_assets" / "diffae-emoji32"


TINY_MODEL = {
    "unet": {
        "sample_size": 16, "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
        "attention_resolutions": [8], "embed_channels": 32, "z_sem_channels": 16, "dropout": 0.1,
    },
    "encoder": {
        "sample_size": 16, "model_channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
        "attention_resolutions": [8], "out_channels": 16,
    },
}  # fmt: skip
QUIET = ["--logging_steps", "2", "--num_validation_images", "2", "--validation_inference_steps", "2"]


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_main(module, args):
    """Runs a script's main() in-process with fresh accelerate singletons; returns its exit code. The torch thread
    count a script sets (--num_threads) is restored afterwards, so that later tests compute as before."""
    import torch

    _reset_accelerate()
    threads = torch.get_num_threads()
    try:
        return module.main([str(a) for a in args])
    finally:
        _reset_accelerate()
        torch.set_num_threads(threads)


def max_abs_diff(path_a, path_b):
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def copy_pipeline(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint-*", "validation"))
    return dst


class OneProcess:
    """The part of `accelerate.Accelerator` that `_checkpoints.save_checkpoint` uses, for one process; `save_state`
    writes a stand-in weights file, or calls `save_state` when given."""

    is_main_process = True
    num_processes = 1

    def __init__(self, save_state=None):
        self._save_state = save_state

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        if self._save_state is not None:
            return self._save_state(folder)
        Path(folder, "model.safetensors").write_bytes(b"weights")


def kill_and_resume(argv, output_dir, kills: int, seed: int, timeout: float) -> dict:
    """Runs `train_diffae.py argv --output_dir <output_dir>/reference` uninterrupted, then the same run into
    `<output_dir>/killed` with `--resume_from_checkpoint latest`, killed with SIGKILL `kills` times and restarted
    each time, until a run finishes. Even kills come a random (seeded) fraction of a step (timed on the reference)
    after the run has written a new checkpoint, so they land anywhere in a step, a checkpoint write or the pruning;
    odd ones up to 20 ms after the write of the next checkpoint has begun, so they land inside a checkpoint write.

    The runs are forked from one helper process that imported everything once (an import costs seconds, a fork
    nothing) and never computes, so each fork starts with fresh thread pools. Returns `{"kills": [{"resumed_at":
    step, "delay": s, "mid_save": whether the kill left a partial checkpoint}, ...], "exit_codes": [...],
    "reference_exit_code": c, "step_time": s}`.
    """
    config = {"argv": [str(a) for a in argv], "output_dir": str(output_dir), "kills": kills, "seed": seed,
              "timeout": timeout}  # fmt: skip
    code = f"import sys; sys.path[:0] = {[str(Path(__file__).parent), str(TRAINING_DIR)]!r}; "
    code += "import training_helpers; training_helpers._kill_and_resume_driver()"
    result = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(config), capture_output=True, text=True, timeout=timeout + 60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _newest_step(folder: Path) -> int:
    import _checkpoints

    checkpoints = _checkpoints.list_checkpoints(str(folder))
    return _checkpoints.checkpoint_step(checkpoints[-1]) if checkpoints else 0


def _fork_run(argv, log: Path) -> int:
    """Forks a process that runs train_diffae.main(argv) with its output appended to `log`; returns its pid."""
    import train_diffae

    pid = os.fork()
    if pid == 0:  # the child: run, then leave without the parent's atexit handlers
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = run_main(train_diffae, argv)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _wait_for(condition, pid: int) -> None:
    """Polls `condition()` every 2 ms until it holds or the process `pid` has exited."""
    while not condition() and os.waitpid(pid, os.WNOHANG) == (0, 0):
        time.sleep(0.002)


def _kill_and_resume_driver() -> None:
    import datasets  # noqa: F401  (what main() imports lazily: once here rather than in every fork)
    import diffusers  # noqa: F401
    import tqdm.auto  # noqa: F401

    import diffusers_diffae  # noqa: F401
    import train_diffae  # noqa: F401

    config = json.load(sys.stdin)
    rng = random.Random(config["seed"])
    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + config["timeout"]
    reference = out / "reference"
    pid = _fork_run([*config["argv"], "--output_dir", reference], out / "reference.log")
    appeared = {}  # step -> when its checkpoint appeared
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        appeared.setdefault(_newest_step(reference), time.monotonic())
        time.sleep(0.002)
    reference_code = os.waitstatus_to_exitcode(status)
    times = sorted(appeared[k + 1] - appeared[k] for k in appeared if k > 0 and k + 1 in appeared)
    step_time = times[len(times) // 2] if times else 0.1  # one step with its checkpoint (the median)

    killed = out / "killed"
    argv = [*config["argv"], "--output_dir", killed, "--resume_from_checkpoint", "latest"]
    kills, codes = [], []
    while time.monotonic() < deadline:
        before = _newest_step(killed)
        pid = _fork_run(argv, out / "killed.log")
        delay = None
        if len(kills) < config["kills"]:
            _wait_for(lambda: _newest_step(killed) > before, pid)
            if len(kills) % 2 == 0:
                delay = rng.uniform(0, step_time)
            else:
                partial = killed / f".tmp-checkpoint-{_newest_step(killed) + 1}"
                _wait_for(partial.exists, pid)
                delay = rng.uniform(0, 0.02)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)  # a no-op if it has already finished
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
        if codes[-1] != -signal.SIGKILL:
            break
        mid_save = any(p.name.startswith(".tmp-checkpoint-") for p in killed.iterdir())
        kills.append({"resumed_at": before, "delay": round(delay, 4), "mid_save": mid_save})
    summary = {"kills": kills, "exit_codes": codes, "reference_exit_code": reference_code, "step_time": step_time}
    print(json.dumps(summary))
