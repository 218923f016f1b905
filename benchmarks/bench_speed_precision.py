"""Speed of the compute dtypes, as users load them: fp32, fp16 and bf16 through `from_pretrained(torch_dtype=...)`,
and bf16 autocast over the fp32 pipeline, timed in turns in one run (ratios to fp32 are the result).

- CPU (default): `pipe.encode` (T=10) + `pipe.decode` (T=10) of 4 images at 32 px (`emoji32`, the bundled
  model's architecture) and 64 px (`ffhq64`) in fp32, bf16 and bf16 autocast, and one UNet call in fp16 against
  fp32 (fp16 without native hardware is too slow for whole edits); then the 256 px edit (FFHQ-256 architecture,
  encode T=20 + decode T=20, one image), extrapolated from one timed encoder call and one timed UNet call per
  variant.
- `--device cuda`: encode T=20 + decode T=20 of a batch of 8 at 128 px (`ffhq128`) and 256 px (`ffhq256`) in fp32,
  fp16 and bf16, and bf16 with `torch.compile` of the UNet. Without a CUDA device it says so and exits with 0.

Random weights (speed does not depend on them). Writes `<output>/<name>.md` and `.json` (default `speed_precision`).

    python benchmarks/bench_speed_precision.py
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Callable, Dict, Optional

import torch
from bench_speed import SCHEDULER, machine, preset_configs, synchronize, timed
from diffusers import DDIMScheduler

from diffusers_diffae import DiffAEInverseScheduler, DiffAEPipeline, DiffAEUNet2DModel, SemanticEncoder


VARIANTS = {  # name -> (torch_dtype of from_pretrained, autocast to bf16)
    "fp32": (torch.float32, False),
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
    "bf16 autocast": (torch.float32, True),
}


def save_random_pipeline(preset: str, folder: str) -> None:
    """A pipeline of the preset's architecture with random weights, saved so that torch_dtype loads it."""
    configs = preset_configs(preset)
    torch.manual_seed(0)
    pipe = DiffAEPipeline(
        unet=DiffAEUNet2DModel.from_config(configs["unet"]).eval(),
        encoder=SemanticEncoder.from_config(configs["encoder"]).eval(),
        scheduler=DDIMScheduler.from_config(SCHEDULER),
        inverse_scheduler=DiffAEInverseScheduler.from_config(SCHEDULER),
    )
    pipe.save_pretrained(folder)


def load(folder: str, variant: str, device: str) -> DiffAEPipeline:
    pipe = DiffAEPipeline.from_pretrained(folder, torch_dtype=VARIANTS[variant][0]).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compute(variant: str, device: str):
    if not VARIANTS[variant][1]:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def edit_fn(pipe: DiffAEPipeline, images: torch.Tensor, steps: int, variant: str, device: str) -> Callable:
    """`pipe.encode` (encoder + `steps` inversion calls) and `pipe.decode` (`steps` calls) of `images`."""

    def run():
        with compute(variant, device):
            latents = pipe.encode(images, num_inference_steps=steps, chunk_size=len(images))
            pipe.decode(latents.z_sem, latents.x_T, steps, output_type="pt", chunk_size=len(images))
        synchronize(device)

    return run


