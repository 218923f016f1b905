"""Speed of Diffusion Autoencoders on this machine: DiffAE against the DDIM baseline, the cost of each speed-up,
and the compute dtypes as users load them. The one entry point of `docs/results/speed.md`.

1. For the presets `emoji32` (the bundled model's architecture) and `ffhq64`, with random weights: the training
   step, DiffAE against the DDIM baseline (paper Table 7); UNet and encoder forwards; each in fp32, channels_last,
   bf16 autocast (and torch.compile with `--compile`), with FLOPs from torch's counter.
2. Precision and layout (`_speed_dtypes.py`): encode T=10 + decode T=10 of 4 images at 32 and 64 px loaded with
   `torch_dtype` fp32 / bf16 / fp16, bf16 autocast, contiguous or channels_last; the torch.profiler breakdown of the
   32 px run; editing one 256x256 photo with the FFHQ-256 architecture (encode T=20 + decode T=20). With
   `--device cuda`: encode T=20 + decode T=20 of a batch of 8 at 128 and 256 px in fp32, fp16, bf16 and bf16 with
   torch.compile of the UNet (without a CUDA device the CPU report says the GPU table was not measured).
3. Fidelity of channels_last and bf16 autocast against fp32 on the official fixture model (barely trained; the
   trained model's precision is `bench_precision.py`'s report).

See benchmarks/README.md; writes `<output>/<name>.md` and `<name>.json` (default `docs/results/speed`).
"""

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import _speed_dtypes as dtypes
import torch
from _speed_common import (  # noqa: F401  (interleaved and machine: imported from here by the other benchmarks)
    CLOCK,
    CLOCKS,
    REPO_ROOT,
    SCHEDULER,
    count_flops,
    fmt,
    interleaved,
    load_average,
    machine,
    matmul_rate,
    n_params,
    preset_configs,
    synchronize,
    table,
    timed,
    timed_once,
    write_atomic,
)
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from diffusers_diffae import DiffAEUNet2DModel, SemanticEncoder
from diffusers_diffae.training_utils import diffae_loss


TRAIN_BATCH = {"emoji32": 32, "ffhq64": 2}
VARIANTS = {
    "fp32": {"channels_last": False, "bf16": False},
    "channels_last": {"channels_last": True, "bf16": False},
    "bf16 autocast": {"channels_last": False, "bf16": True},
    "channels_last + bf16": {"channels_last": True, "bf16": True},
}
FIDELITY_VARIANTS = ("channels_last", "bf16 autocast", "channels_last + bf16")
CPU_DTYPE_PRESETS = ["emoji32", "ffhq64", "ffhq256"]  # the dtype rows; ffhq256 is the 256 px edit
CUDA_DTYPE_PRESETS = ["ffhq128", "ffhq256"]


# 1. Variants of the training step and the forwards


def autocast(device: str, variant: Dict):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=variant["bf16"])


def as_format(x: torch.Tensor, variant: Dict) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if variant["channels_last"] and x.ndim == 4 else x


def prepare(module: torch.nn.Module, variant: Dict) -> torch.nn.Module:
    module = copy.deepcopy(module)
    return module.to(memory_format=torch.channels_last) if variant["channels_last"] else module


def train_step_fn(unet, encoder, batch: int, device: str, variant: Dict, compile_model: bool = False) -> Callable:
    """One official training step: eps-MSE (Eq. 6), backward, clip 1.0, Adam 1e-4, EMA 0.9999 on every weight."""
    unet = prepare(unet, variant).train()
    encoder = prepare(encoder, variant).train() if encoder is not None else None
    params = list(unet.parameters()) + (list(encoder.parameters()) if encoder is not None else [])
    optimizer = torch.optim.Adam(params, lr=1e-4)
    ema = EMAModel(params, decay=0.9999, foreach=True)
    noise_scheduler = DDPMScheduler.from_config(SCHEDULER)
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    x0 = as_format(torch.rand(batch, 3, size, size, generator=generator).to(device) * 2 - 1, variant)
    noise = as_format(torch.randn(batch, 3, size, size, generator=generator).to(device), variant)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    model = torch.compile(unet) if compile_model else unet

    def step():
        with autocast(device, variant):
            loss = diffae_loss(model, encoder, x0, timesteps, noise, noise_scheduler)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        synchronize(device)

    return step


