"""What the training tests share: the tiny model config, in-process runs of the scripts, and their data.

The fixtures built from these (`data`, `trained_pipeline`, `bad_data`) are in conftest.py.
"""

import shutil
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
    """Runs a script's main() in-process with fresh accelerate singletons; returns its exit code."""
    _reset_accelerate()
    try:
        return module.main([str(a) for a in args])
    finally:
        _reset_accelerate()


def max_abs_diff(path_a, path_b):
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def copy_pipeline(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint-*", "validation"))
    return dst
