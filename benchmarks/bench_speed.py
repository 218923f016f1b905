"""Speed of Diffusion Autoencoders on this machine, against the DDIM baseline, and the cost of each speed-up.

```
python benchmarks/bench_speed.py                      # about 6-9 minutes on 2 CPU cores
python benchmarks/bench_speed.py --compile            # adds torch.compile (about 2.5 minutes per compiled graph)
python benchmarks/bench_speed.py --presets emoji32 --skip_headline --skip_fidelity   # a quick look
```

What it measures, for each preset (`emoji32`: the bundled 32 px emoji model's architecture, `training/configs/emoji32.json`; `ffhq64`: the official
FFHQ-64 architecture), with random weights:
- the training step (forward, loss, backward, grad clip, Adam, EMA) in images/s, DiffAE vs the DDIM baseline (the
  same UNet without z_sem and without the encoder), and their ratio (paper Table 7: DiffAE about 1.2-1.25x);
- encoder forward, UNet forward at batch 1 and 16, and a 10-step `encode` + 10-step `decode` of 4 images through
  `DiffAEPipeline`;
- each in fp32, with channels_last, with bf16 autocast (and channels_last + bf16), and with torch.compile when
  `--compile` is given; FLOPs per image from torch's FLOP counter and the fraction of the measured matmul peak.
Then the headline: editing one real 256x256 photo with the FFHQ-256 architecture (`encode` with T=20 plus `decode`
with T=20); a full fp32 run takes minutes here, so the UNet and encoder are timed and the 41 network calls are
extrapolated, and the extrapolation is checked against a real end-to-end run with T=2+2.
Finally the fidelity bound: bf16 and channels_last decoding vs fp32 decoding on the official fixture model.

Writes the tables to stdout and to `docs/results/<name>.md` (and `<name>.json`; `--name speed` by default).
"""

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler
from diffusers.training_utils import EMAModel
from torch.utils.flop_counter import FlopCounterMode

from diffusers_diffae import DiffAEPipeline, DiffAEUNet2DModel, SemanticEncoder, preset_config
from diffusers_diffae.presets import _ddim_config
from diffusers_diffae.training_utils import diffae_loss

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The bundled emoji model's architecture: read from the training config when the repository has it.
EMOJI32_CONFIG = os.path.join(REPO_ROOT, "training", "configs", "emoji32.json")
EMOJI32_FALLBACK = {
    "unet": {
        "sample_size": 32, "model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 2,
        "attention_resolutions": [16], "num_heads": 1, "embed_channels": 128, "z_sem_channels": 128, "dropout": 0.1,
    },
    "encoder": {
        "sample_size": 32, "model_channels": 32, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2,
        "attention_resolutions": [16], "num_heads": 1, "out_channels": 128,
    },
}  # fmt: skip
TRAIN_BATCH = {"emoji32": 32, "ffhq64": 2}


def preset_configs(name: str) -> Dict[str, dict]:
    if name == "emoji32":
        if os.path.isfile(EMOJI32_CONFIG):
            with open(EMOJI32_CONFIG, encoding="utf-8") as f:
                configs = json.load(f)
            return {"unet": configs["unet"], "encoder": configs["encoder"]}
        return copy.deepcopy(EMOJI32_FALLBACK)
    return {"unet": preset_config(name, "unet"), "encoder": preset_config(name, "encoder")}


# ---------------------------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------------------------


def timed(fn: Callable, warmup: int = 1, repeat: int = 3) -> Dict[str, float]:
    """Median and best wall time of `fn` over `repeat` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "best_s": min(times), "runs": len(times)}


def timed_round_robin(fns: Dict[str, Callable], warmup: int = 1, repeat: int = 2) -> Dict[str, Dict[str, float]]:
    """Times several functions in turns (a, b, c, a, b, c, ...), so that load from other jobs on a shared machine
    hits every variant alike and their ratios stay meaningful."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "best_s": min(t), "runs": len(t)} for name, t in times.items()}


