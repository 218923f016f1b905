"""diffusers' step callbacks in every denoising loop: encode's inversion (DDIM and exact), decode, the latent DDIM
of sample_z_sem, and both loops of __call__. Each callback sees every step, can change the loop's tensors, and an
interrupt stops the loop."""

import pytest
import torch
from diffusers.callbacks import PipelineCallback

from tiny import Z, tiny_pipeline


@pytest.fixture
def pipe():
    return tiny_pipeline()


def _count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    return calls, handle


class Recorder:
    """A step callback that records (step, timestep, tensor shapes), optionally replaces tensors or interrupts."""

    def __init__(self, replace=None, interrupt_at=None):
        self.seen, self.replace, self.interrupt_at = [], replace or {}, interrupt_at

    def __call__(self, pipe, i, t, tensors):
        self.seen.append((i, int(t), {k: tuple(v.shape) for k, v in tensors.items()}))
        if i == self.interrupt_at:
            pipe._interrupt = True
        return {name: fn(tensors[name]) for name, fn in self.replace.items()}

    @property
    def steps(self):
        return [i for i, _, _ in self.seen]

    @property
    def timesteps(self):
        return [t for _, t, _ in self.seen]


IMAGE_INPUTS = ["latents", "z_sem"]


@pytest.mark.parametrize("inversion", ["ddim", "exact"])
def test_inversion_callback_sees_every_step_and_replaces_tensors(pipe, inversion):
    x0, z_sem = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, Z)
    recorder = Recorder()
    x_T = pipe.invert(x0, z_sem, 4, inversion=inversion, callback_on_step_end=recorder,
                      callback_on_step_end_tensor_inputs=IMAGE_INPUTS)  # fmt: skip
    assert recorder.steps == [0, 1, 2, 3] and pipe.num_timesteps == 4
    assert recorder.timesteps == [0, 250, 500, 750]  # levels the step starts from, clean image first
    assert recorder.seen[0][2] == {"latents": (2, 3, 16, 16), "z_sem": (2, Z)}
    assert torch.equal(x_T, pipe.invert(x0, z_sem, 4, inversion=inversion))  # observing changes nothing
    zeroed = pipe.invert(
        x0, z_sem, 4, inversion=inversion, callback_on_step_end=Recorder({"latents": torch.zeros_like})
    )
    assert torch.equal(zeroed, torch.zeros_like(zeroed))


def test_inversion_callback_can_swap_z_sem_between_steps(pipe):
    x0, z1, z2 = torch.rand(1, 3, 16, 16) * 2 - 1, torch.randn(1, Z), torch.randn(1, Z)
    swapped = pipe.invert(x0, z1, 2, callback_on_step_end=Recorder({"z_sem": lambda z: z2}),
                          callback_on_step_end_tensor_inputs=["z_sem"])  # fmt: skip
    scheduler = pipe.inverse_scheduler
    scheduler.set_timesteps(2)
    x = x0
    for t, z in zip(scheduler.timesteps, (z1, z2)):  # step 0 with z1, step 1 with the swapped code
        x = scheduler.step(pipe.unet(x, t, z).sample, t, x).prev_sample
    torch.testing.assert_close(swapped, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("inversion, calls_per_step", [("ddim", 1), ("exact", 3)])
def test_interrupt_stops_the_inversion(pipe, inversion, calls_per_step):
    x0, z_sem = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, Z)
    recorder = Recorder(interrupt_at=1)
    calls, handle = _count_calls(pipe.unet)
    try:
        partial = pipe.invert(x0, z_sem, 5, inversion=inversion, callback_on_step_end=recorder)
    finally:
        handle.remove()
    assert recorder.steps == [0, 1] and len(calls) == 2 * calls_per_step
    two_steps = pipe.invert(x0, z_sem, 5, inversion=inversion, callback_on_step_end=Recorder(interrupt_at=1))
    assert torch.equal(partial, two_steps) and pipe.interrupt  # the loop stayed interrupted
    full = pipe.invert(x0, z_sem, 5, inversion=inversion)  # the next call starts uninterrupted
    assert not pipe.interrupt and not torch.equal(full, partial)


def test_encode_passes_the_callback_to_its_inversion(pipe):
    recorder = Recorder(interrupt_at=0)
    images = torch.rand(2, 3, 16, 16)
    latents = pipe.encode(images, num_inference_steps=3, callback_on_step_end=recorder)
    assert recorder.steps == [0]
    x0 = pipe.preprocess(images)
    torch.testing.assert_close(
        latents.x_T, pipe.invert(x0, latents.z_sem, 3, callback_on_step_end=Recorder(interrupt_at=0))
    )


