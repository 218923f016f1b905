"""Saving and loading `DiffAEPipeline`: folders, `custom_pipeline`, scheduler swaps, and loading that runs no code."""

import json
import os
import shutil

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils import dynamic_modules_utils

from diffusers_diffae import (
    AttributeClassifier,
    DiffAEInverseScheduler,
    DiffAEPipeline,
    DiffAEUNet2DModel,
    LatentMLPDenoiser,
    SemanticEncoder,
)
from diffusers_diffae.pipelines.loading import component_shim_source
from diffusers_diffae.presets import _ddim_config


MODEL_COMPONENTS = ("unet", "encoder", "latent_denoiser", "classifier")
OWN_COMPONENTS = MODEL_COMPONENTS + ("inverse_scheduler",)
DIFFUSERS_COMPONENTS = ("scheduler", "latent_scheduler")
MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def make_tiny_pipeline(seed: int = 0) -> DiffAEPipeline:
    """A 16x16 DiffAE pipeline with every optional component, random weights and non-trivial statistics."""
    torch.manual_seed(seed)
    unet = DiffAEUNet2DModel(
        sample_size=16, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
        embed_channels=32, z_sem_channels=16, zero_init=False,  # zero-initialised outputs would hide the weights
    )  # fmt: skip
    encoder = SemanticEncoder(
        sample_size=16, model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
        out_channels=16,
    )  # fmt: skip
    latent = LatentMLPDenoiser(num_channels=16, hidden_channels=32, num_layers=3)
    classifier = AttributeClassifier(
        num_channels=16,
        attribute_names=["a", "b"],
        attribute_types=["binary", "continuous"],
        target_logits=[1.5, None],
    )
    for model in (encoder, latent, classifier):
        model.set_z_sem_statistics(torch.randn(16), torch.rand(16) + 0.5)
    for model in (unet, encoder, latent, classifier):
        model.eval()  # as from_pretrained leaves them: the UNet's dropout would make outputs differ
    configs = {
        "scheduler": _ddim_config(1000, "linear", True),
        "latent_scheduler": _ddim_config(1000, "const0.008", False),
    }
    pipe = DiffAEPipeline.from_official_configs(
        configs, unet=unet, encoder=encoder, latent_denoiser=latent, classifier=classifier
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fixed_codes(seed: int = 1, batch_size: int = 2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 16, generator=generator), torch.randn(batch_size, 3, 16, 16, generator=generator)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), f"{key} differs after loading"


def plain_config(scheduler) -> dict:
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def tiny_pipe():
    return make_tiny_pipeline()


@pytest.fixture(scope="module")
def saved_dir(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffae-pipeline")
    tiny_pipe.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _modules_cache(tmp_path, monkeypatch):
    # diffusers copies executed loader files into HF_MODULES_CACHE; keep them out of the user's cache.
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))


def test_save_load_round_trip_keeps_everything(tiny_pipe, saved_dir):
    loaded = DiffAEPipeline.from_pretrained(saved_dir)
    assert type(loaded) is DiffAEPipeline
    assert loaded.name_or_path == str(saved_dir)
    for name in MODEL_COMPONENTS:
        assert type(getattr(loaded, name)) is type(getattr(tiny_pipe, name))
        assert_same_weights(getattr(tiny_pipe, name), getattr(loaded, name))
    for name in ("encoder", "latent_denoiser", "classifier"):
        assert torch.equal(getattr(loaded, name).z_sem_mean, getattr(tiny_pipe, name).z_sem_mean)
        assert torch.equal(getattr(loaded, name).z_sem_std, getattr(tiny_pipe, name).z_sem_std)
        assert not torch.equal(getattr(loaded, name).z_sem_std, torch.ones(16))  # the statistics are not defaults
    assert loaded.classifier.attribute_names == ["a", "b"]
    assert loaded.classifier.attribute_type("b") == "continuous"
    assert list(loaded.classifier.config.target_logits) == [1.5, None]
    for name in DIFFUSERS_COMPONENTS + ("inverse_scheduler",):
        assert type(getattr(loaded, name)) is type(getattr(tiny_pipe, name))
        assert plain_config(getattr(loaded, name)) == plain_config(getattr(tiny_pipe, name))
    assert isinstance(loaded.inverse_scheduler, DiffAEInverseScheduler)

    z_sem, x_T = fixed_codes()
    before = tiny_pipe.decode(z_sem, x_T, num_inference_steps=3, output_type="pt").images
    after = loaded.decode(z_sem, x_T, num_inference_steps=3, output_type="pt").images
    assert before.std() > 0
    assert torch.equal(before, after)


