"""Saving DiffAE pipelines so that plain diffusers can load them, and loading them without running their code.

diffusers resolves a component that is neither a diffusers nor a transformers class through a file
`<component>/<module>.py` in the folder or Hub repo, and refuses a Hub repo without one
(huggingface/diffusers#6563). `save_pretrained` therefore writes one-line re-exports of the installed classes
there, and `diffae.py` for `custom_pipeline="diffae"`; only diffusers' own `trust_remote_code=True` flow runs
them. `DiffAEPipeline.from_pretrained` runs no file of the folder: it accepts only components whose classes it
knows (this package's and diffusers'), loads this package's components with their own `from_pretrained`, and
lets diffusers load the rest, unless the caller passed `trust_remote_code=True`.
"""

import json
import os
import tempfile
from typing import Dict, Optional, Union

import torch


# `custom_pipeline="diffae"` resolves to this file; it re-exports the installed class.
COMMUNITY_PIPELINE_SOURCE = '''"""Diffusion Autoencoders pipeline (community entry point).

Requires `pip install diffusers-diffae`; the classes live in that package (the pipeline's components are
DiffAE-specific models), this file only makes `custom_pipeline="diffae"` resolve to them.
"""

from diffusers_diffae import DiffAEPipeline  # noqa: F401
'''

# Loading options that only concern models; they are forwarded to this package's models.
MODEL_LOADING_OPTIONS = (
    "variant",
    "use_safetensors",
    "low_cpu_mem_usage",
    "disable_mmap",
    "device_map",
    "max_memory",
    "offload_folder",
    "offload_state_dict",
    "use_flashpack",
)
HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only", "force_download")


def component_shim_source(module: str, class_name: str) -> str:
    """The text of `<component>/<module>.py` for a component `[module, class_name]` of this package."""
    return (
        '"""Loader shim written by diffusers-diffae: re-exports the installed class (`pip install diffusers-diffae`)."""\n'
        "\n"
        f"from {module} import {class_name}  # noqa: F401\n"
    )


def own_classes() -> Dict[tuple, type]:
    """`(module, class name)` as `save_pretrained` writes them -> the class, for every class of this package."""
    from ..models import AttributeClassifier, DiffAEUNet2DModel, LatentMLPDenoiser, SemanticEncoder
    from ..schedulers import DiffAEInverseScheduler

    classes = (DiffAEUNet2DModel, SemanticEncoder, LatentMLPDenoiser, AttributeClassifier, DiffAEInverseScheduler)
    return {(cls.__module__, cls.__name__): cls for cls in classes}


def components_of(model_index: Dict) -> Dict[str, list]:
    """The component entries `name: [library, class]` of a `model_index.json` (absent optional ones excluded)."""
    return {
        name: entry
        for name, entry in model_index.items()
        if not name.startswith("_") and isinstance(entry, list) and entry and entry[0] is not None
    }


def read_model_index(folder: str) -> Dict:
    """The folder's `model_index.json` as a dict; a `ValueError` naming the file when it is missing or malformed."""
    index_file = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_file):
        raise ValueError(f"{folder} is not a pipeline folder: it has no model_index.json")
    try:
        with open(index_file, encoding="utf-8") as f:
            model_index = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index_file} is not valid JSON: {e}") from e
    if not isinstance(model_index, dict):
        raise ValueError(f"{index_file} must hold a JSON object, found {type(model_index).__name__}")
    return model_index


def check_folder(folder: str, model_index: Dict, passed: Dict, trust_remote_code: bool) -> None:
    """Refuses, before anything is loaded, a folder that would make diffusers run its code or that lacks a part.

    Without `trust_remote_code`, every component not passed in `passed` must be a class of this package or of
    diffusers, and `_class_name` a plain string (a list names a pipeline file of the folder).
    """
    import diffusers

    index_file = os.path.join(folder, "model_index.json")
    if not trust_remote_code and not isinstance(model_index.get("_class_name"), str):
        raise ValueError(
            f"{index_file}: _class_name must be a class name; a list would run a pipeline file from the folder"
        )
    known = own_classes()
    for name, entry in components_of(model_index).items():
        if name in passed:
            continue
        if len(entry) != 2 or not all(isinstance(part, str) for part in entry):
            raise ValueError(f"{index_file}: component {name!r} must be [library, class], got {entry!r}")
        if not os.path.isdir(os.path.join(folder, name)):
            raise ValueError(f"model_index.json lists the component {name!r} but {folder} has no {name}/ folder")
        library, class_name = entry
        from_diffusers = library == "diffusers" and isinstance(getattr(diffusers, class_name, None), type)
        if not (trust_remote_code or tuple(entry) in known or from_diffusers):
            raise ValueError(
                f"{index_file}: component {name!r} is {library}.{class_name}, neither a diffusers_diffae nor a "
                "diffusers class; loading it would run code from the folder. Pass trust_remote_code=True only if "
                "you trust that code"
            )


def check_variant(folder: str, variant: Optional[str]) -> None:
    """diffusers' error for a `variant` no weights file of the folder has (raised before any model loads)."""
    if variant is None:
        return
    for _, _, files in os.walk(folder):
        if any(f".{variant}." in file for file in files):
            return
    raise ValueError(
        f"You are trying to load the model files of the `variant={variant}`, but no such modeling files are available."
    )


def default_memory_format(resolution: int, dtype: torch.dtype) -> torch.memory_format:
    """The layout `from_pretrained` gives the UNet and the encoder: channels_last from 64 px up and for half
    precision at every size (oneDNN's bf16 convolutions run in NHWC; there it pays at 32 px too, see
    docs/results/speed.md), the official contiguous layout for small float32 models, which keeps their fp32 sums in
    the official order bit for bit."""
    if resolution >= 64 or dtype in (torch.float16, torch.bfloat16):
        return torch.channels_last
    return torch.contiguous_format