def forward_fn(module, inputs: List, device: str, variant: Dict, compile_model: bool = False) -> Callable:
    module = prepare(module, variant).eval()
    inputs = [as_format(x, variant) for x in inputs]
    model = torch.compile(module) if compile_model else module

    def run():
        with torch.inference_mode(), autocast(device, variant):
            model(*inputs)
        synchronize(device)

    return run


def variants_to_run(native_bf16: bool, all_variants: bool, expensive: bool) -> Dict[str, Dict]:
    """Every variant for cheap measurements; for expensive ones bf16 only where the hardware runs it natively
    (emulated bf16 matmuls were measured 5-7x slower than fp32 on CPUs without AVX512-BF16 or AMX)."""
    if all_variants or not expensive or native_bf16:
        return dict(VARIANTS)
    return {k: v for k, v in VARIANTS.items() if not v["bf16"]}


# 4. Measurements


def bench_preset(name: str, device: str, compile_model: bool, native_bf16: bool, all_variants: bool, log) -> Dict:
    configs = preset_configs(name)
    torch.manual_seed(0)
    unet = DiffAEUNet2DModel.from_config(configs["unet"]).to(device)
    encoder = SemanticEncoder.from_config(configs["encoder"]).to(device)
    baseline = DiffAEUNet2DModel.from_config({**configs["unet"], "z_sem_channels": None}).to(device)
    size, width = configs["unet"]["sample_size"], configs["unet"]["z_sem_channels"]
    batch = TRAIN_BATCH.get(name, 8)
    fp32, expensive = VARIANTS["fp32"], variants_to_run(native_bf16, all_variants, expensive=True)
    gen = torch.Generator().manual_seed(1)
    x1, x16 = (torch.randn(n, 3, size, size, generator=gen).to(device) for n in (1, 16))
    z1, z16 = (torch.randn(n, width, generator=gen).to(device) for n in (1, 16))
    t1, t16 = torch.tensor([500], device=device), torch.full((16,), 500, device=device)
    skipped = [v for v in VARIANTS if v not in expensive]
    result = {
        "config": configs,
        "params_M": {"unet": n_params(unet), "encoder": n_params(encoder), "baseline_unet": n_params(baseline)},
        "train_batch": batch,
        "gflop_per_image": {
            "unet_forward": count_flops(forward_fn(unet, [x1, t1, z1], device, fp32)) / 1e9,
            "encoder_forward": count_flops(forward_fn(encoder, [x1], device, fp32)) / 1e9,
            "diffae_train_step": count_flops(train_step_fn(unet, encoder, 1, device, fp32)) / 1e9,
            "baseline_train_step": count_flops(train_step_fn(baseline, None, 1, device, fp32)) / 1e9,
        },
        "skipped_variants": skipped,
    }

    # Training step, DiffAE vs baseline in turns (bf16 and channels_last together add nothing for training).
    train = {}
    for vname, variant in expensive.items():
        if vname == "channels_last + bf16":
            continue
        log(f"{name}: train step ({vname})")
        pair = timed(
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
    result["train_step"] = train

    # Forward passes, then encode + decode through the pipeline.
    chosen = variants_to_run(native_bf16, all_variants, expensive=size > 32)
    log(f"{name}: forward passes ({', '.join(chosen)}, in turns)")
    repeat = 3 if size <= 32 else 1
    batch1 = timed({v: forward_fn(unet, [x1, t1, z1], device, c) for v, c in chosen.items()}, repeat=repeat)
    batch16 = timed({v: forward_fn(unet, [x16, t16, z16], device, c) for v, c in chosen.items()}, repeat=repeat)
    enc16 = timed({v: forward_fn(encoder, [x16], device, c) for v, c in chosen.items()}, repeat=repeat)
    result["unet_forward"] = {
        v: {"batch1_ms": batch1[v]["median_s"] * 1e3, "batch16_ms": batch16[v]["median_s"] * 1e3} for v in chosen
    }
    result["encoder_forward"] = {v: {"batch16_ms": enc16[v]["median_s"] * 1e3} for v in chosen}
    if compile_model and size <= 32:  # compiling a 64 px model's backward graph takes too long here
        # Each compiled graph's first call compiles it; then compiled and eager fp32 are timed in turns.
        log(f"{name}: torch.compile of the training step and the UNet forward at batch 16 (compiling)")
        step = {c: train_step_fn(unet, encoder, batch, device, fp32, compile_model=c) for c in (True, False)}
        forward = {c: forward_fn(unet, [x16, t16, z16], device, fp32, compile_model=c) for c in (True, False)}
        result["compile"] = {"train_compile_s": timed_once(step[True]), "unet_compile_s": timed_once(forward[True])}
        for key, fns, repeat in (("train_step_s", step, 2), ("unet_batch16_s", forward, 3)):
            both = timed({"compiled": fns[True], "eager": fns[False]}, repeat=repeat)
            result["compile"][key] = {k: v["median_s"] for k, v in both.items()}
    return result


def bench_fidelity(fixture_dir: str, log, steps: int = 10) -> Dict:
    """channels_last / bf16 against fp32 on the converted official fixture model: one eps prediction, decoding the
    fp32 codes, and encoding + decoding in the variant."""
    from safetensors.torch import load_file

    from diffusers_diffae.convert import convert_official_checkpoint

    ckpt = os.path.join(fixture_dir, "last.ckpt")
    if not os.path.isfile(ckpt):
        return {"skipped": f"skipped: official fixture not found at {fixture_dir}"}
    log("fidelity on the official fixture model")
    pipe = convert_official_checkpoint(ckpt, os.path.join(fixture_dir, "config.json"))
    pipe.set_progress_bar_config(disable=True)
    x0 = load_file(os.path.join(fixture_dir, "inputs.safetensors"))["x0"]
    images = (x0 + 1) / 2
    with torch.no_grad():
        ref = pipe.encode(images, num_inference_steps=steps)
        ref_pixels = pipe.decode(ref.z_sem, ref.x_T, steps, output_type="latent").images
        t = pipe.scheduler.timesteps[0]  # the first decoding step's timestep
        eps_ref = pipe.unet(ref.x_T, t, ref.z_sem).sample
    out = {"steps": steps, "images": int(x0.shape[0]), "scale": "pixel values in [-1, 1]"}
    for vname in FIDELITY_VARIANTS:
        variant = VARIANTS[vname]
        p = copy.deepcopy(pipe)
        p.set_memory_format(torch.channels_last if variant["channels_last"] else torch.contiguous_format)
        with torch.no_grad(), autocast("cpu", variant):
            decoded = p.decode(ref.z_sem, ref.x_T, steps, output_type="latent").images.float()
            latents = p.encode(images, num_inference_steps=steps)
            round_trip = p.decode(latents.z_sem, latents.x_T, steps, output_type="latent").images.float()
            eps = p.unet(as_format(ref.x_T, variant), t, ref.z_sem).sample.float()
        out[vname] = {
            "eps_relative_rms": ((eps - eps_ref).pow(2).mean() / eps_ref.pow(2).mean()).sqrt().item(),
            "decode_max_abs": (decoded - ref_pixels).abs().max().item(),
            "decode_mean_abs": (decoded - ref_pixels).abs().mean().item(),
            "encode_decode_max_abs": (round_trip - ref_pixels).abs().max().item(),
            "encode_decode_mean_abs": (round_trip - ref_pixels).abs().mean().item(),
            "x_T_max_abs": (latents.x_T.float() - ref.x_T).abs().max().item(),
        }
    return out


# 5. Report


def report(results: Dict) -> str:
    m, peak = results["machine"], results["matmul_peak"]
    fp32_peak = peak["fp32"]["best_gflops"]
    load_end = tuple(round(v, 2) for v in results["load_average_at_end"] or ())
    best_both = ", ".join(f"{v:.0f}" for v in peak["fp32"].get("best_at_start_and_end", []))
    lines = [
        "# Speed benchmarks",
        "",
        f"Measured by `{results['command']}` on {results['date']} in {results['runtime_s']:.0f} s.",
        "",
        "## Machine",
        "",
        f"- CPU: {m.get('cpu')} ({m.get('cpus')} CPUs, family/model/stepping {m.get('cpu_family_model_stepping')}, "
        f"hypervisor {m.get('hypervisor')}); bf16 hardware: {m.get('bf16_hardware')}; "
        f"native bf16: {m['native_bf16']}",
        f"- torch {m['torch']}, {m['threads']} threads, Python {m['python']}; {m['platform']}",
        f"- times: {'CPU time of this process (one thread)' if results.get('clock') == 'cpu' else 'wall time'}",
        f"- load average at start {tuple(round(v, 2) for v in m['load_average_at_start'] or ())}, at end {load_end} "
        "(the VM shares its cores: medians are noisy, ±20% or worse when other jobs run)",
        f"- matmul rate (2048x2048): fp32 {peak['fp32']['median_gflops']:.0f} GFLOP/s median at the start, best "
        f'{fp32_peak:.0f} (best at start / end: {best_both}; the best is the "peak" below); '
        f"bf16 {peak['bf16']['median_gflops']:.0f} median ({peak['bf16']['best_gflops']:.0f} best)",
        "",
    ]
    for name, r in results["presets"].items():
        g = r["gflop_per_image"]
        lines += [
            f"## Preset `{name}` ({r['config']['unet']['sample_size']} px; UNet {r['params_M']['unet']:.2f} M, "
            f"encoder {r['params_M']['encoder']:.2f} M parameters)",
            "",
            f"GFLOP per image: UNet forward {g['unet_forward']:.2f}, encoder forward {g['encoder_forward']:.2f}, "
            f"training step DiffAE {g['diffae_train_step']:.2f} vs DDIM baseline {g['baseline_train_step']:.2f} "
            f"(FLOP ratio {g['diffae_train_step'] / g['baseline_train_step']:.2f}x).",
            "",
            f"**Training step** (batch {r['train_batch']}: forward, loss, backward, clip, Adam, EMA)",
            "",
        ]
        rows = []
        for vname, row in r["train_step"].items():
            share = row["diffae_images_per_s"] * g["diffae_train_step"] / fp32_peak
            ratio = f"{fmt(row['ratio_diffae_over_baseline'])} (best times {fmt(row['ratio_best_times'])})"
            rows.append(
                [vname, fmt(row["diffae_images_per_s"]), fmt(row["baseline_images_per_s"]), ratio, f"{share:.0%}"]
            )
        header = "variant | DiffAE img/s | DDIM baseline img/s | time ratio DiffAE / DDIM | DiffAE % of fp32 peak"
        lines += table(header, rows) + ["**Inference** (median time)", ""]
        rows = []
        for vname, row in r["unet_forward"].items():
            per_s = f"{16e3 / row['batch16_ms']:.1f}"
            share = 16e3 / row["batch16_ms"] * g["unet_forward"] / fp32_peak
            encoder_ms = fmt(r["encoder_forward"][vname]["batch16_ms"], 0)
            rows.append(
                [vname, fmt(row["batch1_ms"], 0), fmt(row["batch16_ms"], 0), per_s, f"{share:.0%}", encoder_ms]
            )
        header = "variant | UNet batch 1 (ms) | UNet batch 16 (ms) | UNet img/s at 16 | % of fp32 peak at 16 | "
        lines += table(header + "encoder batch 16 (ms)", rows)
        if r["skipped_variants"]:
            lines += [
                f"bf16 skipped for training and the 64 px forward passes: "
                f"{', '.join(r['skipped_variants'])} (no native bf16 on this machine; see the matmul peak; "
                "--all_variants runs them).",
                "",
            ]
        if "compile" in r:
            c = r["compile"]
            train, unet = c["train_step_s"], c["unet_batch16_s"]
            lines += [
                f"**torch.compile** (fp32; compiled and eager timed in turns): training step "
                f"{r['train_batch'] / train['compiled']:.2f} img/s vs {r['train_batch'] / train['eager']:.2f} eager "
                f"(compiling took {c['train_compile_s']:.0f} s), UNet forward at batch 16 "
                f"{unet['compiled'] * 1e3:.0f} ms vs {unet['eager'] * 1e3:.0f} ms eager (compiling took "
                f"{c['unet_compile_s']:.0f} s).",
                "",
            ]
    if results.get("dtypes"):
        lines += dtypes.report(results["dtypes"], results["device"], peak)
    if results["device"] == "cpu":
        lines += ["## GPU (`--device cuda`)", "", results["gpu"], ""]
    fid = results.get("fidelity")
    if fid:
        lines += [
            "## Fidelity of the fast settings (official fixture model, 32 px)",
            "",
            "The fixture's weights are barely trained, which magnifies bf16's error; on the trained bundled model bf16 "
            "stays within its fidelity bound (docs/results/precision.md).",
            "",
        ]
        if "skipped" in fid:
            return "\n".join(lines + [fid["skipped"], ""])
        lines += [
            f"{fid['images']} images, T={fid['steps']}, differences to fp32 in {fid['scale']}: decoding the fp32 "
            "codes, and encoding + decoding in the given precision.",
            "",
        ]
        keys = ["eps_relative_rms", "decode_max_abs", "decode_mean_abs", "encode_decode_max_abs"]
        keys += ["encode_decode_mean_abs", "x_T_max_abs"]
        header = "variant | eps relative RMS (one call) | decode max abs | decode mean abs | encode+decode max abs | "
        rows = [[v] + [fmt(fid[v][k], 4) for k in keys] for v in FIDELITY_VARIANTS]
        lines += table(header + "encode+decode mean abs | x_T max abs", rows)
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="emoji32,ffhq64", help="Comma-separated presets (emoji32 or official).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Where to run.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--compile", action="store_true", help="Also time torch.compile (minutes per graph).")
    parser.add_argument(
        "--dtype_presets",
        default=None,
        help=f"Comma-separated presets of the precision rows ('' for none; default: {','.join(CPU_DTYPE_PRESETS)} "
        f"on the CPU, where ffhq256 is the 256 px edit; {','.join(CUDA_DTYPE_PRESETS)} with --device cuda).",
    )
    parser.add_argument("--repeat", type=int, default=3, help="Timed runs per variant of the precision rows.")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall: wall time; cpu: CPU time of this process (needs --threads 1), which other jobs do not inflate.",
    )
    parser.add_argument("--skip_fidelity", action="store_true", help="Skip the fidelity check on the fixture.")
    parser.add_argument(
        "--all_variants", action="store_true", help="Run bf16 everywhere, even without native bf16 hardware (slow)."
    )
    parser.add_argument(
        "--fixture_dir",
        default=os.environ.get(
            "DIFFAE_OFFICIAL_FIXTURES", os.path.join(REPO_ROOT, "pipelines_tests/fixtures/official")
        ),
        help="Folder with the official fixture checkpoint (last.ckpt, config.json, inputs.safetensors).",
    )
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "docs", "results"), help="Folder for the results.")
    parser.add_argument("--name", default="speed", help="File name (without extension) of the .md and .json results.")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    allowed = CUDA_DTYPE_PRESETS if args.device == "cuda" else CPU_DTYPE_PRESETS
    dtype_presets = allowed if args.dtype_presets is None else [p for p in args.dtype_presets.split(",") if p]
    if set(dtype_presets) - set(allowed):
        parser.error(f"--dtype_presets: unknown {sorted(set(dtype_presets) - set(allowed))}; choose from {allowed}")
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (the CPU time of several threads is not the time of a run)")
    CLOCK["name"] = args.clock
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.threads:
        torch.set_num_threads(args.threads)
    fresh_cache = None
    if args.compile and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # A fresh cache, so that the reported compile times are what a first run costs (a warm cache hides them).
        fresh_cache = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
    started = time.time()

    def log(message: str) -> None:
        print(f"[bench {time.time() - started:6.0f} s] {message}", flush=True)

    info = machine(args.device)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "compile": args.compile,
        "command": " ".join(["python benchmarks/bench_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device,
        "clock": args.clock,
        "machine": info,
        "gpu": "Measured with `--device cuda` where a CUDA device is present (128 and 256 px, batch 8, fp32 / fp16 / "
        "bf16 / bf16 with torch.compile of the UNet). "
        + ("Not measured in this run." if cuda else "Not measured: this machine has no CUDA device."),
    }
    log("matmul rate")
    results["matmul_peak"] = {
        "fp32": matmul_rate(args.device, torch.float32),
        "bf16": matmul_rate(args.device, torch.bfloat16, repeat=2),
    }
    native, every = info["native_bf16"], args.all_variants
    results["presets"] = {
        name: bench_preset(name, args.device, args.compile, native, every, log)
        for name in args.presets.split(",")
        if name
    }
    bench_dtypes = dtypes.bench_cuda if args.device == "cuda" else dtypes.bench_cpu
    results["dtypes"] = bench_dtypes(log, args.repeat, dtype_presets, lambda rows: log("precision rows done"))
    if not args.skip_fidelity:
        results["fidelity"] = bench_fidelity(args.fixture_dir, log)
    # Measured again at the end: on a shared machine the higher of the two best rates is the better estimate of
    # what the cores can do, and the spread shows how much other jobs interfered.
    log("matmul rate (again)")
    fp32 = results["matmul_peak"]["fp32"]
    both = [fp32["best_gflops"], matmul_rate(args.device, torch.float32)["best_gflops"]]
    fp32.update(best_gflops=max(both), best_at_start_and_end=both)
    results["runtime_s"] = time.time() - started
    results["load_average_at_end"] = load_average()
    if fresh_cache is not None:
        shutil.rmtree(fresh_cache, ignore_errors=True)
    text = report(results)
    print(text)
    write_atomic(os.path.join(args.output, f"{args.name}.json"), json.dumps(results, indent=2, default=str))
    write_atomic(os.path.join(args.output, f"{args.name}.md"), text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