def test_save_writes_community_file_and_verified_shims(saved_dir):
    with open(saved_dir / "diffae.py", encoding="utf-8") as f:
        assert "from diffusers_diffae import DiffAEPipeline" in f.read()
    config = DiffAEPipeline.load_config(saved_dir)
    assert config["_class_name"] == "DiffAEPipeline"  # a string keeps DiffAEPipeline.from_pretrained trust-free
    for name in OWN_COMPONENTS:
        module, class_name = config[name]
        with open(saved_dir / name / f"{module}.py", encoding="utf-8") as f:
            assert f.read() == component_shim_source(module, class_name)
    for name in DIFFUSERS_COMPONENTS:
        assert not [p for p in os.listdir(saved_dir / name) if p.endswith(".py")]


def test_optional_components_absent_round_trip(tmp_path):
    full = make_tiny_pipeline()
    pipe = DiffAEPipeline(
        unet=full.unet, encoder=full.encoder, scheduler=full.scheduler, inverse_scheduler=full.inverse_scheduler
    )
    pipe.save_pretrained(tmp_path)
    assert not (tmp_path / "classifier").exists()
    loaded = DiffAEPipeline.from_pretrained(tmp_path)
    assert loaded.latent_denoiser is None and loaded.latent_scheduler is None and loaded.classifier is None
    assert_same_weights(pipe.unet, loaded.unet)


def test_diffusion_pipeline_custom_pipeline_returns_installed_class(tiny_pipe, saved_dir):
    for spelling in ("diffae", str(saved_dir / "diffae.py")):
        loaded = DiffusionPipeline.from_pretrained(saved_dir, custom_pipeline=spelling, trust_remote_code=True)
        assert type(loaded) is DiffAEPipeline, spelling  # the installed class, not an executed copy
        for name in MODEL_COMPONENTS:
            assert type(getattr(loaded, name)) is type(getattr(tiny_pipe, name))
            assert_same_weights(getattr(tiny_pipe, name), getattr(loaded, name))


def test_custom_pipeline_without_trust_is_refused(saved_dir):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(saved_dir, custom_pipeline="diffae")


@pytest.mark.parametrize(
    "scheduler_cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler, DDPMScheduler]
)
def test_swapped_scheduler_survives_save_and_load(scheduler_cls, tmp_path):
    pipe = make_tiny_pipeline()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    assert DiffAEPipeline.load_config(tmp_path)["scheduler"] == ["diffusers", scheduler_cls.__name__]
    loaded = DiffAEPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is scheduler_cls
    assert plain_config(loaded.scheduler) == plain_config(pipe.scheduler)
    assert type(loaded.inverse_scheduler) is DiffAEInverseScheduler  # the encoder keeps its own scheduler
    z_sem, x_T = fixed_codes()
    generator = torch.Generator().manual_seed(0)  # DDPM draws noise in every step
    before = pipe.decode(z_sem, x_T, num_inference_steps=2, generator=generator, output_type="pt").images
    generator = torch.Generator().manual_seed(0)
    after = loaded.decode(z_sem, x_T, num_inference_steps=2, generator=generator, output_type="pt").images
    assert torch.equal(before, after)


def test_scheduler_passed_to_from_pretrained_replaces_saved_one(saved_dir):
    ddim = DDIMScheduler.from_pretrained(saved_dir, subfolder="scheduler")
    loaded = DiffAEPipeline.from_pretrained(saved_dir, scheduler=UniPCMultistepScheduler.from_config(ddim.config))
    assert type(loaded.scheduler) is UniPCMultistepScheduler


