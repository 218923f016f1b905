"""DiffAEPipeline: official parity, the inversion/decoding maths, every method and every error."""

import math
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ModelMixin,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from safetensors.torch import load_file

from diffusers_diffae import DiffAELatents, DiffAEPipeline
from diffusers_diffae.convert import convert_official_checkpoint
from diffusers_diffae.pipelines import edit_strength_for_target, slerp
from tiny import Z, official_schedulers, tiny_encoder, tiny_pipeline, tiny_unet


# ---------------------------------------------------------------------------------------------------------------
# Parity with the official algorithms
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official(official_dir):
    pipe = convert_official_checkpoint(official_dir / "last.ckpt", official_dir / "config.json")
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_file(official_dir / "inputs.safetensors"), load_file(official_dir / "outputs.safetensors")


def test_encode_and_render_match_official(official):
    pipe, inputs, outputs = official
    latents = pipe.encode((inputs["x0"] + 1) / 2, num_inference_steps=10)
    torch.testing.assert_close(latents.z_sem, outputs["ema.encode.z_sem"], atol=1e-4, rtol=0)
    torch.testing.assert_close(latents.x_T, outputs["ema.encode_stochastic.xT"], atol=1e-3, rtol=0)
    image = pipe.decode(latents.z_sem, latents.x_T, num_inference_steps=10, output_type="pt").images * 2 - 1
    reference = outputs["ema.render.image"]
    unclipped = reference.abs() < 1
    assert unclipped.float().mean() > 0.5
    assert (image - reference)[unclipped].abs().max() < 5e-3


def test_inversion_trajectory_matches_official(official):
    pipe, inputs, outputs = official
    states = []
    pipe.unet.register_forward_pre_hook(lambda m, args: states.append(args[0][:2].clone()))
    try:
        pipe.invert(inputs["x0"], outputs["ema.z_sem"], num_inference_steps=10)
    finally:
        pipe.unet._forward_pre_hooks.clear()
    # the network sees x0, then the state after each of the first 9 official steps
    torch.testing.assert_close(torch.stack(states[1:]), outputs["ema.encode_stochastic.traj"][:9], atol=1e-3, rtol=0)


def test_decode_random_noise_and_latent_sampling_match_official(official):
    pipe, _, outputs = official
    image = pipe.decode(outputs["ema.encode.z_sem"], outputs["ema.render_random.xT"], 10, output_type="pt").images
    torch.testing.assert_close(image * 2 - 1, outputs["ema.render_random.image"], atol=5e-3, rtol=0)
    z_n = pipe.sample_z_sem(4, 10, z_noise=outputs["latent.sample.noise"], return_normalized=True)
    reference = outputs["latent.sample.z_normalized"]
    assert (z_n - reference).abs().max() / reference.abs().max() < 1e-4
    z_sem = pipe.latent_denoiser.denormalize_z_sem(z_n)
    assert (z_sem - outputs["latent.sample.z_sem"]).abs().max() / outputs["latent.sample.z_sem"].abs().max() < 1e-4
    image = pipe(
        batch_size=4, num_inference_steps=10, latent_num_inference_steps=10,
        z_noise=outputs["latent.sample.noise"], x_T=outputs["latent.sample.xT"], output_type="pt",
    ).images  # fmt: skip
    torch.testing.assert_close(image * 2 - 1, outputs["latent.sample.image"], atol=5e-3, rtol=0)


