"""Tiny DiffAE components shared by the tests (seeded, a few thousand parameters)."""

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from diffusers_diffae import AttributeClassifier, DiffAEPipeline, DiffAEUNet2DModel, LatentMLPDenoiser, SemanticEncoder
from diffusers_diffae.presets import official_component_configs


Z = 16  # z_sem width of the tiny models

UNET = dict(
    sample_size=16,
    model_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    embed_channels=32,
    z_sem_channels=Z,
    dropout=0.0,
)
ENCODER = dict(
    sample_size=16,
    model_channels=8,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    out_channels=Z,
)
LATENT = dict(num_channels=Z, hidden_channels=32, num_layers=3)


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Fresh DiffAE models predict exactly 0 (zero-initialised output convs); perturb so outputs are informative."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model.eval()


def tiny_unet(seed: int = 0, **overrides) -> DiffAEUNet2DModel:
    torch.manual_seed(seed)
    return _perturb(DiffAEUNet2DModel(**{**UNET, **overrides}), seed)


def tiny_encoder(seed: int = 1, **overrides) -> SemanticEncoder:
    torch.manual_seed(seed)
    return _perturb(SemanticEncoder(**{**ENCODER, **overrides}), seed)


def tiny_latent(seed: int = 2) -> LatentMLPDenoiser:
    torch.manual_seed(seed)
    return _perturb(LatentMLPDenoiser(**LATENT), seed)


def tiny_classifier(seed: int = 3) -> AttributeClassifier:
    torch.manual_seed(seed)
    return AttributeClassifier(
        num_channels=Z, attribute_names=["smile", "age"], attribute_types=["binary", "continuous"]
    ).eval()


def official_schedulers():
    configs = official_component_configs({"net_latent_net_type": "skip", "net_latent_layers": 3})
    return (
        DDIMScheduler.from_config(configs["scheduler"]),
        DDIMInverseScheduler.from_config(configs["scheduler"]),
        DDIMScheduler.from_config(configs["latent_scheduler"]),
    )


def tiny_pipeline(latent: bool = True, classifier: bool = True) -> DiffAEPipeline:
    scheduler, inverse, latent_scheduler = official_schedulers()
    pipe = DiffAEPipeline(
        unet=tiny_unet(),
        encoder=tiny_encoder(),
        scheduler=scheduler,
        inverse_scheduler=inverse,
        latent_denoiser=tiny_latent() if latent else None,
        latent_scheduler=latent_scheduler if latent else None,
        classifier=tiny_classifier() if classifier else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
