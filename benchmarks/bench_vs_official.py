"""Speed of this project against the official Diffusion Autoencoders code (phizaz/diffae), side by side.

Both sides get the same architecture, weights, inputs, batch sizes and threads, and are timed in turns (official,
ours, official, ours, ...) so that load from other jobs hits both alike; each row reports the ratio official time /
our time (> 1: this project is faster), median and spread over the rounds. Before timing, the parameter counts and
one forward of each network are checked to match (the official weights, randomised so that no zero-initialised
layer hides a difference, are copied into our models with the project's converter).

The official side is its unmodified network, diffusion and config modules, imported from a checkout given with
`--official`; only its dataset module (LMDB, torchvision) is replaced by an empty stand-in. Rows:

- UNet forward at batch 1 and 8, encoder forward at batch 8;
- encode (encoder + DDIM inversion, T=10) + decode (T=10) of 4 images: official sampler loops vs our pipeline;
- training step: official `training_losses` + clip + Adam + its state-dict EMA vs this project's training step with
  the defaults of `training/train_diffae.py` (see `ours_training_step`);
- DiffAE vs the DDIM baseline (both ours; with the FLOP ratio of their steps), and the training step with each speed-up
  undone vs with it (both ours), so that each change is measured in the same run.

`--profile` adds torch.profiler per-op tables of our UNet forward and training step. Writes `<output>/<name>.md` and
`.json`. See benchmarks/README.md.
"""

import argparse
import copy
import dataclasses
import enum
import json
import os
import statistics
import sys
import tempfile
import time
import types
from typing import Callable, Dict, List
from unittest import mock

import torch
import torch.nn.functional as F
from _speed_common import count_flops, interleaved, machine
from _vs_official_report import markdown
from diffusers import DDIMScheduler

from diffusers_diffae import DiffAEPipeline, DiffAEUNet2DModel, SemanticEncoder
from diffusers_diffae.convert import convert_official_state_dict
from diffusers_diffae.presets import load_official_config, official_component_configs
from diffusers_diffae.schedulers import DiffAEInverseScheduler


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_CONFIG = os.path.join(REPO_ROOT, "pipelines_tests", "fixtures", "official", "config.json")
sys.path.insert(0, os.path.join(REPO_ROOT, "training"))
ROWS = (
    "unet1",
    "unet8",
    "encoder8",
    "encode_decode",
    "encode_decode_bf16",
    "train",
    "train_fp32",
    "diffae_vs_baseline",
    "encoder_vs_baseline",
    "without_bf16_group_norm",
    "without_lerp_ema",
)
# name -> (official config, training batch, rows); ffhq256 is too slow on a CPU for more than the UNet forward.
ARCHITECTURES = {
    "fixture32": (FIXTURE_CONFIG, 8, ROWS),
    "ffhq64_autoenc": ("ffhq64_autoenc", 2, ROWS),
    "ffhq256_autoenc": ("ffhq256_autoenc", 1, ("unet1",)),
}
PARITY_TOLERANCE = 1e-4  # max |official - ours| / max |official| of one forward in fp32


# 1. The official code


