"""The `diffae` command: demo on a tiny model, and each subcommand."""

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_diffae import AttributeClassifier
from diffusers_diffae.cli import main
from diffusers_diffae.image_utils import image_grid, to_pil
from tiny import Z, tiny_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pipe = tiny_pipeline()
    pipe.classifier = AttributeClassifier(num_channels=Z, attribute_names=["is_woman", "dark_skin"])
    folder = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(8):
            array = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)  # not square: resized and cropped
            PIL.Image.fromarray(array).save(folder / f"e{i}.png")
            f.write(json.dumps({"file_name": f"e{i}.png", "is_woman": i % 2 == 0}) + "\n")
    return folder


def test_demo_writes_every_section(tmp_path, model_dir, samples_dir, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--model",
            str(model_dir),
            "--dtype",
            "float32",
            "--samples",
            str(samples_dir),
            "--output",
            str(out),
            "--steps",
            "2",
            "--num_images",
            "8",
        ]
    )
    assert code == 0
    for name in ("index.html", "metrics.json", "reconstructions.png", "interpolations.png", "variations.png",
                 "edit_dark_skin.png", "edit_is_woman.png", "samples.png", "few_shot_samples.png"):  # fmt: skip
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"reconstruction (inverted x_T)", "z_sem only (random x_T)"}
    assert 0 <= metrics["reconstruction (inverted x_T)"]["mse"] < 1
    if metrics["reconstruction (inverted x_T)"]["ssim"] is not None:  # with the `metrics` extra
        for values in metrics.values():  # plain SSIM and the official (zero-padded) one, both measured
            assert -1 <= values["ssim"] <= 1 and -1 <= values["ssim_official"] <= 1
    html = (out / "index.html").read_text()
    assert "reconstructions.png" in html and "few_shot_samples.png" in html
    assert "index.html" in capsys.readouterr().out
    with PIL.Image.open(out / "reconstructions.png") as grid:
        assert grid.size[1] > grid.size[0] / 8  # three rows of images


def test_subcommands_round_trip(tmp_path, model_dir, samples_dir):
    images = [str(samples_dir / "e0.png"), str(samples_dir / "e1.png")]
    base = ["--model", str(model_dir), "--dtype", "float32", "--steps", "2"]
    codes = tmp_path / "codes.safetensors"
    assert main(["encode", *base, "--images", *images, "--output", str(codes)]) == 0
    assert main(["decode", *base, "--codes", str(codes), "--output", str(tmp_path / "dec")]) == 0
    assert main(["decode", *base, "--codes", str(codes), "--random-xT", "--output", str(tmp_path / "var")]) == 0
    assert main(["reconstruct", *base, "--images", *images, "--output", str(tmp_path / "rec")]) == 0
    assert main(["interpolate", *base, "--images", *images, "--frames", "3", "--output", str(tmp_path / "int")]) == 0
    assert (
        main(
            [
                "edit",
                *base,
                "--images",
                images[0],
                "--attribute",
                "is_woman",
                "--strengths",
                "-0.5",
                "0.5",
                "--output",
                str(tmp_path / "edit"),
            ]
        )
        == 0
    )
    assert main(["sample", *base, "--num", "2", "--output", str(tmp_path / "smp")]) == 0
    assert len(list((tmp_path / "dec").glob("*.png"))) == 2
    assert len(list((tmp_path / "int").glob("*.png"))) == 3
    assert len(list((tmp_path / "edit").glob("*.png"))) == 2
    # decoding the saved codes reproduces the reconstruction exactly
    rec = np.asarray(PIL.Image.open(tmp_path / "rec" / "e0_reconstruction.png"))
    dec = np.asarray(PIL.Image.open(tmp_path / "dec" / "e0_decoded.png"))
    assert np.array_equal(rec, dec)


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "diffusers_diffae", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_evaluate_and_convert_subcommands_delegate(capsys):
    for command, flag in (("evaluate", "--pipeline"), ("convert", "--config")):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0 and flag in capsys.readouterr().out


