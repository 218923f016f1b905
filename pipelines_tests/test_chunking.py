"""Batches far larger than memory: encode, invert and decode call the networks on chunks of `chunk_size` images and
give the unchunked result."""

import pytest
import torch

from diffusers_diffae.pipelines.denoising import CHUNK_PIXELS, chunked, default_chunk_size
from tiny import Z, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


class LargestBatch:
    """Records the largest batch each module's forward receives."""

    def __init__(self, *modules):
        self.largest = {id(m): 0 for m in modules}
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, args):
        self.largest[id(module)] = max(self.largest[id(module)], args[0].shape[0])
        self.calls += 1

    def __getitem__(self, module):
        return self.largest[id(module)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_default_chunk_size_follows_the_pixel_budget():
    assert default_chunk_size(64) * 64 * 64 == CHUNK_PIXELS
    assert default_chunk_size(32) == 4 * default_chunk_size(64)
    assert default_chunk_size(4096) == 1


def test_chunked_calls_concatenate_and_pass_none_through():
    seen = []

    def fn(x, z):
        seen.append((x.shape[0], z))
        return x * 2

    x = torch.arange(7.0)[:, None]
    assert torch.equal(chunked(fn, 3, x, None), x * 2)
    assert seen == [(3, None), (3, None), (1, None)]


@pytest.mark.parametrize("inversion", ["ddim", "exact"])
def test_chunked_encode_and_decode_equal_the_unchunked_ones(pipe, inversion):
    images = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = pipe.encode(images, num_inference_steps=3, inversion=inversion)
    with LargestBatch(pipe.unet, pipe.encoder) as largest:
        parts = pipe.encode(images, num_inference_steps=3, inversion=inversion, chunk_size=3)
    assert largest[pipe.unet] == 3 and largest[pipe.encoder] == 3
    # equal up to fp32 rounding: batched convolutions may sum in another order for another batch size, and the
    # inversion amplifies that (x_T has unit scale)
    torch.testing.assert_close(parts.z_sem, whole.z_sem, atol=1e-6, rtol=0)
    torch.testing.assert_close(parts.x_T, whole.x_T, atol=1e-4, rtol=0)
    decoded = pipe.decode(whole.z_sem, whole.x_T, num_inference_steps=3, output_type="latent").images
    chunks = pipe.decode(whole.z_sem, whole.x_T, num_inference_steps=3, output_type="latent", chunk_size=2).images
    torch.testing.assert_close(chunks, decoded, atol=1e-4, rtol=0)


def test_eta_noise_is_drawn_for_the_whole_batch(pipe):
    z_sem = torch.randn(5, Z)
    outputs = [
        pipe.decode(
            z_sem,
            num_inference_steps=3,
            eta=1.0,
            output_type="latent",
            chunk_size=chunk,
            generator=[torch.Generator().manual_seed(s) for s in range(5)],
        ).images  # fmt: skip
        for chunk in (None, 2)
    ]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=0)


def test_two_thousand_images_never_reach_the_networks_at_once(pipe):
    images = torch.rand(2048, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with LargestBatch(pipe.unet, pipe.encoder) as largest:
        latents = pipe.encode(images, num_inference_steps=1, chunk_size=64)
        assert largest[pipe.unet] == 64 and largest[pipe.encoder] == 64
        assert largest.calls == 2 * 2048 // 64  # one encoder and one UNet pass per chunk
        pipe.decode(latents.z_sem, latents.x_T, num_inference_steps=1, output_type="latent")
        assert largest[pipe.unet] == default_chunk_size(16) < 2048  # the default chunks too
    assert latents.x_T.shape == (2048, 3, 16, 16) and torch.isfinite(latents.x_T).all()


def test_bad_chunk_sizes_are_refused(pipe):
    for chunk_size in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1"):
            pipe.decode(torch.randn(1, Z), num_inference_steps=1, chunk_size=chunk_size)
        with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1"):
            pipe.encode(torch.rand(1, 3, 16, 16), num_inference_steps=1, chunk_size=chunk_size)
