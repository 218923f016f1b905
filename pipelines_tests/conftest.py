import json
import os
import sys
from pathlib import Path

import pytest
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "training"))  # the training scripts and their helpers, for the training tests
# The official parity fixtures live in the repository (see fixtures/official/README.md); another set of the
# same format can be checked with DIFFAE_OFFICIAL_FIXTURES=/path.
FIXTURES = Path(os.environ.get("DIFFAE_OFFICIAL_FIXTURES", Path(__file__).parent / "fixtures" / "official"))

# Reproducible CPU numerics; the fixtures were produced with 2 threads.
torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not (FIXTURES / "last.ckpt").is_file():
        pytest.fail(f"official fixtures not found at {FIXTURES} (set DIFFAE_OFFICIAL_FIXTURES)")
    return FIXTURES


# Fixtures of the training tests (test_training.py, test_training_checks.py); training_helpers imports the
# training scripts, so it is imported only when one of these runs.


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny image datasets (saved and image folder) and the tiny model config of the training tests."""
    import _tiny_data
    from training_helpers import TINY_MODEL

    root = tmp_path_factory.mktemp("training_data")
    saved = _tiny_data.write_saved_dataset(str(root / "saved16"), n=48, size=16, seed=0)
    folder = _tiny_data.write_imagefolder(str(root / "folder16"), n=24, size=20, seed=1)
    config = root / "tiny_model.json"
    config.write_text(json.dumps(TINY_MODEL))
    return {"root": root, "saved": saved, "folder": folder, "config": str(config), "cache": str(root / "hf_cache")}


@pytest.fixture(scope="module")
def trained_pipeline(data, tmp_path_factory):
    """A DiffAE trained for 6 steps from a save_to_disk dataset (the autoencoder stage), shared by later stages."""
    import train_diffae
    from training_helpers import QUIET, run_main

    out = tmp_path_factory.mktemp("diffae") / "run"
    code = run_main(
        train_diffae,
        ["--dataset_name", data["saved"], "--model_config", data["config"], "--train_batch_size", 8,
         "--max_train_steps", 6, "--checkpointing_steps", 2, "--checkpoints_total_limit", 2, "--use_ema",
         "--ema_warmup", "--random_flip", "--validation_steps", 3, "--seed", 0, "--output_dir", out, *QUIET],
    )  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def bad_data(data):
    """Datasets the training scripts must refuse: empty, broken files, label columns of the wrong kind."""
    import datasets
    import PIL.Image

    import _tiny_data

    root = data["root"] / "bad"
    empty = datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()}))
    empty.save_to_disk(str(root / "empty"), num_shards=1)
    (root / "empty_folder").mkdir()
    broken = Path(_tiny_data.write_imagefolder(str(root / "broken"), n=6, size=16))
    (broken / "notes.txt").write_text("not an image, ignored by imagefolder")
    (broken / "0003.png").write_bytes(b"this is not a png")
    counts = datasets.Dataset.from_dict(
        {"image": [PIL.Image.new("RGB", (16, 16))] * 4, "count": [0, 1, 2, 3], "name": ["a", "b", "c", "d"]},
        features=datasets.Features({"image": datasets.Image(), "count": datasets.Value("int64"),
                                    "name": datasets.Value("string")}),
    )  # fmt: skip
    counts.save_to_disk(str(root / "counts"))
    return {
        "empty": str(root / "empty"),
        "empty_folder": str(root / "empty_folder"),
        "broken": str(broken),
        "counts": str(root / "counts"),
    }
