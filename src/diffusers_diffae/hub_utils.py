"""The DiffAE model card and the upload that carries it.

`create_model_card(pipe, repo_id)` writes the card a `DiffAEPipeline.push_to_hub` uploads: YAML
metadata (`library_name: diffusers`, tags, licence, pipeline tag), the paper, the components and how to load them.
The single models push with diffusers' own `ModelMixin.push_to_hub` and its card.
"""

import os
from typing import List, Optional, Union

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError


PAPER_TITLE = "Diffusion Autoencoders: Toward a Meaningful and Decodable Representation"
PAPER_URL = "https://arxiv.org/abs/2111.15640"
OFFICIAL_CODE_URL = "https://github.com/phizaz/diffae"
DEFAULT_LICENSE = "mit"  # the licence of the official code (and of this package)
DEFAULT_TAGS = ["diffusers", "diffae", "diffusion-autoencoder", "arxiv:2111.15640"]
PACKAGE_NAME = "diffusers_diffae"
PIP_NAME = "diffusers-diffae"

CITATION = """@inproceedings{preechakul2021diffusion,
  title={Diffusion Autoencoders: Toward a Meaningful and Decodable Representation},
  author={Preechakul, Konpat and Chatthee, Nattanat and Wizadwongsa, Suttisak and Suwajanakorn, Supasorn},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2022},
}"""

# What each DiffAE class is, for the card's component table.
_ROLES = {
    "DiffAEUNet2DModel": "conditional DDIM decoder: predicts the noise of x_t given t and z_sem (paper §3.1)",
    "SemanticEncoder": "semantic encoder: image in [-1, 1] -> z_sem (paper §3.2)",
    "LatentMLPDenoiser": "latent DDIM: denoises normalised z_sem, enables unconditional sampling (paper §4)",
    "AttributeClassifier": "linear heads on normalised z_sem, for `edit` and conditional sampling (paper §5.3, §5.6)",
    "DDIMInverseScheduler": "drives the stochastic encoder (DDIM inversion, paper §3.3)",
}
_SCHEDULER_ROLES = {"scheduler": "image decoding sampler", "latent_scheduler": "latent DDIM sampler"}


# ------------------------------------------------------------------------------------------------------------------
# Model cards
# ------------------------------------------------------------------------------------------------------------------


def _model_summary(model) -> str:
    config, name = model.config, type(model).__name__
    if name == "DiffAEUNet2DModel":
        z = config.get("z_sem_channels")
        cond = f"z_sem width {z}" if z else "no z_sem (DDIM baseline)"
        return f"{config['in_channels']}x{config['sample_size']}x{config['sample_size']} images, {cond}"
    if name == "SemanticEncoder":
        size = f"{config['in_channels']}x{config['sample_size']}x{config['sample_size']}"
        return f"{size} images -> z_sem width {config['out_channels']}"
    if name == "LatentMLPDenoiser":
        return f"z_sem width {config['num_channels']}, {config['num_layers']} layers of {config['hidden_channels']}"
    if name == "AttributeClassifier":
        names = list(getattr(model, "attribute_names", None) or config.get("attribute_names") or [])
        types = config.get("attribute_types") or ["binary"] * len(names)
        shown = ", ".join(f"`{n}` ({t})" for n, t in zip(names[:12], types[:12], strict=False))
        more = f", ... ({len(names)} in all)" if len(names) > 12 else ""
        return f"{len(names)} heads: {shown}{more}"
    return ""


def _pipeline_body(pipe, repo: str, model_description: Optional[str]) -> str:
    rows = []
    for name, component in pipe.components.items():
        if component is None:
            continue
        cls = type(component).__name__
        role = _SCHEDULER_ROLES.get(name) or _ROLES.get(cls, "")
        summary = _model_summary(component) if hasattr(component, "config") and cls in _ROLES else ""
        rows.append(f"| `{name}` | `{cls}` | {role}{'; ' + summary if summary else ''} |")
    usage = [
        "latents = pipe.encode(images, num_inference_steps=100)  # z_sem (B, D) and x_T (B, C, H, W)",
        "recon = pipe.decode(latents.z_sem, latents.x_T, num_inference_steps=100).images",
        "frames = pipe.interpolate(image_a, image_b, num_frames=10).images",
    ]
    if getattr(pipe, "classifier", None) is not None:
        attribute = pipe.classifier.attribute_names[0]
        usage.append(f'edited = pipe.edit(latents, attribute="{attribute}", strength=0.3).images')
    if getattr(pipe, "latent_denoiser", None) is not None:
        usage.append("samples = pipe(batch_size=4, num_inference_steps=20, latent_num_inference_steps=20).images")
    usage_block = "\n".join(usage)
    description = f"\n{model_description.strip()}\n" if model_description else ""
    return f"""
# Diffusion Autoencoder (DiffAE) pipeline

A [Diffusion Autoencoder]({PAPER_URL}) (Preechakul et al., CVPR 2022) as a 🧨 diffusers pipeline, from the
[`{PIP_NAME}`](https://pypi.org/project/{PIP_NAME}/) package. It encodes an image into a semantic code `z_sem`
and a stochastic code `x_T` and decodes them back, which gives near-exact reconstruction, interpolation and
attribute manipulation on real images.
{description}
## Components

| component | class | role |
|---|---|---|
{chr(10).join(rows)}

## How to load

```bash
pip install {PIP_NAME}
```

```py
from diffusers_diffae import DiffAEPipeline

pipe = DiffAEPipeline.from_pretrained("{repo}")
```

With plain diffusers (the package must be installed; `diffae.py` and the `*/diffusers_diffae.*.py` files in this
repository only re-export its classes):

```py
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo}", custom_pipeline="diffae", trust_remote_code=True)
```

## Usage

```py
{usage_block}
```

{_licence_and_citation()}"""