def test_fast_default_layout_stays_within_fp32_tolerance(official, tmp_path):
    """channels_last (`from_pretrained`'s default from 64 px up) vs the official contiguous layout: the same fp32 maths,
    summed in another order. Bounds: z_sem 1e-5, x_T 5e-4, decoded pixels (range 2) 1e-3 max / 1e-4 mean (what this
    fixture measures: the fidelity table of docs/results/speed.md)."""
    pipe, inputs, _ = official
    assert pipe.resolution < 64  # the 32 px fixture keeps the official layout by default
    weights = [p for p in list(pipe.unet.parameters()) + list(pipe.encoder.parameters()) if p.ndim == 4]
    assert weights and all(w.is_contiguous() for w in weights)
    big = DiffAEPipeline(tiny_unet(sample_size=64), tiny_encoder(sample_size=64), *official_schedulers()[:2])
    assert all(p.is_contiguous() for p in big.unet.parameters())  # models passed in keep their layout
    big.save_pretrained(tmp_path)
    loaded = DiffAEPipeline.from_pretrained(tmp_path)  # the loaded ones get the default layout
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in loaded.unet.parameters() if p.ndim == 4)

    def run():
        latents = pipe.encode((inputs["x0"] + 1) / 2, num_inference_steps=10)
        image = pipe.decode(latents.z_sem, latents.x_T, num_inference_steps=10, output_type="pt").images
        return latents, image * 2 - 1

    ref_latents, ref_image = run()
    try:
        pipe.set_memory_format(torch.channels_last)
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
        fast_latents, fast_image = run()
        fast_decoded = pipe.decode(fast_latents.z_sem, fast_latents.x_T, 10, output_type="pt").images * 2 - 1
    finally:
        pipe.set_memory_format(torch.contiguous_format)
    ref_decoded = pipe.decode(fast_latents.z_sem, fast_latents.x_T, 10, output_type="pt").images * 2 - 1
    torch.testing.assert_close(fast_latents.z_sem, ref_latents.z_sem, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_latents.x_T, ref_latents.x_T, atol=5e-4, rtol=0)
    # decoding the same codes in both layouts
    assert (fast_decoded - ref_decoded).abs().max() < 1e-3
    assert (fast_decoded - ref_decoded).abs().mean() < 1e-4
    assert (fast_image - ref_image).abs().mean() < 1e-4
    with pytest.raises(ValueError, match="memory_format"):
        pipe.set_memory_format(torch.preserve_format)


# ---------------------------------------------------------------------------------------------------------------
# A perfect model: the Bayes-optimal noise predictor of a Gaussian mixture
# ---------------------------------------------------------------------------------------------------------------