def load_own_components(folder: str, model_index: Dict, kwargs: Dict) -> None:
    """Loads this package's components with their own `from_pretrained` into `kwargs` (no file of the folder runs)."""
    from diffusers import ModelMixin

    if kwargs.get("quantization_config") is not None:
        raise ValueError(
            "quantization_config: quantize the DiffAE models with their own from_pretrained(..., quantization_config=) "
            "and pass them to DiffAEPipeline.from_pretrained (unet=..., encoder=...)"
        )
    dtype_key = "torch_dtype" if kwargs.get("torch_dtype") is not None else "dtype"
    dtype = kwargs.get(dtype_key)
    model_kwargs = {key: kwargs[key] for key in MODEL_LOADING_OPTIONS if kwargs.get(key) is not None}
    known = own_classes()
    for name, entry in components_of(model_index).items():
        component_cls = known.get(tuple(entry))
        if name in kwargs or component_cls is None:
            continue
        load_kwargs = {}
        if issubclass(component_cls, ModelMixin):
            load_kwargs = dict(model_kwargs)
            if component_cls._keep_in_fp32_modules and load_kwargs.get("low_cpu_mem_usage") is False:
                # diffusers keeps the float32 parts only on its low-memory path; the loaded weights are the same
                del load_kwargs["low_cpu_mem_usage"]
            component_dtype = dtype.get(name, dtype.get("default")) if isinstance(dtype, dict) else dtype
            if component_dtype is not None:
                load_kwargs[dtype_key] = component_dtype
        try:
            kwargs[name] = component_cls.from_pretrained(folder, subfolder=name, **load_kwargs)
        except (OSError, ValueError) as e:  # diffusers names the folder but not the component
            raise type(e)(f"cannot load the {name!r} component from {os.path.join(folder, name)}: {e}") from e


class DiffAELoadingMixin:
    """`save_pretrained`, `push_to_hub` and `from_pretrained` of [`DiffAEPipeline`] (see the module docstring)."""

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size: Optional[Union[int, str]] = None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        """
        Saves every component (safetensors by default), `diffae.py` and the component shims; with
        `push_to_hub=True` also uploads the folder with the DiffAE model card to `repo_id` (default: the folder
        name). `commit_message`, `private`, `token` and `create_pr` are read from `kwargs` as diffusers does.
        """
        from ..hub_utils import upload_with_model_card

        hub_kwargs = {
            key: kwargs.pop(key)
            for key in ("repo_id", "commit_message", "private", "token", "create_pr")
            if key in kwargs
        }
        super().save_pretrained(
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            **kwargs,
        )
        with open(os.path.join(save_directory, "diffae.py"), "w", encoding="utf-8") as f:
            f.write(COMMUNITY_PIPELINE_SOURCE)
        known = own_classes()
        for name, entry in components_of(read_model_index(save_directory)).items():
            if tuple(entry) in known:
                with open(os.path.join(save_directory, name, f"{entry[0]}.py"), "w", encoding="utf-8") as f:
                    f.write(component_shim_source(*entry))
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            upload_with_model_card(self, save_directory, repo_id, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[Union[str, bool]] = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        **card_kwargs,
    ):
        """Uploads the saved pipeline with the DiffAE model card (`hub_utils.create_model_card`; `card_kwargs` such
        as `license`, `tags`, `model_description` or a prepared `model_card` go there). Returns the `CommitInfo`."""
        from ..hub_utils import upload_with_model_card

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            return upload_with_model_card(
                self, folder, repo_id, commit_message=commit_message, private=private, token=token,
                create_pr=create_pr, **card_kwargs,
            )  # fmt: skip

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """
        Loads a pipeline from a folder or a Hub repo id (`namespace/name`) and runs no code from it.

        A repo id is first downloaded with `huggingface_hub.snapshot_download` (`revision`, `token`, `cache_dir`,
        `local_files_only` and `force_download` apply; offline, the cached snapshot is used), because diffusers
        cannot list third-party components of a Hub repo itself (huggingface/diffusers#6563). Model options
        (`torch_dtype`/`dtype`, `variant`, `device_map`, `low_cpu_mem_usage`, ...) reach every model (models with
        `_keep_in_fp32_modules` load on diffusers' low-memory path, which alone keeps those parts); components
        given as arguments replace the saved ones. A component of another library, or a pipeline file, is
        refused with a `ValueError` unless `trust_remote_code=True`, which hands the folder to diffusers' own
        remote-code loading.
        """
        from huggingface_hub import snapshot_download

        name = os.fspath(pretrained_model_name_or_path)
        folder = name
        if not os.path.isdir(name):
            if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name):
                raise ValueError(f"{name!r} is neither a folder nor a Hub repo id of the form 'namespace/name'")
            hub_kwargs = {key: kwargs.pop(key) for key in HUB_OPTIONS if kwargs.get(key) is not None}
            folder = snapshot_download(name, **hub_kwargs)
        model_index = read_model_index(folder)
        trusted = bool(kwargs.get("trust_remote_code"))
        check_folder(folder, model_index, kwargs, trusted)
        check_variant(folder, kwargs.get("variant"))
        if not trusted and kwargs.get("custom_pipeline") is None:
            load_own_components(folder, model_index, kwargs)
        pipe = super().from_pretrained(folder, **kwargs)
        pipe.set_memory_format(default_memory_format(pipe.resolution, pipe.unet.dtype))
        if folder != name:
            pipe.register_to_config(_name_or_path=name)  # the repo id, not the snapshot folder
        return pipe