def _licence_and_citation() -> str:
    return f"""## Licence and citation

The code follows the MIT licence of the [official implementation]({OFFICIAL_CODE_URL}); weights trained on a
data set are also subject to that data set's terms (FFHQ, for instance, is CC BY-NC-SA 4.0).

```bibtex
{CITATION}
```
"""


def create_model_card(
    pipe,
    repo_id: Optional[str] = None,
    license: str = DEFAULT_LICENSE,
    tags: Optional[List[str]] = None,
    model_description: Optional[str] = None,
    base_model: Optional[str] = None,
    datasets: Optional[List[str]] = None,
) -> ModelCard:
    """The model card of a DiffAE pipeline.

    Args:
        pipe: a `DiffAEPipeline`.
        repo_id (`str`, *optional*): where it will live, used in the "how to load" snippets (a placeholder if
            `None`).
        license (`str`): the card's licence identifier (default "mit", the official code's licence).
        tags (`List[str]`, *optional*): tags added to the default ones (diffusers, diffae, diffusion-autoencoder, the
            paper's arXiv id).
        model_description (`str`, *optional*): a paragraph about this checkpoint (data, training), e.g. from a
            training script.
        base_model (`str`, *optional*): the repo id this checkpoint was fine-tuned from.
        datasets (`List[str]`, *optional*): Hub data sets it was trained on.

    Returns:
        `huggingface_hub.ModelCard` with YAML metadata (`library_name: diffusers`, tags, licence, ...) and a body.
    """
    repo = repo_id or "path/or/repo-id"
    all_tags = list(DEFAULT_TAGS)
    pipeline_tag = None
    sampling = getattr(pipe, "latent_denoiser", None) is not None
    pipeline_tag = "unconditional-image-generation" if sampling else "image-to-image"
    all_tags.append(pipeline_tag)
    for tag in tags or []:
        if tag not in all_tags:
            all_tags.append(tag)
    data = ModelCardData(
        license=license,
        library_name="diffusers",
        tags=all_tags,
        pipeline_tag=pipeline_tag,
        base_model=base_model,
        datasets=datasets,
    )
    body = _pipeline_body(pipe, repo, model_description)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def load_or_create_model_card(
    pipe,
    repo_id: str,
    token: Optional[Union[str, bool]] = None,
    **card_kwargs,
) -> ModelCard:
    """The card to upload to `repo_id`: its existing card with our metadata merged in, or `create_model_card`.

    An existing README is kept (its author may have edited it); only missing metadata (`library_name`, licence,
    pipeline tag) and missing default tags are added, as diffusers' own `populate_model_card` does.
    `card_kwargs` go to `create_model_card`.
    """
    fresh = create_model_card(pipe, repo_id=repo_id, **card_kwargs)
    try:
        card = ModelCard.load(repo_id, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError):
        return fresh
    data = card.data
    data.library_name = data.library_name or "diffusers"
    data.license = data.license or fresh.data.license
    if getattr(data, "pipeline_tag", None) is None and fresh.data.pipeline_tag is not None:
        data.pipeline_tag = fresh.data.pipeline_tag
    tags = list(data.tags or [])
    data.tags = tags + [t for t in fresh.data.tags if t not in tags]
    return card


# ------------------------------------------------------------------------------------------------------------------
# Uploads
# ------------------------------------------------------------------------------------------------------------------


def upload_with_model_card(
    pipe,
    folder: Union[str, os.PathLike],
    repo_id: str,
    commit_message: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    create_pr: bool = False,
    subfolder: Optional[str] = None,
    model_card: Optional[ModelCard] = None,
    **card_kwargs,
):
    """Creates `repo_id` if needed, writes the model card into `folder` and uploads `folder` in one commit.

    Like diffusers' `push_to_hub`, an upload into a `subfolder` leaves the repository's card alone. `model_card`
    replaces the generated card. Returns the `huggingface_hub.CommitInfo`.
    """
    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if not subfolder:
        card = model_card or load_or_create_model_card(pipe, repo_id, token=token, **card_kwargs)
        card.save(os.path.join(folder, "README.md"))
    return upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        path_in_repo=subfolder,
        token=token,
        commit_message=commit_message or f"Upload {type(pipe).__name__}",
        create_pr=create_pr,
    )