def with_ratios(times: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    fp32 = times["fp32"]
    return {
        v: {**t, "speedup_median": fp32["median_s"] / t["median_s"], "speedup_best": fp32["best_s"] / t["best_s"]}
        for v, t in times.items()
    }


def unet_call_fn(pipe: DiffAEPipeline, batch: int, variant: str, device: str) -> Callable:
    """One UNet call on `batch` images at timestep 500."""
    size, dtype = pipe.resolution, pipe.unet.dtype
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    z = torch.randn(batch, pipe.unet.config.z_sem_channels).to(device, dtype)

    def run():
        with torch.inference_mode(), compute(variant, device):
            pipe.unet(x, torch.tensor([500], device=device), z)
        synchronize(device)

    return run


def bench_cpu(log, repeat: int, presets, done: Callable) -> Dict:
    result = {}
    for preset in [p for p in presets if p != "ffhq256"]:
        with tempfile.TemporaryDirectory() as folder:
            save_random_pipeline(preset, folder)
            pipes = {v: load(folder, v, "cpu") for v in VARIANTS}
        size = pipes["fp32"].resolution
        images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        # fp16 without native fp16 hardware is far too slow for whole edits: it gets one UNet call against fp32's
        chosen = [v for v in VARIANTS if v != "fp16"]
        log(f"{preset}: encode T=10 + decode T=10 of 4 images, {', '.join(chosen)} in turns")
        fns = {v: edit_fn(pipes[v], images, 10, v, "cpu") for v in chosen}
        result[preset] = with_ratios(timed(fns, warmup=1, repeat=repeat))
        log(json.dumps({v: round(r["speedup_median"], 2) for v, r in result[preset].items()}))
        log(f"{preset}: one UNet call on 4 images, fp32 and fp16 in turns")
        fns = {v: unet_call_fn(pipes[v], 4, v, "cpu") for v in ("fp32", "fp16")}
        result[f"{preset}_unet_fp16"] = with_ratios(timed(fns, warmup=0, repeat=1))
        done(result)
    if "ffhq256" not in presets:
        return result

    # The 256 px edit: 41 network calls; each variant's encoder and UNet call timed in turns, then extrapolated.
    # Plain fp32 (the official contiguous layout) is the reference; the others keep the pipeline's default layout
    # at 256 px (channels_last).
    modes = {"fp32": "fp32", "fp32 channels_last": "fp32", "bf16": "bf16", "bf16 autocast": "bf16 autocast"}
    with tempfile.TemporaryDirectory() as folder:
        save_random_pipeline("ffhq256", folder)
        pipes = {row: load(folder, mode, "cpu") for row, mode in modes.items()}
    pipes["fp32"].set_memory_format(torch.contiguous_format)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z, t = torch.randn(1, pipes["fp32"].unet.config.z_sem_channels), torch.tensor([500])

    def forward(pipe, variant, encoder):
        def run():
            with torch.inference_mode(), compute(variant, "cpu"):
                dtype = pipe.unet.dtype
                pipe.encoder(x.to(dtype)) if encoder else pipe.unet(x.to(dtype), t, z.to(dtype))

        return run

    log("ffhq256: one encoder call and one UNet call per variant, in turns")
    enc = timed({v: forward(p, modes[v], True) for v, p in pipes.items()}, warmup=1, repeat=1)
    unet = timed({v: forward(p, modes[v], False) for v, p in pipes.items()}, warmup=1, repeat=2)
    edit = {
        v: {
            "median_s": enc[v]["median_s"] + 40 * unet[v]["median_s"],
            "best_s": enc[v]["best_s"] + 40 * unet[v]["best_s"],
        }
        for v in pipes
    }
    result["ffhq256_edit_T20"] = with_ratios(edit)
    return result


def bench_cuda(log, repeat: int, presets, done: Callable) -> Dict:
    result = {}
    for preset in presets:
        with tempfile.TemporaryDirectory() as folder:
            save_random_pipeline(preset, folder)
            pipes = {v: load(folder, v, "cuda") for v in ("fp32", "fp16", "bf16")}
            pipes["bf16 + compile"] = load(folder, "bf16", "cuda")
        pipes["bf16 + compile"].unet.compile()  # in place: the pipeline keeps its registered UNet
        size = pipes["fp32"].resolution
        images = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(0)).cuda()
        fns = {v: edit_fn(pipe, images, 20, v.split(" +")[0], "cuda") for v, pipe in pipes.items()}
        log(f"{preset}: compiling, then encode T=20 + decode T=20 of 8 images in turns")
        start = time.perf_counter()
        fns["bf16 + compile"]()
        compile_s = time.perf_counter() - start
        result[preset] = with_ratios(timed(fns, warmup=1, repeat=repeat))
        result[preset]["bf16 + compile"]["first_call_s"] = compile_s
        done(result)
    return result


