"""DiffAE networks: shapes, diffusers contracts, presets, bad input."""

import json

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from peft import LoraConfig

from diffusers_diffae import DiffAEUNet2DModel, LatentMLPDenoiser, SemanticEncoder, preset_config
from diffusers_diffae.models.blocks import DiffAEAttnProcessor
from diffusers_diffae.presets import OFFICIAL_CONFIGS, official_component_configs
from tiny import ENCODER, LATENT, UNET, Z, tiny_classifier, tiny_encoder, tiny_latent, tiny_unet


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_forward_shapes_and_output_types():
    unet, encoder, latent = tiny_unet(), tiny_encoder(), tiny_latent()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = encoder(x).z_sem
    assert z.shape == (3, Z)
    assert torch.equal(encoder(x, return_dict=False)[0], z)
    eps = unet(x, torch.tensor([0, 500, 999]), z)
    assert eps.sample.shape == x.shape
    assert torch.equal(unet(x, torch.tensor([0, 500, 999]), z, return_dict=False)[0], eps.sample)
    pred = latent(torch.randn(3, Z), 10).sample
    assert pred.shape == (3, Z)


def test_timestep_forms_are_equivalent():
    unet = tiny_unet()
    x, z = torch.randn(2, 3, 16, 16), torch.randn(2, Z)
    ref = unet(x, torch.tensor([250, 250]), z).sample
    for t in (250, 250.0, torch.tensor(250), torch.tensor([250])):
        assert torch.equal(unet(x, t, z).sample, ref)
    assert not torch.allclose(unet(x, 251, z).sample, ref)  # the timestep matters


def test_z_sem_modulates_the_decoder():
    unet = tiny_unet()
    x = torch.randn(2, 3, 16, 16)
    a = unet(x, 100, torch.randn(2, Z)).sample
    b = unet(x, 100, torch.randn(2, Z)).sample
    assert (a - b).abs().max() > 1e-3


def test_save_load_round_trip_bit_identical(tmp_path):
    models = [tiny_unet(), tiny_encoder(), tiny_latent(), tiny_classifier()]
    models[1].set_z_sem_statistics(torch.randn(Z), torch.rand(Z) + 0.5)
    models[2].set_z_sem_statistics(torch.randn(1, Z), torch.rand(1, Z) + 0.5)  # official (1, D) shapes
    for model in models:
        folder = tmp_path / type(model).__name__
        model.save_pretrained(folder)
        assert (folder / "diffusion_pytorch_model.safetensors").is_file()
        loaded = type(model).from_pretrained(folder)
        original, reloaded = model.state_dict(), loaded.state_dict()
        assert original.keys() == reloaded.keys()
        for key in original:
            assert torch.equal(original[key], reloaded[key]), key

        def public(m):
            return {k: v for k, v in json.loads(m.to_json_string()).items() if not k.startswith("_")}

        assert public(loaded) == public(model)
    assert torch.equal(SemanticEncoder.from_pretrained(tmp_path / "SemanticEncoder").z_sem_std, models[1].z_sem_std)


def test_statistics_normalisation_round_trip():
    latent = tiny_latent()
    mean, std = torch.randn(Z), torch.rand(Z) + 0.5
    latent.set_z_sem_statistics(mean, std)
    z = torch.randn(4, Z)
    assert torch.allclose(latent.normalize_z_sem(z), (z - mean) / std)
    assert torch.allclose(latent.denormalize_z_sem(latent.normalize_z_sem(z)), z, atol=1e-6)
    with pytest.raises(ValueError, match="strictly positive"):
        latent.set_z_sem_statistics(mean, torch.zeros(Z))
    with pytest.raises(ValueError, match="16 entries"):
        latent.set_z_sem_statistics(torch.zeros(5), torch.ones(5))