def import_official(path: str) -> types.SimpleNamespace:
    """The official `config`, `choices` and `diffusion.base` modules from a checkout at `path`."""
    needed = [
        "config.py",
        "choices.py",
        os.path.join("model", "unet_autoenc.py"),
        os.path.join("diffusion", "base.py"),
    ]
    missing = [name for name in needed if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise SystemExit(f"--official {path!r} is not a checkout of github.com/phizaz/diffae (missing {missing[0]})")
    sys.path.insert(0, os.path.abspath(path))
    # The official dataset module needs lmdb and torchvision; nothing here uses it.
    sys.modules.setdefault("dataset", types.ModuleType("dataset"))
    import choices
    import config
    from diffusion import base

    return types.SimpleNamespace(config=config, choices=choices, base=base)


def official_train_config(official, fields: dict):
    """An official `TrainConfig` with the given fields (plain values turned back into the official enums)."""
    conf = official.config.TrainConfig()
    types_ = {field.name: field.type for field in dataclasses.fields(conf)}
    for key, value in fields.items():
        kind = types_[key]
        if isinstance(kind, type) and issubclass(kind, enum.Enum) and value is not None:
            value = kind(value)
        elif isinstance(value, list):
            value = tuple(value)
        setattr(conf, key, value)
    conf.diffusion_type = "beatgans"  # as the official autoenc_base template
    conf.fp16 = False  # only switches CUDA autocast in the official code
    conf.make_model_conf()
    return conf


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Gives every zero-initialised tensor random values, so that a forward depends on every layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def build_pair(official, arch: str, seed: int = 0) -> dict:
    """The official model and our UNet + encoder with the same weights, and their configs."""
    fields = dict(load_official_config(ARCHITECTURES[arch][0]))
    fields["net_latent_net_type"] = "none"  # the autoencoder only
    conf = official_train_config(official, fields)
    torch.manual_seed(seed)
    model = conf.make_model_conf().make_model()
    randomize_(model, seed)
    configs = official_component_configs(fields)
    state = {f"ema_model.{k}": v for k, v in model.state_dict().items()}
    converted = convert_official_state_dict(state, configs)
    unet = DiffAEUNet2DModel.from_config(configs["unet"])
    encoder = SemanticEncoder.from_config(configs["encoder"])
    unet.load_state_dict(converted["unet"])
    encoder.load_state_dict(converted["encoder"], strict=False)  # no z_sem statistics in this checkpoint
    return {"conf": conf, "configs": configs, "official": model, "unet": unet, "encoder": encoder}


def check_parity(pair: dict, batch: int = 2) -> dict:
    """Parameter counts and one forward of the UNet and the encoder, official vs ours; raises on a mismatch."""
    official, unet, encoder = pair["official"].eval(), pair["unet"].eval(), pair["encoder"].eval()
    counts = {
        "official": sum(p.numel() for p in official.parameters()),
        "ours": sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in encoder.parameters()),
    }
    if counts["official"] != counts["ours"]:
        raise SystemExit(f"parameter counts differ: official {counts['official']}, ours {counts['ours']}")
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=generator)
    t = torch.tensor([10, 900][:batch] + [500] * max(0, batch - 2))
    with torch.no_grad():
        z_official = official.encoder(x)
        eps_official = official(x, t, cond=z_official).pred
        z_ours = encoder(x).z_sem
        eps_ours = unet(x, t, z_ours).sample
    errors = {
        "encoder": ((z_official - z_ours).abs().max() / z_official.abs().max()).item(),
        "unet": ((eps_official - eps_ours).abs().max() / eps_official.abs().max()).item(),
    }
    for name, error in errors.items():
        if not error <= PARITY_TOLERANCE:
            raise SystemExit(f"the {name} outputs differ from the official ones (relative max error {error:.2e})")
    return {"parameters": counts["ours"], "relative_max_error": errors}


# 2. Timing


def summarize(times: Dict[str, List[float]]) -> dict:
    """Median times, the official/ours ratio per round (median, min, max) and the ratio of the best times (the least
    disturbed by other jobs)."""
    ratios = [a / b for a, b in zip(times["official"], times["ours"])]
    return {
        "official_s": statistics.median(times["official"]),
        "ours_s": statistics.median(times["ours"]),
        "ratio": statistics.median(ratios),
        "ratio_of_best": min(times["official"]) / min(times["ours"]),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "rounds": len(ratios),
    }


# 3. What is timed


