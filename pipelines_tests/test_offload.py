"""Device placement: diffusers' model CPU offload covers every network of the pipeline, each public method frees
the offload hooks when it ends (`maybe_free_model_hooks`), and `from_pretrained` picks the layout by dtype.

On a machine without an accelerator, `enable_model_cpu_offload(device="cpu")` installs the same accelerate hooks
as on a GPU, with the CPU as execution device: the hooks, their order and the results are checked here; the
transfers themselves need a GPU. `enable_sequential_cpu_offload(device="cpu")` fails inside accelerate for
diffusers' own pipelines too (weights cannot be moved back to the meta device when the execution device is the
CPU), so it is exercised only up to its hooks.
"""

import pytest
import torch

from diffusers_diffae import DiffAEPipeline
from diffusers_diffae.pipelines.loading import default_memory_format
from tiny import tiny_pipeline


IMAGES = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def networks(pipe: DiffAEPipeline) -> set:
    return {name for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def calls(pipe: DiffAEPipeline, latents) -> dict:
    """Every public method that runs a network, each on fresh seeds."""
    return {
        "encode": lambda: pipe.encode(IMAGES, num_inference_steps=2).x_T,
        "invert": lambda: pipe.invert(IMAGES * 2 - 1, latents.z_sem, num_inference_steps=2),
        "decode": lambda: pipe.decode(latents.z_sem, latents.x_T, 2, output_type="pt").images,
        "edit": lambda: (
            pipe.edit(latents, attribute="smile", strength=0.3, num_inference_steps=2, output_type="pt").images
        ),
        "interpolate": lambda: (
            pipe.interpolate(latents, latents, num_frames=2, num_inference_steps=2, output_type="pt").images
        ),
        "__call__": lambda: (
            pipe(
                batch_size=2,
                num_inference_steps=2,
                latent_num_inference_steps=2,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ).images
        ),
        "sample (conditional)": lambda: (
            pipe.sample(
                attribute="smile",
                num_inference_steps=2,
                latent_num_inference_steps=2,
                generator=torch.Generator().manual_seed(1),
                output_type="pt",
            ).images
        ),
        "sample_z_sem": lambda: pipe.sample_z_sem(2, 2, generator=torch.Generator().manual_seed(2)),
        "sample_z_sem_with_attribute": lambda: pipe.sample_z_sem_with_attribute(
            1, "smile", num_inference_steps=2, generator=torch.Generator().manual_seed(3)
        ),
    }


def test_offload_sequence_names_every_network():
    pipe = tiny_pipeline()
    sequence = DiffAEPipeline.model_cpu_offload_seq.split("->")
    assert len(sequence) == len(set(sequence))
    assert set(sequence) == networks(pipe) == {"unet", "encoder", "latent_denoiser", "classifier"}
    # encode -> decode: the UNet's hook offloads the encoder when the UNet loads
    assert sequence.index("unet") == sequence.index("encoder") + 1


def test_model_cpu_offload_hooks_every_network_and_each_method_frees_them_last():
    reference = tiny_pipeline()
    pipe = tiny_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe._execution_device.type == "cpu"
    # one chained hook per network, in the sequence's order
    assert len(pipe._all_hooks) == len(networks(pipe))
    for name in networks(pipe):
        assert hasattr(getattr(pipe, name), "_hf_hook"), name

    events = []
    for name in networks(pipe):
        getattr(pipe, name).register_forward_hook(lambda *_, name=name: events.append(name))
    free = pipe.maybe_free_model_hooks

    def spy():
        events.append("free")
        free()

    pipe.maybe_free_model_hooks = spy
    latents = reference.encode(IMAGES, num_inference_steps=2)
    expected = {name: fn() for name, fn in calls(reference, latents).items()}
    for name, fn in calls(pipe, latents).items():
        events.clear()
        output = fn()
        ran = [e for e in events if e != "free"]
        assert ran, f"{name} ran no network"
        assert events[-1] == "free", f"{name} did not free the offload hooks after its last network call: {events}"
        # the hooks are back after each call, one per network
        assert len(pipe._all_hooks) == len(networks(pipe)), name
        torch.testing.assert_close(output, expected[name], rtol=0, atol=0, msg=name)


def test_sequential_cpu_offload_hooks_every_network():
    pipe = tiny_pipeline()
    pipe.enable_sequential_cpu_offload(device="cpu")
    for name in networks(pipe):
        module = getattr(pipe, name)
        weights = list(module.parameters())
        assert weights and all(p.device.type == "meta" for p in weights), name  # held by the hooks until used
        assert any(hasattr(m, "_hf_hook") for m in module.modules()), name


@pytest.mark.parametrize(
    "resolution, dtype, expected",
    [
        (32, torch.float32, torch.contiguous_format),
        (64, torch.float32, torch.channels_last),
        (32, torch.bfloat16, torch.channels_last),
        (32, torch.float16, torch.channels_last),
    ],
)
def test_default_layout_by_resolution_and_dtype(resolution, dtype, expected):
    assert default_memory_format(resolution, dtype) == expected


def test_from_pretrained_lays_out_a_bf16_32px_pipeline_channels_last(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    fp32 = DiffAEPipeline.from_pretrained(tmp_path)
    bf16 = DiffAEPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    convs = [p for p in bf16.unet.parameters() if p.ndim == 4] + [p for p in bf16.encoder.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(p.is_contiguous() for p in fp32.unet.parameters() if p.ndim == 4)


def test_z_sem_statistics_follow_the_codes_device():
    # under model offload the classifier (whose statistics `edit` reads) may sit on the CPU while z_sem is on the GPU;
    # the meta device stands in for the GPU here: a computation mixing it with CPU tensors fails the same way
    classifier = tiny_pipeline().classifier
    z_sem = torch.randn(2, classifier.z_sem_mean.shape[0], device="meta")
    for f in (classifier.normalize_z_sem, classifier.denormalize_z_sem):
        out = f(z_sem)
        assert out.device.type == "meta" and out.shape == z_sem.shape
