"""Reconstruction fidelity and cost of the stochastic encoders: DDIM inversion against exact inversion.

For a pipeline and held-out images, and for the official fixture model, every (inversion, T) row encodes the images
(z_sem and x_T at T steps), decodes them with the pipeline's DDIM scheduler at the same T and reports SSIM (the
official zero-padded protocol and the plain one), MSE, network calls of the encoding and CPU time (summed over
threads, which other jobs on the cores inflate less than wall time). For the fixture it also reports the error on the
pixels whose x0 the decoder never clips, and for both models, step by step, how strongly the fixed-point map of exact inversion contracts (the spectral radius of its Jacobian, estimated by power
iteration with Jacobian-vector products): above 1 no fixed-point refinement of that step converges. Writes
`<output>/<name>.md` and `.json`.

    python benchmarks/bench_inversion.py --dataset data/emoji32 --num_images 64
"""

import argparse
import json
import os
import time

import torch
from _speed_common import machine, table
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor
from safetensors.torch import load_file

from diffusers_diffae import DiffAEPipeline
from diffusers_diffae.convert import convert_official_checkpoint
from diffusers_diffae.evaluation import metrics
from diffusers_diffae.schedulers import invert_step


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join("src", "diffusers_diffae", "demo_assets", "diffae-emoji32")
FIXTURES = os.path.join("pipelines_tests", "fixtures", "official")


def count_calls(model: torch.nn.Module):
    """A list that grows by one at every forward call of `model`, and the hook's handle."""
    calls = []
    return calls, model.register_forward_pre_hook(lambda *_: calls.append(1))


def measure(pipe: DiffAEPipeline, images: torch.Tensor, inversion: str, steps: int, iterations: int, batch: int):
    """One row: images (N, C, H, W) in [0, 1] encoded and decoded in batches, metrics averaged over the images; with
    the reconstructions and the codes (z_sem, x_T)."""
    calls, hook = count_calls(pipe.unet)
    scores, recons, codes, start = [], [], [], time.process_time()
    try:
        for i in range(0, len(images), batch):
            x = images[i : i + batch]
            latents = pipe.encode(x, steps, inversion=inversion, inversion_iterations=iterations)
            if i == 0:
                encode_calls = len(calls)
            recon = pipe.decode(latents.z_sem, latents.x_T, steps, output_type="pt").images
            scores.append(metrics.reconstruction_scores(recon, x))
            recons.append(recon)
            codes.append(latents)
    finally:
        hook.remove()
    row = {key: float(torch.cat([s[key] for s in scores]).mean()) for key in ("ssim_official", "ssim", "mse")}
    row.update(inversion=inversion, T=steps, encode_calls=encode_calls, cpu_seconds=time.process_time() - start)
    z_sem, x_T = (torch.cat([getattr(c, name) for c in codes]) for name in ("z_sem", "x_T"))
    return row, torch.cat(recons), z_sem, x_T


