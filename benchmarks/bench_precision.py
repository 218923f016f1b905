"""Fidelity of half precision against float32, on the trained bundled model and on the official fixture model.

For each model and each of fp16 and bf16 loaded with `from_pretrained(..., torch_dtype=...)` (the precision-critical
parts stay float32 through `_keep_in_fp32_modules`) and bf16 autocast over the float32 model:

- a single UNet call: eps on noised held-out images at timesteps spread over [0, 999], against fp32's eps;
- decode of fp32 codes: the fp32 encoder's (z_sem, x_T) at T steps decoded in the variant at T steps;
- encode + decode: both in the variant at T steps;

at T=10 and T=20, as mean and max absolute difference to fp32 (pixels in [0, 1]) and the reconstruction SSIM to the
inputs next to fp32's. Writes `<output>/<name>.md` and `.json`.

    python benchmarks/bench_precision.py --dataset data/emoji32 --num_images 16
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
from typing import Dict, List

import torch
from _speed_common import machine, table
from bench_inversion import FIXTURES, add_held_out_arguments, held_out_images  # the inversion report's subset
from safetensors.torch import load_file

from diffusers_diffae import DiffAEPipeline
from diffusers_diffae.convert import convert_official_checkpoint
from diffusers_diffae.evaluation import metrics


VARIANTS = {  # name -> (torch_dtype of from_pretrained, autocast dtype)
    "fp16": (torch.float16, None),
    "bf16": (torch.bfloat16, None),
    "bf16 autocast": (torch.float32, torch.bfloat16),
}


def compute(autocast_dtype):
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=autocast_dtype)


def difference(output: torch.Tensor, reference: torch.Tensor) -> Dict[str, float]:
    diff = (output.float() - reference.float()).abs()
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max())}


def ssim(images: torch.Tensor, inputs: torch.Tensor) -> float:
    return float(metrics.reconstruction_scores(images.float(), inputs)["ssim_official"].mean())


def noised_inputs(pipe: DiffAEPipeline, images: torch.Tensor):
    """x_t (N, C, H, W), t (N,) spread over the training steps and the fp32 z_sem (N, D) of `images`."""
    generator = torch.Generator().manual_seed(0)
    x0 = images * 2 - 1
    t = torch.linspace(0, pipe.scheduler.config.num_train_timesteps - 1, len(images)).round().long()
    alpha_bar = pipe.scheduler.alphas_cumprod[t].float()[:, None, None, None]
    noise = torch.randn(x0.shape, generator=generator)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise, t, pipe.encoder(x0).z_sem


@torch.no_grad()
def measure_model(folder: str, images: torch.Tensor, steps: List[int], fp16_images: int, log) -> Dict:
    """Every row of one model: fp32 reference, then each variant against it. fp16 runs on the first `fp16_images`
    images at the first T only: CPUs without native fp16 convolve in fp16 tens of times slower than in fp32."""
    reference = DiffAEPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    x_t, t, z_sem = noised_inputs(reference, images)
    fp32 = {"eps": reference.unet(x_t, t, z_sem).sample}
    for T in steps:
        latents = reference.encode(images, num_inference_steps=T)
        recon = reference.decode(latents.z_sem, latents.x_T, num_inference_steps=T, output_type="pt").images
        fp32[T] = {"latents": latents, "recon": recon, "ssim": ssim(recon, images)}
    rows = []
    for name, (dtype, autocast_dtype) in VARIANTS.items():
        pipe = DiffAEPipeline.from_pretrained(folder, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        n = fp16_images if dtype == torch.float16 else len(images)
        with compute(autocast_dtype):
            eps = pipe.unet(x_t[:n].to(pipe.unet.dtype), t[:n], z_sem[:n].to(pipe.unet.dtype)).sample
        row = {"variant": name, "test": "single UNet call (eps)", "T": None, "images": n}
        rows.append({**row, **difference(eps, fp32["eps"][:n])})
        log(rows[-1])
        for T in steps[:1] if dtype == torch.float16 else steps:
            codes, reference = fp32[T]["latents"], fp32[T]["recon"][:n]
            with compute(autocast_dtype):
                decoded = pipe.decode(codes.z_sem[:n], codes.x_T[:n], num_inference_steps=T, output_type="pt").images
                latents = pipe.encode(images[:n], num_inference_steps=T)
                both = pipe.decode(latents.z_sem, latents.x_T, num_inference_steps=T, output_type="pt").images
            for test, out in (("decode of fp32 codes", decoded), ("encode + decode", both)):
                row = {"variant": name, "test": test, "T": T, "images": n, **difference(out, reference)}
                row.update(ssim=ssim(out, images[:n]), ssim_fp32=ssim(reference, images[:n]))
                rows.append(row)
                log(row)
    return {"rows": rows}


def precision_table(rows: List[Dict]) -> List[str]:
    """The rows as a Markdown table (followed by a blank line)."""
    return table(
        "variant | test | T | images | mean abs diff to fp32 | max abs diff to fp32 | SSIM to inputs | fp32 SSIM",
        [
            [r["variant"], r["test"], str(r["T"] or "–"), str(r["images"]), f"{r['mean_abs']:.2e}",
             f"{r['max_abs']:.2e}", *([f"{r['ssim']:.4f}", f"{r['ssim_fp32']:.4f}"] if "ssim" in r else ["–", "–"])]
            for r in rows
        ],
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_held_out_arguments(parser, num_images=16)
    parser.add_argument("--steps", default="10,20", help="Comma-separated T of the decode and encode rows.")
    parser.add_argument("--fp16_images", type=int, default=4, help="Images of the fp16 rows (run at the first T).")
    parser.add_argument("--fixture_dir", default=FIXTURES, help="Official fixture (last.ckpt, config.json, inputs).")
    parser.add_argument("--output", default=os.path.join("docs", "results"), help="Folder of the report.")
    parser.add_argument("--name", default="precision", help="File name of the report, without extension.")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    for path in (args.dataset, args.pipeline, args.fixture_dir):
        if not os.path.exists(path):
            parser.error(f"{path} does not exist")

    def log(row):
        print(json.dumps(row), flush=True)

    # 1. the trained bundled model on held-out images
    probe = DiffAEPipeline.from_pretrained(args.pipeline)
    images = held_out_images(args.dataset, args.split, args.num_images, probe)
    trained = measure_model(args.pipeline, images, steps, args.fp16_images, log)

    # 2. the official fixture model, saved as a pipeline folder so that torch_dtype loads it as users would
    fixture = convert_official_checkpoint(
        os.path.join(args.fixture_dir, "last.ckpt"), os.path.join(args.fixture_dir, "config.json")
    )
    fixture_images = (load_file(os.path.join(args.fixture_dir, "inputs.safetensors"))["x0"] + 1) / 2
    with tempfile.TemporaryDirectory() as folder:
        fixture.save_pretrained(folder)
        official = measure_model(folder, fixture_images, steps, args.fp16_images, log)

    # 3. report
    command = "python benchmarks/bench_precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Half precision against float32",
        "",
        f"Measured by `{command}` on {machine('cpu')['cpu']} ({torch.get_num_threads()} threads), torch {torch.__version__}.",
        "",
        "fp16 and bf16: `DiffAEPipeline.from_pretrained(folder, torch_dtype=...)` (norms, time MLPs and z_sem "
        "statistics stay float32 through `_keep_in_fp32_modules`, and the pipeline keeps the DDIM state in float32). "
        "bf16 autocast: the float32 pipeline under `torch.autocast('cpu', dtype=torch.bfloat16)`. "
        "Differences are on pixels in [0, 1] (eps: on the UNet output); SSIM is the official zero-padded protocol, "
        "reconstruction against the inputs. The single UNet call uses each image noised at one timestep, spread "
        "over 0..999. fp16 rows cover the first images at the first T only: this CPU has no native fp16, and its "
        "fp16 convolutions run tens of times slower than fp32 (fp16 is a GPU setting).",
        "",
        f"## Trained bundled model (`{args.pipeline}`): {len(images)} held-out images of split `{args.split}`",
        "",
        *precision_table(trained["rows"]),
        f"## Official fixture model (`{args.fixture_dir}`: its {len(fixture_images)} input images, weights barely "
        "trained)",
        "",
        *precision_table(official["rows"]),
    ]
    os.makedirs(args.output, exist_ok=True)
    for extension, text in (
        ("md", "\n".join(lines)),
        ("json", json.dumps({"command": command, "trained": trained, "official": official}, indent=1)),
    ):
        path = os.path.join(args.output, f"{args.name}.{extension}")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