def training_fns(pair: dict, batch: int, options: List[str], sides=("official", "ours")) -> Dict[str, Callable]:
    """One optimizer step on the same batch, official and ours."""
    size = pair["conf"].img_size
    x0 = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    fns = {}
    if "official" in sides:
        fns["official"] = official_training_step(pair, batch, x0)
    if "ours" in sides:
        # The step of training/train_diffae.py with its defaults for this machine and the given options.
        import train_diffae

        size_option = ["--resolution", str(size), "--train_batch_size", str(batch)]
        args = train_diffae.parse_args(["--train_data_dir", ".", *size_option, *options])
        unet, encoder = copy.deepcopy(pair["unet"]), copy.deepcopy(pair["encoder"])
        step = our_training_step(args, unet, encoder, pair["configs"]["scheduler"])
        fns["ours"] = lambda: step(x0)
    return fns


def our_training_step(args, unet, encoder, scheduler_config: dict) -> Callable:
    """`step(x0) -> loss`: one step of training/train_diffae.py's loop with the settings `args` gives."""
    from diffusers import DDPMScheduler

    import _models
    import train_diffae

    module = train_diffae.DiffAETrainingModule(unet, encoder, DDPMScheduler.from_config(scheduler_config))
    return _models.make_training_step(args, module)


def official_training_step(pair: dict, batch: int, x0: torch.Tensor) -> Callable:
    """The official step on `x0`."""
    official, conf = copy.deepcopy(pair["official"]).train(), pair["conf"]
    # Official: LitModel.training_step (uniform t, sampler.training_losses), then what PL and its hooks do:
    # backward, clip_grad_norm_ 1.0 (on_before_optimizer_step), Adam, EMA over the state dict (experiment.ema).
    sampler, t_sampler = conf.make_diffusion_conf().make_sampler(), conf.make_T_sampler()
    optimizer = torch.optim.Adam(official.parameters(), lr=conf.lr, weight_decay=conf.weight_decay)
    ema_model = copy.deepcopy(official)

    def official_step():
        t, _ = t_sampler.sample(batch, x0.device)
        loss = sampler.training_losses(model=official, x_start=x0, t=t)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(official.parameters()), max_norm=conf.grad_clip)
        optimizer.step()
        with torch.no_grad():
            targets = ema_model.state_dict()
            for key, value in official.state_dict().items():
                targets[key].copy_(targets[key] * conf.ema_decay + value * (1 - conf.ema_decay))

    return official_step


def baseline_fns(pair: dict, batch: int) -> Dict[str, Callable]:
    """Our training step of DiffAE and of the paper's DDIM baseline (the same UNet without z_sem, no encoder), with
    the defaults of train_diffae.py; in this row "official" is the baseline."""
    import train_diffae

    size = pair["conf"].img_size
    x0 = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(6)) * 2 - 1
    args = train_diffae.parse_args(["--train_data_dir", ".", "--resolution", str(size)])
    baseline = DiffAEUNet2DModel.from_config({**pair["configs"]["unet"], "z_sem_channels": None})
    scheduler = pair["configs"]["scheduler"]
    steps = {
        "official": our_training_step(args, baseline, None, scheduler),
        "ours": our_training_step(args, copy.deepcopy(pair["unet"]), copy.deepcopy(pair["encoder"]), scheduler),
    }
    return {name: (lambda step=step: step(x0)) for name, step in steps.items()}


def baseline_flop_ratio(pair: dict, batch: int) -> float:
    """FLOPs of the DiffAE training forward + backward over those of the DDIM baseline (torch's counter)."""
    from diffusers import DDPMScheduler

    import train_diffae

    size = pair["conf"].img_size
    x0 = torch.rand(batch, 3, size, size) * 2 - 1
    t, noise = torch.randint(0, 1000, (batch,)), torch.randn_like(x0)
    baseline = DiffAEUNet2DModel.from_config({**pair["configs"]["unet"], "z_sem_channels": None})
    flops = []
    for unet, encoder in ((pair["unet"], pair["encoder"]), (baseline, None)):
        module = train_diffae.DiffAETrainingModule(
            copy.deepcopy(unet), copy.deepcopy(encoder), DDPMScheduler.from_config(pair["configs"]["scheduler"])
        )
        flops.append(count_flops(lambda: module(x0, t, noise).mean().backward()))
    return flops[0] / flops[1]


