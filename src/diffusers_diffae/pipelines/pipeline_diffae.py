"""DiffAEPipeline: encode, decode, interpolate, edit and sample with Diffusion Autoencoders.

Paper map: semantic encoder §3.2 -> `encode` (z_sem); stochastic encoder §3.3 -> `encode` (x_T, DDIM inversion);
decoder §3.1 -> `decode`; interpolation §5.2 -> `interpolate`; attribute manipulation §5.3 / Appendix G ->
`edit`; latent DDIM sampling §4 and few-shot conditional sampling §5.6 -> `sample` / `__call__`.
"""

import importlib
import inspect
import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler, DDIMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..hub_utils import DiffAEModelHubMixin, component_shims_status, upload_with_model_card, write_component_shims
from ..models import AttributeClassifier, DiffAEUNet2DModel, LatentMLPDenoiser, SemanticEncoder

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, List[PIL.Image.Image], List[np.ndarray], List[torch.Tensor]]

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers_diffae import DiffAEPipeline
        >>> pipe = DiffAEPipeline.from_pretrained("path/to/diffae-pipeline")
        >>> latents = pipe.encode(images, num_inference_steps=50)            # z_sem (B, D), x_T (B, 3, H, W)
        >>> recon = pipe.decode(latents.z_sem, latents.x_T, num_inference_steps=50).images
        >>> smiling = pipe.edit(latents, attribute="Smiling", strength=0.3).images
        >>> samples = pipe(batch_size=4, num_inference_steps=20, latent_num_inference_steps=20).images
        ```
"""

# The one-line community pipeline written next to every saved pipeline: it re-exports the installed class, so
# `DiffusionPipeline.from_pretrained(folder, custom_pipeline="diffae", trust_remote_code=True)` returns it.
COMMUNITY_PIPELINE_SOURCE = '''"""Diffusion Autoencoders pipeline (community entry point).

Requires `pip install diffusers-diffae`; the classes live in that package (the pipeline's components are
DiffAE-specific models), this file only makes `custom_pipeline="diffae"` resolve to them.
"""

from diffusers_diffae import DiffAEPipeline  # noqa: F401
'''


@dataclass
class DiffAELatents(BaseOutput):
    """
    The two-part code of Diffusion Autoencoders.

    Args:
        z_sem (`torch.Tensor` of shape `(B, D)`): semantic subcode.
        x_T (`torch.Tensor` of shape `(B, C, H, W)`, *optional*): stochastic subcode (`None` if not computed).
    """

    z_sem: torch.Tensor
    x_T: Optional[torch.Tensor] = None


def slerp(x0: torch.Tensor, x1: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of flattened noise maps (paper §5.2, official `interpolate.ipynb`).

    `theta = arccos(<x0/|x0|, x1/|x1|>)`, `x(a) = (sin((1-a) theta) x0 + sin(a theta) x1) / sin(theta)`.
    x0, x1: (B, ...); alpha: (F,). Returns (B, F, ...).
    """
    a, b = x0.flatten(1).double(), x1.flatten(1).double()
    cos = (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).clamp(-1, 1)
    theta = torch.arccos(cos)[:, None]  # (B, 1)
    alpha = alpha.double()[None, :]  # (1, F)
    sin_theta = torch.sin(theta)
    parallel = sin_theta.abs() < 1e-6  # identical directions: slerp degenerates to lerp
    w0 = torch.where(parallel, 1 - alpha, torch.sin((1 - alpha) * theta) / sin_theta.clamp_min(1e-12))
    w1 = torch.where(parallel, alpha, torch.sin(alpha * theta) / sin_theta.clamp_min(1e-12))
    out = w0[..., None] * a[:, None] + w1[..., None] * b[:, None]
    return out.reshape(x0.shape[0], alpha.shape[1], *x0.shape[1:]).to(x0.dtype)


def edit_strength_for_target(logit: torch.Tensor, w: torch.Tensor, target: float) -> torch.Tensor:
    """Per-image strength alpha such that the edited code reaches `target` (paper Appendix G, Eq. 11).

    The edit is `z_n + alpha * sqrt(D) * w / |w|`; the linear head gives `logit + alpha * sqrt(D) * |w|`, so
    `alpha = (target - logit) / (sqrt(D) * |w|)`. logit: (B,), w: (D,) or one direction per image (B, D). Returns (B,).
    """
    return (target - logit) / (math.sqrt(w.shape[-1]) * w.norm(dim=-1))


class DiffAEPipeline(DiffusionPipeline):
    r"""
    Diffusion Autoencoders (Preechakul et al., CVPR 2022): a semantic encoder and a conditional DDIM decoder.

    Args:
        unet ([`DiffAEUNet2DModel`]): the conditional noise predictor (decoder).
        encoder ([`SemanticEncoder`]): image -> z_sem.
        scheduler ([`SchedulerMixin`]): the decoding sampler; the official sampler is a `DDIMScheduler` with
            "leading" spacing, offset 0, `set_alpha_to_one=True` and x0 clipped to [-1, 1]. Any diffusers scheduler
            (DPM-Solver++, UniPC, Euler, DDPM, ...) can be swapped in with `from_config`.
        inverse_scheduler ([`DDIMInverseScheduler`]): drives the stochastic encoder (DDIM inversion).
        latent_denoiser ([`LatentMLPDenoiser`], *optional*): the latent DDIM network, needed by `sample`.
        latent_scheduler ([`SchedulerMixin`], *optional*): the latent DDIM sampler (official: constant 0.008 betas).
        classifier ([`AttributeClassifier`], *optional*): linear attribute heads on normalised z_sem, for `edit`
            and conditional `sample`.
    """

    model_cpu_offload_seq = "encoder->unet"
    _optional_components = ["latent_denoiser", "latent_scheduler", "classifier"]
    _callback_tensor_inputs = ["latents", "z_sem"]

    def __init__(
        self,
        unet: DiffAEUNet2DModel,
        encoder: SemanticEncoder,
        scheduler: SchedulerMixin,
        inverse_scheduler: DDIMInverseScheduler,
        latent_denoiser: Optional[LatentMLPDenoiser] = None,
        latent_scheduler: Optional[SchedulerMixin] = None,
        classifier: Optional[AttributeClassifier] = None,
    ):
        super().__init__()
        self.register_modules(
            unet=unet,
            encoder=encoder,
            scheduler=scheduler,
            inverse_scheduler=inverse_scheduler,
            latent_denoiser=latent_denoiser,
            latent_scheduler=latent_scheduler,
            classifier=classifier,
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False, do_normalize=True)
        # The fastest numerically safe layout is the default (docs/results/speed.md): channels_last pays from 64 px
        # up (1.08x for 64 px encode+decode, 1.29x for a 256 px UNet call on CPU); at 32 px it is no faster, so
        # small models keep the official layout, and with it bit-for-bit the official summation order.
        self.set_memory_format(torch.channels_last if self.resolution >= 64 else torch.contiguous_format)

    def set_memory_format(self, memory_format: torch.memory_format = torch.channels_last) -> "DiffAEPipeline":
        r"""
        Lays out the 4-D weights of the UNet and the encoder (in place) in `memory_format`; the activations follow.

        `torch.channels_last` is the default from 64 px up: it is still fp32 arithmetic (only the order of summation
        changes), 1.1-1.3x faster on CPU at 64-256 px, and it moves decoded pixels by at most ~2e-4 on the official
        fixture model (see `docs/results/speed.md` and `pipelines_tests/test_pipeline.py::
        test_fast_default_layout_stays_within_fp32_tolerance`). `torch.contiguous_format` is the official code's
        layout (the default below 64 px, where channels_last gains nothing). bf16 is *not* offered as a default: it
        moves a DDIM decode by up to 1.5 (pixel range 2).
        """
        if memory_format not in (torch.channels_last, torch.contiguous_format):
            raise ValueError(f"memory_format must be torch.channels_last or torch.contiguous_format, got {memory_format}")
        for model in (self.unet, self.encoder):
            if isinstance(model, torch.nn.Module):
                model.to(memory_format=memory_format)
        return self

    # ------------------------------------------------------------------------------------------------------------
    # Construction, saving and loading
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_official_configs(cls, configs: Dict, unet, encoder, latent_denoiser=None, classifier=None):
        """Builds the pipeline with schedulers configured like the official samplers (see `presets.py`)."""
        latent_scheduler = None
        if latent_denoiser is not None:
            latent_scheduler = DDIMScheduler.from_config(configs["latent_scheduler"])
        return cls(
            unet=unet,
            encoder=encoder,
            scheduler=DDIMScheduler.from_config(configs["scheduler"]),
            inverse_scheduler=DDIMInverseScheduler.from_config(configs["scheduler"]),
            latent_denoiser=latent_denoiser,
            latent_scheduler=latent_scheduler,
            classifier=classifier,
        )

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
        Saves every component (safetensors) and the files that let plain diffusers load the folder.

        The models keep their z_sem statistics in their state dicts and the classifier its attribute names and
        types in its config, so all of them round-trip. Beside `model_index.json` and the component folders this
        writes `diffae.py` (the community entry point: `custom_pipeline="diffae"`) and, for each DiffAE component,
        `<component>/<module>.py`, a one-line re-export that diffusers requires of third-party components in a Hub
        repo (huggingface/diffusers#6563).

        Args:
            save_directory (`str` or `os.PathLike`): the folder (created if missing).
            safe_serialization (`bool`): safetensors (default) or pickle weights.
            variant (`str`, *optional*): weights variant, e.g. "fp16".
            max_shard_size (`int` or `str`, *optional*): shard large weights.
            push_to_hub (`bool`): also upload the folder, with the DiffAE model card, to the Hub repo `repo_id`
                (default: the folder name); `commit_message`, `private`, `token` and `create_pr` are read from
                `kwargs` as diffusers does.
        """
        hub_keys = ("repo_id", "commit_message", "private", "token", "create_pr")
        hub_kwargs = {key: kwargs.pop(key) for key in hub_keys if key in kwargs}
        super().save_pretrained(
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            **kwargs,
        )
        with open(os.path.join(save_directory, "diffae.py"), "w", encoding="utf-8") as f:
            f.write(COMMUNITY_PIPELINE_SOURCE)
        write_component_shims(save_directory)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            upload_with_model_card(self, save_directory, repo_id, **hub_kwargs)

    # Same upload as the models': save_pretrained into a temporary folder, then one commit with the DiffAE card.
    push_to_hub = DiffAEModelHubMixin.push_to_hub

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """
        Loads a pipeline saved with `save_pretrained`, from a folder or a Hub repo id (`namespace/name`).

        diffusers cannot resolve third-party component classes when it lists a Hub repo itself
        (huggingface/diffusers#6563), so a repo id is first downloaded with `huggingface_hub.snapshot_download`
        (`revision`, `token`, `cache_dir`, `local_files_only` and `force_download` apply; offline, the cached
        snapshot is used) and then loaded as a folder. Every other argument goes to
        `DiffusionPipeline.from_pretrained` (`dtype`, `variant`, components to replace, ...).

        diffusers would run the loader shims `<component>/<module>.py` that `save_pretrained` writes, and only with
        `trust_remote_code=True`. When every such file is byte for byte one of our shims, this method loads those
        components itself with their `from_pretrained` (no code from the folder runs, nothing is written to
        `HF_MODULES_CACHE`, `DIFFUSERS_DISABLE_REMOTE_CODE` does not matter). Options only diffusers' own loader
        handles (`device_map`, `max_memory`, `offload_*`, `quantization_config`, `use_flashpack`) let diffusers run
        the verified shims instead, which is the same as importing this package. Any other code in the folder
        still needs the caller's `trust_remote_code=True`.
        """
        from diffusers.utils import dynamic_modules_utils
        from huggingface_hub import snapshot_download

        name = os.fspath(pretrained_model_name_or_path)
        path = name
        if not os.path.isdir(name):
            if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name):
                raise ValueError(f"{name!r} is neither a folder nor a Hub repo id of the form 'namespace/name'")
            hub_keys = ("revision", "token", "cache_dir", "local_files_only", "force_download")
            path = snapshot_download(name, **{key: kwargs.pop(key) for key in hub_keys if kwargs.get(key) is not None})

        cls._check_folder(path, kwargs)
        trusted = kwargs.get("trust_remote_code")
        if component_shims_status(path) and kwargs.get("custom_pipeline") is None and not trusted:
            # Options that only diffusers' own component loader implements.
            loader_options = ("device_map", "max_memory", "offload_folder", "offload_state_dict")
            loader_options += ("quantization_config", "use_flashpack")
            diffusers_only = sorted(key for key in loader_options if kwargs.get(key))
            if not diffusers_only:
                kwargs.pop("trust_remote_code", None)
                cls._load_shimmed_components(path, kwargs)
            elif trusted is False or dynamic_modules_utils.DIFFUSERS_DISABLE_REMOTE_CODE:
                raise ValueError(
                    f"{', '.join(diffusers_only)} need diffusers' own component loading, which runs the loader shims "
                    f"in {path} (they only import diffusers_diffae); allow them with trust_remote_code=True, or load "
                    "without these options"
                )
            else:
                kwargs["trust_remote_code"] = True  # runs exactly our verified shims, see the docstring
        pipe = super().from_pretrained(path, **kwargs)
        if path != name:
            pipe.register_to_config(_name_or_path=name)  # the repo id, not the snapshot folder
        return pipe

    @staticmethod
    def _check_folder(folder: str, kwargs: Dict) -> None:
        """Names a broken pipeline folder's problem; diffusers' own errors name neither the file nor the component."""
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
        for name, entry in model_index.items():
            if name.startswith("_") or not isinstance(entry, list) or not entry or entry[0] is None or name in kwargs:
                continue
            if not os.path.isdir(os.path.join(folder, name)):
                raise ValueError(f"model_index.json lists the component {name!r} but {folder} has no {name}/ folder")

    @staticmethod
    def _load_shimmed_components(folder: str, kwargs: Dict) -> None:
        """Loads the components that have a loader shim with their own `from_pretrained`, into `kwargs`."""
        from diffusers import ModelMixin

        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
            model_index = json.load(f)
        # Forward the dtype under the name the caller used: `torch_dtype` (older diffusers) or `dtype`.
        dtype_key = "torch_dtype" if kwargs.get("torch_dtype") is not None else "dtype"
        dtype = kwargs.get(dtype_key)
        load_keys = ("variant", "use_safetensors", "low_cpu_mem_usage", "disable_mmap")
        load_kwargs = {key: kwargs[key] for key in load_keys if key in kwargs}
        for name, entry in model_index.items():
            if name.startswith("_") or not isinstance(entry, list) or entry[0] is None or name in kwargs:
                continue
            module, class_name = entry
            if not os.path.isfile(os.path.join(folder, name, f"{module}.py")):
                continue
            # component_shims_status checked that `module` is a module of this package.
            model_cls = getattr(importlib.import_module(module), class_name, None)
            if not (isinstance(model_cls, type) and issubclass(model_cls, ModelMixin)):
                raise ValueError(f"{name}: {module}.{class_name} in model_index.json is not a diffusers_diffae model")
            component_dtype = dtype.get(name, dtype.get("default")) if isinstance(dtype, dict) else dtype
            if component_dtype is not None:
                load_kwargs[dtype_key] = component_dtype
            else:
                load_kwargs.pop(dtype_key, None)
            try:
                kwargs[name] = model_cls.from_pretrained(folder, subfolder=name, **load_kwargs)
            except (OSError, ValueError) as e:  # diffusers names the folder but not the component
                kind = ValueError if isinstance(e, ValueError) else OSError
                raise kind(f"cannot load the {name!r} component from {os.path.join(folder, name)}: {e}") from e

    # ------------------------------------------------------------------------------------------------------------
    # Input handling
    # ------------------------------------------------------------------------------------------------------------

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size

    def _check_steps(self, num_inference_steps: int, scheduler) -> None:
        limit = scheduler.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise ValueError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
        if not 1 <= num_inference_steps <= limit:
            raise ValueError(f"num_inference_steps must be between 1 and {limit} (training steps), got {num_inference_steps}")

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images -> (B, C, H, W) float tensor in [-1, 1] at the model resolution.

        Accepts PIL images, numpy arrays (H, W, C) / (B, H, W, C) and tensors (C, H, W) / (B, C, H, W) with values
        in [0, 1] (diffusers' image processor conventions), or lists of these. Like the official preprocessing
        (`Resize(size)` + `CenterCrop(size)`), the shorter side is resized to the model resolution with bilinear
        (antialiased) interpolation and the centre is cropped.
        """
        items = images if isinstance(images, (list, tuple)) else [images]
        if len(items) == 0:
            raise ValueError("no images given")
        batches = [self._to_unit_tensor(item) for item in items]
        if len({tuple(b.shape[1:]) for b in batches}) > 1:
            batches = [self._resize_center_crop(b) for b in batches]
        x = torch.cat(batches)
        channels = self.unet.config.in_channels
        if x.shape[1] != channels:
            raise ValueError(f"images have {x.shape[1]} channels but the model expects {channels}")
        return self._resize_center_crop(x) * 2 - 1

    def _to_unit_tensor(self, image) -> torch.Tensor:
        if isinstance(image, PIL.Image.Image):
            rgb = image.convert("RGB") if self.unet.config.in_channels == 3 else image.convert("L")
            array = np.asarray(rgb, dtype=np.float32) / 255.0
            return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]
        if isinstance(image, np.ndarray):
            if not np.issubdtype(image.dtype, np.floating):
                raise ValueError(
                    f"numpy images must be floats in [0, 1] (diffusers convention), got dtype {image.dtype}; "
                    "convert uint8 arrays with `array / 255` or pass PIL images"
                )
            if image.ndim == 3:
                image = image[None]
            if image.ndim != 4:
                raise ValueError(f"numpy images must have shape (H, W, C) or (B, H, W, C), got {image.shape}")
            tensor = torch.from_numpy(np.ascontiguousarray(image)).float()
            if tensor.shape[-1] not in (1, 3, 4) and tensor.shape[1] in (1, 3, 4):
                tensor = tensor.permute(0, 2, 3, 1)  # a (B, C, H, W) array
            tensor = tensor.permute(0, 3, 1, 2)
        elif isinstance(image, torch.Tensor):
            if not image.is_floating_point():
                raise ValueError(f"image tensors must be floating point in [0, 1], got dtype {image.dtype}")
            tensor = image[None] if image.ndim == 3 else image
            if tensor.ndim != 4:
                raise ValueError(f"image tensors must have shape (C, H, W) or (B, C, H, W), got {tuple(image.shape)}")
            tensor = tensor.detach().float().cpu()
        else:
            raise ValueError(f"unsupported image type {type(image).__name__}; pass PIL images, arrays or tensors")
        if tensor.numel() == 0 or min(tensor.shape[-2:]) < 1:
            raise ValueError(f"images have an unusable size {tuple(tensor.shape[-2:])}")
        if not torch.isfinite(tensor).all():
            raise ValueError("images contain NaN or infinite values")
        lo, hi = tensor.min().item(), tensor.max().item()
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"image values must lie in [0, 1] (diffusers convention), got range [{lo:.3g}, {hi:.3g}]; "
                "for [-1, 1] data pass `(x + 1) / 2`"
            )
        return tensor

    def _resize_center_crop(self, x: torch.Tensor) -> torch.Tensor:
        size = self.resolution
        h, w = x.shape[-2:]
        if (h, w) == (size, size):
            return x
        if min(h, w) != size:  # torchvision Resize(int): shorter side to `size`, aspect ratio kept
            scale = size / min(h, w)
            new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=scale < 1, align_corners=False)
            h, w = new_h, new_w
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        return x[..., top : top + size, left : left + size]

    def _check_latents(self, z_sem: torch.Tensor, x_T: Optional[torch.Tensor]) -> None:
        width = self.encoder.config.out_channels
        if not isinstance(z_sem, torch.Tensor) or z_sem.ndim != 2 or z_sem.shape[1] != width:
            shape = tuple(z_sem.shape) if isinstance(z_sem, torch.Tensor) else type(z_sem).__name__
            raise ValueError(f"z_sem must have shape (B, {width}), got {shape}")
        self._check_values("z_sem", z_sem)
        if x_T is None:
            return
        expected = (self.unet.config.in_channels, self.resolution, self.resolution)
        if not isinstance(x_T, torch.Tensor) or x_T.ndim != 4 or tuple(x_T.shape[1:]) != expected:
            shape = tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__
            raise ValueError(f"x_T must have shape (B, {', '.join(map(str, expected))}), got {shape}")
        if x_T.shape[0] != z_sem.shape[0]:
            raise ValueError(f"batch size mismatch: z_sem has {z_sem.shape[0]} rows, x_T has {x_T.shape[0]}")
        self._check_values("x_T", x_T)

    @staticmethod
    def _check_values(name: str, tensor: torch.Tensor) -> None:
        # A NaN code would decode silently into garbage (and a uint8 cast warning), an integer one is a mix-up.
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains NaN or infinite values")

    @staticmethod
    def _check_eta(eta: float) -> None:
        # DDIM's sigma_t = eta * sqrt(posterior variance); above 1 the direction term's square root goes negative.
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:
            raise ValueError(f"eta must be a number in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}")

    def _as_latents(self, images_or_latents, num_inference_steps: int) -> DiffAELatents:
        if isinstance(images_or_latents, DiffAELatents):
            if images_or_latents.x_T is None:
                raise ValueError("these latents have no x_T; encode with stochastic=True")
            return images_or_latents
        return self.encode(images_or_latents, num_inference_steps=num_inference_steps)

    @staticmethod
    def _step_kwargs(scheduler, generator, eta: float) -> Dict:
        params = set(inspect.signature(scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "use_clipped_model_output" in params:
            kwargs["use_clipped_model_output"] = True  # official DDIM re-derives eps from the clipped x0
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    # ------------------------------------------------------------------------------------------------------------
    # Encoding (paper §3.2, §3.3)
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(
        self,
        images: ImageInput,
        num_inference_steps: int = 100,
        stochastic: bool = True,
        return_dict: bool = True,
    ) -> Union[DiffAELatents, tuple]:
        r"""
        Encodes images into the semantic code z_sem and, with `stochastic=True`, the stochastic code x_T.

        Args:
            images: PIL image(s), numpy array(s) or tensor(s) with values in [0, 1] (see [`~DiffAEPipeline.preprocess`]).
            num_inference_steps (`int`): DDIM inversion steps (the official notebooks use 250).
            stochastic (`bool`): also run the stochastic encoder (DDIM inversion conditioned on z_sem).

        Returns:
            [`DiffAELatents`] with `z_sem` (B, D) and `x_T` (B, C, H, W) (or `None`), or a tuple.
        """
        device, dtype = self._execution_device, self.unet.dtype
        x0 = self.preprocess(images).to(device=device, dtype=self.encoder.dtype)
        z_sem = self.encoder(x0).z_sem.to(dtype)
        x_T = self.invert(x0.to(dtype), z_sem, num_inference_steps) if stochastic else None
        if not return_dict:
            return (z_sem, x_T)
        return DiffAELatents(z_sem=z_sem, x_T=x_T)

    @torch.no_grad()
    def invert(self, x0: torch.Tensor, z_sem: torch.Tensor, num_inference_steps: int = 100) -> torch.Tensor:
        r"""
        The stochastic encoder (paper Eq. 8): DDIM run backwards from `x0` (B, C, H, W) in [-1, 1], conditioned on
        z_sem (B, D). Returns x_T (B, C, H, W). Reproduces the official `ddim_reverse_sample_loop`: the model is
        evaluated at the current level t_i (first at t=0 on the clean image), x0 is clipped to [-1, 1] and eps
        re-derived from it, and the last step goes to alpha_bar = 0, so x_T is the re-derived eps at the last level.
        """
        self._check_steps(num_inference_steps, self.inverse_scheduler)
        self._check_latents(z_sem, x0)
        scheduler = self.inverse_scheduler
        scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        timesteps = scheduler.timesteps
        x = x0
        for i, t in enumerate(self.progress_bar(timesteps)):
            eps = self.unet(x, t, z_sem).sample
            if scheduler.config.clip_sample:
                # DDIMInverseScheduler clips x0 but keeps the raw eps; the official code re-derives eps from the
                # clipped x0, so hand the scheduler that eps (its own clip is then a no-op).
                eps = self._eps_from_clipped_x0(x, eps, t, scheduler)
            if i + 1 < len(timesteps):
                # DDIMInverseScheduler.step(eps, target, x) moves x from level `target - T/N` (= t here) to `target`.
                x = scheduler.step(eps, timesteps[i + 1], x).prev_sample
            else:
                # The official last step goes to alpha_bar = 0, which the stock scheduler cannot express:
                # x_T = sqrt(0) * x0 + sqrt(1 - 0) * eps.
                x = eps
        return x

    @staticmethod
    def _eps_from_clipped_x0(x, eps, t, scheduler) -> torch.Tensor:
        # Arranged as the official `p_mean_variance` (x0 = sqrt(1/a) x - sqrt(1/a - 1) eps, then
        # eps = (sqrt(1/a) x - x0) / sqrt(1/a - 1), coefficients in float64 cast to float32): at t = 0,
        # sqrt(1/a - 1) = 0.01 amplifies any other arrangement's rounding 100-fold.
        alpha_bar = torch.cumprod(1 - scheduler.betas.double(), dim=0)[int(t)]
        recip = torch.sqrt(1 / alpha_bar).float().to(x.device)
        recip_m1 = torch.sqrt(1 / alpha_bar - 1).float().to(x.device)
        limit = scheduler.config.clip_sample_range
        x32, eps32 = x.float(), eps.float()
        x0 = (recip * x32 - recip_m1 * eps32).clamp(-limit, limit)
        return ((recip * x32 - x0) / recip_m1).to(eps.dtype)

    # ------------------------------------------------------------------------------------------------------------
    # Decoding (paper §3.1)
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def denoise(
        self,
        z_sem: torch.Tensor,
        x_T: Optional[torch.Tensor] = None,
        num_inference_steps: int = 100,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        eta: float = 0.0,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> torch.Tensor:
        """Runs the conditional sampler from x_T (fresh noise when `None`); returns x_0 (B, C, H, W) in [-1, 1]."""
        self._check_steps(num_inference_steps, self.scheduler)
        self._check_latents(z_sem, x_T)
        self._check_eta(eta)
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be a subset of {self._callback_tensor_inputs}")
        device, dtype = self._execution_device, self.unet.dtype
        z_sem = z_sem.to(device=device, dtype=dtype)
        batch_size = z_sem.shape[0]
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
        if x_T is None:
            shape = (batch_size, self.unet.config.in_channels, self.resolution, self.resolution)
            x_T = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = x_T.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = self._step_kwargs(self.scheduler, generator, eta)
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            eps = self.unet(model_input, t, z_sem).sample
            latents = self.scheduler.step(eps, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                local = {"latents": latents, "z_sem": z_sem}
                outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                latents = outputs.pop("latents", latents)
                z_sem = outputs.pop("z_sem", z_sem)
        return latents

    def _postprocess(self, x: torch.Tensor, output_type: str):
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        return self.image_processor.postprocess(x.float(), output_type=output_type)

    @torch.no_grad()
    def decode(
        self,
        z_sem: torch.Tensor,
        x_T: Optional[torch.Tensor] = None,
        num_inference_steps: int = 100,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Decodes `(z_sem, x_T)` into images.

        Args:
            z_sem (`torch.Tensor` of shape `(B, D)`): semantic codes.
            x_T (`torch.Tensor` of shape `(B, C, H, W)`, *optional*): stochastic codes; fresh Gaussian noise when
                `None`, which gives the stochastic variations of the paper's Figure 3.
            num_inference_steps (`int`): sampler steps (official notebooks: 20 to reconstruct, 100 to edit).
            generator: `torch.Generator` (or one per image) for the noise.
            eta (`float`): DDIM eta (0 = deterministic, as the paper).
            output_type (`str`): `"pil"`, `"np"` (B, H, W, C) in [0, 1], or `"pt"` (B, C, H, W) in [0, 1].
            callback_on_step_end: `fn(pipe, step, timestep, tensors) -> dict`, called after each step.

        Returns:
            [`~diffusers.ImagePipelineOutput`] or `(images,)`.
        """
        x0 = self.denoise(
            z_sem, x_T, num_inference_steps, generator, eta, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        images = self._postprocess(x0, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # ------------------------------------------------------------------------------------------------------------
    # Interpolation (paper §5.2)
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def interpolate(
        self,
        a: Union[ImageInput, DiffAELatents],
        b: Union[ImageInput, DiffAELatents],
        num_frames: int = 10,
        num_inference_steps: int = 20,
        encode_num_inference_steps: int = 100,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Interpolates between two images (or their latents): lerp on z_sem, slerp on x_T, `alpha = linspace(0, 1)`.

        Args:
            a, b: images or [`DiffAELatents`] with the same batch size B.
            num_frames (`int`): frames per pair, endpoints included.
            num_inference_steps (`int`): decoding steps (official notebook: 20).
            encode_num_inference_steps (`int`): inversion steps when images are given.

        Returns:
            [`~diffusers.ImagePipelineOutput`] with B * num_frames images, pair after pair.
        """
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 2:
            raise ValueError(f"num_frames must be an int >= 2, got {num_frames!r}")
        la = self._as_latents(a, encode_num_inference_steps)
        lb = self._as_latents(b, encode_num_inference_steps)
        if la.z_sem.shape != lb.z_sem.shape:
            raise ValueError(f"batch size mismatch: a has {la.z_sem.shape[0]} items, b has {lb.z_sem.shape[0]}")
        alpha = torch.linspace(0, 1, num_frames, device=la.z_sem.device)
        z = torch.lerp(la.z_sem[:, None], lb.z_sem[:, None], alpha[None, :, None].to(la.z_sem.dtype))
        x_T = slerp(la.x_T, lb.x_T, alpha)
        return self.decode(
            z.flatten(0, 1), x_T.flatten(0, 1), num_inference_steps, output_type=output_type, return_dict=return_dict
        )

    # ------------------------------------------------------------------------------------------------------------
    # Attribute manipulation (paper §5.3, Appendix G)
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def edit(
        self,
        images_or_latents: Union[ImageInput, DiffAELatents],
        attribute: Optional[Union[str, int]] = None,
        strength: Union[float, torch.Tensor] = 0.3,
        direction: Optional[torch.Tensor] = None,
        target_logit: Optional[float] = None,
        target_probability: Optional[float] = None,
        num_inference_steps: int = 100,
        encode_num_inference_steps: int = 100,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Moves normalised z_sem along an attribute direction and decodes with the image's own x_T:
        `z_n' = z_n + strength * sqrt(D) * w / |w|` (official manipulation; the notebook uses strength 0.3).

        Args:
            images_or_latents: images, or [`DiffAELatents`] from `encode`.
            attribute (`str` or `int`): an output of `classifier` (binary logit or continuous regression head).
            strength (`float` or `(B,)` tensor): alpha; negative values move away from the attribute.
            direction (`torch.Tensor` of shape `(D,)` or `(B, D)`, *optional*): a raw direction in normalised z_sem
                space (or one per image), used instead of a classifier head (normalised with the classifier's
                statistics if there is a classifier, else with the encoder's).
            target_logit (`float`, *optional*): instead of `strength`, pick a per-image alpha so that every edited
                code reaches this head output (Eq. 11); for continuous heads it is the target value.
            target_probability (`float`, *optional*): the same as a probability for binary heads.

        Returns:
            [`~diffusers.ImagePipelineOutput`] with one edited image per input.
        """
        if target_logit is None and target_probability is None:  # checked before encoding, the expensive part
            if isinstance(strength, bool) or not isinstance(strength, (numbers.Real, torch.Tensor)):
                raise ValueError(f"strength must be a number or a (B,) tensor, got {type(strength).__name__}")
            if not torch.isfinite(torch.as_tensor(strength, dtype=torch.float32)).all():
                raise ValueError(f"strength must be finite, got {strength}")
        latents = self._as_latents(images_or_latents, encode_num_inference_steps)
        z_sem = latents.z_sem
        if direction is None:
            if self.classifier is None:
                raise ValueError("edit needs a classifier component (with an attribute name) or a direction vector")
            if attribute is None:
                raise ValueError(f"name the attribute to edit; the classifier knows: {', '.join(self.classifier.attribute_names)}")
            index = self.classifier.attribute_index(attribute)
            stats, w = self.classifier, self.classifier.linear.weight[index]
            bias = self.classifier.linear.bias[index]
        else:
            direction = torch.as_tensor(direction)
            if direction.shape not in ((z_sem.shape[1],), tuple(z_sem.shape)):
                raise ValueError(
                    f"direction must have shape ({z_sem.shape[1]},) or one row per image {tuple(z_sem.shape)}, "
                    f"got {tuple(direction.shape)}"
                )
            if not torch.isfinite(direction).all() or (direction.norm(dim=-1) == 0).any():
                raise ValueError("direction must be a finite, non-zero vector (every row, for one per image)")
            stats, w, bias = (self.classifier or self.encoder), direction, torch.zeros(())
        w = w.to(device=z_sem.device, dtype=torch.float32)
        z_n = stats.normalize_z_sem(z_sem.float())

        if target_probability is not None:
            if target_logit is not None:
                raise ValueError("pass either target_logit or target_probability, not both")
            if direction is None and self.classifier.attribute_type(attribute) != "binary":
                raise ValueError("target_probability needs a binary attribute; use target_logit for continuous heads")
            if not 0 < target_probability < 1:
                raise ValueError(f"target_probability must be in (0, 1), got {target_probability}")
            target_logit = math.log(target_probability / (1 - target_probability))
        if target_logit is not None:
            if not math.isfinite(float(target_logit)):
                raise ValueError(f"target_logit must be finite, got {target_logit}")
            logit = (z_n * w).sum(-1) + bias.to(w.device).float()
            alpha = edit_strength_for_target(logit, w, float(target_logit))
        else:
            alpha = torch.as_tensor(strength, dtype=torch.float32, device=z_sem.device).reshape(-1)
            if alpha.numel() not in (1, z_sem.shape[0]):
                raise ValueError(f"strength must be a number or have one value per image ({z_sem.shape[0]})")
        z_n = z_n + alpha[:, None] * math.sqrt(w.shape[-1]) * w / w.norm(dim=-1, keepdim=True)
        edited = stats.denormalize_z_sem(z_n).to(z_sem.dtype)
        return self.decode(edited, latents.x_T, num_inference_steps, output_type=output_type, return_dict=return_dict)

    # ------------------------------------------------------------------------------------------------------------
    # Sampling (paper §4, §5.6)
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_z_sem(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 20,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        z_noise: Optional[torch.Tensor] = None,
        return_normalized: bool = False,
    ) -> torch.Tensor:
        r"""
        Samples semantic codes with the latent DDIM: DDIM on normalised z_sem from `z_noise` (B, D) (fresh Gaussian
        noise when `None`), then de-normalised with the latent denoiser's statistics. Returns (B, D) z_sem, or the
        normalised codes with `return_normalized=True`.
        """
        if self.latent_denoiser is None or self.latent_scheduler is None:
            raise ValueError("sampling needs the latent_denoiser and latent_scheduler components (a *_latent model)")
        self._check_steps(num_inference_steps, self.latent_scheduler)
        device, dtype = self._execution_device, self.latent_denoiser.dtype
        width = self.latent_denoiser.config.num_channels
        if z_noise is None:
            z_noise = randn_tensor((batch_size, width), generator=generator, device=device, dtype=dtype)
        else:
            if not isinstance(z_noise, torch.Tensor) or z_noise.ndim != 2 or z_noise.shape[1] != width:
                shape = tuple(z_noise.shape) if isinstance(z_noise, torch.Tensor) else type(z_noise).__name__
                raise ValueError(f"z_noise must have shape (B, {width}), got {shape}")
            self._check_values("z_noise", z_noise)
        z = z_noise.to(device=device, dtype=dtype) * self.latent_scheduler.init_noise_sigma
        self.latent_scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = self._step_kwargs(self.latent_scheduler, generator, 0.0)
        for t in self.progress_bar(self.latent_scheduler.timesteps):
            eps = self.latent_denoiser(self.latent_scheduler.scale_model_input(z, t), t).sample
            z = self.latent_scheduler.step(eps, t, z, **step_kwargs).prev_sample
        return z if return_normalized else self.latent_denoiser.denormalize_z_sem(z)

    @torch.no_grad()
    def sample_z_sem_with_attribute(
        self,
        batch_size: int,
        attribute: Union[str, int],
        min_probability: float = 0.5,
        num_inference_steps: int = 20,
        generator: Optional[torch.Generator] = None,
        max_candidates: Optional[int] = None,
    ) -> torch.Tensor:
        r"""
        Conditional sampling by rejection (paper §5.6, following D2C): draw z_sem from the latent DDIM, reject
        candidates whose classifier probability p is below `min_probability` (0.5 in the paper), then accept each
        remaining one with probability p. Returns (batch_size, D) z_sem. Raises a `ValueError` when fewer than
        `batch_size` are accepted among `max_candidates` (default `200 * batch_size`) draws.
        """
        if self.classifier is None:
            raise ValueError("conditional sampling needs a classifier component")
        index = self.classifier.attribute_index(attribute)
        if self.classifier.attribute_type(index) != "binary":
            raise ValueError(f"attribute {attribute!r} is a continuous head; rejection sampling needs a binary one")
        if not 0 <= min_probability < 1:
            raise ValueError(f"min_probability must be in [0, 1), got {min_probability}")
        max_candidates = max_candidates or 200 * batch_size
        accepted, drawn = [], 0
        chunk = max(batch_size, 16)
        while sum(len(a) for a in accepted) < batch_size and drawn < max_candidates:
            n = min(chunk, max_candidates - drawn)
            z = self.sample_z_sem(n, num_inference_steps, generator=generator)
            p = torch.sigmoid(self.classifier(z.float()).logits[:, index])
            u = torch.rand(n, generator=generator, device=generator.device if generator else "cpu").to(p.device)
            keep = (p >= min_probability) & (u < p)
            accepted.append(z[keep])
            drawn += n
        z = torch.cat(accepted)
        if z.shape[0] < batch_size:
            raise ValueError(
                f"rejection sampling accepted {z.shape[0]} of {drawn} candidates for {attribute!r} "
                f"(rate {z.shape[0] / drawn:.2%}); cannot reach {batch_size} samples. Lower min_probability, raise "
                "max_candidates, or check the classifier"
            )
        return z[:batch_size]

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 20,
        latent_num_inference_steps: int = 20,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        attribute: Optional[Union[str, int]] = None,
        min_probability: float = 0.5,
        z_noise: Optional[torch.Tensor] = None,
        x_T: Optional[torch.Tensor] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Unconditional sampling (paper §4): latent DDIM on normalised z_sem, de-normalise, decode from fresh x_T.
        With `attribute`, conditional sampling by rejection with the classifier (paper §5.6).

        Args:
            batch_size (`int`): number of images.
            num_inference_steps (`int`): image sampler steps.
            latent_num_inference_steps (`int`): latent DDIM steps.
            generator: `torch.Generator` (or one per image).
            attribute (`str`, *optional*): a binary classifier head to condition on.
            min_probability (`float`): rejection threshold (paper: 0.5).
            z_noise (`(B, D)`, *optional*) / x_T (`(B, C, H, W)`, *optional*): fixed starting noise.

        Returns:
            [`~diffusers.ImagePipelineOutput`] or `(images,)`.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if attribute is not None:
            if isinstance(generator, list):
                raise ValueError("conditional sampling takes a single generator")
            z_sem = self.sample_z_sem_with_attribute(
                batch_size, attribute, min_probability, latent_num_inference_steps, generator
            )
        else:
            latent_generator = generator[0] if isinstance(generator, list) else generator
            z_sem = self.sample_z_sem(batch_size, latent_num_inference_steps, latent_generator, z_noise)
        return self.decode(
            z_sem.to(self.unet.dtype),
            x_T,
            num_inference_steps,
            generator=generator,
            eta=eta,
            output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

    sample = __call__
