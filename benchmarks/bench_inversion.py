"""Reconstruction fidelity and cost of the stochastic encoders: DDIM inversion against exact inversion.

For a pipeline and held-out images, and for the official fixture model, every (inversion, T) row encodes the images
(z_sem and x_T at T steps), decodes them with the pipeline's DDIM scheduler at the same T and reports SSIM (the
official zero-padded protocol and the plain one), MSE, network calls of the encoding and wall time. Writes
`<output>/<name>.md` and `.json`.

    python benchmarks/bench_inversion.py --dataset data/emoji32 --num_images 64
"""

import argparse
import json
import os
import time

import torch
from bench_speed import machine
from safetensors.torch import load_file

from diffusers_diffae import DiffAEPipeline
from diffusers_diffae.convert import convert_official_checkpoint
from diffusers_diffae.evaluation import metrics


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join("src", "diffusers_diffae", "demo_assets", "diffae-emoji32")
FIXTURES = os.path.join("pipelines_tests", "fixtures", "official")


def count_calls(model: torch.nn.Module):
    """A list that grows by one at every forward call of `model`, and the hook's handle."""
    calls = []
    return calls, model.register_forward_pre_hook(lambda *_: calls.append(1))


def measure(pipe: DiffAEPipeline, images: torch.Tensor, inversion: str, steps: int, iterations: int, batch: int):
    """One row: images (N, C, H, W) in [0, 1] encoded and decoded in batches; metrics averaged over the images."""
    calls, hook = count_calls(pipe.unet)
    scores, recons, start = [], [], time.perf_counter()
    try:
        for i in range(0, len(images), batch):
            x = images[i : i + batch]
            latents = pipe.encode(x, steps, inversion=inversion, inversion_iterations=iterations)
            if i == 0:
                encode_calls = len(calls)
            recon = pipe.decode(latents.z_sem, latents.x_T, steps, output_type="pt").images
            scores.append(metrics.reconstruction_scores(recon, x))
            recons.append(recon)
    finally:
        hook.remove()
    row = {key: float(torch.cat([s[key] for s in scores]).mean()) for key in ("ssim_official", "ssim", "mse")}
    row.update(inversion=inversion, T=steps, encode_calls=encode_calls, seconds=time.perf_counter() - start)
    return row, torch.cat(recons)


def held_out_images(dataset: str, split: str, num_images: int, pipe: DiffAEPipeline) -> torch.Tensor:
    import datasets

    data = datasets.load_from_disk(dataset)[split]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:num_images].tolist()
    return (pipe.preprocess([data[i]["image"] for i in order]) + 1) / 2


def table(rows) -> list:
    lines = [
        "| inversion | T | network calls to encode | SSIM (official) | SSIM (plain) | MSE | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['inversion']} | {r['T']} | {r['encode_calls']} | {r['ssim_official']:.4f} | {r['ssim']:.4f} | "
            f"{r['mse']:.2e} | {r['seconds']:.1f} |"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="save_to_disk dataset with the held-out images.")
    parser.add_argument("--split", default="test", help="Split of the held-out images.")
    parser.add_argument("--pipeline", default=BUNDLED, help="DiffAE pipeline folder (default: the bundled model).")
    parser.add_argument("--num_images", type=int, default=64, help="Held-out images (seeded random subset).")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per network call.")
    parser.add_argument("--ddim_steps", default="10,20,50,100,250", help="T of the DDIM inversion rows.")
    parser.add_argument("--exact_steps", default="5,10,20", help="T of the exact inversion rows.")
    parser.add_argument("--iterations", type=int, default=3, help="Network calls per step of the exact inversion.")
    parser.add_argument("--fixture_dir", default=FIXTURES, help="Official fixture (last.ckpt, config.json, inputs).")
    parser.add_argument("--output", default=os.path.join("docs", "results"), help="Folder of the report.")
    parser.add_argument("--name", default="inversion", help="File name of the report, without extension.")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    grid = [("ddim", int(t)) for t in args.ddim_steps.split(",")] + [
        ("exact", int(t)) for t in args.exact_steps.split(",")
    ]

    # 1. the trained pipeline on held-out images
    pipe = DiffAEPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    images = held_out_images(args.dataset, args.split, args.num_images, pipe)
    measure(pipe, images[: args.batch_size], "ddim", 2, 1, args.batch_size)  # warm-up, not timed
    rows = []
    for inversion, steps in grid:
        rows.append(measure(pipe, images, inversion, steps, args.iterations, args.batch_size)[0])
        print(json.dumps(rows[-1]), flush=True)

    # 2. the official fixture model: how close exact inversion comes to the input, pixel by pixel
    fixture = convert_official_checkpoint(
        os.path.join(args.fixture_dir, "last.ckpt"), os.path.join(args.fixture_dir, "config.json")
    )
    fixture.set_progress_bar_config(disable=True)
    x0 = (load_file(os.path.join(args.fixture_dir, "inputs.safetensors"))["x0"] + 1) / 2
    fixture_rows = []
    for inversion, steps in grid:
        row, recon = measure(fixture, x0, inversion, steps, args.iterations, args.batch_size)
        error = (recon - x0).abs() * 2  # on the model's [-1, 1] scale
        inside = (x0 > 0) & (x0 < 1) & (recon > 0) & (recon < 1)  # neither input nor output saturated
        row.update(
            max_abs=float(error.max()), max_abs_inside=float(error[inside].max()), inside=float(inside.float().mean())
        )
        fixture_rows.append(row)
        print(json.dumps(row), flush=True)

    # 3. report
    cpu = machine("cpu")["cpu"]
    lines = [
        "# DDIM inversion vs exact inversion",
        "",
        f"Measured by `python benchmarks/bench_inversion.py --dataset {args.dataset} --num_images {args.num_images}` on "
        f"{cpu} ({torch.get_num_threads()} threads), torch {torch.__version__}.",
        "",
        f"## `{args.pipeline}`: {len(images)} held-out images of split `{args.split}`",
        "",
        "Encode at T steps (`pipe.encode(..., inversion=...)`), decode with the pipeline's DDIM scheduler at the same T. "
        f"Exact inversion spends {args.iterations} network calls per step (`inversion_iterations`).",
        "",
        *table(rows),
        "",
        f"## Official fixture model (`{args.fixture_dir}`: its 4 input images, 32 px, weights barely trained)",
        "",
        *table(fixture_rows),
        "",
        "| inversion | T | max abs error, all pixels | max abs error, unsaturated pixels | share unsaturated |",
        "|---|---|---|---|---|",
        *[
            f"| {r['inversion']} | {r['T']} | {r['max_abs']:.2e} | {r['max_abs_inside']:.2e} | {r['inside']:.2f} |"
            for r in fixture_rows
        ],
        "",
        "Errors on the model's [-1, 1] scale; unsaturated pixels are those where neither the input nor the "
        "reconstruction is at 0 or 1 (where the decoder's x0 clipping decides the value, no x_T moves it).",
    ]
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, f"{args.name}.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.output, f"{args.name}.json"), "w", encoding="utf-8") as f:
        json.dump({"pipeline": args.pipeline, "split": args.split, "rows": rows, "fixture": fixture_rows}, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