class MixtureOracle(ModelMixin, ConfigMixin):
    """eps*(x_t, t) = (x_t - sqrt(a) E[x0 | x_t]) / sqrt(1 - a) for data ~ mixture of N(mu_k, s^2 I); ignores z_sem."""

    @register_to_config
    def __init__(self, sample_size=8, in_channels=3, num_components=4, std=0.1, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        dim = in_channels * sample_size * sample_size
        self.register_buffer("means", torch.rand(num_components, dim, generator=generator) - 0.5)
        self.register_buffer("alphas_cumprod", DDIMScheduler().alphas_cumprod.double())

    def sample_data(self, n, generator):
        k = torch.randint(0, self.means.shape[0], (n,), generator=generator)
        x = self.means[k] + self.config.std * torch.randn(n, self.means.shape[1], generator=generator)
        return x.reshape(n, self.config.in_channels, self.config.sample_size, self.config.sample_size)

    def forward(self, sample, timestep, z_sem=None):
        shape = sample.shape
        x = sample.double().flatten(1)
        a = self.alphas_cumprod[torch.as_tensor(timestep).long().reshape(-1)].reshape(-1, 1)
        mus, s2 = self.means.double(), self.config.std**2
        var = a * s2 + (1 - a)
        logits = -((x[:, None] - a.sqrt()[:, None] * mus[None]) ** 2).sum(-1) / (2 * var)
        w = torch.softmax(logits, dim=1)
        posterior = mus[None] + (a.sqrt() * s2 / var)[:, None] * (x[:, None] - a.sqrt()[:, None] * mus[None])
        x0 = (w[..., None] * posterior).sum(1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return type("Out", (), {"sample": eps.reshape(shape).to(sample.dtype)})()


@pytest.fixture(scope="module")
def oracle_pipe():
    scheduler, inverse, _ = official_schedulers()
    oracle = MixtureOracle()
    encoder = tiny_encoder(sample_size=8, channel_mult=(1, 2))
    pipe = DiffAEPipeline(unet=oracle, encoder=encoder, scheduler=scheduler, inverse_scheduler=inverse)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_round_trip_error_shrinks_with_steps(oracle_pipe):
    oracle = oracle_pipe.unet
    x0 = oracle.sample_data(32, torch.Generator().manual_seed(1))
    errors = {}
    for steps in (10, 50, 250):
        latents = oracle_pipe.encode((x0 + 1) / 2, num_inference_steps=steps)
        recon = oracle_pipe.decode(latents.z_sem, latents.x_T, steps, output_type="pt").images * 2 - 1
        errors[steps] = ((recon - x0).norm() / x0.norm()).item()
    assert errors[10] > errors[50] > errors[250]
    assert errors[250] < errors[10] / 3
    assert errors[250] < 0.05


@pytest.mark.parametrize(
    "scheduler_cls, steps",
    [
        (DDIMScheduler, 50),
        (DPMSolverMultistepScheduler, 25),
        (UniPCMultistepScheduler, 25),
        (EulerDiscreteScheduler, 50),
        (DDPMScheduler, 200),
    ],
)
def test_swapped_schedulers_sample_the_data_distribution(oracle_pipe, scheduler_cls, steps):
    pipe = DiffAEPipeline(
        **{**oracle_pipe.components, "scheduler": scheduler_cls.from_config(oracle_pipe.scheduler.config)}
    )
    pipe.set_progress_bar_config(disable=True)
    z_sem = torch.zeros(16, pipe.encoder.config.out_channels)
    images = pipe.decode(
        z_sem, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    x = (images * 2 - 1).flatten(1)
    nearest = torch.cdist(x.double(), pipe.unet.means.double()).min(dim=1).values / math.sqrt(x.shape[1])
    assert nearest.max() < 0.2, f"{scheduler_cls.__name__}: samples are not near the data (rms {nearest.max():.3f})"
    assert x.std(dim=0).mean() > 0.05  # not collapsed onto one point


# ---------------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def pipe():
    return tiny_pipeline()


def _images(n=2, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_encode_accepts_every_image_format(pipe):
    images = _images(2)
    reference = pipe.encode(images, num_inference_steps=3)
    as_np = images.permute(0, 2, 3, 1).numpy()
    pil = [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in as_np]
    for variant in (as_np, list(images), [as_np[0], as_np[1]]):
        latents = pipe.encode(variant, num_inference_steps=3)
        torch.testing.assert_close(latents.z_sem, reference.z_sem, atol=1e-5, rtol=0)
        torch.testing.assert_close(latents.x_T, reference.x_T, atol=1e-4, rtol=0)  # memory layout only
    latents = pipe.encode(pil, num_inference_steps=3)
    torch.testing.assert_close(latents.z_sem, reference.z_sem, atol=0.05, rtol=0)  # 8-bit quantisation only
    assert pipe.encode(pil[0], stochastic=False).x_T is None
    z_sem, x_T = pipe.encode(images, num_inference_steps=2, return_dict=False)
    assert z_sem.shape == (2, Z) and x_T.shape == (2, 3, 16, 16)


def test_preprocess_resizes_and_centre_crops_like_the_official_transforms(pipe):
    wide = torch.zeros(1, 3, 32, 64)
    wide[..., 12:52] = 1.0  # a bright band wider than the centre crop, dark borders that the crop removes
    out = pipe.preprocess(wide)
    assert out.shape == (1, 3, 16, 16)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-6)
    tall = torch.zeros(1, 3, 64, 32)
    tall[..., 24:40, :] = 1.0  # band narrower than the crop: dark rows at the crop's top and bottom
    out = pipe.preprocess(tall)
    assert out[..., 6:10, :].min() > 0.99 and out[..., 0, :].max() < -0.99
    pil = PIL.Image.new("L", (40, 20), color=255)  # grayscale: converted to RGB like the official loader
    assert pipe.preprocess(pil).shape == (1, 3, 16, 16)


def test_decode_output_types_generators_and_callback(pipe):
    z_sem = torch.randn(2, Z)
    pt = pipe.decode(z_sem, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert pt.shape == (2, 3, 16, 16) and 0 <= pt.min() and pt.max() <= 1
    np_images = pipe.decode(
        z_sem, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = pipe.decode(z_sem, num_inference_steps=3, output_type="pil").images
    assert len(pil) == 2 and pil[0].size == (16, 16)
    (tuple_images,) = pipe.decode(
        z_sem, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt", return_dict=False
    )
    assert torch.equal(tuple_images, pt)

    # one generator per image: image i depends only on generator i (the paper's stochastic variations, Fig. 3)
    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a = pipe.decode(z_sem, num_inference_steps=3, generator=gens([1, 2]), output_type="pt").images
    b = pipe.decode(z_sem, num_inference_steps=3, generator=gens([1, 3]), output_type="pt").images
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    zeroed = pipe.decode(z_sem, num_inference_steps=3, output_type="pt", callback_on_step_end=callback).images
    assert [i for i, _ in seen] == [0, 1, 2] and [t for _, t in seen] == [666, 333, 0]
    assert torch.allclose(zeroed, torch.full_like(zeroed, 0.5))


def test_decode_variations_differ_but_share_semantics(pipe):
    z_sem = torch.randn(1, Z).repeat(2, 1)
    images = pipe.decode(
        z_sem, num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="pt"
    ).images
    assert not torch.equal(images[0], images[1])


def test_interpolate_endpoints_are_the_reconstructions(pipe):
    a, b = _images(1, 1), _images(1, 2)
    la, lb = pipe.encode(a, 4), pipe.encode(b, 4)
    frames = pipe.interpolate(la, lb, num_frames=5, num_inference_steps=4, output_type="pt").images
    assert frames.shape == (5, 3, 16, 16)
    torch.testing.assert_close(
        frames[0], pipe.decode(la.z_sem, la.x_T, 4, output_type="pt").images[0], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        frames[-1], pipe.decode(lb.z_sem, lb.x_T, 4, output_type="pt").images[0], atol=1e-4, rtol=0
    )
    from_images = pipe.interpolate(
        a, b, num_frames=5, num_inference_steps=4, encode_num_inference_steps=4, output_type="pt"
    ).images
    torch.testing.assert_close(from_images, frames)


def test_slerp_and_lerp_formulas():
    x0, x1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    alpha = torch.tensor([0.0, 0.3, 1.0])
    out = slerp(x0, x1, alpha)
    torch.testing.assert_close(out[:, 0], x0)
    torch.testing.assert_close(out[:, 2], x1, atol=1e-5, rtol=0)
    a, b = x0[0].flatten().double(), x1[0].flatten().double()
    theta = torch.arccos(torch.dot(a / a.norm(), b / b.norm()))
    expected = (torch.sin(0.7 * theta) * a + torch.sin(0.3 * theta) * b) / torch.sin(theta)
    torch.testing.assert_close(out[0, 1].flatten().double(), expected, atol=1e-5, rtol=0)
    same = slerp(x0, x0.clone(), alpha)  # parallel vectors fall back to lerp instead of dividing by zero
    assert torch.isfinite(same).all()


class _Capture:
    def __init__(self, pipe):
        self.calls = []
        pipe.decode = lambda z_sem, x_T, *args, **kwargs: self.calls.append((z_sem, x_T)) or None


def test_edit_moves_z_sem_along_the_classifier_direction(pipe):
    torch.nn.init.normal_(pipe.classifier.linear.weight)
    pipe.classifier.set_z_sem_statistics(torch.randn(Z), torch.rand(Z) + 0.5)
    latents = pipe.encode(_images(3), num_inference_steps=3)
    capture = _Capture(pipe)
    pipe.edit(latents, attribute="smile", strength=0.3)
    edited, x_T = capture.calls[-1]
    assert torch.equal(x_T, latents.x_T)  # the stochastic code is kept
    clf = pipe.classifier
    w = clf.linear.weight[0]
    expected = clf.denormalize_z_sem(clf.normalize_z_sem(latents.z_sem) + 0.3 * math.sqrt(Z) * w / w.norm())
    torch.testing.assert_close(edited, expected)
    before, after = clf(latents.z_sem).logits[:, 0], clf(edited).logits[:, 0]
    assert (after > before).all()
    pipe.edit(latents, attribute="smile", strength=-0.3)
    assert (clf(capture.calls[-1][0]).logits[:, 0] < before).all()


def test_edit_to_a_target_confidence_and_with_raw_or_continuous_directions(pipe):
    torch.nn.init.normal_(pipe.classifier.linear.weight)
    latents = pipe.encode(_images(3), num_inference_steps=3)
    capture = _Capture(pipe)
    pipe.edit(latents, attribute="smile", target_logit=2.5)
    torch.testing.assert_close(
        pipe.classifier(capture.calls[-1][0]).logits[:, 0], torch.full((3,), 2.5), atol=1e-4, rtol=0
    )
    pipe.edit(latents, attribute="smile", target_probability=0.9)
    probability = torch.sigmoid(pipe.classifier(capture.calls[-1][0]).logits[:, 0])
    torch.testing.assert_close(probability, torch.full((3,), 0.9), atol=1e-4, rtol=0)
    pipe.edit(latents, attribute="age", target_logit=-1.0)  # continuous regression head: target value
    torch.testing.assert_close(
        pipe.classifier(capture.calls[-1][0]).logits[:, 1], torch.full((3,), -1.0), atol=1e-4, rtol=0
    )
    direction = torch.randn(Z)
    pipe.edit(latents, direction=direction, strength=torch.tensor([0.0, 0.5, 1.0]))
    z_n = pipe.classifier.normalize_z_sem(capture.calls[-1][0]) - pipe.classifier.normalize_z_sem(latents.z_sem)
    torch.testing.assert_close(z_n[0], torch.zeros(Z), atol=1e-5, rtol=0)
    torch.testing.assert_close(z_n[2], math.sqrt(Z) * direction / direction.norm(), atol=1e-4, rtol=0)
    assert edit_strength_for_target(torch.tensor([0.0]), torch.ones(4), 4.0).item() == pytest.approx(1.0)
    # One direction per image (e.g. random control edits) moves each code as the same edit of that image alone.
    directions = torch.randn(3, Z)
    pipe.edit(latents, direction=directions, strength=torch.tensor([0.2, -0.5, 1.0]))
    batched = capture.calls[-1][0]
    for i, alpha in enumerate((0.2, -0.5, 1.0)):
        single = DiffAELatents(latents.z_sem[i : i + 1], latents.x_T[i : i + 1])
        pipe.edit(single, direction=directions[i], strength=alpha)
        torch.testing.assert_close(batched[i : i + 1], capture.calls[-1][0])
    pipe.edit(latents, direction=directions, target_logit=1.5)
    moved = pipe.classifier.normalize_z_sem(capture.calls[-1][0])
    torch.testing.assert_close((moved * directions).sum(-1), torch.full((3,), 1.5), atol=1e-4, rtol=0)


def test_edit_decodes_real_images(pipe):
    out = pipe.edit(
        _images(2),
        attribute="smile",
        strength=0.5,
        num_inference_steps=3,
        encode_num_inference_steps=3,
        output_type="np",
    )
    assert out.images.shape == (2, 16, 16, 3)


def test_unconditional_and_conditional_sampling(pipe):
    images = pipe(
        batch_size=3,
        num_inference_steps=3,
        latent_num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (3, 3, 16, 16)
    again = pipe.sample(
        batch_size=3,
        num_inference_steps=3,
        latent_num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert torch.equal(images, again)
    clf = pipe.classifier
    torch.nn.init.normal_(clf.linear.weight)
    z = pipe.sample_z_sem_with_attribute(
        6, "smile", min_probability=0.5, num_inference_steps=3, generator=torch.Generator().manual_seed(1)
    )
    assert z.shape == (6, Z)
    assert (torch.sigmoid(clf(z).logits[:, 0]) >= 0.5).all()
    images = pipe(
        batch_size=2,
        num_inference_steps=2,
        latent_num_inference_steps=3,
        attribute="smile",
        generator=torch.Generator().manual_seed(2),
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 16, 16)


def test_rejection_sampling_follows_d2c(pipe):
    """Accepted codes: p >= threshold, kept with probability p (so the accepted mean p exceeds the candidates')."""
    clf = pipe.classifier
    torch.nn.init.normal_(clf.linear.weight, std=0.3)
    z_all = pipe.sample_z_sem(400, 3, generator=torch.Generator().manual_seed(3))
    p_all = torch.sigmoid(clf(z_all).logits[:, 0])
    z = pipe.sample_z_sem_with_attribute(
        40, "smile", min_probability=0.0, num_inference_steps=3, generator=torch.Generator().manual_seed(4)
    )
    p = torch.sigmoid(clf(z).logits[:, 0])
    assert p.mean() > p_all.mean()


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_errors_name_the_problem(pipe):
    images, z = _images(2), torch.randn(2, Z)
    cases = [
        (lambda: pipe.encode(torch.rand(2, 4, 16, 16)), "4 channels but the model expects 3"),
        (lambda: pipe.encode(torch.rand(2, 3, 0, 16)), "unusable size"),
        (lambda: pipe.encode(images * 2 - 1), r"must lie in \[0, 1\]"),
        (lambda: pipe.encode((images * 255).to(torch.uint8)), "floating point"),
        (lambda: pipe.encode(np.zeros((16, 16, 3), dtype=np.uint8)), "floats in"),
        (lambda: pipe.encode("cat.png"), "unsupported image type"),
        (lambda: pipe.encode([]), "no images"),
        (lambda: pipe.decode(z, torch.randn(3, 3, 16, 16)), "batch size mismatch"),
        (lambda: pipe.decode(torch.randn(2, Z + 1)), r"z_sem must have shape \(B, 16\)"),
        (lambda: pipe.decode(z, torch.randn(2, 3, 8, 8)), r"x_T must have shape \(B, 3, 16, 16\)"),
        (lambda: pipe.decode(z, num_inference_steps=0), "between 1 and 1000"),
        (lambda: pipe.decode(z, num_inference_steps=1001), "between 1 and 1000"),
        (lambda: pipe.encode(images, num_inference_steps=0), "between 1 and 1000"),
        (lambda: pipe.decode(z, output_type="png"), "output_type"),
        (lambda: pipe.decode(z, generator=[torch.Generator()]), "1 generators for a batch of 2"),
        (lambda: pipe.edit(DiffAELatents(z, torch.randn(2, 3, 16, 16)), attribute="wings"), "unknown attribute 'wings'"),
        (lambda: pipe.edit(DiffAELatents(z, torch.randn(2, 3, 16, 16))), "name the attribute"),
        (lambda: pipe.edit(DiffAELatents(z, None), attribute="smile"), "no x_T"),
        (lambda: pipe.edit(DiffAELatents(z, torch.randn(2, 3, 16, 16)), direction=torch.zeros(Z)), "non-zero"),
        (lambda: pipe.edit(DiffAELatents(z, torch.randn(2, 3, 16, 16)), direction=torch.ones(3, Z)), r"one row per image \(2, 16\)"),
        (lambda: pipe.edit(DiffAELatents(z, torch.randn(2, 3, 16, 16)), direction=torch.stack([torch.ones(Z), torch.zeros(Z)])), "every row"),
        (lambda: pipe.edit(DiffAELatents(z, torch.randn(2, 3, 16, 16)), attribute="age", target_probability=0.8), "binary attribute"),
        (lambda: pipe.interpolate(images[:1], images, num_frames=3, encode_num_inference_steps=2), "batch size mismatch"),
        (lambda: pipe.interpolate(images, images, num_frames=1), "num_frames"),
        (lambda: pipe(batch_size=0), "batch_size"),
        (lambda: pipe(batch_size=2, attribute="age"), "continuous head"),
        # values that would otherwise decode silently into NaN images
        (lambda: pipe.decode(torch.full((2, Z), float("nan"))), "z_sem contains NaN"),
        (lambda: pipe.decode(z, torch.full((2, 3, 16, 16), float("inf"))), "x_T contains NaN or infinite"),
        (lambda: pipe.decode(z.long()), "z_sem must be a floating-point tensor, got dtype torch.int64"),
        (lambda: pipe.decode(z, eta=float("nan")), r"eta must be a number in \[0, 1\]"),
        (lambda: pipe.decode(z, eta=1.5), r"eta must be a number in \[0, 1\]"),
        (lambda: pipe(batch_size=2, eta=-0.1), r"eta must be a number in \[0, 1\]"),
        (lambda: pipe.sample_z_sem(2, z_noise=torch.full((2, Z), float("nan"))), "z_noise contains NaN"),
        (lambda: pipe.sample_z_sem(2, z_noise=[0.0] * Z), r"z_noise must have shape \(B, 16\), got list"),
        (lambda: pipe.edit(DiffAELatents(z, torch.randn(2, 3, 16, 16)), attribute="smile", strength=float("nan")), "strength must be finite"),
        (lambda: pipe.edit(DiffAELatents(z, torch.randn(2, 3, 16, 16)), attribute="smile", target_logit=float("inf")), "target_logit must be finite"),
        (lambda: pipe.edit(images, attribute="smile", strength="big"), "strength must be a number or a"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    torch.nn.init.constant_(pipe.classifier.linear.bias, -50.0)  # p(smile) ~ 0: nothing can be accepted
    with pytest.raises(ValueError, match="accepted 0 of 32 candidates.*cannot reach 2 samples"):
        pipe.sample_z_sem_with_attribute(2, "smile", num_inference_steps=2, max_candidates=32)


def test_missing_components_are_errors():
    bare = tiny_pipeline(latent=False, classifier=False)
    with pytest.raises(ValueError, match="latent_denoiser"):
        bare(batch_size=1)
    latents = DiffAELatents(torch.randn(1, Z), torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="needs a classifier"):
        bare.edit(latents, attribute="smile")
    with pytest.raises(ValueError, match="classifier"):
        bare.sample_z_sem_with_attribute(1, "smile")
    capture = _Capture(bare)  # a raw direction works without a classifier (encoder statistics normalise)
    bare.edit(latents, direction=torch.ones(Z), strength=1.0)
    assert capture.calls


def test_latent_output_is_the_sampler_result(pipe):
    z, x_T = torch.randn(2, Z), torch.randn(2, 3, 16, 16)
    latent = pipe.decode(z, x_T, num_inference_steps=3, output_type="latent").images
    assert torch.equal(latent, pipe.decode(z, x_T, num_inference_steps=3, output_type="latent").images)
    assert pipe.num_timesteps == 3
    images = pipe.decode(z, x_T, num_inference_steps=3, output_type="pt").images
    assert torch.allclose(images, (latent / 2 + 0.5).clamp(0, 1))


def test_one_generator_per_image_reproduces_each_image_alone(pipe):
    def sample(seeds):
        generator = [torch.Generator().manual_seed(seed) for seed in seeds]
        kwargs = dict(num_inference_steps=2, latent_num_inference_steps=2, output_type="pt")
        return pipe(batch_size=len(seeds), generator=generator, **kwargs).images

    batch, alone = sample([3, 4]), sample([4])
    assert not torch.allclose(batch[0], batch[1])
    assert torch.allclose(batch[1], alone[0], atol=1e-5)


def test_exact_inversion_reconstructs_far_better_than_ddim(oracle_pipe):
    x0 = oracle_pipe.unet.sample_data(32, torch.Generator().manual_seed(1))
    errors = {}
    # Tight clusters make the exact x_T far from the image (a hard case): allow iterations until 1e-4.
    options = {"ddim": {}, "exact": {"inversion_iterations": 20, "inversion_tolerance": 1e-4}}
    for inversion in ("ddim", "exact"):
        latents = oracle_pipe.encode((x0 + 1) / 2, num_inference_steps=10, inversion=inversion, **options[inversion])
        recon = oracle_pipe.decode(latents.z_sem, latents.x_T, 10, output_type="pt").images * 2 - 1
        errors[inversion] = ((recon - x0).norm() / x0.norm()).item()
    assert errors["exact"] < errors["ddim"] / 10, errors
    assert errors["exact"] < 0.01, errors


def test_exact_inversion_calls_and_tolerance(oracle_pipe):
    x0 = oracle_pipe.unet.sample_data(4, torch.Generator().manual_seed(2))
    z_sem = oracle_pipe.encoder(x0).z_sem
    calls = []
    unet_forward = oracle_pipe.unet.forward
    with mock.patch.object(
        oracle_pipe.unet, "forward", side_effect=lambda *a, **k: calls.append(1) or unet_forward(*a, **k)
    ):
        oracle_pipe.invert(x0, z_sem, 5, inversion="exact", inversion_iterations=3)
        assert len(calls) == 15  # num_inference_steps * inversion_iterations
        calls.clear()
        oracle_pipe.invert(x0, z_sem, 5, inversion="exact", inversion_iterations=50, inversion_tolerance=1e-3)
        assert 5 < len(calls) < 250  # converged steps stop early
    for kwargs, message in [
        ({"inversion": "newton"}, "inversion must be 'ddim' or 'exact'"),
        ({"inversion": "exact", "inversion_iterations": 0}, "inversion_iterations must be an int >= 1"),
        ({"inversion": "exact", "inversion_tolerance": -1.0}, "inversion_tolerance must be a number >= 0"),
        ({"inversion": "exact", "inversion_tolerance": float("nan")}, "inversion_tolerance must be a number >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            oracle_pipe.invert(x0, z_sem, 5, **kwargs)


def test_every_pil_mode_is_read_as_it_shows(pipe, tmp_path):
    # 16-bit grayscale: half of 65535 is mid-grey, not white (Pillow's convert("RGB") clips it at 255)
    grey16 = PIL.Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16))
    grey16.save(tmp_path / "grey16.png")
    with PIL.Image.open(tmp_path / "grey16.png") as image:
        assert image.mode in ("I;16", "I")
        x = pipe.preprocess(image)
    torch.testing.assert_close(x, torch.full_like(x, 32768 / 65535 * 2 - 1))
    # transparency is composited on the pipeline's background (white by default, as the training images)
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:8, :, :] = (255, 0, 0, 255)  # opaque red top half, fully transparent bottom half
    image = PIL.Image.fromarray(rgba, "RGBA")
    x = (pipe.preprocess(image) + 1) / 2
    assert torch.equal(x[0, :, 8:], torch.ones(3, 8, 16))  # transparent: white
    red = torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 8, 16)
    assert torch.equal(x[0, :, :8], red)  # opaque: as it is
    black = DiffAEPipeline(**{**pipe.components, "image_background": 0})
    assert torch.equal((black.preprocess(image) + 1)[0, :, 8:] / 2, torch.zeros(3, 8, 16))
    palette = image.convert("P")
    palette.info["transparency"] = palette.getpixel((0, 15))
    assert torch.equal((pipe.preprocess(palette) + 1)[0, :, 8:] / 2, torch.ones(3, 8, 16))


def test_codes_outside_the_model_range_are_named_instead_of_decoding_to_nan(pipe):
    with pytest.raises(ValueError, match="non-finite pixels: z_sem or x_T is far outside the model's range"):
        pipe.decode(torch.full((1, Z), 1e30), torch.zeros(1, 3, 16, 16), num_inference_steps=2)
    with pytest.raises(ValueError, match="z_sem is empty: it must hold at least one row"):
        pipe.decode(torch.zeros(0, Z), num_inference_steps=2)