def test_image_grid_layout():
    """Rows of images, each enlarged by pixel repetition, on white with `padding` pixels between and around them."""
    red, blue = torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
    red[:, 0], blue[:, 2] = 1.0, 1.0
    grid = np.asarray(image_grid([torch.cat([red, blue]), red], scale=2, padding=1))
    assert grid.shape == (2 * (2 + 1) + 1, 2 * (4 + 1) + 1, 3)
    assert (grid[1:3, 1:5] == [255, 0, 0]).all() and (grid[1:3, 6:10] == [0, 0, 255]).all()
    assert (grid[4:6, 1:5] == [255, 0, 0]).all()
    assert (grid[4:6, 6:10] == 255).all() and (grid[0] == 255).all() and (grid[:, 5] == 255).all()  # white
    grey = image_grid(list(torch.full((3, 1, 2, 2), 0.5).split(2)), padding=2, num_columns=2)
    assert grey.mode == "L" and grey.size == (10, 10) and np.asarray(grey)[2, 2] == 128
    assert [image.size for image in to_pil(torch.rand(2, 3, 5, 4))] == [(4, 5), (4, 5)]


def test_exact_inversion_flag_reaches_the_pipeline(tmp_path, model_dir, samples_dir):
    from safetensors.torch import load_file

    from diffusers_diffae import DiffAEPipeline

    images = [str(samples_dir / "e0.png")]
    base = ["--model", str(model_dir), "--dtype", "float32", "--steps", "2"]
    for inversion in ("ddim", "exact"):
        output = tmp_path / f"{inversion}.safetensors"
        assert main(["encode", *base, "--images", *images, "--inversion", inversion, "--output", str(output)]) == 0
    pipe = DiffAEPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe.encode(PIL.Image.open(images[0]), num_inference_steps=2, inversion="exact").x_T
    assert torch.equal(load_file(tmp_path / "exact.safetensors")["x_T"], expected)
    assert not torch.equal(load_file(tmp_path / "ddim.safetensors")["x_T"], expected)
    for command in ("reconstruct", "edit --attribute is_woman", "interpolate"):
        name, *flags = command.split()
        inputs = images * 2 if name == "interpolate" else images
        args = [name, *base, "--images", *inputs, *flags, "--inversion", "exact", "--output", str(tmp_path / name)]
        assert main(args) == 0 and any((tmp_path / name).iterdir())


def test_every_flag_has_help_and_shows_its_default(capsys):
    import argparse

    from diffusers_diffae.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        if name in ("convert", "evaluate"):  # their own parsers, delegated to
            continue
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            if not action.required and action.default is not None:
                assert f"(default: {action.default})" in text, f"{name} {action.option_strings} hides its default"
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "(default: False)" in " ".join(capsys.readouterr().out.split())  # --overwrite, --no-ema


def test_help_reads_the_attributes_without_loading_a_model(monkeypatch, capsys):
    from diffusers.models.modeling_utils import ModelMixin

    from diffusers_diffae import DiffAEPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("--help loaded a model")

    monkeypatch.setattr(DiffAEPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(ModelMixin, "from_pretrained", refuse)
    for command in ("edit", "sample"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0 and "hair_blond" in capsys.readouterr().out


def test_dtype_flag_sets_the_compute_dtype(tmp_path, model_dir, samples_dir):
    from safetensors.torch import load_file

    image = str(samples_dir / "e0.png")
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.safetensors"
        argv = ["encode", "--model", str(model_dir), "--dtype", dtype, "--steps", "2", "--images", image]
        assert main([*argv, "--output", str(out)]) == 0
        assert load_file(out)["z_sem"].dtype == getattr(torch, dtype)


def test_demo_keeps_a_previous_demo_unless_overwrite(tmp_path, model_dir, samples_dir):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "index.html").write_text("previous")
    argv = ["demo", "--model", str(model_dir), "--dtype", "float32", "--samples", str(samples_dir), "--steps", "1",
            "--num_images", "2", "--edit_attributes", "--few_shot_attribute", "", "--output", str(out)]  # fmt: skip
    with pytest.raises(SystemExit, match="holds a previous demo .*pass --overwrite"):
        main(argv)
    assert (out / "index.html").read_text() == "previous"
    assert main([*argv, "--overwrite"]) == 0
    assert "Diffusion Autoencoders demo" in (out / "index.html").read_text()
    assert not list(out.glob(".*"))  # no temporary file left
