"""The `diffae` command: demo on a tiny model, and each subcommand."""

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

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
    base = ["--model", str(model_dir), "--steps", "2"]
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


def test_cli_errors_are_one_line(tmp_path, model_dir, capsys):
    with pytest.raises(SystemExit, match="cannot read image"):
        main(
            [
                "reconstruct",
                "--model",
                str(model_dir),
                "--images",
                str(tmp_path / "missing.png"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
    bad = tmp_path / "img.png"
    PIL.Image.new("RGB", (16, 16)).save(bad)
    assert (
        main(
            [
                "edit",
                "--model",
                str(model_dir),
                "--steps",
                "2",
                "--images",
                str(bad),
                "--attribute",
                "wings",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert "unknown attribute 'wings'" in capsys.readouterr().err
    assert main(["reconstruct", "--model", str(tmp_path), "--images", str(bad), "--output", str(tmp_path / "o")]) == 1
    assert "is not a pipeline folder: it has no model_index.json" in capsys.readouterr().err
    (tmp_path / "codes.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SystemExit, match="cannot read codes .*codes.safetensors"):
        main(
            [
                "decode",
                "--model",
                str(model_dir),
                "--codes",
                str(tmp_path / "codes.safetensors"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(SystemExit, match=r"has no z_sem tensor \(found w\)"):
        main(
            [
                "decode",
                "--model",
                str(model_dir),
                "--codes",
                str(tmp_path / "other.safetensors"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
    assert not (tmp_path / "o").exists()  # nothing half-written


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
    base = ["--model", str(model_dir), "--steps", "2"]
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


def test_decompression_bomb_is_one_line_naming_the_file(tmp_path, model_dir):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # claims 20000 x 20000 RGB
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(SystemExit, match=r"cannot read image .*bomb\.png: .*exceeds limit"):
        main(["reconstruct", "--model", str(model_dir), "--images", str(bomb), "--output", str(tmp_path / "o")])


@pytest.mark.parametrize(
    "case, message",
    [
        ("output_is_an_input", "the output .* is one of the inputs"),
        ("existing_file", "exists; pass --overwrite to replace it"),
        ("output_names_an_image", "names an image; give a folder"),
        ("output_is_a_file", "exists and is not a folder"),
        ("same_stem_twice", "two outputs would both be"),
        ("one_frame", "--frames must be at least 2"),
        ("no_samples", "--num must be at least 1"),
    ],
)
def test_outputs_are_checked_before_any_compute(tmp_path, samples_dir, case, message):
    # --model names no folder: an error about the output proves the check ran before the model was loaded
    image = tmp_path / "a.png"
    image.write_bytes((samples_dir / "e0.png").read_bytes())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(image.read_bytes())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_reconstruction.png").write_bytes(b"keep me")
    (tmp_path / "plain_file").write_bytes(b"keep me")
    base = ["--model", str(tmp_path / "no-model"), "--steps", "2"]
    argv = {
        "output_is_an_input": ["encode", *base, "--images", str(image), "--output", str(image)],
        "existing_file": ["reconstruct", *base, "--images", str(image), "--output", str(tmp_path / "out")],
        "output_names_an_image": ["reconstruct", *base, "--images", str(image), "--output", str(tmp_path / "r.png")],
        "output_is_a_file": ["reconstruct", *base, "--images", str(image), "--output", str(tmp_path / "plain_file")],
        "same_stem_twice": ["reconstruct", *base, "--images", str(image), str(tmp_path / "sub" / "a.png"),
                            "--output", str(tmp_path / "o")],
        "one_frame": ["interpolate", *base, "--images", str(image), str(image), "--frames", "1",
                      "--output", str(tmp_path / "o")],
        "no_samples": ["sample", *base, "--num", "0", "--output", str(tmp_path / "o")],
    }[case]  # fmt: skip
    with pytest.raises(SystemExit, match=message):
        main(argv)
    assert (tmp_path / "out" / "a_reconstruction.png").read_bytes() == b"keep me"
    assert (tmp_path / "plain_file").read_bytes() == b"keep me" and image.read_bytes()[:4] == b"\x89PNG"


def test_outputs_are_named_after_inputs_and_values_and_replaced_only_when_asked(tmp_path, model_dir, samples_dir):
    images = [str(samples_dir / "e0.png"), str(samples_dir / "e1.png")]
    base = ["--model", str(model_dir), "--steps", "2", "--images", *images]
    edit = ["edit", *base, "--attribute", "is_woman", "--strengths", "0.301", "0.304", "--output", str(tmp_path)]
    assert main(edit) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == sorted(f"{s}_is_woman_+{v}.png" for v in ("0.301", "0.304") for s in ("e0", "e1"))
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(edit)
    assert main([*edit, "--overwrite"]) == 0
    assert not list(tmp_path.glob(".*.partial"))  # written through a temporary file and a rename
