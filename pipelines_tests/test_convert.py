"""Official checkpoint conversion, proven against the official code's outputs (pipelines_tests/fixtures/official)."""

import ast
import errno
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from diffusers_diffae import DiffAEPipeline, io_utils
from diffusers_diffae.convert import (
    UnsafeCheckpointError,
    convert_official_checkpoint,
    convert_official_state_dict,
    load_official_file,
    main,
)
from diffusers_diffae.presets import official_component_configs
from diffusers_diffae.training_utils import diffae_loss
from test_reliability import failing_writer, siblings


@pytest.fixture(scope="module")
def fixture_io(official_dir):
    return load_file(official_dir / "inputs.safetensors"), load_file(official_dir / "outputs.safetensors")


@pytest.fixture(scope="module")
def converted(official_dir):
    return {
        prefix: convert_official_checkpoint(official_dir / "last.ckpt", official_dir / "config.json", use_ema=ema)
        for prefix, ema in (("ema", True), ("model", False))
    }


@pytest.mark.parametrize("prefix", ["ema", "model"])
def test_single_forward_passes_match_official(converted, fixture_io, prefix):
    inputs, outputs = fixture_io
    pipe = converted[prefix]
    with torch.no_grad():
        z_sem = pipe.encoder(inputs["x0"]).z_sem
        eps = pipe.unet(inputs["x_t"], inputs["t"], z_sem).sample
        latent = pipe.latent_denoiser(inputs["latent.z"], inputs["latent.t"]).sample
    torch.testing.assert_close(z_sem, outputs[f"{prefix}.z_sem"], atol=1e-4, rtol=0)
    torch.testing.assert_close(eps, outputs[f"{prefix}.eps"], atol=1e-4, rtol=0)
    torch.testing.assert_close(latent, outputs[f"latent.{prefix}.pred"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("prefix", ["ema", "model"])
def test_training_loss_reproduces_official_mse(converted, fixture_io, prefix):
    inputs, outputs = fixture_io
    pipe = converted[prefix]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    torch.testing.assert_close(
        noise_scheduler.add_noise(inputs["x0"], inputs["noise"], inputs["t"]), inputs["x_t"], atol=1e-5, rtol=0
    )
    with torch.no_grad():
        loss = diffae_loss(
            pipe.unet, pipe.encoder, inputs["x0"], inputs["t"], inputs["noise"], noise_scheduler, "none"
        )
    torch.testing.assert_close(loss, outputs[f"{prefix}.train_loss_mse"], atol=1e-5, rtol=1e-5)


def test_statistics_and_schedulers_follow_the_official_config(converted, official_dir):
    ckpt = load_official_file(official_dir / "last.ckpt")["state_dict"]
    pipe = converted["ema"]
    for model in (pipe.latent_denoiser, pipe.encoder):
        assert torch.equal(model.z_sem_mean, ckpt["conds_mean"].reshape(-1))
        assert torch.equal(model.z_sem_std, ckpt["conds_std"].reshape(-1))
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.clip_sample
    assert pipe.scheduler.config.set_alpha_to_one and pipe.scheduler.config.steps_offset == 0
    assert torch.allclose(pipe.latent_scheduler.betas, torch.full((1000,), 0.008))
    assert not pipe.latent_scheduler.config.clip_sample
    pipe.scheduler.set_timesteps(10)
    meta = json.loads((official_dir / "run_meta.json").read_text())
    assert pipe.scheduler.timesteps.tolist() == [row[0] for row in meta["render"]["network_t"]]


def test_cli_writes_a_loadable_pipeline_folder(tmp_path, official_dir, converted, fixture_io):
    out = tmp_path / "converted"
    assert (
        main(
            [
                "--checkpoint",
                str(official_dir / "last.ckpt"),
                "--config",
                str(official_dir / "config.json"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    for name in ("model_index.json", "diffae.py", "unet/diffusion_pytorch_model.safetensors",
                 "encoder/diffusion_pytorch_model.safetensors", "latent_denoiser/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "inverse_scheduler/scheduler_config.json",
                 "latent_scheduler/scheduler_config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    loaded = DiffAEPipeline.from_pretrained(out)
    for name in ("unet", "encoder", "latent_denoiser"):
        original, reloaded = getattr(converted["ema"], name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(original[k], reloaded[k]) for k in original), name
    inputs, outputs = fixture_io
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder(inputs["x0"]).z_sem, outputs["ema.z_sem"], atol=1e-4, rtol=0)


def test_cli_module_entry_point_reports_errors(tmp_path):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_text("not a checkpoint")
    proc = subprocess.run(
        [sys.executable, "-m", "diffusers_diffae.convert", "--checkpoint", str(bogus), "--config", "ffhq256_autoenc", "--output", str(tmp_path / "o")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "not a torch.save checkpoint" in proc.stderr
    assert not (tmp_path / "o").exists()


def _meta_state(path, kind):
    state = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _dtype, present = line.rstrip("\n").split("\t")
        if kind == "latent" or present == "both":
            state[key] = torch.empty(ast.literal_eval(shape), device="meta")
    return state


@pytest.mark.parametrize(
    "resolution, autoenc, latent",
    [("128", "ffhq128_autoenc_130M", "ffhq128_autoenc_latent"), ("256", "ffhq256_autoenc", "ffhq256_autoenc_latent")],
)
def test_every_key_of_full_releases_is_converted(official_dir, resolution, autoenc, latent):
    keys_file = official_dir / f"keys_ffhq{resolution}.txt"
    for kind, config in (("autoenc", autoenc), ("latent", latent)):
        state = _meta_state(keys_file, kind)
        configs = official_component_configs(config)
        for use_ema in (True, False):
            result = convert_official_state_dict(state, configs, use_ema=use_ema)
            assert (result["latent_denoiser"] is None) == (kind == "autoenc")
            assert (result["statistics"] is None) == (kind == "autoenc")
        # the wrong release kind is refused
        wrong = official_component_configs(latent if kind == "autoenc" else autoenc)
        with pytest.raises(ValueError, match="latent"):
            convert_official_state_dict(state, wrong)


@pytest.fixture(scope="module")
def fixture_state(official_dir):
    return load_official_file(official_dir / "last.ckpt")["state_dict"]


def _fixture_configs(official_dir, **overrides):
    config = json.loads((official_dir / "config.json").read_text())["train_config"]
    config.update(overrides)
    return official_component_configs(config)


def test_unknown_and_missing_keys_are_errors(official_dir, fixture_state):
    configs = _fixture_configs(official_dir)
    extra = dict(fixture_state, **{"ema_model.input_blocks.1.0.surprise.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown key.*surprise"):
        convert_official_state_dict(extra, configs)
    extra_top = dict(fixture_state, mystery=torch.zeros(1))
    with pytest.raises(ValueError, match="unknown top-level key.*mystery"):
        convert_official_state_dict(extra_top, configs)
    missing = {k: v for k, v in fixture_state.items() if k != "ema_model.out.2.weight"}
    with pytest.raises(ValueError, match="lacks 1 UNet tensor"):
        convert_official_state_dict(missing, configs)
    with pytest.raises(ValueError, match="does not match the config"):
        convert_official_state_dict(fixture_state, _fixture_configs(official_dir, net_ch=64))
    with pytest.raises(ValueError, match="no 'ema_model"):
        convert_official_state_dict(
            {k: v for k, v in fixture_state.items() if not k.startswith("ema_model.")}, configs
        )
    corrupted = dict(fixture_state)
    corrupted["ema_model.latent_net.layers.0.cond_layers.1.weight"] = torch.zeros_like(
        fixture_state["ema_model.latent_net.layers.0.linear_emb.weight"]
    )
    with pytest.raises(ValueError, match="aliased"):
        convert_official_state_dict(corrupted, configs)


def test_autoencoder_release_with_latent_pkl(tmp_path, official_dir, fixture_state, converted, fixture_io):
    autoenc = {k: v for k, v in fixture_state.items() if "latent_net" not in k and not k.startswith("conds_")}
    ckpt_path, pkl_path = tmp_path / "last.ckpt", tmp_path / "latent.pkl"
    torch.save({"state_dict": autoenc, "global_step": 1}, ckpt_path)
    mean, std = torch.randn(1, 64), torch.rand(1, 64) + 0.5
    torch.save({"conds": torch.randn(10, 64), "conds_mean": mean, "conds_std": std}, pkl_path)
    config = json.loads((official_dir / "config.json").read_text())["train_config"]
    config["net_latent_net_type"] = {"__enum__": "LatentNetType", "value": "none"}
    config_path = tmp_path / "autoenc.json"
    config_path.write_text(json.dumps(config))

    pipe = convert_official_checkpoint(ckpt_path, config_path, latent_stats=pkl_path, output_dir=tmp_path / "out")
    assert pipe.latent_denoiser is None and pipe.latent_scheduler is None
    assert torch.equal(pipe.encoder.z_sem_std, std.reshape(-1))
    inputs, outputs = fixture_io
    with torch.no_grad():
        torch.testing.assert_close(pipe.encoder(inputs["x0"]).z_sem, outputs["ema.z_sem"], atol=1e-4, rtol=0)
    reloaded = DiffAEPipeline.from_pretrained(tmp_path / "out")
    assert reloaded.latent_denoiser is None
    assert torch.equal(reloaded.encoder.z_sem_mean, mean.reshape(-1))
    with pytest.raises(ValueError, match="no conds_mean"):
        convert_official_checkpoint(ckpt_path, config_path, latent_stats=ckpt_path)
    with pytest.raises(ValueError, match="differ from those stored"):
        convert_official_checkpoint(official_dir / "last.ckpt", official_dir / "config.json", latent_stats=pkl_path)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    _Exploit.marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x_T": torch.zeros(1)}, "callbacks": _Exploit()}, evil)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load 'posix.system'|refusing to load 'os.system'"):
        load_official_file(evil)
    with pytest.raises(pickle.UnpicklingError):
        convert_official_checkpoint(evil, "ffhq256_autoenc")
    assert not _Exploit.marker.exists()
    # a plain pickle that calls eval through builtins is refused too
    raw = tmp_path / "eval.pkl"
    raw.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises((UnsafeCheckpointError, ValueError)):
        load_official_file(raw)


def test_bad_files_and_configs_are_clear_errors(tmp_path, official_dir):
    with pytest.raises(FileNotFoundError):
        load_official_file(tmp_path / "missing.ckpt")
    text = tmp_path / "text.ckpt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a torch.save checkpoint"):
        load_official_file(text)
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(b"F" + bytes(range(1, 10)) + bytes(range(128, 255)) + b"\n")  # pickle FLOAT of raw bytes
    with pytest.raises(ValueError, match="not a torch.save checkpoint") as info:
        load_official_file(noise)
    assert str(info.value).isprintable() and len(str(info.value)) < 400  # no raw bytes of the file in the message
    tensor_only = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(2), tensor_only)
    with pytest.raises(ValueError, match="does not hold a dict"):
        load_official_file(tensor_only)
    with pytest.raises(ValueError, match="neither an official release name"):
        official_component_configs("no_such_release")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        official_component_configs(str(bad_json))
    with pytest.raises(ValueError, match="model_name"):
        official_component_configs({"model_name": {"__enum__": "ModelName", "value": "beatgans_ddpm"}})
    with pytest.raises(ValueError, match="inconsistent official config"):
        official_component_configs({"style_ch": 256})


def test_official_classifier_checkpoint_converts_into_the_pipeline(tmp_path, official_dir):
    from diffusers_diffae import CELEBAHQ_ATTRIBUTES
    from diffusers_diffae.convert import convert_official_classifier

    generator = torch.Generator().manual_seed(0)
    mean, std = torch.randn(1, 64, generator=generator), torch.rand(1, 64, generator=generator) + 0.5
    weight, bias = torch.randn(40, 64, generator=generator), torch.randn(40, generator=generator)
    state = {"conds_mean": mean, "conds_std": std, "classifier.weight": weight, "classifier.bias": bias,
             "ema_classifier.weight": weight + 1, "ema_classifier.bias": bias + 1}  # fmt: skip
    cls_path = tmp_path / "cls.ckpt"
    torch.save({"state_dict": state, "global_step": 9}, cls_path)

    classifier = convert_official_classifier(cls_path)
    assert classifier.attribute_names == CELEBAHQ_ATTRIBUTES and classifier.attribute_index("Smiling") == 31
    z_sem = torch.randn(3, 64, generator=generator)
    expected = ((z_sem - mean) / std) @ weight.T + bias  # the official ClsModel on normalised z_sem
    torch.testing.assert_close(classifier(z_sem).logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(convert_official_classifier(cls_path, use_ema=True).linear.bias, bias + 1)

    out = tmp_path / "with_cls"
    assert main(["--checkpoint", str(official_dir / "last.ckpt"), "--config", str(official_dir / "config.json"),
                 "--output", str(out), "--classifier", str(cls_path)]) == 0  # fmt: skip
    loaded = DiffAEPipeline.from_pretrained(out)
    torch.testing.assert_close(loaded.classifier(z_sem).logits, expected, atol=1e-5, rtol=1e-5)

    torch.save({"state_dict": dict(state, surprise=torch.zeros(1))}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="unknown key.*surprise"):
        convert_official_classifier(tmp_path / "bad.ckpt")
    torch.save(
        {"state_dict": {k: v for k, v in state.items() if not k.startswith("conds")}}, tmp_path / "nostats.ckpt"
    )
    with pytest.raises(ValueError, match="no conds_mean"):
        convert_official_classifier(tmp_path / "nostats.ckpt")


# ----------------------------------------------------------------------------------------------------------------
# The output folder (existing paths, a read-only place, a full disk) and bad inputs of `diffae convert`, one test id
# each (docs/reliability.md)
# ----------------------------------------------------------------------------------------------------------------


def convert_argv(official_dir, output, *extra):
    return ["--checkpoint", str(official_dir / "last.ckpt"), "--config", str(official_dir / "config.json"),
            "--output", str(output), *extra]  # fmt: skip


def converter_existing_file(ctx):
    ctx.out.write_bytes(b"keep me")
    (ctx.tmp / "text.ckpt").write_text("not a checkpoint")
    argv = ["--checkpoint", str(ctx.tmp / "text.ckpt"), "--config", "ffhq256_autoenc", "--output", str(ctx.out)]
    assert ctx.convert(argv) == 1  # refused before the checkpoint is read
    assert "the output " in ctx.err() and ctx.out.read_bytes() == b"keep me"
    return "is an existing file; give a folder for the pipeline"


def converter_non_empty_folder(ctx):
    ctx.out.mkdir()
    (ctx.out / "notes.txt").write_text("keep me")
    assert ctx.convert(convert_argv(ctx.official, ctx.out)) == 1
    message = ctx.err()
    assert ctx.convert(convert_argv(ctx.official, ctx.out, "--overwrite")) == 1  # not a pipeline folder
    assert "not a pipeline folder (no model_index.json); refusing to replace it" in ctx.err()
    assert (ctx.out / "notes.txt").read_text() == "keep me"
    ctx.last = message
    return "exists and is not empty; pass --overwrite"


def converter_output_holds_the_checkpoint(ctx):
    folder = ctx.tmp / "release"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "last.ckpt").write_bytes((ctx.official / "last.ckpt").read_bytes())
    argv = ["--checkpoint", str(folder / "last.ckpt"), "--config", str(ctx.official / "config.json"),
            "--output", str(folder), "--overwrite"]  # fmt: skip
    assert ctx.convert(argv) == 1 and (folder / "last.ckpt").is_file()
    return "holds the input .*last.ckpt; choose another"


def converter_read_only(ctx):
    real_access = os.access
    ctx.monkeypatch.setattr(io_utils.os, "access", lambda p, m: False if str(p) == str(ctx.tmp) else real_access(p, m))
    assert ctx.convert(convert_argv(ctx.official, ctx.out)) == 1
    return "cannot write into .*: permission denied"


def converter_full_disk(ctx):
    ctx.monkeypatch.setattr(
        safetensors.torch, "save_file", failing_writer(safetensors.torch.save_file, errno.ENOSPC, 1)
    )
    assert ctx.convert(convert_argv(ctx.official, ctx.out)) == 1
    assert not ctx.out.exists() and not siblings(ctx.out)  # no half folder, visible or hidden
    return "cannot write the pipeline to .*: No space left on device; nothing was written"


def converter_full_disk_keeps_the_previous_folder(ctx):
    assert ctx.convert(convert_argv(ctx.official, ctx.out)) == 0
    before = {p.relative_to(ctx.out): p.read_bytes() for p in ctx.out.rglob("*") if p.is_file()}
    ctx.monkeypatch.setattr(
        safetensors.torch, "save_file", failing_writer(safetensors.torch.save_file, errno.ENOSPC, 2)
    )
    assert ctx.convert(convert_argv(ctx.official, ctx.out, "--overwrite", "--no-ema")) == 1
    after = {p.relative_to(ctx.out): p.read_bytes() for p in ctx.out.rglob("*") if p.is_file()}
    assert after == before and not siblings(ctx.out)
    ctx.monkeypatch.undo()
    assert ctx.convert(convert_argv(ctx.official, ctx.out, "--overwrite", "--no-ema")) == 0  # replaced when it fits
    assert {p.relative_to(ctx.out) for p in ctx.out.rglob("*") if p.is_file()} == set(before)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (ctx.out / unet).read_bytes() != before[Path(unet)] and not siblings(ctx.out)
    return "No space left on device; nothing was written"


CONVERTER_OUTPUTS = {name[10:]: func for name, func in globals().items() if name.startswith("converter_")}


@pytest.mark.parametrize("case", CONVERTER_OUTPUTS)
def test_converter_output(case, official_dir, tmp_path, capsys, monkeypatch):
    ctx = SimpleNamespace()
    ctx.official, ctx.tmp, ctx.out, ctx.monkeypatch, ctx.last = (
        official_dir,
        tmp_path,
        tmp_path / "converted",
        monkeypatch,
        None,
    )
    lines = []

    def err():
        text = capsys.readouterr().err.strip()
        lines.append(text)
        return text

    ctx.err = err
    ctx.convert = main
    message = CONVERTER_OUTPUTS[case](ctx)
    text = ctx.last or (lines[0] if lines else err())
    assert text.startswith("error: ") and "\n" not in text and re.search(message, text), text


def test_a_killed_conversion_is_tidied_by_the_next(official_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(convert_argv(official_dir, out)) == 0
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(finished.stdout), os.getppid()
    # killed between its two renames: the previous pipeline moved aside, the new one complete but hidden
    os.replace(out, tmp_path / f".converted.replaced-{dead}")
    (tmp_path / f".converted.partial-{dead}").mkdir()
    (tmp_path / f".converted.partial-{alive}").mkdir()  # a conversion still running elsewhere
    capsys.readouterr()

    assert main(convert_argv(official_dir, out)) == 1  # the previous pipeline is back, so it needs --overwrite
    assert "put back the pipeline folder" in capsys.readouterr().err
    assert (out / "model_index.json").is_file()
    assert siblings(out) == [f".converted.partial-{alive}"]
    assert main(convert_argv(official_dir, out, "--overwrite")) == 0


BAD_CONVERTER_INPUTS = {
    "unknown_preset": ("--checkpoint {ckpt} --config ffhq999_autoenc --output {out}",
                       r"neither an official release name"),
    "checkpoint_missing": ("--checkpoint {tmp}/last.ckpt --config ffhq256_autoenc --output {out}",
                           r"checkpoint file not found: .*last.ckpt"),
    "checkpoint_is_a_folder": ("--checkpoint {tmp} --config ffhq256_autoenc --output {out}",
                               r"is a folder; give the checkpoint file in it \(e.g. last.ckpt\)"),
    "config_of_another_size": ("--checkpoint {ckpt} --config ffhq128_autoenc_latent --output {out}",
                               r"the checkpoint does not match the config"),
    "latent_stats_missing": ("--checkpoint {ckpt} --config {config} --latent-stats {tmp}/latent.pkl --output {out}",
                             r"checkpoint file not found: .*latent.pkl"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_CONVERTER_INPUTS)
def test_bad_converter_input(case, official_dir, tmp_path, capsys):
    argv, message = BAD_CONVERTER_INPUTS[case]
    paths = {"ckpt": official_dir / "last.ckpt", "config": official_dir / "config.json", "tmp": tmp_path,
             "out": tmp_path / "converted"}  # fmt: skip
    assert main([part.format(**paths) for part in argv.split()]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and "\n" not in line and re.search(message, line), line
    assert not (tmp_path / "converted").exists()