def test_decode_callback_and_interrupt(pipe):
    z_sem, x_T = torch.randn(2, Z), torch.randn(2, 3, 16, 16)
    recorder = Recorder(interrupt_at=2)
    calls, handle = _count_calls(pipe.unet)
    try:
        out = pipe.decode(z_sem, x_T, num_inference_steps=5, output_type="latent", callback_on_step_end=recorder,
                          callback_on_step_end_tensor_inputs=IMAGE_INPUTS).images  # fmt: skip
    finally:
        handle.remove()
    assert recorder.steps == [0, 1, 2] and len(calls) == 3 and pipe.num_timesteps == 5
    assert recorder.timesteps == [800, 600, 400]
    full = pipe.decode(z_sem, x_T, num_inference_steps=5, output_type="latent").images
    assert not torch.equal(out, full)


def test_sample_z_sem_callback_sees_normalised_codes_and_can_interrupt(pipe):
    z_noise = torch.randn(3, Z)
    recorder = Recorder()
    z = pipe.sample_z_sem(3, 4, z_noise=z_noise, return_normalized=True, callback_on_step_end=recorder)
    assert recorder.steps == [0, 1, 2, 3] and recorder.seen[0][2] == {"latents": (3, Z)}
    assert torch.equal(z, pipe.sample_z_sem(3, 4, z_noise=z_noise, return_normalized=True))
    replaced = pipe.sample_z_sem(3, 4, z_noise=z_noise, return_normalized=True,
                                 callback_on_step_end=Recorder({"latents": torch.ones_like}))  # fmt: skip
    assert torch.equal(replaced, torch.ones_like(replaced))
    calls, handle = _count_calls(pipe.latent_denoiser)
    try:
        pipe.sample_z_sem(3, 4, z_noise=z_noise, callback_on_step_end=Recorder(interrupt_at=0))
    finally:
        handle.remove()
    assert len(calls) == 1
    with pytest.raises(ValueError, match=r"subset of \['latents'\]"):
        pipe.sample_z_sem(3, 4, callback_on_step_end=recorder, callback_on_step_end_tensor_inputs=["z_sem"])


def test_call_runs_the_latent_and_the_image_callbacks(pipe):
    latent, image = Recorder(), Recorder(interrupt_at=0)
    images = pipe(batch_size=2, num_inference_steps=3, latent_num_inference_steps=4, output_type="pt",
                  generator=torch.Generator().manual_seed(0), latent_callback_on_step_end=latent,
                  callback_on_step_end=image, callback_on_step_end_tensor_inputs=IMAGE_INPUTS).images  # fmt: skip
    assert latent.steps == [0, 1, 2, 3] and latent.seen[0][2] == {"latents": (2, Z)}
    assert image.steps == [0] and image.seen[0][2] == {"latents": (2, 3, 16, 16), "z_sem": (2, Z)}
    assert images.shape == (2, 3, 16, 16)
    conditional = Recorder()
    pipe(batch_size=1, attribute="smile", min_probability=0.0, num_inference_steps=2, latent_num_inference_steps=2,
         generator=torch.Generator().manual_seed(0), latent_callback_on_step_end=conditional)  # fmt: skip
    assert conditional.steps[:2] == [0, 1]  # each latent DDIM run of the rejection sampler reports its steps


def test_callback_errors_come_before_any_compute(pipe):
    calls, handle = _count_calls(pipe.unet)
    try:
        for call in (
            lambda: pipe.decode(torch.randn(1, Z), callback_on_step_end_tensor_inputs=["noise"]),
            lambda: pipe.invert(
                torch.zeros(1, 3, 16, 16), torch.randn(1, Z), callback_on_step_end_tensor_inputs="z_sem"
            ),
            lambda: pipe(batch_size=1, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["eps"]),
        ):
            with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs must be a subset"):
                call()
        with pytest.raises(ValueError, match="callback_on_step_end must be callable"):
            pipe.decode(torch.randn(1, Z), callback_on_step_end="print")
    finally:
        handle.remove()
    assert calls == []


class ZeroLatentsAtStep(PipelineCallback):
    """A diffusers `PipelineCallback`: its `tensor_inputs` decide what the loop hands over."""

    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == self.config.cutoff_step_index:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs


def test_diffusers_pipeline_callback_objects_work(pipe):
    out = pipe.decode(torch.randn(1, Z), torch.randn(1, 3, 16, 16), num_inference_steps=3, output_type="latent",
                      callback_on_step_end=ZeroLatentsAtStep(cutoff_step_ratio=None, cutoff_step_index=2)).images  # fmt: skip
    assert torch.equal(out, torch.zeros_like(out))
