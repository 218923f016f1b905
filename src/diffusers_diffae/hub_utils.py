"""Model cards, Hub uploads and the loader shims that let plain diffusers load DiffAE folders and repos.

- `create_model_card(pipeline_or_model, repo_id)` writes the card every upload gets: YAML metadata
  (`library_name: diffusers`, tags, licence, pipeline tag), the paper, the components and how to load them.
- `DiffAEModelHubMixin` gives the DiffAE models a `push_to_hub` (and `save_pretrained(push_to_hub=True)`) that
  uploads that card instead of diffusers' generic one. `DiffAEPipeline` does the same for the whole pipeline.
- Component shims: diffusers only resolves a third-party component class of a *Hub repo* when the repo ships
  `<component>/<module>.py` (huggingface/diffusers#6563). `write_component_shims` writes those files as one-line
  re-exports of the installed classes, and `component_shims_status` recognises them byte for byte, so that
  `DiffAEPipeline.from_pretrained` can allow exactly this code and nothing else.
"""

import json
import os
import re
import tempfile
from typing import Dict, List, Optional, Union

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
# Component shims (huggingface/diffusers#6563)
# ------------------------------------------------------------------------------------------------------------------


def component_shim_source(module: str, class_name: str) -> str:
    """The exact text of the shim `<component>/<module>.py` for a component `[module, class_name]`."""
    return (
        f'"""Loader shim written by {PIP_NAME}: re-exports the installed class (`pip install {PIP_NAME}`)."""\n'
        "\n"
        f"from {module} import {class_name}  # noqa: F401\n"
    )


def _is_own_component(module: str, class_name: str) -> bool:
    # Names are checked as identifiers because they end up in the shim's source and in import statements.
    return bool(
        re.fullmatch(rf"{PACKAGE_NAME}(\.[A-Za-z_]\w*)*", module) and re.fullmatch(r"[A-Za-z_]\w*", class_name)
    )


def _components(model_index: Dict) -> Dict[str, List[str]]:
    return {
        name: value
        for name, value in model_index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], str)
    }


def _read_model_index(folder: Union[str, os.PathLike]) -> Dict:
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        return json.load(f)


def write_component_shims(save_directory: Union[str, os.PathLike]) -> List[str]:
    """Writes `<component>/<module>.py` for every component of this package named in `model_index.json`.

    With them, `DiffusionPipeline.from_pretrained(repo_id, custom_pipeline="diffae", trust_remote_code=True)`
    passes diffusers' check that a Hub repo ships the code of each non-diffusers component. Returns the paths
    written, relative to `save_directory`.
    """
    written = []
    for name, (module, class_name) in _components(_read_model_index(save_directory)).items():
        if not _is_own_component(module, class_name):
            continue  # other libraries' components are not ours to vouch for
        relative = f"{name}/{module}.py"
        os.makedirs(os.path.join(save_directory, name), exist_ok=True)
        with open(os.path.join(save_directory, relative), "w", encoding="utf-8") as f:
            f.write(component_shim_source(module, class_name))
        written.append(relative)
    return written


def component_shims_status(folder: Union[str, os.PathLike]) -> Optional[bool]:
    """Whether the code diffusers would run for a folder's components is exactly our shims.

    diffusers executes `<folder>/<component>/<library>.py` for every component that has one. Returns `None` when
    no component has such a file, `True` when every such file is one of our shims byte for byte (so running it is
    the same as importing this package) and the pipeline class is named plainly, `False` otherwise.
    """
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        return None  # not a pipeline folder; diffusers reports that
    model_index = _read_model_index(folder)
    found = False
    for name, (module, class_name) in _components(model_index).items():
        path = os.path.join(folder, name, f"{module}.py")
        if not os.path.isfile(path):
            continue
        found = True
        if not _is_own_component(module, class_name):
            return False
        with open(path, encoding="utf-8") as f:
            if f.read() != component_shim_source(module, class_name):
                return False
    if not found:
        return None
    # A list `_class_name` makes diffusers run a pipeline file from the folder, which we do not vouch for.
    return isinstance(model_index.get("_class_name"), str)


# ------------------------------------------------------------------------------------------------------------------
# Model cards
# ------------------------------------------------------------------------------------------------------------------


def _is_pipeline(obj) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


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