@torch.no_grad()
def never_clipped(pipe: DiffAEPipeline, z_sem: torch.Tensor, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """Mask (N, C, H, W) of the pixels whose predicted x0 stays inside the clipping range at every step of the
    decoder's DDIM run from (z_sem, x_T); the same steps as `pipe.decode`, whose clipping hides the raw x0."""
    decoder = DDIMScheduler.from_config(pipe.scheduler.config)
    decoder.set_timesteps(steps)
    x, inside = x_T, torch.ones_like(x_T, dtype=torch.bool)
    for t in decoder.timesteps:
        eps = pipe.unet(x, t, z_sem).sample
        alpha = decoder.alphas_cumprod[t]
        inside &= ((x - (1 - alpha) ** 0.5 * eps) / alpha**0.5).abs() <= decoder.config.clip_sample_range
        x = decoder.step(eps, t, x, use_clipped_model_output=True).prev_sample
    return inside


def contraction(pipe: DiffAEPipeline, images: torch.Tensor, steps: int, iterations: int, power_iterations: int = 20):
    """Per step of exact inversion (from the image upwards): the largest over `images` of the power-iteration estimate
    of the spectral radius of the step's fixed-point map x -> solve(eps(x)) at the x the inversion reached, and the
    step's remaining residual max |step(x) - target| (pixels in [-1, 1])."""
    latents = pipe.encode(images, steps, stochastic=False)
    reached = []  # x at each level, collected by the step callback
    x0 = images * 2 - 1
    pipe.invert(
        x0, latents.z_sem, steps, inversion="exact", inversion_iterations=iterations,
        callback_on_step_end=lambda _p, _i, _t, tensors: reached.append(tensors["latents"]) or {},
    )  # fmt: skip
    decoder = DDIMScheduler.from_config(pipe.inverse_scheduler.config)
    decoder.set_timesteps(steps)
    processors = pipe.unet.attn_processors
    pipe.unet.set_attn_processor(AttnProcessor())  # the fused SDPA kernel has no forward-mode derivative on a CPU
    rows = []
    try:
        for t, target, x in zip(decoder.timesteps.flip(0).tolist(), [x0, *reached[:-1]], reached):

            def solve(y, t=t, target=target):  # the step's solution for the eps predicted at y
                eps = pipe.unet(y, t, latents.z_sem).sample
                return invert_step(lambda _: eps, decoder, t, target, eps, num_iterations=1)[0]

            v, growth = torch.randn_like(x), None
            for _ in range(power_iterations):
                v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                v = torch.func.jvp(solve, (x,), (v,))[1]
                growth = v.flatten(1).norm(dim=1)
            with torch.no_grad():
                eps = pipe.unet(x, t, latents.z_sem).sample
                residual = decoder.step(eps, t, x, use_clipped_model_output=True).prev_sample - target
            rows.append({"t": t, "radius": float(growth.max()), "residual": float(residual.abs().max())})
    finally:
        pipe.unet.set_attn_processor(processors)
    return rows


def held_out_images(dataset: str, split: str, num_images: int, pipe: DiffAEPipeline) -> torch.Tensor:
    import datasets

    data = datasets.load_from_disk(dataset)[split]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:num_images].tolist()
    return (pipe.preprocess([data[i]["image"] for i in order]) + 1) / 2


def add_held_out_arguments(parser: argparse.ArgumentParser, num_images: int) -> None:
    """The options that pick the pipeline and its held-out images (for [`held_out_images`])."""
    parser.add_argument("--dataset", required=True, help="save_to_disk dataset with the held-out images.")
    parser.add_argument("--split", default="test", help="Split of the held-out images.")
    parser.add_argument("--pipeline", default=BUNDLED, help="DiffAE pipeline folder (default: the bundled model).")
    parser.add_argument("--num_images", type=int, default=num_images, help="Held-out images (seeded random subset).")