def test_variant_and_dtype(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = DiffAEPipeline.from_pretrained(tmp_path, variant="fp16", dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16 and loaded.classifier.dtype == torch.float16
    assert torch.equal(loaded.unet.conv_in.weight, tiny_pipe.unet.conv_in.weight.half())


def test_changed_shim_is_never_run_without_trust(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    marker = tmp_path / "marker"
    module = DiffAEPipeline.load_config(tmp_path)["unet"][0]
    with open(tmp_path / "unet" / f"{module}.py", "a", encoding="utf-8") as f:
        f.write(MARKER_CODE.format(marker=str(marker)))
    assert_same_weights(tiny_pipe.unet, DiffAEPipeline.from_pretrained(tmp_path).unet)
    assert not marker.exists()
    DiffAEPipeline.from_pretrained(tmp_path, trust_remote_code=True)  # the caller vouches for the folder's code
    assert marker.exists()


@pytest.mark.parametrize(
    "module, class_name",
    [
        ("diffusers_diffae.__main__", "main"),  # a module of this package that is not a component
        ("diffusers_diffae.models.unet_diffae import DiffAEUNet2DModel\nimport os #", "X"),
        ("evil", "DiffAEUNet2DModel"),
        ("transformers", "CLIPTextModel"),
    ],
)
def test_unknown_component_class_is_refused_before_anything_runs(saved_dir, tmp_path, module, class_name):
    folder = tmp_path / "pipeline"
    shutil.copytree(saved_dir, folder)
    marker = tmp_path / "marker"
    config = json.loads((folder / "model_index.json").read_text())
    config["unet"] = [module, class_name]
    (folder / "model_index.json").write_text(json.dumps(config))
    (folder / "unet" / f"{module}.py").write_text(MARKER_CODE.format(marker=str(marker)))
    with pytest.raises(ValueError, match="(?s)component 'unet' is .*neither a diffusers_diffae nor a diffusers class"):
        DiffAEPipeline.from_pretrained(folder)
    assert not marker.exists()


def test_pipeline_file_named_by_class_name_is_refused(saved_dir, tmp_path):
    folder = tmp_path / "pipeline"
    shutil.copytree(saved_dir, folder)
    marker = tmp_path / "marker"
    config = json.loads((folder / "model_index.json").read_text())
    config["_class_name"] = ["pipeline", "DiffAEPipeline"]
    (folder / "model_index.json").write_text(json.dumps(config))
    (folder / "pipeline.py").write_text(MARKER_CODE.format(marker=str(marker)))
    with pytest.raises(ValueError, match="_class_name must be a class name"):
        DiffAEPipeline.from_pretrained(folder)
    assert not marker.exists()


# Every option diffusers 0.42's DiffusionPipeline.from_pretrained reads, except the Hub ones (offline here) and
# the ones that hand the loading to code (`custom_pipeline`, `trust_remote_code`).
LOADING_OPTIONS = {
    "none": {},
    "device_map": {"device_map": "cpu"},
    "max_memory": {"max_memory": {"cpu": "2GB"}},
    "offload_folder": {"offload_folder": "OFFLOAD"},
    "offload_state_dict": {"offload_state_dict": True},
    "low_cpu_mem_usage": {"low_cpu_mem_usage": False},
    "use_safetensors": {"use_safetensors": True},
    "disable_mmap": {"disable_mmap": True},
    "torch_dtype": {"torch_dtype": torch.float16},
    "dtype": {"dtype": {"unet": torch.bfloat16, "default": torch.float32}},
    "variant": {"variant": None},
    "use_flashpack": {"use_flashpack": False},
    "use_onnx": {"use_onnx": False},
    "provider": {"provider": None, "sess_options": None, "provider_options": None},
    "load_connected_pipeline": {"load_connected_pipeline": True},
    "output_loading_info": {"output_loading_info": False},
    "quantization_config": {"quantization_config": object()},
    "trust_remote_code=False": {"trust_remote_code": False},
    "local_files_only": {"local_files_only": True},
    "custom_revision": {"custom_revision": "main"},
}


@pytest.mark.parametrize("option", sorted(LOADING_OPTIONS))
def test_no_loading_option_runs_code_from_the_folder(tiny_pipe, saved_dir, tmp_path, option):
    # diffusers treats `<folder>/None.py` as the pipeline file when no custom_pipeline is given.
    folder = tmp_path / "pipeline"
    shutil.copytree(saved_dir, folder)
    marker = tmp_path / "marker"
    for name in ("None.py", "pipeline.py", "diffae.py"):
        (folder / name).write_text(MARKER_CODE.format(marker=str(marker)))
    for name in OWN_COMPONENTS:
        module = DiffAEPipeline.load_config(folder)[name][0]
        (folder / name / f"{module}.py").write_text(MARKER_CODE.format(marker=str(marker)))
    kwargs = {k: (str(tmp_path / v) if v == "OFFLOAD" else v) for k, v in LOADING_OPTIONS[option].items()}
    with pytest.raises(ValueError, match="None.py|quantization_config"):
        DiffAEPipeline.from_pretrained(folder, **kwargs)
    assert not marker.exists()
    os.remove(folder / "None.py")
    try:
        loaded = DiffAEPipeline.from_pretrained(folder, **kwargs)
    except ValueError as e:
        assert option == "quantization_config" and "quantization_config" in str(e)
    else:
        assert type(loaded) is DiffAEPipeline
        weight = loaded.classifier.linear.weight
        if not weight.is_meta:  # diffusers' offload_state_dict without a device_map leaves every model on "meta"
            assert torch.equal(weight, tiny_pipe.classifier.linear.weight.to(weight.dtype))
    assert not marker.exists()


def test_verified_shims_are_not_executed(tiny_pipe, saved_dir, tmp_path, monkeypatch):
    # By default the shimmed components are loaded with their own from_pretrained: no folder code runs.
    loaded = DiffAEPipeline.from_pretrained(saved_dir, dtype={"unet": torch.float16, "default": torch.float32})
    assert not (tmp_path / "modules").exists()  # diffusers copies every executed file there
    assert loaded.unet.dtype == torch.float16 and loaded.encoder.dtype == torch.float32
    for name in MODEL_COMPONENTS:
        assert type(getattr(loaded, name)) is type(getattr(tiny_pipe, name))
    assert_same_weights(tiny_pipe.classifier, loaded.classifier)
    monkeypatch.setattr(dynamic_modules_utils, "DIFFUSERS_DISABLE_REMOTE_CODE", True)  # nothing to disable
    assert_same_weights(tiny_pipe.encoder, DiffAEPipeline.from_pretrained(saved_dir).encoder)


def test_bad_location_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a folder nor a Hub repo id"):
        DiffAEPipeline.from_pretrained(str(tmp_path / "missing" / "pipeline"))


@pytest.mark.parametrize(
    "breakage, error, message",
    [
        (lambda d: os.remove(d / "model_index.json"), ValueError, "not a pipeline folder: it has no model_index.json"),
        (lambda d: (d / "model_index.json").write_text("{not json"), ValueError, "model_index.json is not valid JSON"),
        (lambda d: (d / "model_index.json").write_text("[1, 2]"), ValueError, "must hold a JSON object, found list"),
        (lambda d: shutil.rmtree(d / "encoder"), ValueError, "lists the component 'encoder' but .* has no encoder/"),
        (lambda d: os.remove(d / "unet" / "diffusion_pytorch_model.safetensors"), OSError, "cannot load the 'unet' component from .*unet"),
        (lambda d: (d / "encoder" / "diffusion_pytorch_model.safetensors").write_text("hello"), OSError, "cannot load the 'encoder' component"),
    ],
)  # fmt: skip
def test_broken_folder_names_the_component(saved_dir, tmp_path, breakage, error, message):
    folder = tmp_path / "copy"
    shutil.copytree(saved_dir, folder)
    breakage(folder)
    with pytest.raises(error, match=message):
        DiffAEPipeline.from_pretrained(folder)


def test_wrong_variant_gives_diffusers_error(saved_dir):
    with pytest.raises(ValueError, match="variant=fp17"):
        DiffAEPipeline.from_pretrained(saved_dir, variant="fp17")


def test_image_background_is_saved_and_can_be_overridden(saved_dir):
    assert DiffAEPipeline.load_config(saved_dir)["image_background"] == 255
    assert DiffAEPipeline.from_pretrained(saved_dir).image_processor.background == 255
    assert DiffAEPipeline.from_pretrained(saved_dir, image_background=0).image_processor.background == 0