def count_flops(fn: Callable) -> int:
    """FLOPs of one call (torch's counter: 2 per multiply-add of matmuls and convolutions)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@contextmanager
def precision(device: str, bf16: bool):
    if bf16:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            yield
    else:
        yield


VARIANTS = {
    "fp32": {"channels_last": False, "bf16": False},
    "channels_last": {"channels_last": True, "bf16": False},
    "bf16 autocast": {"channels_last": False, "bf16": True},
    "channels_last + bf16": {"channels_last": True, "bf16": True},
}


def prepare(module: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    module = copy.deepcopy(module)
    return module.to(memory_format=torch.channels_last) if channels_last else module


def as_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def matmul_peak(device: str, dtype: torch.dtype, size: int = 2048, repeat: int = 8) -> Dict[str, float]:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    stats = timed(lambda: a @ b, warmup=1, repeat=repeat)
    flops = 2 * size**3
    return {"median_gflops": flops / stats["median_s"] / 1e9, "best_gflops": flops / stats["best_s"] / 1e9}


# ---------------------------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------------------------


def machine() -> Dict:
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = set(fields.get("Flags", "").split())
        info.update(
            cpu=fields.get("Model name"),
            cpus=fields.get("CPU(s)"),
            cpu_family_model_stepping=f"{fields.get('CPU family')}/{fields.get('Model')}/{fields.get('Stepping')}",
            hypervisor=fields.get("Hypervisor vendor"),
            bf16_hardware={f: f in flags for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")},
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def native_bf16(device: str) -> bool:
    """Whether bf16 matmuls/convolutions run on dedicated hardware (AMX / AVX512-BF16 on CPU, bf16 CUDA GPUs)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


def build_models(configs: Dict[str, dict], device: str, seed: int = 0):
    torch.manual_seed(seed)
    unet = DiffAEUNet2DModel.from_config(configs["unet"]).to(device)
    encoder = SemanticEncoder.from_config(configs["encoder"]).to(device)
    baseline = DiffAEUNet2DModel.from_config({**configs["unet"], "z_sem_channels": None}).to(device)
    return unet, encoder, baseline


def train_step_fn(unet, encoder, batch: int, device: str, variant: Dict, compile_model: bool = False) -> Callable:
    """One official training step: eps-MSE (Eq. 6), backward, clip 1.0, Adam 1e-4, EMA 0.9999 on every weight."""
    unet = prepare(unet, variant["channels_last"]).train()
    encoder = prepare(encoder, variant["channels_last"]).train() if encoder is not None else None
    params = list(unet.parameters()) + (list(encoder.parameters()) if encoder is not None else [])
    optimizer = torch.optim.Adam(params, lr=1e-4)
    ema = EMAModel(params, decay=0.9999, foreach=True)
    noise_scheduler = DDPMScheduler.from_config(_ddim_config(1000, "linear", clip_sample=True))
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    x0 = as_format(torch.rand(batch, 3, size, size, generator=generator).to(device) * 2 - 1, variant["channels_last"])
    noise = as_format(torch.randn(batch, 3, size, size, generator=generator).to(device), variant["channels_last"])
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    model = torch.compile(unet) if compile_model else unet

    def step():
        with precision(device, variant["bf16"]):
            loss = diffae_loss(model, encoder, x0, timesteps, noise, noise_scheduler)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return step


