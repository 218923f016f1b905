"""Convert official Diffusion Autoencoders checkpoints (github.com/phizaz/diffae) to a diffusers pipeline folder.

```
python -m diffusers_diffae.convert --checkpoint ffhq256_autoenc_latent/last.ckpt \
    --config ffhq256_autoenc_latent --output diffae-ffhq256
```

Official `last.ckpt` files are PyTorch-Lightning pickles. They are read with a restricted unpickler: tensors,
plain containers and a few inert classes are allowed, Lightning classes become empty placeholders, and any other
global (for example `os.system`) is refused, so a crafted file cannot run code. Every key of the state dict is
either converted or deliberately ignored (`x_T`, the other weight copy, aliased tensors); an unknown or missing
key is an error.
"""

import argparse
import os
import pickle
import sys
import types
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from .io_utils import check_output_folder, save_pipeline_atomically
from .models import CELEBAHQ_ATTRIBUTES, AttributeClassifier, DiffAEUNet2DModel, LatentMLPDenoiser, SemanticEncoder
from .presets import official_component_configs


PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------------------------
# Restricted loading of official pickles
# ----------------------------------------------------------------------------------------------------------------

_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "bool"),
    ("builtins", "str"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("builtins", "range"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("argparse", "Namespace"),
}
# Lightning stores its callback state keyed by the callback class; nothing of it is needed for the weights.
_PLACEHOLDER_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric")
_placeholders: Dict[Tuple[str, str], type] = {}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """Raised when a checkpoint pickle references code that an official checkpoint never needs."""


def _placeholder(module: str, name: str) -> type:
    key = (module, name)
    if key not in _placeholders:

        def __init__(self, *args, **kwargs):
            pass

        def __setstate__(self, state):
            self.__dict__["_state"] = state

        _placeholders[key] = type(name, (), {"__init__": __init__, "__setstate__": __setstate__, "__module__": module})
    return _placeholders[key]


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.split(".")[0] in _PLACEHOLDER_PACKAGES:
            return _placeholder(module, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"refusing to load '{module}.{name}': the file references code that an official DiffAE checkpoint "
            "never contains (possibly a malicious pickle)"
        )


_restricted_pickle = types.ModuleType("diffae_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
_restricted_pickle.__name__ = "diffae_restricted_pickle"


def check_file(path: PathLike) -> str:
    """The path of an existing file; a `FileNotFoundError` (missing) or `ValueError` (a folder) otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; give the checkpoint file in it (e.g. last.ckpt)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def load_official_file(path: PathLike) -> dict:
    """Loads an official `.ckpt` / `latent.pkl` (a `torch.save` pickle) without Lightning and without running code.

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeCheckpointError: the pickle references a disallowed global.
        ValueError: the file is not a `torch.save` pickle of a dict.
    """
    path = check_file(path)
    try:
        obj = torch.load(path, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # torch raises many types for files that are not torch pickles
        reason = str(e)
        if not reason.isprintable() or len(reason) > 200:  # the unpickler quotes raw bytes of a random file
            reason = "its bytes are not a pickle"
        raise ValueError(
            f"{path} is not a torch.save checkpoint that can be read: {type(e).__name__}: {reason}"
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a dict (found {type(obj).__name__}); not an official DiffAE file")
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Key mapping: official module paths -> diffusers module paths
# ----------------------------------------------------------------------------------------------------------------

_RESBLOCK_KEYS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "cond_emb_layers.1": "z_sem_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _half_unet_modules(prefix: str, target: str, channel_mult, num_res_blocks: int, resolution: int, attn) -> List:
    """(official prefix, diffusers prefix, kind) for `input_blocks` and `middle_block` of a UNet or encoder."""
    modules = [(f"{prefix}input_blocks.0.0", f"{target}conv_in", "plain")]
    k = 1
    for level in range(len(channel_mult)):
        for j in range(num_res_blocks):
            modules.append((f"{prefix}input_blocks.{k}.0", f"{target}down_blocks.{level}.resnets.{j}", "res"))
            if resolution in attn:
                modules.append((f"{prefix}input_blocks.{k}.1", f"{target}down_blocks.{level}.attentions.{j}", "attn"))
            k += 1
        if level != len(channel_mult) - 1:
            modules.append((f"{prefix}input_blocks.{k}.0", f"{target}down_blocks.{level}.downsamplers.0", "res"))
            k += 1
            resolution //= 2
    modules += [
        (f"{prefix}middle_block.0", f"{target}mid_block.resnets.0", "res"),
        (f"{prefix}middle_block.1", f"{target}mid_block.attention", "attn"),
        (f"{prefix}middle_block.2", f"{target}mid_block.resnets.1", "res"),
    ]
    return modules


def _unet_modules(cfg: dict) -> List:
    mult, nrb, attn = cfg["channel_mult"], cfg["num_res_blocks"], cfg["attention_resolutions"]
    modules = [
        ("time_embed.time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.time_embed.2", "time_embedding.linear_2", "plain"),
    ]
    modules += _half_unet_modules("", "", mult, nrb, cfg["sample_size"], attn)
    resolution = cfg["sample_size"] // 2 ** (len(mult) - 1)
    k = 0
    for u, level in enumerate(reversed(range(len(mult)))):
        for i in range(nrb + 1):
            modules.append((f"output_blocks.{k}.0", f"up_blocks.{u}.resnets.{i}", "res"))
            m = 1
            if resolution in attn:
                modules.append((f"output_blocks.{k}.1", f"up_blocks.{u}.attentions.{i}", "attn"))
                m = 2
            if level > 0 and i == nrb:
                modules.append((f"output_blocks.{k}.{m}", f"up_blocks.{u}.upsamplers.0", "res"))
            k += 1
        if level > 0:
            resolution *= 2
    modules += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return modules


def _encoder_modules(cfg: dict) -> List:
    modules = _half_unet_modules(
        "encoder.", "", cfg["channel_mult"], cfg["num_res_blocks"], cfg["sample_size"], cfg["attention_resolutions"]
    )
    return modules + [("encoder.out.0", "norm_out", "plain"), ("encoder.out.3", "proj_out", "linear_from_conv")]


def _latent_modules(cfg: dict) -> List:
    modules = []
    for i in range(cfg["num_time_layers"]):
        # Sequential(Linear, act, Linear, ...): the linear layers sit at even indices in both implementations
        modules.append((f"latent_net.time_embed.{2 * i}", f"time_embedding.{2 * i}", "plain"))
    for i in range(cfg["num_layers"]):
        modules.append((f"latent_net.layers.{i}.linear", f"layers.{i}.linear", "plain"))
        if i < cfg["num_layers"] - 1:
            modules.append((f"latent_net.layers.{i}.linear_emb", f"layers.{i}.cond_proj", "plain"))
            modules.append((f"latent_net.layers.{i}.cond_layers.1", f"layers.{i}.cond_proj", "alias"))
            if cfg["use_norm"]:
                modules.append((f"latent_net.layers.{i}.norm", f"layers.{i}.norm", "plain"))
    return modules


def _split_qkv(tensor: torch.Tensor, num_heads: int) -> List[torch.Tensor]:
    """Official legacy qkv rows are grouped per head as [q_h, k_h, v_h]; diffusers wants q, k, v each head-major."""
    channels = tensor.shape[0] // 3
    grouped = tensor.reshape(num_heads, 3, channels // num_heads, *tensor.shape[1:])
    return [grouped[:, i].reshape(channels, *tensor.shape[1:]) for i in range(3)]


def _convert_module(
    kind: str, sub: str, tensor: torch.Tensor, target: str, num_heads: int
) -> List[Tuple[str, torch.Tensor]]:
    """Translates one official tensor (`sub` = its key below the module) to diffusers key(s)."""
    if kind in ("plain", "alias"):
        return [(f"{target}.{sub}", tensor)]
    if kind == "linear_from_conv":
        return [(f"{target}.{sub}", tensor.reshape(tensor.shape[0], -1) if sub == "weight" else tensor)]
    module, _, param = sub.rpartition(".")
    if kind == "res":
        if module not in _RESBLOCK_KEYS:
            raise KeyError(sub)
        return [(f"{target}.{_RESBLOCK_KEYS[module]}.{param}", tensor)]
    if kind == "attn":
        if module == "norm":
            return [(f"{target}.group_norm.{param}", tensor)]
        if module == "qkv":
            q, k, v = _split_qkv(tensor.squeeze(-1) if param == "weight" else tensor, num_heads)
            return [(f"{target}.to_q.{param}", q), (f"{target}.to_k.{param}", k), (f"{target}.to_v.{param}", v)]
        if module == "proj_out":
            return [(f"{target}.to_out.0.{param}", tensor.squeeze(-1) if param == "weight" else tensor)]
        raise KeyError(sub)
    raise ValueError(kind)


def _convert_state_dict(
    source: Dict[str, torch.Tensor], modules: List, model: torch.nn.Module, num_heads: int, what: str
) -> Tuple[Dict[str, torch.Tensor], set]:
    """Converts `source` (keys relative to the model prefix) onto `model`; returns the state dict and the used keys."""
    by_prefix = {official: (target, kind) for official, target, kind in modules}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("z_sem_")}
    converted, used, aliases = {}, set(), []
    for key, tensor in source.items():
        prefix, _, sub = key.rpartition(".")
        while prefix and prefix not in by_prefix:  # walk up to the longest registered module prefix
            prefix, _, rest = prefix.rpartition(".")
            sub = f"{rest}.{sub}"
        if not prefix:
            continue  # not one of this model's keys; the caller reports leftovers
        target, kind = by_prefix[prefix]
        try:
            pairs = _convert_module(kind, sub, tensor, target, num_heads)
        except KeyError:
            raise ValueError(f"unknown key in the official {what} weights: {key}") from None
        used.add(key)
        if kind == "alias":
            aliases.extend(pairs)
            continue
        for new_key, new_tensor in pairs:
            if new_key not in expected:
                raise ValueError(f"unknown key in the official {what} weights: {key} (no counterpart {new_key})")
            if tuple(new_tensor.shape) != tuple(expected[new_key].shape):
                raise ValueError(
                    f"the checkpoint does not match the config: {key} has shape {tuple(tensor.shape)}, the config "
                    f"builds {new_key} with shape {tuple(expected[new_key].shape)}"
                )
            converted[new_key] = new_tensor.to(torch.float32).contiguous()
    for new_key, tensor in aliases:  # official latent layers register the same Linear twice
        if new_key in converted and not tensor.is_meta and not torch.equal(converted[new_key], tensor.float()):
            raise ValueError(f"corrupt checkpoint: the aliased latent tensors of {new_key} differ")
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} {what} tensor(s) that the config needs, e.g. {missing[:5]}; "
            "is the config right for this checkpoint?"
        )
    return converted, used


def _statistics(obj: dict, where: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    if "conds_mean" not in obj and "conds_std" not in obj:
        return None
    if "conds_mean" not in obj or "conds_std" not in obj:
        raise ValueError(f"{where} has only one of conds_mean / conds_std")
    return obj["conds_mean"].float().reshape(-1), obj["conds_std"].float().reshape(-1)


def convert_official_state_dict(state: Dict[str, torch.Tensor], configs: dict, use_ema: bool = True) -> dict:
    """Maps an official `state_dict` onto the diffusers models described by `configs`.

    Works on shapes only, so it also runs on meta tensors (used to check the full-size key lists). Every key is
    either converted or deliberately ignored; anything else raises a `ValueError`.

    Args:
        state: the official `LitModel.state_dict()` (`x_T`, optional `conds_mean`/`conds_std`, `model.*`,
            `ema_model.*`).
        configs: the output of [`~diffusers_diffae.presets.official_component_configs`].
        use_ema: take `ema_model.*` (default) or `model.*`.

    Returns:
        A dict with the state dicts `unet`, `encoder`, `latent_denoiser` (or `None`) and `statistics` (a
        `(mean, std)` pair or `None`).
    """
    prefix, other = ("ema_model.", "model.") if use_ema else ("model.", "ema_model.")
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(
            f"the checkpoint has no '{prefix}*' weights" + (" (try use_ema=False / --no-ema)" if use_ema else "")
        )
    with torch.device("meta"):  # shapes only: the models are not materialised here
        unet = DiffAEUNet2DModel.from_config(configs["unet"])
        encoder = SemanticEncoder.from_config(configs["encoder"])
        latent = LatentMLPDenoiser.from_config(configs["latent_denoiser"]) if configs["latent_denoiser"] else None
    heads = configs["unet"]["num_heads"]
    result = {"latent_denoiser": None}
    result["unet"], used = _convert_state_dict(weights, _unet_modules(configs["unet"]), unet, heads, "UNet")
    result["encoder"], used_encoder = _convert_state_dict(
        weights, _encoder_modules(configs["encoder"]), encoder, heads, "encoder"
    )
    used |= used_encoder

    has_latent_keys = any(k.startswith("latent_net.") for k in weights)
    if latent is not None:
        if not has_latent_keys:
            raise ValueError(
                "the config describes a latent DDIM (a *_latent release) but the checkpoint has no latent_net "
                "weights; use the autoencoder config (e.g. ffhq256_autoenc) for this file"
            )
        result["latent_denoiser"], used_latent = _convert_state_dict(
            weights, _latent_modules(configs["latent_denoiser"]), latent, 1, "latent net"
        )
        used |= used_latent
    elif has_latent_keys:
        raise ValueError(
            "the checkpoint holds latent_net weights (a *_latent release) but the config has no latent net; use "
            "the latent config (e.g. ffhq256_autoenc_latent)"
        )

    leftover = sorted(set(weights) - used)
    if leftover:
        raise ValueError(f"unknown key(s) in the checkpoint, not converted: {[prefix + k for k in leftover[:5]]}")
    ignored = {"x_T", "conds_mean", "conds_std"}  # x_T: the trainer's fixed preview noise
    unknown = sorted(k for k in state if not k.startswith((prefix, other)) and k not in ignored)
    if unknown:
        raise ValueError(f"unknown top-level key(s) in the checkpoint: {unknown[:5]}")
    result["statistics"] = _statistics(state, "the checkpoint")
    return result


def convert_official_classifier(checkpoint: PathLike, use_ema: bool = False) -> AttributeClassifier:
    """Converts an official `*_cls` checkpoint (`ClsModel`: a linear head on normalised z_sem) to an
    [`AttributeClassifier`] with the 40 CelebA-HQ attribute names and the stored z_sem statistics.

    The official demos use the raw `classifier.*` weights, so `use_ema=False` is the default; `use_ema=True` takes
    `ema_classifier.*`. A classifier with a number of outputs other than 40 gets the names `attribute_<i>`.
    """
    state = load_official_file(checkpoint)
    state = state.get("state_dict", state)
    prefix = "ema_classifier." if use_ema else "classifier."
    known = {
        "x_T",
        "conds_mean",
        "conds_std",
        "classifier.weight",
        "classifier.bias",
        "ema_classifier.weight",
        "ema_classifier.bias",
    }
    unknown = sorted(k for k in state if k not in known)
    if unknown:
        raise ValueError(f"unknown key(s) in the classifier checkpoint: {unknown[:5]}")
    if f"{prefix}weight" not in state or f"{prefix}bias" not in state:
        raise ValueError(f"{checkpoint} has no '{prefix}weight' / '{prefix}bias'; not an official *_cls checkpoint")
    stats = _statistics(state, str(checkpoint))
    if stats is None:
        raise ValueError(f"{checkpoint} has no conds_mean / conds_std; an official *_cls checkpoint stores them")
    weight, bias = state[f"{prefix}weight"].float(), state[f"{prefix}bias"].float()
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"classifier weights have unexpected shapes {tuple(weight.shape)} / {tuple(bias.shape)}")
    count = weight.shape[0]
    names = (
        list(CELEBAHQ_ATTRIBUTES) if count == len(CELEBAHQ_ATTRIBUTES) else [f"attribute_{i}" for i in range(count)]
    )
    classifier = AttributeClassifier(num_channels=weight.shape[1], attribute_names=names)
    classifier.linear.load_state_dict({"weight": weight, "bias": bias})
    classifier.set_z_sem_statistics(*stats)
    return classifier.eval()


def convert_official_checkpoint(
    checkpoint: PathLike,
    config: Union[str, PathLike, dict],
    output_dir: Optional[PathLike] = None,
    use_ema: bool = True,
    latent_stats: Optional[PathLike] = None,
    classifier: Optional[PathLike] = None,
    overwrite: bool = False,
):
    """Converts an official DiffAE checkpoint into a [`DiffAEPipeline`].

    Args:
        checkpoint: an official `last.ckpt` (autoencoder-only or `*_latent` release), or a state dict file with
            `model.*` / `ema_model.*` keys.
        config: an official release name (`ffhq256_autoenc`, `ffhq128_autoenc_latent`, ...), a JSON file of the
            official `TrainConfig` fields, or a dict of them.
        output_dir: if given, the pipeline is saved there (safetensors) with `save_pretrained`, atomically (see
            [`save_pipeline_atomically`]); the folder is checked before the checkpoint is read.
        use_ema: convert the EMA weights (`ema_model.*`, what every official demo uses) or the raw ones (`model.*`).
        latent_stats: an official `latent.pkl` (`conds_mean`, `conds_std`): the z_sem statistics.
        classifier: an official `*_cls` checkpoint, added as the `classifier` component.
        overwrite: replace a pipeline folder at `output_dir`.

    Returns:
        The converted `DiffAEPipeline`, in eval mode.
    """
    from .pipelines import DiffAEPipeline  # the pipeline imports the models; avoid a cycle at import time

    for path in (checkpoint, latent_stats, classifier):  # every input file, before the long reads
        if path is not None:
            check_file(path)
    if output_dir is not None:
        inputs = (checkpoint, config, latent_stats, classifier)
        check_output_folder(output_dir, overwrite, inputs=[p for p in inputs if isinstance(p, (str, os.PathLike))])
    configs = official_component_configs(config)
    ckpt = load_official_file(checkpoint)
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{checkpoint} holds no state_dict of tensors; not an official DiffAE checkpoint")
    converted = convert_official_state_dict(state, configs, use_ema=use_ema)

    stats = converted["statistics"]
    if latent_stats is not None:
        pkl_stats = _statistics(load_official_file(latent_stats), str(latent_stats))
        if pkl_stats is None:
            raise ValueError(f"{latent_stats} has no conds_mean / conds_std; not an official latent.pkl")
        if stats is not None and not all(torch.allclose(a, b) for a, b in zip(stats, pkl_stats)):
            raise ValueError(f"the statistics in {latent_stats} differ from those stored in {checkpoint}")
        stats = pkl_stats
    if configs["latent_denoiser"] is not None and stats is None:
        raise ValueError("a latent release must hold conds_mean / conds_std (or pass latent_stats=latent.pkl)")

    models = {
        "unet": DiffAEUNet2DModel.from_config(configs["unet"]),
        "encoder": SemanticEncoder.from_config(configs["encoder"]),
        "latent_denoiser": (
            LatentMLPDenoiser.from_config(configs["latent_denoiser"]) if configs["latent_denoiser"] else None
        ),
    }
    for name, model in models.items():
        if model is None:
            continue
        full = model.state_dict()
        full.update(converted[name])
        model.load_state_dict(full, strict=True)
        if stats is not None and name != "unet":
            model.set_z_sem_statistics(*stats)
        model.eval()  # like from_pretrained: inference mode (dropout off)

    if classifier is not None:
        models["classifier"] = convert_official_classifier(classifier)
        if models["classifier"].config.num_channels != configs["encoder"]["out_channels"]:
            raise ValueError("the classifier's z_sem width does not match the encoder's")
    pipe = DiffAEPipeline.from_official_configs(configs, **models)
    if output_dir is not None:
        save_pipeline_atomically(pipe, output_dir, overwrite)
    return pipe


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_diffae.convert",
        description="Convert an official DiffAE checkpoint to diffusers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="official last.ckpt")
    parser.add_argument("--config", required=True, help="official release name or TrainConfig JSON file")
    parser.add_argument("--output", required=True, help="output folder for the diffusers pipeline (a new one)")
    parser.add_argument("--overwrite", action="store_true", help="replace a pipeline folder at --output")
    parser.add_argument("--no-ema", action="store_true", help="convert the raw weights instead of the EMA weights")
    parser.add_argument("--latent-stats", default=None, help="official latent.pkl with conds_mean / conds_std")
    parser.add_argument("--classifier", default=None, help="official *_cls checkpoint (attribute heads) to include")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        convert_official_checkpoint(
            args.checkpoint,
            args.config,
            args.output,
            use_ema=not args.no_ema,
            latent_stats=args.latent_stats,
            classifier=args.classifier,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