def _model_body(model, repo: str, subfolder: Optional[str], model_description: Optional[str]) -> str:
    cls = type(model).__name__
    role = _ROLES.get(cls, "a Diffusion Autoencoder component")
    summary = _model_summary(model)
    where = f'"{repo}", subfolder="{subfolder}"' if subfolder else f'"{repo}"'
    description = f"\n{model_description.strip()}\n" if model_description else ""
    config = json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}, indent=2, default=str)
    return f"""
# DiffAE `{cls}`

The {role} of a [Diffusion Autoencoder]({PAPER_URL}) (Preechakul et al., CVPR 2022), as a 🧨 diffusers model
from the [`{PIP_NAME}`](https://pypi.org/project/{PIP_NAME}/) package{": " + summary if summary else ""}.
{description}
## How to load

```bash
pip install {PIP_NAME}
```

```py
from diffusers_diffae import {cls}

model = {cls}.from_pretrained({where})
```

A full pipeline is assembled from its parts with `DiffAEPipeline(unet=..., encoder=..., scheduler=...,
inverse_scheduler=...)`; see the package documentation.

## Configuration

```json
{config}
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
    pipeline_or_model,
    repo_id: Optional[str] = None,
    license: str = DEFAULT_LICENSE,
    tags: Optional[List[str]] = None,
    model_description: Optional[str] = None,
    base_model: Optional[str] = None,
    datasets: Optional[List[str]] = None,
    subfolder: Optional[str] = None,
) -> ModelCard:
    """The model card of a DiffAE pipeline or model.

    Args:
        pipeline_or_model: a `DiffAEPipeline` or one of its models.
        repo_id (`str`, *optional*): where it will live, used in the "how to load" snippets (a placeholder if
            `None`).
        license (`str`): the card's licence identifier (default "mit", the official code's licence).
        tags (`List[str]`, *optional*): tags added to the default ones (diffusers, diffae, diffusion-autoencoder, the
            paper's arXiv id).
        model_description (`str`, *optional*): a paragraph about this checkpoint (data, training), e.g. from a
            training script.
        base_model (`str`, *optional*): the repo id this checkpoint was fine-tuned from.
        datasets (`List[str]`, *optional*): Hub data sets it was trained on.
        subfolder (`str`, *optional*): for a model stored in a subfolder of `repo_id`.

    Returns:
        `huggingface_hub.ModelCard` with YAML metadata (`library_name: diffusers`, tags, licence, ...) and a body.
    """
    repo = repo_id or "path/or/repo-id"
    is_pipeline = _is_pipeline(pipeline_or_model)
    all_tags = list(DEFAULT_TAGS)
    pipeline_tag = None
    if is_pipeline:
        sampling = getattr(pipeline_or_model, "latent_denoiser", None) is not None
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
    if is_pipeline:
        body = _pipeline_body(pipeline_or_model, repo, model_description)
    else:
        body = _model_body(pipeline_or_model, repo, subfolder, model_description)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def load_or_create_model_card(
    pipeline_or_model,
    repo_id: str,
    token: Optional[Union[str, bool]] = None,
    **card_kwargs,
) -> ModelCard:
    """The card to upload to `repo_id`: its existing card with our metadata merged in, or `create_model_card`.

    An existing README is kept (its author may have edited it); only missing metadata (`library_name`, licence,
    pipeline tag) and missing default tags are added, as diffusers' own `populate_model_card` does.
    `card_kwargs` go to `create_model_card`.
    """
    fresh = create_model_card(pipeline_or_model, repo_id=repo_id, **card_kwargs)
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
    pipeline_or_model,
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
        card = model_card or load_or_create_model_card(pipeline_or_model, repo_id, token=token, **card_kwargs)
        card.save(os.path.join(folder, "README.md"))
    return upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        path_in_repo=subfolder,
        token=token,
        commit_message=commit_message or f"Upload {type(pipeline_or_model).__name__}",
        create_pr=create_pr,
    )


class DiffAEModelHubMixin:
    """`push_to_hub` for DiffAE models with the DiffAE model card (see `create_model_card`).

    Put it before `ModelMixin` in the bases so that it overrides `PushToHubMixin.push_to_hub`.
    """

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[Union[str, bool]] = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        subfolder: Optional[str] = None,
        model_card: Optional[ModelCard] = None,
        license: str = DEFAULT_LICENSE,
        tags: Optional[List[str]] = None,
        model_description: Optional[str] = None,
    ):
        """
        Uploads the model (config and safetensors weights) and its model card to the Hub.

        Args:
            repo_id (`str`): `namespace/name`, or `name` for your own namespace; created if missing.
            commit_message (`str`, *optional*): defaults to "Upload <ClassName>".
            private (`bool`, *optional*): visibility of a newly created repository.
            token (`str`, *optional*): Hub token (defaults to the stored login).
            create_pr (`bool`): open a pull request instead of committing to `main`.
            safe_serialization (`bool`): save safetensors (default) or pickle weights.
            variant (`str`, *optional*): weights variant, e.g. "fp16".
            subfolder (`str`, *optional*): upload into this folder of the repository (the card is left alone).
            model_card (`ModelCard`, *optional*): a prepared card instead of the generated one.
            license (`str`), tags (`List[str]`), model_description (`str`): passed to `create_model_card`.

        Returns:
            `huggingface_hub.CommitInfo` of the upload.
        """
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            return upload_with_model_card(
                self,
                folder,
                repo_id,
                commit_message=commit_message,
                private=private,
                token=token,
                create_pr=create_pr,
                subfolder=subfolder,
                model_card=model_card,
                license=license,
                tags=tags,
                model_description=model_description,
            )

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        is_main_process: bool = True,
        save_function=None,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size: Union[int, str] = "10GB",
        push_to_hub: bool = False,
        **kwargs,
    ):
        """`ModelMixin.save_pretrained`; with `push_to_hub=True` the folder is uploaded with the DiffAE model card.

        Hub arguments (`repo_id`, defaulting to the folder name, `commit_message`, `private`, `token`,
        `create_pr`) are taken from `kwargs` as diffusers does. The explicit arguments keep the signature that
        `DiffusionPipeline.save_pretrained` inspects to forward `safe_serialization`, `variant` and `max_shard_size`.
        """
        hub_keys = ("repo_id", "commit_message", "private", "token", "create_pr")
        hub_kwargs = {key: kwargs.pop(key) for key in hub_keys if key in kwargs}
        super().save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            save_function=save_function,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            **kwargs,
        )
        if push_to_hub and is_main_process:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            upload_with_model_card(self, save_directory, repo_id, **hub_kwargs)