def forward_fn(module, inputs: List, device: str, variant: Dict, compile_model: bool = False) -> Callable:
    module = prepare(module, variant["channels_last"]).eval()
    inputs = [as_format(x, variant["channels_last"]) if isinstance(x, torch.Tensor) else x for x in inputs]
    model = torch.compile(module) if compile_model else module

    def run():
        with torch.inference_mode(), precision(device, variant["bf16"]):
            model(*inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return run


def pipeline_for(unet, encoder, variant: Dict) -> DiffAEPipeline:
    config = _ddim_config(1000, "linear", clip_sample=True)
    pipe = DiffAEPipeline(
        unet=prepare(unet, variant["channels_last"]).eval(),
        encoder=prepare(encoder, variant["channels_last"]).eval(),
        scheduler=DDIMScheduler.from_config(config),
        inverse_scheduler=DDIMInverseScheduler.from_config(config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_decode_fn(pipe: DiffAEPipeline, images: torch.Tensor, steps: int, device: str, variant: Dict) -> Callable:
    images = as_format(images.to(device), variant["channels_last"])

    def run():
        with precision(device, variant["bf16"]):
            latents = pipe.encode(images, num_inference_steps=steps)
            pipe.decode(latents.z_sem, latents.x_T, num_inference_steps=steps, output_type="pt")

    return run


def variants_to_run(device: str, all_variants: bool, expensive: bool) -> Dict[str, Dict]:
    """All variants for cheap measurements; for expensive ones, bf16 only where the hardware runs it natively
    (emulated bf16 was measured 5-7x slower than fp32 for matmuls on CPUs without AVX512-BF16/AMX)."""
    if all_variants or not expensive or native_bf16(device):
        return dict(VARIANTS)
    return {k: v for k, v in VARIANTS.items() if not v["bf16"]}


def bench_preset(name: str, device: str, compile_model: bool, log: Callable, all_variants: bool = False) -> Dict:
    configs = preset_configs(name)
    unet, encoder, baseline = build_models(configs, device)
    size, width = configs["unet"]["sample_size"], configs["unet"]["z_sem_channels"]
    batch = TRAIN_BATCH.get(name, 8)
    result = {
        "config": configs,
        "params_M": {
            "unet": sum(p.numel() for p in unet.parameters()) / 1e6,
            "encoder": sum(p.numel() for p in encoder.parameters()) / 1e6,
            "baseline_unet": sum(p.numel() for p in baseline.parameters()) / 1e6,
        },
        "train_batch": batch,
    }
    gen = torch.Generator().manual_seed(1)
    x1, x16 = (
        torch.randn(1, 3, size, size, generator=gen).to(device),
        torch.randn(16, 3, size, size, generator=gen).to(device),
    )
    z1, z16 = torch.randn(1, width, generator=gen).to(device), torch.randn(16, width, generator=gen).to(device)
    t1, t16 = torch.tensor([500], device=device), torch.full((16,), 500, device=device)
    fp32 = VARIANTS["fp32"]

    # FLOPs per image.
    result["gflop_per_image"] = {
        "unet_forward": count_flops(forward_fn(unet, [x1, t1, z1], device, fp32)) / 1e9,
        "encoder_forward": count_flops(forward_fn(encoder, [x1], device, fp32)) / 1e9,
        "diffae_train_step": count_flops(train_step_fn(unet, encoder, 1, device, fp32)) / 1e9,
        "baseline_train_step": count_flops(train_step_fn(baseline, None, 1, device, fp32)) / 1e9,
    }

    # Training step, DiffAE vs baseline.
    train = {}
    skipped = [v for v in VARIANTS if v not in variants_to_run(device, all_variants, expensive=True)]
    result["skipped_variants"] = (
        f"skipped for training, 10-step encode/decode and the 64 px forward passes: {', '.join(skipped)} (no native "
        "bf16 on this machine; see the matmul peak; --all_variants runs them)"
        if skipped
        else None
    )
    for vname, variant in variants_to_run(device, all_variants, expensive=True).items():
        if vname == "channels_last + bf16":
            continue  # training: bf16 and channels_last are measured separately; their product adds nothing here
        log(f"{name}: train step ({vname})")
        pair = timed_round_robin(
            {
                "diffae": train_step_fn(unet, encoder, batch, device, variant),
                "baseline": train_step_fn(baseline, None, batch, device, variant),
            }
        )
        d, b = pair["diffae"], pair["baseline"]
        train[vname] = {
            "diffae_images_per_s": batch / d["median_s"],
            "baseline_images_per_s": batch / b["median_s"],
            "ratio_diffae_over_baseline": d["median_s"] / b["median_s"],
            "ratio_best_times": d["best_s"] / b["best_s"],
        }
    if compile_model and size <= 32:  # compiling the backward graph of a 64 px model takes too long here
        log(f"{name}: train step (torch.compile; compiling)")
        start = time.perf_counter()
        step = train_step_fn(unet, encoder, batch, device, fp32, compile_model=True)
        step()
        compile_s = time.perf_counter() - start
        # Timed in turns with the eager step, so that the comparison survives load from other jobs.
        both = timed_round_robin(
            {"compiled": step, "eager": train_step_fn(unet, encoder, batch, device, fp32)}, repeat=2
        )
        train["torch.compile"] = {
            "diffae_images_per_s": batch / both["compiled"]["median_s"],
            "eager_images_per_s_same_time": batch / both["eager"]["median_s"],
            "compile_s": compile_s,
        }
    result["train_step"] = train

    # Forward passes and the pipeline.
    forward, encoder_fwd, pipeline = {}, {}, {}
    images4 = torch.rand(4, 3, size, size, generator=gen)
    cheap = size <= 32
    chosen = variants_to_run(device, all_variants, expensive=not cheap)
    log(f"{name}: forward passes ({', '.join(chosen)}, in turns)")
    repeat = 3 if cheap else 1
    batch1 = timed_round_robin(
        {v: forward_fn(unet, [x1, t1, z1], device, c) for v, c in chosen.items()}, repeat=repeat
    )
    batch16 = timed_round_robin(
        {v: forward_fn(unet, [x16, t16, z16], device, c) for v, c in chosen.items()}, repeat=repeat
    )
    enc16 = timed_round_robin({v: forward_fn(encoder, [x16], device, c) for v, c in chosen.items()}, repeat=repeat)
    for vname in chosen:
        forward[vname] = {"batch1_ms": batch1[vname]["median_s"] * 1e3, "batch16_ms": batch16[vname]["median_s"] * 1e3}
        encoder_fwd[vname] = {"batch16_ms": enc16[vname]["median_s"] * 1e3}
    for vname, variant in variants_to_run(device, all_variants, expensive=True).items():
        log(f"{name}: 10-step encode + 10-step decode of 4 images ({vname})")
        pipe = pipeline_for(unet, encoder, variant)
        pipeline[vname] = {
            "encode10_decode10_batch4_s": timed(
                encode_decode_fn(pipe, images4, 10, device, variant), warmup=0, repeat=1
            )["median_s"]
        }
    if compile_model and size <= 32:
        log(f"{name}: UNet forward batch 16 (torch.compile; compiling)")
        run = forward_fn(unet, [x16, t16, z16], device, fp32, compile_model=True)
        start = time.perf_counter()
        run()
        compile_s = time.perf_counter() - start
        both = timed_round_robin({"compiled": run, "eager": forward_fn(unet, [x16, t16, z16], device, fp32)}, repeat=3)
        forward["torch.compile"] = {
            "compile_s": compile_s,
            "batch16_ms": both["compiled"]["median_s"] * 1e3,
            "eager_batch16_ms_same_time": both["eager"]["median_s"] * 1e3,
        }
    result["unet_forward"] = forward
    result["encoder_forward"] = encoder_fwd
    result["encode_decode"] = pipeline
    return result


def bench_headline(device: str, log: Callable, all_variants: bool = False) -> Dict:
    """Editing one 256x256 photo with the FFHQ-256 architecture: encode (T=20) + decode (T=20)."""
    configs = preset_configs("ffhq256")
    torch.manual_seed(0)
    unet = DiffAEUNet2DModel.from_config(configs["unet"]).to(device).eval()
    encoder = SemanticEncoder.from_config(configs["encoder"]).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 256, 256, generator=gen).to(device) * 2 - 1
    z, t = torch.randn(1, 512, generator=gen).to(device), torch.tensor([500], device=device)
    steps = 20
    out = {
        "params_M": (sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in encoder.parameters())) / 1e6
    }
    out["gflop_unet_forward"] = count_flops(forward_fn(unet, [x, t, z], device, VARIANTS["fp32"])) / 1e9
    rows = {}
    # At 256 px plain bf16 is not worth the time; its combination with channels_last runs where bf16 is native.
    chosen = {k: v for k, v in variants_to_run(device, all_variants, expensive=True).items() if k != "bf16 autocast"}
    log(f"ffhq256 headline: UNet and encoder forward ({', '.join(chosen)}, in turns)")
    unet_times = timed_round_robin({v: forward_fn(unet, [x, t, z], device, c) for v, c in chosen.items()}, repeat=2)
    encoder_times = timed_round_robin({v: forward_fn(encoder, [x], device, c) for v, c in chosen.items()}, repeat=1)
    for vname in chosen:
        u, e = unet_times[vname]["median_s"], encoder_times[vname]["median_s"]
        # encode = encoder + T inversion calls; decode = T calls. The DDIM arithmetic between calls is negligible.
        rows[vname] = {
            "unet_forward_s": u,
            "encoder_forward_s": e,
            "edit_T20_extrapolated_s": e + 2 * steps * u,
            "edit_T10_extrapolated_s": e + 2 * 10 * u,
        }
    out["variants"] = rows
    # However well the kernels run, 41 calls cannot beat the machine's measured fp32 matmul rate.
    out["gflop_edit_T20"] = (
        2 * steps * out["gflop_unet_forward"] + count_flops(forward_fn(encoder, [x], device, VARIANTS["fp32"])) / 1e9
    )
    fastest = min(rows, key=lambda k: rows[k]["edit_T20_extrapolated_s"])
    out["fastest"] = fastest
    # Check the extrapolation with a real end-to-end run through the pipeline with T=2+2 (5 network calls).
    variant = VARIANTS[fastest]
    log(f"ffhq256 headline: end-to-end check with T=2+2 ({fastest})")
    pipe = pipeline_for(unet, encoder, variant)
    image = (x + 1) / 2
    real = timed(encode_decode_fn(pipe, image, 2, device, variant), warmup=0, repeat=1)["median_s"]
    predicted = rows[fastest]["encoder_forward_s"] + 4 * rows[fastest]["unet_forward_s"]
    out["check_T2"] = {"measured_s": real, "extrapolated_s": predicted, "ratio": real / predicted}
    return out


def bench_fidelity(fixture_dir: str, log: Callable, steps: int = 10) -> Dict:
    """bf16 / channels_last decoding (and encoding) vs fp32 on the converted official fixture model."""
    from safetensors.torch import load_file

    from diffusers_diffae.convert import convert_official_checkpoint

    ckpt, config = os.path.join(fixture_dir, "last.ckpt"), os.path.join(fixture_dir, "config.json")
    if not os.path.isfile(ckpt):
        return {"skipped": f"skipped: official fixture not found at {fixture_dir}"}
    log("fidelity on the official fixture model")
    pipe = convert_official_checkpoint(ckpt, config)
    pipe.set_progress_bar_config(disable=True)
    x0 = load_file(os.path.join(fixture_dir, "inputs.safetensors"))["x0"]
    images = (x0 + 1) / 2
    with torch.no_grad():
        ref_lat = pipe.encode(images, num_inference_steps=steps)
        ref = pipe.denoise(ref_lat.z_sem, ref_lat.x_T, steps)
    out = {"steps": steps, "images": int(x0.shape[0]), "scale": "pixel values in [-1, 1]"}
    for vname in ("channels_last", "bf16 autocast", "channels_last + bf16"):
        variant = VARIANTS[vname]
        p = copy.deepcopy(pipe)
        if variant["channels_last"]:
            p.unet.to(memory_format=torch.channels_last)
            p.encoder.to(memory_format=torch.channels_last)
        with torch.no_grad(), precision("cpu", variant["bf16"]):
            decoded = p.denoise(ref_lat.z_sem, ref_lat.x_T, steps).float()  # decode from the fp32 codes
            lat = p.encode(images, num_inference_steps=steps)
            round_trip = p.denoise(lat.z_sem, lat.x_T, steps).float()  # encode and decode in this precision
            # One network call on the inputs of the first decoding step: how far the eps prediction itself moves.
            x_t, t = ref_lat.x_T, p.scheduler.timesteps[0]
            eps = p.unet(as_format(x_t, variant["channels_last"]), t, ref_lat.z_sem).sample.float()
        with torch.no_grad():
            eps_ref = pipe.unet(x_t, t, ref_lat.z_sem).sample
        out[vname] = {
            "eps_relative_rms": ((eps - eps_ref).pow(2).mean() / eps_ref.pow(2).mean()).sqrt().item(),
            "decode_max_abs": (decoded - ref).abs().max().item(),
            "decode_mean_abs": (decoded - ref).abs().mean().item(),
            "encode_decode_max_abs": (round_trip - ref).abs().max().item(),
            "encode_decode_mean_abs": (round_trip - ref).abs().mean().item(),
            "x_T_max_abs": (lat.x_T.float() - ref_lat.x_T).abs().max().item(),
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _f(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and abs(v) < 1e-2 else f"{v:.{digits}f}"
    return str(v)


def report(results: Dict) -> str:
    m = results["machine"]
    peak = results["matmul_peak"]
    lines = [
        "# Speed benchmarks",
        "",
        f"Measured by `{results.get('command', 'python benchmarks/bench_speed.py')}` on {results['date']} "
        f"in {results['runtime_s']:.0f} s.",
        "",
        "## Machine",
        "",
        f"- CPU: {m.get('cpu')} ({m.get('cpus')} CPUs, family/model/stepping {m.get('cpu_family_model_stepping')}, "
        f"hypervisor {m.get('hypervisor')}); bf16 hardware: {m.get('bf16_hardware')}; native bf16: {results['native_bf16']}",
        f"- torch {m['torch']}, {m['threads']} threads, Python {m['python']}; {m['platform']}",
        f"- load average at start {tuple(round(v, 2) for v in m['load_average_at_start'] or ())}, at end "
        f"{tuple(round(v, 2) for v in results['load_average_at_end'] or ())} (the VM shares its cores: medians are noisy, "
        "±20% or worse when other jobs run)",
        f"- matmul rate (2048x2048): fp32 {peak['fp32']['median_gflops']:.0f} GFLOP/s median at the start, best "
        f"{peak['fp32']['best_gflops']:.0f} (best at start / end: "
        f'{", ".join(f"{v:.0f}" for v in peak["fp32"].get("best_at_start_and_end", []))}; the best is the "peak" below); '
        f"bf16 {peak['bf16']['median_gflops']:.0f} median ({peak['bf16']['best_gflops']:.0f} best)",
        "",
    ]
    fp32_peak = peak["fp32"]["best_gflops"]
    for name, r in results["presets"].items():
        g = r["gflop_per_image"]
        lines += [
            f"## Preset `{name}` ({r['config']['unet']['sample_size']} px; UNet {r['params_M']['unet']:.2f} M, encoder "
            f"{r['params_M']['encoder']:.2f} M parameters)",
            "",
            f"GFLOP per image: UNet forward {g['unet_forward']:.2f}, encoder forward {g['encoder_forward']:.2f}, "
            f"training step DiffAE {g['diffae_train_step']:.2f} vs DDIM baseline {g['baseline_train_step']:.2f} "
            f"(FLOP ratio {g['diffae_train_step'] / g['baseline_train_step']:.2f}x).",
            "",
            f"**Training step** (batch {r['train_batch']}: forward, loss, backward, clip, Adam, EMA)",
            "",
            "| variant | DiffAE img/s | DDIM baseline img/s | time ratio DiffAE / DDIM | DiffAE % of fp32 peak |",
            "|---|---|---|---|---|",
        ]
        for vname, row in r["train_step"].items():
            if "baseline_images_per_s" not in row:
                lines.append(
                    f"| {vname} (compile {row['compile_s']:.0f} s; eager fp32 timed in turns: "
                    f"{_f(row['eager_images_per_s_same_time'])} img/s) | {_f(row['diffae_images_per_s'])} | – | – | – |"
                )
                continue
            frac = row["diffae_images_per_s"] * g["diffae_train_step"] / fp32_peak
            lines.append(
                f"| {vname} | {_f(row['diffae_images_per_s'])} | {_f(row['baseline_images_per_s'])} | "
                f"{_f(row['ratio_diffae_over_baseline'])} (best times {_f(row['ratio_best_times'])}) | {frac:.0%} |"
            )
        lines += ["", "**Inference** (median wall time)", ""]
        lines += [
            "| variant | UNet batch 1 (ms) | UNet batch 16 (ms) | UNet img/s at 16 | % of fp32 peak at 16 | encoder batch 16 (ms) | encode T=10 + decode T=10, 4 images (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for vname, row in r["unet_forward"].items():
            if vname == "torch.compile":
                lines.append(
                    f"| torch.compile (compile {row['compile_s']:.0f} s; eager fp32 timed in turns: "
                    f"{_f(row['eager_batch16_ms_same_time'], 0)} ms) | – | {_f(row['batch16_ms'], 0)} | "
                    f"{16e3 / row['batch16_ms']:.1f} | – | – | – |"
                )
                continue
            frac = 16e3 / row["batch16_ms"] * g["unet_forward"] / fp32_peak
            lines.append(
                f"| {vname} | {_f(row['batch1_ms'], 0)} | {_f(row['batch16_ms'], 0)} | {16e3 / row['batch16_ms']:.1f} | "
                f"{frac:.0%} | {_f(r['encoder_forward'][vname]['batch16_ms'], 0)} | "
                f"{_f(r['encode_decode'].get(vname, {}).get('encode10_decode10_batch4_s'))} |"
            )
        lines.append("")
        if r.get("skipped_variants"):
            lines += [f"bf16 {r['skipped_variants']}.", ""]
    h = results.get("headline")
    if h:
        lines += [
            "## Headline: editing one 256x256 photo on this CPU (FFHQ-256 architecture, random weights)",
            "",
            f"`encode` with T=20 (encoder + 20 inversion steps) plus `decode` with T=20: 41 network calls. "
            f"{h['params_M']:.0f} M parameters; UNet forward {h['gflop_unet_forward']:.0f} GFLOP. A full fp32 run takes "
            "minutes, so the UNet and encoder forwards are timed and the total is extrapolated "
            f"(checked with a real T=2+2 run: measured {h['check_T2']['measured_s']:.1f} s vs extrapolated "
            f"{h['check_T2']['extrapolated_s']:.1f} s, ratio {h['check_T2']['ratio']:.2f}).",
            "",
            "| variant | UNet forward (s) | encoder (s) | edit, T=20+20 (s, extrapolated) | edit, T=10+10 (s, extrapolated) |",
            "|---|---|---|---|---|",
        ]
        for vname, row in h["variants"].items():
            lines.append(
                f"| {vname} | {_f(row['unet_forward_s'])} | {_f(row['encoder_forward_s'])} | "
                f"{_f(row['edit_T20_extrapolated_s'], 0)} | {_f(row['edit_T10_extrapolated_s'], 0)} |"
            )
        lines.append("")
        best = peak["fp32"]["best_gflops"]
        lines += [
            f"Lower bound in fp32: the edit is {h['gflop_edit_T20'] / 1e3:.1f} TFLOP, which takes "
            f"{h['gflop_edit_T20'] / best:.0f} s even at the best measured fp32 matmul rate ({best:.0f} GFLOP/s); "
            f"T=10+10 halves it. At the measured bf16 rate: {h['gflop_edit_T20'] / peak['bf16']['best_gflops']:.0f} s.",
            "",
        ]
    fid = results.get("fidelity")
    if fid:
        lines += ["## Fidelity of the fast settings (official fixture model, 32 px)", ""]
        if "skipped" in fid:
            lines += [fid["skipped"], ""]
        else:
            lines += [
                f"{fid['images']} images, T={fid['steps']}, differences to fp32 in {fid['scale']}: decoding the fp32 "
                "codes, and encoding + decoding in the given precision.",
                "",
                "| variant | eps relative RMS (one call) | decode max abs | decode mean abs | encode+decode max abs | encode+decode mean abs | x_T max abs |",
                "|---|---|---|---|---|---|---|",
            ]
            for vname in ("channels_last", "bf16 autocast", "channels_last + bf16"):
                row = fid[vname]
                lines.append(
                    f"| {vname} | {_f(row['eps_relative_rms'], 4)} | {_f(row['decode_max_abs'], 4)} | {_f(row['decode_mean_abs'], 4)} | "
                    f"{_f(row['encode_decode_max_abs'], 4)} | {_f(row['encode_decode_mean_abs'], 4)} | {_f(row['x_T_max_abs'], 4)} |"
                )
            lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--presets", default="emoji32,ffhq64", help="Comma-separated presets (emoji32 or official short names)."
    )
    parser.add_argument("--device", default="cpu", help="torch device.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument(
        "--compile", action="store_true", help="Also time torch.compile (minutes of compilation per graph)."
    )
    parser.add_argument("--skip_headline", action="store_true", help="Skip the FFHQ-256 editing headline.")
    parser.add_argument(
        "--all_variants", action="store_true", help="Run bf16 everywhere, even without native bf16 hardware (slow)."
    )
    parser.add_argument(
        "--skip_fidelity", action="store_true", help="Skip the bf16 fidelity check on the official fixture."
    )
    parser.add_argument(
        "--fixture_dir",
        default=os.environ.get(
            "DIFFAE_OFFICIAL_FIXTURES", os.path.join(REPO_ROOT, "pipelines_tests", "fixtures", "official")
        ),
        help="Folder with the official fixture checkpoint (last.ckpt, config.json, inputs.safetensors).",
    )
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "docs", "results"), help="Folder for the results.")
    parser.add_argument("--name", default="speed", help="File name (without extension) of the .md and .json results.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # A fresh cache, so that the reported compile times are what a first run costs (a warm cache hides them).
        import tempfile

        fresh_cache = tempfile.mkdtemp(prefix="bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh_cache
    else:
        fresh_cache = None
    started = time.time()

    def log(message: str) -> None:
        print(f"[bench {time.time() - started:6.0f} s] {message}", flush=True)

    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "compile": args.compile,
        "command": " ".join(["python benchmarks/bench_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "native_bf16": native_bf16(args.device),
    }
    log("matmul peak")
    results["matmul_peak"] = {
        "fp32": matmul_peak(args.device, torch.float32, repeat=5),
        "bf16": matmul_peak(args.device, torch.bfloat16, repeat=2),
    }
    results["presets"] = {
        name: bench_preset(name, args.device, args.compile, log, args.all_variants)
        for name in args.presets.split(",")
        if name
    }
    if not args.skip_headline:
        results["headline"] = bench_headline(args.device, log, args.all_variants)
    if not args.skip_fidelity:
        results["fidelity"] = bench_fidelity(args.fixture_dir, log)
    # Measured again at the end: on a shared machine the higher of the two best rates is the better estimate of
    # what the cores can do, and the spread shows how much other jobs interfered.
    log("matmul peak (again)")
    results["matmul_peak_end"] = {"fp32": matmul_peak(args.device, torch.float32, repeat=5)}
    start_best, end_best = (
        results["matmul_peak"]["fp32"]["best_gflops"],
        results["matmul_peak_end"]["fp32"]["best_gflops"],
    )
    results["matmul_peak"]["fp32"]["best_gflops"] = max(start_best, end_best)
    results["matmul_peak"]["fp32"]["best_at_start_and_end"] = [start_best, end_best]
    results["runtime_s"] = time.time() - started
    results["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if fresh_cache is not None:
        shutil.rmtree(fresh_cache, ignore_errors=True)
    text = report(results)
    print(text)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, f"{args.name}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    with open(os.path.join(args.output, f"{args.name}.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