def encoder_fns(pair: dict, batch: int) -> Dict[str, Callable]:
    """Forward + backward of the semantic encoder ("ours") and of the DDIM baseline's UNet ("official" in this row),
    in the layout, attention kernel and autocast of train_diffae.py's defaults: what DiffAE adds to the baseline."""
    import _models
    import train_diffae

    size = pair["conf"].img_size
    x0 = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(8)) * 2 - 1
    t = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(8))
    args = train_diffae.parse_args(["--train_data_dir", ".", "--resolution", str(size)])
    baseline = DiffAEUNet2DModel.from_config({**pair["configs"]["unet"], "z_sem_channels": None}).train()
    encoder = copy.deepcopy(pair["encoder"]).train()
    _models.prepare_for_training(args, [baseline, encoder])
    calls = {"official": lambda: baseline(x0, t).sample, "ours": lambda: encoder(x0).z_sem}

    def forward_backward(call):
        with _models.training_autocast(args.mixed_precision, x0.device):
            out = call()
        out.float().square().mean().backward()

    return {name: (lambda call=call: forward_backward(call)) for name, call in calls.items()}


def _group_norm_with_casts(norm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm32 as before its bf16 fast path: bf16 input cast to fp32 and back."""
    return F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps).to(x.dtype)


def ablation_fns(pair: dict, batch: int, change: str) -> Dict[str, Callable]:
    """Our training step with the defaults of train_diffae.py ("ours") and with one speed-up undone ("official" in
    this row): `bf16_group_norm` (GroupNorm32 casting bf16 input to fp32 and back), `lerp_ema` (diffusers' own
    two-pass EMA update)."""
    from diffusers.training_utils import EMAModel

    import _checkpoints
    import train_diffae
    from diffusers_diffae.models.blocks import GroupNorm32

    size = pair["conf"].img_size
    x0 = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(7)) * 2 - 1
    args = train_diffae.parse_args(["--train_data_dir", ".", "--resolution", str(size)])
    scheduler = pair["configs"]["scheduler"]
    original_make_ema = _checkpoints.make_ema

    def diffusers_ema(*args, **kwargs):
        ema = original_make_ema(*args, **kwargs)
        ema.step = types.MethodType(EMAModel.step, ema)
        return ema

    steps = {}
    for side in ("official", "ours"):
        unet, encoder = copy.deepcopy(pair["unet"]), copy.deepcopy(pair["encoder"])
        make_ema = diffusers_ema if side == "official" and change == "lerp_ema" else original_make_ema
        with mock.patch.object(_checkpoints, "make_ema", make_ema):
            steps[side] = our_training_step(args, unet, encoder, scheduler)
        if side == "official" and change == "bf16_group_norm":
            for norm in [m for model in (unet, encoder) for m in model.modules() if isinstance(m, GroupNorm32)]:
                norm.forward = types.MethodType(_group_norm_with_casts, norm)
    return {name: (lambda step=step: step(x0)) for name, step in steps.items()}


def forward_fns(pair: dict, part: str, batch: int) -> Dict[str, Callable]:
    official, unet, encoder = pair["official"].eval(), pair["unet"].eval(), pair["encoder"].eval()
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, size, size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    z = torch.randn(batch, encoder.config.out_channels, generator=generator)
    ours_unet, ours_encoder = prepared_for_inference(unet), prepared_for_inference(encoder)
    if part == "encoder":
        fns = {"official": lambda: official.encoder(x), "ours": lambda: ours_encoder(x)}
    else:
        fns = {"official": lambda: official(x, t, cond=z), "ours": lambda: ours_unet(x, t, z)}
    return {name: torch.no_grad()(fn) for name, fn in fns.items()}


def prepared_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """Our model in the layout `DiffAEPipeline.from_pretrained` picks for its resolution."""
    model = copy.deepcopy(model)
    if model.config.sample_size >= 64:
        model.to(memory_format=torch.channels_last)
    return model


def encode_decode_fns(pair: dict, dtype=torch.float32, num_images: int = 4, steps: int = 10) -> Dict[str, Callable]:
    """Encode (z_sem + DDIM inversion) and decode with `steps` steps each: official sampler loops, our pipeline."""
    official, conf = pair["official"].eval(), pair["conf"]
    size = conf.img_size
    images = torch.rand(num_images, 3, size, size, generator=torch.Generator().manual_seed(4))
    sampler = conf._make_diffusion_conf(steps).make_sampler()

    def official_run():  # LitModel.encode, encode_stochastic and render
        x = images * 2 - 1
        cond = official.encoder(x)
        x_T = sampler.ddim_reverse_sample_loop(official, x, model_kwargs={"cond": cond})["sample"]
        sampler.sample(model=official, noise=x_T, cond=cond)

    pipe = ours_pipeline(pair, dtype)

    def ours_run():
        latents = pipe.encode(images, num_inference_steps=steps)
        pipe.decode(latents.z_sem, latents.x_T, num_inference_steps=steps, output_type="pt")

    return {name: torch.no_grad()(fn) for name, fn in {"official": official_run, "ours": ours_run}.items()}


def ours_pipeline(pair: dict, dtype: torch.dtype) -> DiffAEPipeline:
    """A pipeline saved and reloaded with `from_pretrained(dtype=dtype)`: the settings users get."""
    configs = pair["configs"]
    pipe = DiffAEPipeline(
        unet=pair["unet"],
        encoder=pair["encoder"],
        scheduler=DDIMScheduler.from_config(configs["scheduler"]),
        inverse_scheduler=DiffAEInverseScheduler.from_config(configs["scheduler"]),
    )
    with tempfile.TemporaryDirectory() as folder:
        pipe.save_pretrained(folder)
        pipe = DiffAEPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def loss_curves(pair: dict, data: str, steps: int, batch: int = 16, window: int = 10) -> dict:
    """Our training step from the same initial weights, batches, noise and timesteps in fp32 and in bf16 autocast:
    the loss averaged over windows of `window` steps (a `save_to_disk` dataset with an `image` column at `data`)."""
    import numpy as np
    from datasets import load_from_disk

    import train_diffae

    size = pair["conf"].img_size
    images = load_from_disk(data)["train"].select(range(steps * batch))["image"]
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB").resize((size, size))) for im in images]))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    curves = {}
    for precision in ("no", "bf16"):
        options = ["--train_data_dir", ".", "--resolution", str(size), "--mixed_precision", precision]
        unet, encoder = copy.deepcopy(pair["unet"]), copy.deepcopy(pair["encoder"])
        step = our_training_step(train_diffae.parse_args(options), unet, encoder, pair["configs"]["scheduler"])
        torch.manual_seed(0)
        losses = [step(x[i * batch : (i + 1) * batch]).item() for i in range(steps)]
        curves["fp32" if precision == "no" else "bf16"] = [
            statistics.mean(losses[i : i + window]) for i in range(0, steps, window)
        ]
    return {"steps": steps, "batch": batch, "window": window, "data": data, "loss": curves}


# 4. Profile


def profile_table(fn: Callable, rows: int = 12, calls: int = 3) -> List[dict]:
    """The ops with the largest self CPU time over `calls` calls of `fn` (torch.profiler)."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    ms = {e.key: e.self_cpu_time_total / 1e3 / calls for e in events[:rows]}
    return [{"op": e.key, "calls": e.count // calls, "self_ms": ms[e.key], "share": ms[e.key] * calls * 1e3 / total}
            for e in events[:rows]]  # fmt: skip


# 5. Report (rows, goals and markdown: _vs_official_report.py)


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--official", help="A checkout of github.com/phizaz/diffae (its model/, diffusion/, config.py)."
    )
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES), help="Comma-separated subset.")
    parser.add_argument("--repeat", type=int, default=5, help="Timed rounds per row (each times both sides).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or the process's CPU time (use with --threads 1 on a machine shared with other jobs).",
    )
    parser.add_argument("--profile", action="store_true", help="Add per-op profiles of our forward and training step.")
    parser.add_argument("--loss_curve_data", help="A save_to_disk image dataset for fp32 vs bf16 loss curves.")
    parser.add_argument("--loss_curve_steps", type=int, default=200, help="Training steps of each loss curve.")
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "docs", "results"), help="Report folder.")
    parser.add_argument("--name", default="speed_vs_official", help="Report file name without extension.")
    args = parser.parse_args(argv)
    if not args.official:
        print("needs --official PATH: a checkout of github.com/phizaz/diffae (git clone it anywhere)", file=sys.stderr)
        return 2
    architectures = [a for a in args.architectures.split(",") if a]
    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown architecture {unknown[0]!r}; choose from {', '.join(ARCHITECTURES)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not os.path.isdir(args.output):
        parser.error(f"--output {args.output!r} is not a folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    official = import_official(args.official)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    started = time.time()
    result = {
        "command": "python benchmarks/bench_vs_official.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine("cpu"),
        "clock": args.clock,
        "architectures": {},
        "profile": {},
    }
    for arch in architectures:
        _, train_batch, rows = ARCHITECTURES[arch]
        pair = build_pair(official, arch)
        entry = {"train_batch": train_batch, "parity": check_parity(pair), "timings": {}}
        print(f"{arch}: parity {entry['parity']}", flush=True)
        work = {
            "unet1": lambda: forward_fns(pair, "unet", 1),
            "unet8": lambda: forward_fns(pair, "unet", 8),
            "encoder8": lambda: forward_fns(pair, "encoder", 8),
            "encode_decode": lambda: encode_decode_fns(pair),
            "encode_decode_bf16": lambda: encode_decode_fns(pair, torch.bfloat16),
            "train": lambda: training_fns(pair, train_batch, []),
            "train_fp32": lambda: training_fns(pair, train_batch, ["--mixed_precision", "no"]),
            "diffae_vs_baseline": lambda: baseline_fns(pair, train_batch),
            "encoder_vs_baseline": lambda: encoder_fns(pair, train_batch),
            "without_bf16_group_norm": lambda: ablation_fns(pair, train_batch, "bf16_group_norm"),
            "without_lerp_ema": lambda: ablation_fns(pair, train_batch, "lerp_ema"),
        }
        for row in rows:
            entry["timings"][row] = summarize(interleaved(work[row](), args.repeat, clock=clock))
            s = entry["timings"][row]
            print(f"  {row}: official {s['official_s']:.3f} s, ours {s['ours_s']:.3f} s, ratio {s['ratio']:.2f} "
                  f"({s['ratio_min']:.2f}-{s['ratio_max']:.2f})", flush=True)  # fmt: skip
        if "diffae_vs_baseline" in rows:
            entry["diffae_flop_ratio"] = baseline_flop_ratio(pair, train_batch)
        if args.profile:
            size = pair["conf"].img_size
            result["profile"][f"{size} px UNet forward b1"] = profile_table(forward_fns(pair, "unet", 1)["ours"])
            key = f"{size} px training step b{train_batch}"
            result["profile"][key] = profile_table(training_fns(pair, train_batch, [], sides=("ours",))["ours"])
        result["architectures"][arch] = entry
    if args.loss_curve_data:
        pair = build_pair(official, "fixture32")
        result["loss_curves"] = loss_curves(pair, args.loss_curve_data, args.loss_curve_steps)
    result["seconds"] = time.time() - started
    result["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    base = os.path.join(args.output, args.name)
    write_atomic(base + ".json", json.dumps(result, indent=2) + "\n")
    write_atomic(base + ".md", markdown(result))
    print(f"wrote {base}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