def report(results: Dict) -> str:
    info = results["machine"]
    device = info.get("gpu") or f"{info.get('cpu')} ({info.get('cpus')} CPUs, {info.get('threads')} threads)"
    lines = [
        "# Speed of the compute dtypes",
        "",
        f"Measured by `{results['command']}` on {results['date']} in {results['runtime_s']:.0f} s: {device}; native "
        f"bf16: {info['native_bf16']}; torch {info['torch']}. Load average at start {info['load_average_at_start']}, "
        f"at end {results['load_average_at_end']} (other jobs share the cores: variants are timed in turns, so the "
        "ratios hold better than the times).",
        "",
        "Speed-up = fp32 time / variant time, from the median (and from the best) of the runs.",
        "",
    ]
    titles = {
        "emoji32": "32 px (`emoji32`): encode T=10 + decode T=10, 4 images",
        "ffhq64": "64 px (`ffhq64`): encode T=10 + decode T=10, 4 images",
        "emoji32_unet_fp16": "32 px (`emoji32`): one UNet call on 4 images, fp16 against fp32",
        "ffhq64_unet_fp16": "64 px (`ffhq64`): one UNet call on 4 images, fp16 against fp32",
        "ffhq256_edit_T20": "256 px edit (FFHQ-256): encode T=20 + decode T=20, one image, extrapolated from "
        "one encoder and one UNet call; fp32 = plain (contiguous layout), the others in the pipeline's default "
        "channels_last",
        "ffhq128": "128 px (`ffhq128`): encode T=20 + decode T=20, batch 8",
        "ffhq256": "256 px (`ffhq256`): encode T=20 + decode T=20, batch 8",
    }
    for key, rows in results["rows"].items():
        lines += [f"## {titles[key]}", "", "| variant | median s | best s | speed-up (median) | speed-up (best) |"]
        lines.append("|---|---|---|---|---|")
        for v, r in rows.items():
            lines.append(
                f"| {v} | {r['median_s']:.2f} | {r['best_s']:.2f} | {r['speedup_median']:.2f} | {r['speedup_best']:.2f} |"
            )
        if "bf16 + compile" in rows:
            lines.append(
                f"\nFirst call of the compiled UNet (compilation): {rows['bf16 + compile']['first_call_s']:.0f} s."
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Where to run.")
    parser.add_argument("--repeat", type=int, default=2, help="Timed runs per variant (after one warm-up).")
    parser.add_argument("--presets", default=None, help="Comma-separated subset of the presets of the device's table.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--output", default=os.path.join("docs", "results"), help="Folder of the report.")
    parser.add_argument("--name", default="speed_precision", help="File name of the report, without extension.")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: the GPU table (--device cuda) was not measured")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = ["ffhq128", "ffhq256"] if args.device == "cuda" else ["emoji32", "ffhq64", "ffhq256"]
    if args.presets:
        unknown = set(args.presets.split(",")) - set(presets)
        if unknown:
            parser.error(f"unknown presets {sorted(unknown)}; {args.device} runs {', '.join(presets)}")
        presets = args.presets.split(",")
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python benchmarks/bench_speed_precision.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(args.device),
    }

    def write(rows: Dict) -> None:
        """The report so far (rewritten after each preset, so a long run leaves its finished tables)."""
        results.update(rows=rows, runtime_s=time.time() - started, load_average_at_end=os.getloadavg())
        os.makedirs(args.output, exist_ok=True)
        text = report(results)
        for extension, content in (("md", text + "\n"), ("json", json.dumps(results, indent=1, default=str))):
            path = os.path.join(args.output, f"{args.name}.{extension}")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(content)
            os.replace(path + ".tmp", path)
        log(f"wrote {os.path.join(args.output, args.name)}.md")

    bench = bench_cuda if args.device == "cuda" else bench_cpu
    write(bench(log, args.repeat, presets, write))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