def test_official_parameter_counts(official_dir):
    official = json.loads((official_dir / "full_config_param_counts.json").read_text())
    for name, counts in official.items():
        with torch.device("meta"):
            unet = DiffAEUNet2DModel.from_config(preset_config(name))
            encoder = SemanticEncoder.from_config(preset_config(name, "encoder"))
            latent = LatentMLPDenoiser.from_config(preset_config(name, "latent_denoiser"))
        assert n_params(unet) == counts["params_unet_without_encoder"], name
        assert n_params(encoder) == counts["params_encoder"], name
        assert n_params(unet) + n_params(encoder) == counts["params_unet_plus_encoder"], name
        assert n_params(latent) == counts["params_latent_net"], name
        assert encoder.config.out_channels == counts["style_ch"]
    # The fixture's own small config (its param_counts: model_total includes the latent net).
    fixture = json.loads((official_dir / "config.json").read_text())
    configs = official_component_configs(fixture)
    with torch.device("meta"):
        parts = [
            cls.from_config(configs[k])
            for cls, k in (
                (DiffAEUNet2DModel, "unet"),
                (SemanticEncoder, "encoder"),
                (LatentMLPDenoiser, "latent_denoiser"),
            )
        ]
    counts = fixture["param_counts"]
    assert n_params(parts[1]) == counts["encoder"]
    assert n_params(parts[2]) == counts["latent_net"]
    assert sum(map(n_params, parts)) == counts["model_total"]


def test_every_preset_builds_with_documented_sizes():
    # Paper Table 5 / official notes: UNet + encoder per architecture, and the 20-layer LSUN latent nets.
    expected = {"celeba64": 90_839_235, "ffhq64": 90_839_235, "horse128": 128_545_155, "bedroom128": 128_545_155}
    for name, total in expected.items():
        with torch.device("meta"):
            unet = DiffAEUNet2DModel.from_config(preset_config(name))
            encoder = SemanticEncoder.from_config(preset_config(name, "encoder"))
            latent = LatentMLPDenoiser.from_config(preset_config(name, "latent_denoiser"))
        assert n_params(unet) + n_params(encoder) == total, name
        assert latent.config.num_layers == (20 if name in ("horse128", "bedroom128") else 10)
    for release in OFFICIAL_CONFIGS:
        configs = official_component_configs(release)
        assert (configs["latent_denoiser"] is None) == (not release.endswith(("_latent", "_arch")))
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("ffhq1024")
    with pytest.raises(ValueError, match="no latent_denoiser"):
        preset_config("ffhq256_autoenc", "latent_denoiser")


def test_attention_runs_through_sdpa_except_half_precision_on_a_cpu(monkeypatch):
    unet = tiny_unet()
    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    assert attentions, "the tiny UNet has attention at 8x8"
    assert all(isinstance(p, DiffAEAttnProcessor) for p in unet.attn_processors.values())
    x, t, z = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.randn(2, Z)
    sdpa_calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k)
    )
    with torch.no_grad():
        out = unet(x, t, z).sample
        assert len(sdpa_calls) == len(attentions)
        unet.set_attn_processor(AttnProcessor2_0())
        assert torch.equal(unet(x, t, z).sample, out)  # fp32: diffusers' SDPA processor itself
        unet.set_attn_processor(DiffAEAttnProcessor())
        sdpa_calls.clear()
        half = unet.to(torch.bfloat16)(x.bfloat16(), t, z.bfloat16()).sample
    assert not sdpa_calls  # bf16 on a CPU: the batched matmuls
    assert (half.float() - out).abs().mean() < 0.05


def test_gradient_checkpointing_gives_same_gradients():
    unet, encoder = tiny_unet(), tiny_encoder()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])

    def grads():
        for m in (unet, encoder):
            m.zero_grad()
        loss = unet(x, t, encoder(x).z_sem).sample.square().mean()
        loss.backward()
        return [p.grad.clone() for p in list(unet.parameters()) + list(encoder.parameters())]

    reference = grads()
    unet.enable_gradient_checkpointing()
    encoder.enable_gradient_checkpointing()
    assert unet.is_gradient_checkpointing and encoder.is_gradient_checkpointing
    for a, b in zip(reference, grads()):
        assert torch.allclose(a, b, atol=1e-6)


def test_lora_adapter_trains_only_adapter_and_round_trips(tmp_path):
    unet = tiny_unet()
    x, z = torch.randn(2, 3, 16, 16), torch.randn(2, Z)
    base = unet(x, 100, z).sample
    config = LoraConfig(
        r=2, lora_alpha=2, target_modules=["conv1", "conv2", "to_q", "to_v", "z_sem_proj"], init_lora_weights=False
    )
    unet.add_adapter(config, adapter_name="style")
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = unet(x, 100, z).sample
    assert (adapted - base).abs().max() > 1e-4
    unet.save_lora_adapter(tmp_path, adapter_name="style")
    fresh = tiny_unet()
    fresh.load_lora_adapter(tmp_path, prefix=None, adapter_name="style", use_safetensors=True)
    assert torch.allclose(fresh(x, 100, z).sample, adapted, atol=1e-6)