def reconstruction_table(rows) -> list:
    """The reconstruction rows as a Markdown table (followed by a blank line)."""
    return table(
        "inversion | T | network calls to encode | SSIM (official) | SSIM (plain) | MSE | CPU seconds",
        [
            [r["inversion"], str(r["T"]), str(r["encode_calls"]), f"{r['ssim_official']:.4f}", f"{r['ssim']:.4f}",
             f"{r['mse']:.2e}", f"{r['cpu_seconds']:.1f}"]
            for r in rows
        ],
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_held_out_arguments(parser, num_images=64)
    parser.add_argument("--batch_size", type=int, default=32, help="Images per network call.")
    parser.add_argument("--ddim_steps", default="10,20,50,100,250", help="T of the DDIM inversion rows.")
    parser.add_argument("--exact_steps", default="5,10,20", help="T of the exact inversion rows.")
    parser.add_argument("--iterations", type=int, default=3, help="Network calls per step of the exact inversion.")
    parser.add_argument(
        "--contraction_steps", type=int, default=10, help="T of the per-step contraction table (4 images)."
    )
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
    radius_steps = args.contraction_steps
    radii = {"bundled": contraction(pipe, images[:4], radius_steps, args.iterations)}

    # 2. the official fixture model: how close exact inversion comes to the input, pixel by pixel
    fixture = convert_official_checkpoint(
        os.path.join(args.fixture_dir, "last.ckpt"), os.path.join(args.fixture_dir, "config.json")
    )
    fixture.set_progress_bar_config(disable=True)
    x0 = (load_file(os.path.join(args.fixture_dir, "inputs.safetensors"))["x0"] + 1) / 2
    fixture_rows = []
    for inversion, steps in grid:
        row, recon, z_sem, x_T = measure(fixture, x0, inversion, steps, args.iterations, args.batch_size)
        error = (recon - x0).abs() * 2  # on the model's [-1, 1] scale
        inside = (x0 > 0) & (x0 < 1) & (recon > 0) & (recon < 1)  # neither input nor output saturated
        unclipped = never_clipped(fixture, z_sem, x_T, steps)
        row.update(
            max_abs=float(error.max()), max_abs_inside=float(error[inside].max()), inside=float(inside.float().mean()),
            max_abs_unclipped=float(error[unclipped].max()) if unclipped.any() else float("nan"),
            unclipped=float(unclipped.float().mean()),
        )  # fmt: skip
        fixture_rows.append(row)
        print(json.dumps(row), flush=True)

    radii["fixture"] = contraction(fixture, x0, radius_steps, args.iterations)

    # 3. report
    cpu = machine("cpu")["cpu"]
    lines = [
        "# DDIM inversion vs exact inversion",
        "",
        f"Measured by `python benchmarks/bench_inversion.py --dataset {args.dataset} --num_images {args.num_images}` on "
        f"{cpu} ({torch.get_num_threads()} threads), torch {torch.__version__}; load average at the end "
        f"{os.getloadavg()[0]:.1f}. CPU seconds: the benchmark's CPU time summed over its threads.",
        "",
        f"## `{args.pipeline}`: {len(images)} held-out images of split `{args.split}`",
        "",
        "Encode at T steps (`pipe.encode(..., inversion=...)`), decode with the pipeline's DDIM scheduler at the same T. "
        f"Exact inversion spends {args.iterations} network calls per step (`inversion_iterations`).",
        "",
        *reconstruction_table(rows),
        f"## Official fixture model (`{args.fixture_dir}`: its 4 input images, 32 px, weights barely trained)",
        "",
        *reconstruction_table(fixture_rows),
        *table(
            "inversion | T | max abs error, all pixels | unsaturated pixels | share | never-clipped pixels | share",
            [
                [
                    r["inversion"],
                    str(r["T"]),
                    f"{r['max_abs']:.2e}",
                    f"{r['max_abs_inside']:.2e}",
                    f"{r['inside']:.2f}",
                    f"{r['max_abs_unclipped']:.2e}",
                    f"{r['unclipped']:.2f}",
                ]
                for r in fixture_rows
            ],
        ),  # fmt: skip
        "Errors on the model's [-1, 1] scale. Unsaturated pixels: neither the input nor the reconstruction is at 0 or "
        "1 (where the decoder's x0 clipping decides the value, no x_T moves it). Never-clipped pixels: the decoder's "
        "predicted x0 stays inside [-1, 1] at every step of the decode from these codes.",
        "",
        f"## Contraction of exact inversion, step by step (T={radius_steps}, {args.iterations} calls per step, 4 images)",
        "",
        "Spectral radius: the power-iteration estimate (20 Jacobian-vector products) of the spectral radius of the "
        "step's fixed-point map x -> solve(eps(x)) at the x reached, largest over the images; fixed-point refinement "
        "converges near the solution only below 1. Residual: max |step(x) - target| left after the step's calls.",
        "",
        *table(
            "timestep | bundled: spectral radius | bundled: residual | fixture: spectral radius | fixture: residual",
            [
                [
                    str(b["t"]),
                    f"{b['radius']:.2f}",
                    f"{b['residual']:.1e}",
                    f"{f['radius']:.2f}",
                    f"{f['residual']:.1e}",
                ]
                for b, f in zip(radii["bundled"], radii["fixture"])
            ],
        ),
    ]
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, f"{args.name}.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.output, f"{args.name}.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "pipeline": args.pipeline,
                "split": args.split,
                "rows": rows,
                "fixture": fixture_rows,
                "contraction": radii,
            },
            f,
            indent=1,
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
