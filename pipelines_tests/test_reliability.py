"""Reliability (docs/reliability.md): every input gets a clear one-line answer, and no output destroys data.

`test_issue_row[<id>]` is one row of issue 41's table each (the training rows are in the training tests; the
API halves of the image-mode, NaN and empty-batch rows in test_pipeline.py), `test_bad_cli_input[<id>]` and
`test_bad_api_input[<id>]` are further bad inputs, `test_cli_output_failure[<id>]` the command's outputs on a full
disk and a read-only file system. The converter's rows and bad inputs are in test_convert.py
(`test_converter_output[<id>]`, `test_bad_converter_input[<id>]`).
"""

import errno
import json
import os
import re
import struct
import zlib

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from diffusers_diffae import AttributeClassifier, DiffAELatents, DiffAEPipeline, io_utils
from diffusers_diffae.cli import main
from tiny import Z, tiny_pipeline


F32 = ["--dtype", "float32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pipe = tiny_pipeline()
    names, types = ["is_woman", "dark_skin", "age"], ["binary", "binary", "continuous"]
    pipe.classifier = AttributeClassifier(num_channels=Z, attribute_names=names, attribute_types=types)
    folder = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain_model")
    tiny_pipeline(classifier=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def api_pipe(model_dir):
    pipe = DiffAEPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def png(path, array):
    PIL.Image.fromarray(array).save(path)
    return path


@pytest.fixture
def files(tmp_path):
    """Input files of every kind in tmp_path: good images, broken ones, codes files of the wrong make."""
    rng = np.random.default_rng(0)
    f = {"tmp": tmp_path, "out": tmp_path / "out"}
    f["a"] = png(tmp_path / "a.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    f["b"] = png(tmp_path / "b.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    f["c"] = png(tmp_path / "c.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    (tmp_path / "sub").mkdir()
    f["sub_a"] = png(tmp_path / "sub" / "a.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    f["empty"] = tmp_path / "empty.png"
    f["empty"].write_bytes(b"")
    f["text"] = tmp_path / "notes.png"
    f["text"].write_text("this is not an image")
    whole = tmp_path / "whole.png"
    png(whole, rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    f["truncated"] = tmp_path / "truncated.png"
    f["truncated"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    codes = {
        "no_z": {"w": torch.zeros(2)},
        "narrow": {"z_sem": torch.zeros(1, 7)},
        "flat": {"z_sem": torch.zeros(Z)},
        "ints": {"z_sem": torch.zeros(1, Z, dtype=torch.int64)},
        "nan": {"z_sem": torch.full((1, Z), float("nan"))},
        "mismatch": {"z_sem": torch.zeros(2, Z), "x_T": torch.zeros(1, 3, 16, 16)},
    }
    for name, tensors in codes.items():
        f[name] = tmp_path / f"{name}.safetensors"
        save_file(tensors, f[name])
    f["garbage"] = tmp_path / "garbage.safetensors"
    f["garbage"].write_bytes(b"not safetensors")
    return f


def cli(argv):
    return main([str(a) for a in argv])


def run(argv, capsys):
    """Runs the command; returns (exit code, the last line of stderr or of the SystemExit message)."""
    try:
        code = main([str(a) for a in argv])
        message = capsys.readouterr().err
    except SystemExit as e:
        code, message = (1, str(e.code)) if isinstance(e.code, str) else (e.code, capsys.readouterr().err)
    lines = [line for line in message.splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


def assert_one_line_error(argv, capsys, message):
    code, line = run(argv, capsys)
    assert code not in (0, None), line
    assert line.startswith(("error:", "diffae")) and "Traceback" not in line
    assert re.search(message, line), line
    return line


# ----------------------------------------------------------------------------------------------------------------
# the issue's rows
# ----------------------------------------------------------------------------------------------------------------


def row_sixteen_bit_png(ctx):
    # the CLI hands the 16-bit image to the pipeline, which scales it (half of 65535 is mid-grey, not white)
    image = ctx.tmp / "grey16.png"
    PIL.Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(image)
    codes = ctx.tmp / "grey16.safetensors"
    assert cli(["encode", "--model", ctx.model, *F32, "--steps", "2", "--images", image, "--output", codes]) == 0
    expected = ctx.pipe.encode(torch.full((1, 3, 16, 16), 32768 / 65535), stochastic=False).z_sem
    torch.testing.assert_close(load_file(codes)["z_sem"], expected)


def row_transparent_image(ctx):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:8] = (255, 0, 0, 255)  # opaque red top, transparent bottom: composited on white, not black
    image = png(ctx.tmp / "rgba.png", rgba)
    codes = ctx.tmp / "rgba.safetensors"
    assert cli(["encode", "--model", ctx.model, *F32, "--steps", "2", "--images", image, "--output", codes]) == 0
    white = torch.ones(1, 3, 16, 16)
    white[:, 1:, :8] = 0
    torch.testing.assert_close(load_file(codes)["z_sem"], ctx.pipe.encode(white, stochastic=False).z_sem)


def row_close_strengths_get_distinct_files(ctx):
    edit = ["edit", "--model", ctx.model, *F32, "--steps", "2", "--images", ctx.files["a"], "--attribute",
            "is_woman", "--strengths", "0.301", "0.304", "--output", ctx.out]  # fmt: skip
    assert cli(edit) == 0
    assert sorted(p.name for p in ctx.out.glob("*.png")) == ["a_is_woman_+0.301.png", "a_is_woman_+0.304.png"]
    assert_one_line_error(edit, ctx.capsys, "exists; pass --overwrite to replace it")
    assert cli([*edit, "--overwrite"]) == 0 and not list(ctx.out.glob(".*"))


def row_encode_output_is_the_input(ctx):
    before = ctx.files["a"].read_bytes()
    argv = ["encode", "--model", ctx.no_model, "--images", ctx.files["a"], "--output", ctx.files["a"]]
    assert_one_line_error(argv, ctx.capsys, "must be a .safetensors file")
    codes = ctx.tmp / "a.safetensors"
    codes.write_bytes(b"codes")
    argv = ["encode", "--model", ctx.no_model, "--images", codes, "--output", codes]
    assert_one_line_error(argv, ctx.capsys, "the output .*a.safetensors is one of the inputs")
    assert ctx.files["a"].read_bytes() == before and codes.read_bytes() == b"codes"


def row_existing_output_file(ctx):
    # checked before the model is loaded (--model names no folder)
    existing = ctx.tmp / "existing_file.png"
    existing.write_bytes(b"keep me")
    argv = ["reconstruct", "--model", ctx.no_model, "--images", ctx.files["a"], "--output", existing]
    assert_one_line_error(argv, ctx.capsys, "names an image; give a folder")
    plain = ctx.tmp / "plain_file"
    plain.write_bytes(b"keep me")
    argv = ["reconstruct", "--model", ctx.no_model, "--images", ctx.files["a"], "--output", plain]
    assert_one_line_error(argv, ctx.capsys, "exists and is not a folder")
    ctx.out.mkdir()
    (ctx.out / "a_reconstruction.png").write_bytes(b"keep me")
    argv = ["reconstruct", "--model", ctx.no_model, "--images", ctx.files["a"], "--output", ctx.out]
    assert_one_line_error(argv, ctx.capsys, "a_reconstruction.png exists; pass --overwrite")
    assert existing.read_bytes() == plain.read_bytes() == (ctx.out / "a_reconstruction.png").read_bytes()


def row_output_named_like_an_image(ctx):
    argv = ["reconstruct", "--model", ctx.no_model, "--images", ctx.files["a"], "--output", ctx.tmp / "recon.png"]
    assert_one_line_error(argv, ctx.capsys, "names an image; give a folder")
    assert not (ctx.tmp / "recon.png").exists()
    argv = ["reconstruct", "--model", ctx.model, *F32, "--steps", "2", "--images", ctx.files["a"], ctx.files["b"],
            "--output", ctx.out]  # fmt: skip
    assert cli(argv) == 0  # named after the inputs, not by index
    assert sorted(p.name for p in ctx.out.iterdir()) == ["a_reconstruction.png", "b_reconstruction.png"]


def row_decompression_bomb(ctx):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # 69 bytes claiming 20000 x 20000 RGB
    bomb = ctx.tmp / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    argv = ["reconstruct", "--model", ctx.no_model, "--images", bomb, "--output", ctx.out]
    assert_one_line_error(argv, ctx.capsys, r"cannot read image .*bomb\.png: .*exceeds limit")


def row_read_only_output_and_missing_folder(ctx):
    # a folder that cannot be written is refused before any compute (simulated: the tests may run as root) ...
    real_access = os.access
    ctx.monkeypatch.setattr(
        io_utils.os, "access", lambda p, mode: False if str(p) == str(ctx.tmp) else real_access(p, mode)
    )
    argv = ["reconstruct", "--model", ctx.no_model, "--images", ctx.files["a"], "--output", ctx.tmp / "new" / "deep"]
    assert_one_line_error(argv, ctx.capsys, "cannot write into .*: permission denied")
    ctx.monkeypatch.undo()
    # ... and `encode --output` into a missing folder creates it
    codes = ctx.tmp / "new" / "deep" / "codes.safetensors"
    assert (
        cli(["encode", "--model", ctx.model, *F32, "--steps", "2", "--images", ctx.files["a"], "--output", codes]) == 0
    )
    assert load_file(codes)["z_sem"].shape == (1, Z)


def row_demo_metadata_without_file_name(ctx):
    samples = ctx.tmp / "samples"
    samples.mkdir()
    (samples / "metadata.jsonl").write_text('{"file_name": "a.png"}\n\n{"is_woman": true}\n')
    argv = ["demo", "--model", ctx.no_model, "--samples", samples, "--output", ctx.out]
    assert_one_line_error(argv, ctx.capsys, r'metadata.jsonl, line 3: the row needs a "file_name"')


def row_demo_metadata_bad_json(ctx):
    samples = ctx.tmp / "samples"
    samples.mkdir()
    (samples / "metadata.jsonl").write_text('{"file_name": "a.png"}\n{"file_name": "b.png",\n')
    argv = ["demo", "--model", ctx.no_model, "--samples", samples, "--output", ctx.out]
    assert_one_line_error(argv, ctx.capsys, r"samples.metadata.jsonl, line 2: not valid JSON")


def _huge_edit(ctx, **move):
    with pytest.raises(ValueError, match="non-finite pixels.*strength or target_logit far too large"):
        ctx.pipe.edit(
            DiffAELatents(torch.zeros(1, Z), torch.zeros(1, 3, 16, 16)), "is_woman", num_inference_steps=1, **move
        )


def row_huge_edit_strength(ctx):
    _huge_edit(ctx, strength=1e30)


def row_huge_edit_target_logit(ctx):
    _huge_edit(ctx, target_logit=1e30)


def row_negative_counts(ctx):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got -1"):
        ctx.pipe.sample_z_sem(-1)
    with pytest.raises(ValueError, match="max_candidates must be an int >= 1, got -1"):
        ctx.pipe.sample_z_sem_with_attribute(1, "is_woman", max_candidates=-1)


def row_unknown_attribute_before_encoding(ctx):
    # the image does not exist: an error about the attribute proves the check came before reading and encoding
    argv = ["edit", "--model", ctx.model, "--images", ctx.tmp / "missing.png", "--attribute", "wings",
            "--output", ctx.out]  # fmt: skip
    assert_one_line_error(argv, ctx.capsys, "unknown attribute 'wings'; the classifier has: is_woman, dark_skin, age")
    with pytest.raises(SystemExit):
        cli(["edit", "--help"])
    help_text = " ".join(ctx.capsys.readouterr().out.split())
    assert "is_man, is_woman, is_person" in help_text and "continuous: skin_tone" in help_text  # the bundled heads


def row_rejection_sampling_names_cli_flags(ctx):
    argv = ["sample", "--model", ctx.model, *F32, "--steps", "2", "--num", "2", "--attribute", "is_woman",
            "--min_probability", "0.999", "--max_candidates", "16", "--output", ctx.out]  # fmt: skip
    line = assert_one_line_error(argv, ctx.capsys, r"accepted \d+ of 16 candidates")
    assert "--min_probability" in line and "--max_candidates" in line and "Lower min_probability" not in line
    assert not ctx.out.exists()
    with pytest.raises(SystemExit):
        cli(["sample", "--help"])
    help_text = ctx.capsys.readouterr().out
    assert "--min_probability" in help_text and "--max_candidates" in help_text


def row_strength_five_warns(ctx):
    argv = ["edit", "--model", ctx.model, *F32, "--steps", "2", "--images", ctx.files["a"], "--attribute",
            "is_woman", "--strengths", "5", "0.3", "--output", ctx.out]  # fmt: skip
    assert cli(argv) == 0
    err = ctx.capsys.readouterr().err
    assert "warning: --strengths 5 outside the usual range [-1, 1]" in err and "0.3 " not in err


def row_num_zero(ctx):
    argv = ["sample", "--model", ctx.no_model, "--num", "0", "--output", ctx.out]
    assert_one_line_error(argv, ctx.capsys, "argument --num: must be at least 1, got 0")


def row_interpolate_three_images(ctx):
    f = ctx.files
    argv = ["interpolate", "--model", ctx.no_model, "--images", f["a"], f["b"], f["c"], "--output", ctx.out]
    assert_one_line_error(argv, ctx.capsys, "interpolate takes exactly two --images .*, got 3")
    with pytest.raises(SystemExit):
        cli(["interpolate", "--help"])
    assert "exactly two image files" in ctx.capsys.readouterr().out


def row_other_size_is_reported(ctx):
    rng = np.random.default_rng(1)
    wide = [png(ctx.tmp / f"wide{i}.png", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for i in range(2)]
    argv = ["reconstruct", "--model", ctx.model, *F32, "--steps", "2", "--images", *wide, ctx.files["a"],
            "--output", ctx.out]  # fmt: skip
    assert cli(argv) == 0
    notes = [line for line in ctx.capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: 2 of 3 images are not 16x16 (24x20): resized (shorter side to 16) and centre-cropped to the "
        "model's 16x16"
    ]


ISSUE_ROWS = {name[4:]: func for name, func in globals().items() if name.startswith("row_")}


class Context:
    pass


@pytest.mark.parametrize("row", ISSUE_ROWS)
def test_issue_row(row, model_dir, api_pipe, files, capsys, monkeypatch):
    ctx = Context()
    ctx.model, ctx.no_model, ctx.pipe, ctx.files = str(model_dir), str(files["tmp"] / "no-model"), api_pipe, files
    ctx.tmp, ctx.out, ctx.capsys, ctx.monkeypatch = files["tmp"], files["out"], capsys, monkeypatch
    ISSUE_ROWS[row](ctx)


# ----------------------------------------------------------------------------------------------------------------
# further bad inputs of the command: (argv with {placeholders}, the message its one line must match)
# {model}: the tiny model; {plain}: one without a classifier; {none}: no model at all, so an error about anything
# else proves the check ran before the model was loaded.
# ----------------------------------------------------------------------------------------------------------------

BAD_CLI_INPUTS = {
    "folder_as_image": ("reconstruct --model {none} --images {sub} --output {out}",
                        r"cannot read image .*sub: it is a folder, not an image file"),
    "empty_image_file": ("reconstruct --model {none} --images {empty} --output {out}",
                         r"cannot read image .*empty.png: the file is empty"),
    "truncated_png": ("reconstruct --model {none} --images {truncated} --output {out}",
                      r"cannot read image .*truncated.png: image file is truncated"),
    "text_file_as_image": ("reconstruct --model {none} --images {text} --output {out}",
                           r"cannot read image .*notes.png: not an image format Pillow can read"),
    "missing_image": ("encode --model {none} --images {tmp}/nothing.png --output {tmp}/c.safetensors",
                      r"cannot read image .*nothing.png: No such file or directory"),
    "same_name_twice": ("reconstruct --model {none} --images {a} {sub_a} --output {out}",
                        r"two outputs would both be .*a_reconstruction.png"),
    "codes_not_safetensors": ("decode --model {none} --codes {garbage} --output {out}",
                              r"cannot read codes .*garbage.safetensors: "),
    "codes_without_z_sem": ("decode --model {none} --codes {no_z} --output {out}",
                            r"no_z.safetensors has no z_sem tensor \(found w\); write it with `diffae encode`"),
    "codes_one_dimensional": ("decode --model {none} --codes {flat} --output {out}",
                              r"z_sem in .*flat.safetensors must have shape \(B, D\) with B >= 1, got \(16,\)"),
    "codes_folder": ("decode --model {none} --codes {sub} --output {out}",
                     r"cannot read codes .*sub: it is a folder, not a .safetensors file"),
    "codes_of_another_width": ("decode --model {model} --codes {narrow} --output {out}",
                               r"z_sem must have shape \(B, 16\), got \(1, 7\)"),
    "codes_of_integers": ("decode --model {model} --codes {ints} --output {out}",
                          r"z_sem must be a floating-point tensor, got dtype torch.int64"),
    "codes_with_nan": ("decode --model {model} --codes {nan} --output {out}", r"z_sem contains NaN or infinite"),
    "codes_batch_mismatch": ("decode --model {model} --codes {mismatch} --output {out}",
                             r"batch size mismatch: z_sem has 2 rows, x_T has 1"),
    "steps_zero": ("reconstruct --model {none} --steps 0 --images {a} --output {out}",
                   r"argument --steps: must be at least 1, got 0"),
    "steps_not_a_number": ("reconstruct --model {none} --steps ten --images {a} --output {out}",
                           r"argument --steps: expected an integer, got 'ten'"),
    "steps_beyond_training": ("reconstruct --model {model} --steps 5000 --images {a} --output {out}",
                              r"num_inference_steps must be between 1 and 1000 \(training steps\), got 5000"),
    "inversion_iterations_zero": ("encode --model {none} --inversion exact --inversion_iterations 0 --images {a} "
                                  "--output {tmp}/c.safetensors", r"--inversion_iterations: must be at least 1, got 0"),
    "model_not_a_pipeline": ("reconstruct --model {tmp} --images {a} --output {out}",
                             r"is not a pipeline folder: it has no model_index.json"),
    "model_missing": ("reconstruct --model {tmp}/nowhere/model --images {a} --output {out}",
                      r"nowhere/model' is neither a folder nor a Hub repo id"),
    "frames_one": ("interpolate --model {none} --images {a} {b} --frames 1 --output {out}",
                   r"argument --frames: must be at least 2, got 1"),
    "strength_nan": ("edit --model {none} --images {a} --attribute is_woman --strengths nan --output {out}",
                     r"argument --strengths: must be a finite number, got nan"),
    "edit_without_classifier": ("edit --model {plain} --images {a} --attribute is_woman --output {out}",
                                r"has no classifier; it cannot use --attribute"),
    "sample_continuous_head": ("sample --model {model} --attribute age --output {out}",
                               r"attribute 'age' is a continuous head; sampling needs a binary one"),
    "sample_min_probability_one": ("sample --model {none} --attribute is_woman --min_probability 1 --output {out}",
                                   r"argument --min_probability: must be in \[0, 1\), got 1"),
    "sample_max_candidates_zero": ("sample --model {none} --attribute is_woman --max_candidates 0 --output {out}",
                                   r"argument --max_candidates: must be at least 1, got 0"),
    "sample_negative_num": ("sample --model {none} --num -3 --output {out}", r"argument --num: must be at least 1"),
    "encode_output_not_safetensors": ("encode --model {none} --images {a} --output {tmp}/codes.pt",
                                      r"--output .*codes.pt must be a .safetensors file"),
    "encode_output_is_a_folder": ("encode --model {none} --images {a} --output {sub}", r"the output .*sub is a folder"),
    "demo_zero_images": ("demo --model {none} --num_images 0 --output {out}",
                         r"argument --num_images: must be at least 1, got 0"),
    "demo_samples_not_a_folder": ("demo --model {none} --samples {a} --output {out}",
                                  r"--samples .*a.png is not a folder"),
    "demo_sample_file_missing": ("demo --model {none} --samples {meta_missing} --output {out}",
                                 r"cannot read image .*gone.png: No such file or directory"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_CLI_INPUTS)
def test_bad_cli_input(case, files, model_dir, plain_model_dir, capsys):
    argv, message = BAD_CLI_INPUTS[case]
    (files["tmp"] / "meta").mkdir()
    (files["tmp"] / "meta" / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png"}) + "\n")
    paths = dict(files)
    paths.update(model=model_dir, plain=plain_model_dir, none=files["tmp"] / "no-model", sub=files["tmp"] / "sub",
                 meta_missing=files["tmp"] / "meta")  # fmt: skip
    argv = [part.format(**paths) for part in argv.split()]
    assert_one_line_error([*argv, *F32], capsys, message)
    assert not files["out"].exists()  # nothing written


# ----------------------------------------------------------------------------------------------------------------
# further bad inputs of the Python API (the pipeline's own checks are in test_pipeline.py::test_errors_name_the_problem)
# ----------------------------------------------------------------------------------------------------------------

BAD_API_INPUTS = {
    "sample_zero_codes": (lambda pipe: pipe.sample_z_sem(0), r"batch_size must be an int >= 1, got 0"),
    "sample_fractional_count": (lambda pipe: pipe.sample_z_sem(2.5), r"batch_size must be an int >= 1, got 2.5"),
    "attribute_sample_of_zero": (lambda pipe: pipe.sample_z_sem_with_attribute(0, "is_woman"),
                                 r"batch_size must be an int >= 1, got 0"),
    "image_of_zero_pixels": (lambda pipe: pipe.encode(PIL.Image.new("RGB", (0, 0))), r"unusable size \(0, 0\)"),
    "min_probability_one": (lambda pipe: pipe.sample_z_sem_with_attribute(1, "is_woman", min_probability=1.0),
                            r"min_probability must be in \[0, 1\), got 1.0"),
    "sample_unknown_attribute": (lambda pipe: pipe.sample_z_sem_with_attribute(1, "wings"),
                                 r"unknown attribute 'wings'; this classifier knows: is_woman, dark_skin, age"),
    "strengths_per_image_mismatch": (
        lambda pipe: pipe.edit(torch.rand(2, 3, 16, 16), "is_woman", strength=torch.ones(3), num_inference_steps=1,
                               encode_num_inference_steps=1),
        r"strength must be a number or have one value per image \(2\)"),
    "attribute_index_out_of_range": (lambda pipe: pipe.classifier.attribute_index(7),
                                     r"attribute index 7 out of range \(0..2\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_API_INPUTS)
def test_bad_api_input(case, api_pipe):
    call, message = BAD_API_INPUTS[case]
    with pytest.raises(ValueError, match=message) as info:
        call(api_pipe)
    assert "\n" not in str(info.value)


def test_resize_notice_counts_and_names_the_sizes():
    from diffusers_diffae.image_processor import resize_notice

    assert resize_notice([(16, 16), (16, 16)], 16) is None
    notice = resize_notice([(16, 16), (40, 30), (40, 30), (8, 8)], 16)
    assert notice.startswith("3 of 4 images are not 16x16 (8x8, 40x30): resized (shorter side to 16)")
    assert resize_notice([(20, 10)], 16).startswith("the image is not 16x16 (20x10): resized")


# ----------------------------------------------------------------------------------------------------------------
# outputs on a full disk, a read-only place, and existing paths: the converter and the command
# ----------------------------------------------------------------------------------------------------------------


def failing_writer(real, error: int, after: int = 0):
    """Wraps a writer `real(..., path, ...)`: the call number `after` (from 0) writes part of its file and fails
    with the OSError `error` (ENOSPC: a full disk, EROFS: a read-only file system)."""
    calls = []

    def write(*args, **kwargs):
        path = next(a for a in args if isinstance(a, (str, os.PathLike)))
        calls.append(path)
        if len(calls) > after:
            with open(path, "wb") as f:
                f.write(b"\0" * 64)  # what reached the disk before it failed
            raise OSError(error, os.strerror(error))
        return real(*args, **kwargs)

    return write


def siblings(folder):
    """Hidden temporary files or folders beside `folder` or in it."""
    return [p.name for p in [*folder.parent.iterdir(), *(folder.iterdir() if folder.is_dir() else [])]
            if p.name.startswith(".")]  # fmt: skip


def cli_full_disk_images(ctx):
    ctx.monkeypatch.setattr(PIL.Image.Image, "save", failing_writer(PIL.Image.Image.save, errno.ENOSPC, 1))
    argv = ["reconstruct", *ctx.base, "--images", ctx.files["a"], ctx.files["b"], "--output", ctx.out / "new"]
    assert_one_line_error(argv, ctx.capsys, "cannot write .*new: No space left on device; nothing was written")
    assert not (ctx.out / "new").exists()  # not even the folder it made for them


def cli_full_disk_codes(ctx):
    ctx.monkeypatch.setattr(safetensors.torch, "save_file", failing_writer(safetensors.torch.save_file, errno.ENOSPC))
    argv = ["encode", *ctx.base, "--images", ctx.files["a"], "--output", ctx.out / "codes.safetensors"]
    assert_one_line_error(argv, ctx.capsys, "No space left on device; nothing was written")
    assert list(ctx.out.iterdir()) == []


def cli_read_only_file_system_keeps_old_outputs(ctx):
    (ctx.out / "a_reconstruction.png").write_bytes(b"previous")
    ctx.monkeypatch.setattr(PIL.Image.Image, "save", failing_writer(PIL.Image.Image.save, errno.EROFS))
    argv = ["reconstruct", *ctx.base, "--images", ctx.files["a"], "--output", ctx.out, "--overwrite"]
    assert_one_line_error(argv, ctx.capsys, "cannot write .*: Read-only file system; nothing was written")
    assert [p.name for p in ctx.out.iterdir()] == ["a_reconstruction.png"]
    assert (ctx.out / "a_reconstruction.png").read_bytes() == b"previous"


CLI_OUTPUTS = {name[4:]: func for name, func in globals().items() if name.startswith("cli_") and name != "cli"}


@pytest.mark.parametrize("case", CLI_OUTPUTS)
def test_cli_output_failure(case, model_dir, files, capsys, monkeypatch):
    ctx = Context()
    ctx.base, ctx.files, ctx.capsys, ctx.monkeypatch = (
        ["--model", model_dir, *F32, "--steps", "1"],
        files,
        capsys,
        monkeypatch,
    )
    ctx.out = files["out"]
    ctx.out.mkdir()
    CLI_OUTPUTS[case](ctx)