@pytest.mark.parametrize(
    "make_call, message",
    [
        (lambda u, e: u(torch.randn(2, 4, 16, 16), 1, torch.randn(2, Z)), "4 channels but the model expects 3"),
        (lambda u, e: u(torch.randn(2, 3, 15, 16), 1, torch.randn(2, Z)), "cannot downsample"),
        (lambda u, e: u(torch.randn(2, 3, 16, 16), 1, torch.randn(2, Z + 1)), r"z_sem must have shape \(B, 16\)"),
        (lambda u, e: u(torch.randn(2, 3, 16, 16), 1, torch.randn(3, Z)), "batch size mismatch"),
        (lambda u, e: u(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]), torch.randn(2, Z)), "batch size mismatch"),
        (lambda u, e: u(torch.randn(2, 3, 16, 16), 1, None), "z_sem of shape"),
        (lambda u, e: u(torch.randint(0, 255, (2, 3, 16, 16)), 1, torch.randn(2, Z)), "floating-point"),
        (lambda u, e: u(torch.randn(3, 16, 16), 1, torch.randn(2, Z)), r"\(B, C, H, W\)"),
        (lambda u, e: e(torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)), "floating-point"),
        (lambda u, e: e(torch.randn(2, 1, 16, 16)), "1 channels but the model expects 3"),
        (lambda u, e: e(torch.randn(2, 3, 10, 10)), "multiples of 4"),
        (lambda u, e: tiny_latent()(torch.randn(2, Z + 2), 3), r"sample must have shape \(B, 16\)"),
        (lambda u, e: tiny_latent()(torch.randn(2, Z), torch.tensor([1, 2, 3])), "batch size mismatch"),
    ],
)
def test_bad_input_raises_clear_errors(make_call, message):
    with pytest.raises(ValueError, match=message):
        make_call(tiny_unet(), tiny_encoder())


def test_ddim_baseline_unet_has_no_z_sem():
    baseline = DiffAEUNet2DModel(**{**UNET, "z_sem_channels": None})
    assert not any("z_sem_proj" in n for n, _ in baseline.named_parameters())
    assert baseline(torch.randn(1, 3, 16, 16), 5).sample.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="without z_sem"):
        baseline(torch.randn(1, 3, 16, 16), 5, torch.randn(1, Z))


def test_fresh_decoder_is_zero_initialised_like_the_official_code():
    unet = DiffAEUNet2DModel(**UNET)
    out = unet(torch.randn(2, 3, 16, 16), 3, torch.randn(2, Z)).sample
    assert torch.count_nonzero(out) == 0
    latent = LatentMLPDenoiser(**LATENT)
    assert latent.layers[0].linear.weight.std() > 0  # kaiming-normal init, not zeros
    assert ENCODER["out_channels"] == Z


@pytest.mark.parametrize("with_time, with_z", [(True, True), (True, False), (False, True)])
def test_resblock_modulation_is_the_official_formula(with_time, with_z):
    """The fused AdaGN path equals the official `(h * (1 + t_s) + t_b) * (1 + z_s)` in float64, in each case."""
    from diffusers_diffae.models.blocks import DiffAEResBlock

    torch.manual_seed(0)
    block = DiffAEResBlock(8, 8, temb_channels=16, z_sem_channels=Z).double()
    h, temb, z_sem = torch.randn(2, 8, 4, 4).double(), torch.randn(2, 16).double(), torch.randn(2, Z).double()
    expected = h
    if with_time:
        scale, shift = block.time_emb_proj(torch.nn.functional.silu(temb))[:, :, None, None].chunk(2, dim=1)
        expected = expected * (1 + scale) + shift
    if with_z:
        expected = expected * (1 + block.z_sem_proj(torch.nn.functional.silu(z_sem))[:, :, None, None])
    result = block._modulate(h, temb if with_time else None, z_sem if with_z else None)
    torch.testing.assert_close(result, expected, atol=1e-12, rtol=1e-12)
