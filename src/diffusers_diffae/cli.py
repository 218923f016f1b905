"""The `diffae` command: a demo on the bundled model, and the pipeline methods on your own images.

```
diffae demo --output demo_out/                    # bundled emoji model + bundled held-out emoji
diffae reconstruct --model DIR --images a.png b.png --output out/
diffae encode --model DIR --images a.png --output codes.safetensors
diffae decode --model DIR --codes codes.safetensors --output out/
diffae interpolate --model DIR --images a.png b.png --frames 8 --output out/
diffae edit --model DIR --images a.png --attribute is_woman --strengths -0.5 0.5 --output out/
diffae sample --model DIR --num 8 [--attribute ATTR] --output out/
diffae convert --checkpoint last.ckpt --config ffhq256_autoenc --output DIR
```
`--model` takes any DiffAE pipeline folder or Hub repo id (default: the bundled emoji model). Images are written into
the `--output` folder, named after their inputs (`a_reconstruction.png`, `a_is_woman_+0.5.png`, ...), through a
temporary file and a rename; outputs are checked before any compute, and an existing file is replaced only with
`--overwrite`.
"""

import argparse
import html
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import PIL.Image
import torch

from .image_utils import image_grid


ASSETS = Path(__file__).resolve().parent / "demo_assets"
BUNDLED_MODEL = ASSETS / "diffae-emoji32"
BUNDLED_SAMPLES = ASSETS / "samples"


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(model: Optional[str]):
    from .pipelines import DiffAEPipeline

    path = model or str(BUNDLED_MODEL)
    if model is None and not (BUNDLED_MODEL / "model_index.json").is_file():
        raise SystemExit(f"error: the bundled model is missing at {BUNDLED_MODEL}; pass --model DIR")
    try:
        pipe = DiffAEPipeline.from_pretrained(path)
    except OSError as e:  # unreachable Hub repo, missing or unreadable weights: one line, not a traceback
        raise SystemExit(f"error: cannot load a DiffAE pipeline from {path}: {e}") from e
    pipe.set_progress_bar_config(leave=False)
    return pipe


def load_images(paths: Sequence[str]) -> List[PIL.Image.Image]:
    images = []
    for path in paths:
        try:
            with PIL.Image.open(path) as image:
                image.load()  # the pipeline reads every mode (16-bit, transparency) itself
                images.append(image)
        except (OSError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError) as e:
            raise SystemExit(f"error: cannot read image {path}: {e}") from e
    if not images:
        raise SystemExit("error: no images given")
    return images


def save_grid(rows: Sequence[torch.Tensor], path: Path) -> None:
    """Saves rows of (N, C, H, W) images in [0, 1] as one PNG, enlarged twice so small emoji stay crisp."""
    image_grid(rows, scale=2, padding=2).save(path)


def rows_per_input(inputs: torch.Tensor, outputs: torch.Tensor) -> List[torch.Tensor]:
    """Grid rows: each input of (N, C, H, W), then its k = N_out / N consecutive outputs (input i owns outputs
    i*k ... i*k+k-1)."""
    k = outputs.shape[0] // inputs.shape[0]
    return [torch.cat([inputs[i : i + 1], outputs[i * k : (i + 1) * k]]) for i in range(inputs.shape[0])]


def reconstruction_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """MSE, PSNR (dB), SSIM (7x7 window inside the image) and the official code's SSIM (11x11, zero-padded, the
    paper's protocol) of images in [0, 1], averaged over the batch; SSIMs are None without pytorch-msssim."""
    from .evaluation import metrics

    try:
        scores = metrics.reconstruction_scores(pred, target, ssim_win_size=7)
    except ImportError:  # reported as "not measured" (pytorch-msssim is in the `metrics` extra)
        scores = {"mse": metrics.mse(pred, target), "psnr": metrics.psnr(pred, target)}
        scores.update(ssim=None, ssim_official=None)
    return {name: None if values is None else values.mean().item() for name, values in scores.items()}


def _read_metadata(folder: Path) -> List[dict]:
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return [{"file_name": p.name} for p in sorted(folder.glob("*.png"))]
    return [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------------------------


def few_shot_head(pipe, z_sem: torch.Tensor, labels: torch.Tensor, attribute: str):
    """A one-head `AttributeClassifier` for `attribute`: logistic regression on the normalised z_sem (N, D) of a
    few examples with 0/1 `labels` (N,), classes balanced (paper §5.6)."""
    from .evaluation import metrics
    from .models import AttributeClassifier

    stats = pipe.latent_denoiser
    z_n = stats.normalize_z_sem(z_sem.float())
    options = {"max_iter": 300, "standardize": False, "class_balanced": True, "dtype": torch.float32}
    w, b, _, _ = metrics.fit_logistic_probe(z_n, labels, **options)
    head = AttributeClassifier(num_channels=w.numel(), attribute_names=[attribute], attribute_types=["binary"])
    head.linear.weight.data[0], head.linear.bias.data[0] = w, b
    head.set_z_sem_statistics(stats.z_sem_mean, stats.z_sem_std)
    return head


def run_demo(args) -> int:
    start = time.time()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    pipe = load_pipeline(args.model)
    samples_dir = Path(args.samples) if args.samples else BUNDLED_SAMPLES
    meta = _read_metadata(samples_dir)[: args.num_images]
    if not meta:
        raise SystemExit(f"error: no sample images in {samples_dir}")
    images = load_images([str(samples_dir / m["file_name"]) for m in meta])
    steps, n = args.steps, len(images)
    generator = torch.Generator().manual_seed(args.seed)
    sections, numbers = [], {}

    print(f"[1/6] encoding {n} images (z_sem + DDIM inversion, T={steps})")
    x = (pipe.preprocess(images) + 1) / 2
    latents = pipe.encode(x, num_inference_steps=steps)

    print("[2/6] reconstructing: z_sem only (random x_T) and full (inverted x_T)")
    full = pipe.decode(latents.z_sem, latents.x_T, steps, output_type="pt").images
    semantic = pipe.decode(latents.z_sem, None, steps, generator=generator, output_type="pt").images
    numbers["reconstruction (inverted x_T)"] = reconstruction_metrics(full, x)
    numbers["z_sem only (random x_T)"] = reconstruction_metrics(semantic, x)
    shown = min(n, 12)
    save_grid([x[:shown], semantic[:shown], full[:shown]], out / "reconstructions.png")
    caption = "Rows: input | z_sem only with random x_T | full reconstruction (inverted x_T)."
    sections.append(("Reconstructions", "reconstructions.png", caption))

    print("[3/6] interpolating and stochastic variations")
    pairs = [(i, (i + n // 2) % n) for i in range(min(4, n // 2))]
    rows = []
    for i, j in pairs:
        a = type(latents)(latents.z_sem[i : i + 1], latents.x_T[i : i + 1])
        b = type(latents)(latents.z_sem[j : j + 1], latents.x_T[j : j + 1])
        rows.append(pipe.interpolate(a, b, num_frames=8, num_inference_steps=steps, output_type="pt").images)
    save_grid(rows, out / "interpolations.png")
    sections.append(("Interpolations", "interpolations.png", "lerp on z_sem, slerp on x_T (paper §5.2)."))
    # Variations and each edit grid are decoded as one batch: on 2 CPU cores a batch of 24-30 runs about 20 % more
    # images per second than one call per input (5-8 images).
    shown_var = min(4, n)
    z = latents.z_sem[:shown_var].repeat_interleave(6, dim=0)
    varied = pipe.decode(z, None, steps, generator=generator, output_type="pt").images
    save_grid(rows_per_input(x[:shown_var], varied), out / "variations.png")
    caption = "Input, then the same z_sem decoded from six random x_T (paper Fig. 3)."
    sections.append(("Stochastic variations", "variations.png", caption))

    print("[4/6] editing attributes")
    if pipe.classifier is not None:
        strengths = [-0.6, -0.3, 0.0, 0.3, 0.6]
        for attribute in args.edit_attributes or _default_edit_attributes(pipe.classifier):
            if attribute not in pipe.classifier.attribute_names:
                continue
            shown_edit, k = min(6, n), len(strengths)
            batch = type(latents)(
                latents.z_sem[:shown_edit].repeat_interleave(k, dim=0),
                latents.x_T[:shown_edit].repeat_interleave(k, dim=0),
            )
            strength = torch.tensor(strengths).repeat(shown_edit)  # image i gets strengths[j] at i * k + j
            options = {"num_inference_steps": steps, "output_type": "pt"}
            edited = pipe.edit(batch, attribute=attribute, strength=strength, **options).images
            name = f"edit_{attribute}.png"
            save_grid(rows_per_input(x[:shown_edit], edited), out / name)
            caption = f"Input, then strength {strengths} along the classifier direction; x_T kept."
            sections.append((f"Edit: {attribute}", name, caption))
    else:
        print("      (the model has no classifier: skipped)")

    print("[5/6] sampling unconditionally")
    if pipe.latent_denoiser is not None:
        sampler = {"num_inference_steps": steps, "latent_num_inference_steps": steps, "generator": generator}
        uncond = pipe(batch_size=16, output_type="pt", **sampler).images
        save_grid([uncond[:8], uncond[8:]], out / "samples.png")
        caption = "Latent DDIM on normalised z_sem, then the decoder (paper §4)."
        sections.append(("Unconditional samples", "samples.png", caption))

        print("[6/6] few-shot conditional sampling")
        attribute = args.few_shot_attribute
        labels = torch.tensor([float(bool(m.get(attribute, 0))) for m in meta]) if attribute else None
        if labels is not None and 0 < labels.sum() < len(labels):
            full_classifier, pipe.classifier = pipe.classifier, few_shot_head(pipe, latents.z_sem, labels, attribute)
            try:
                cond = pipe(batch_size=8, attribute=attribute, output_type="pt", **sampler).images
            except ValueError as e:
                cond = None
                print(f"      few-shot sampling failed: {e}")
            finally:
                pipe.classifier = full_classifier
            if cond is not None:
                save_grid([cond], out / "few_shot_samples.png")
                k = int(labels.sum())
                caption = f"A linear head fitted on {k} positive and {len(labels) - k} negative examples, then "
                caption += "rejection sampling (paper §5.6)."
                sections.append((f"Few-shot conditional samples: {attribute}", "few_shot_samples.png", caption))
        else:
            print("      (no labelled attribute in the samples' metadata: skipped)")
    else:
        print("      (the model has no latent DDIM: skipped)")

    _write_index(out, sections, numbers, steps, time.time() - start)
    (out / "metrics.json").write_text(json.dumps(numbers, indent=2))
    for name, values in numbers.items():
        ssim, official = (_ssim_text(values[k]) for k in ("ssim", "ssim_official"))
        print(f"  {name}: MSE {values['mse']:.5f}  PSNR {values['psnr']:.2f} dB  SSIM {ssim} (official: {official})")
    print(f"done in {time.time() - start:.0f} s: open {out.resolve() / 'index.html'}")
    return 0


def _default_edit_attributes(classifier) -> List[str]:
    preferred = ["dark_skin", "is_woman", "hair_blond", "is_older", "beard", "Smiling", "Male"]
    names = [a for a in preferred if a in classifier.attribute_names]
    return names[:3] or classifier.attribute_names[:2]


def _ssim_text(value: Optional[float]) -> str:
    """An SSIM for the console and index.html; None (pytorch-msssim not installed) reads "n/a"."""
    return "n/a" if value is None else f"{value:.4f}"


def _write_index(out: Path, sections, numbers, steps, seconds) -> None:
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v['mse']:.5f}</td><td>{v['psnr']:.2f}</td>"
        + "".join(f"<td>{_ssim_text(v[m])}</td>" for m in ("ssim", "ssim_official"))
        + "</tr>"
        for k, v in numbers.items()
    )
    body = "".join(
        f"<h2>{html.escape(title)}</h2><p>{html.escape(caption)}</p><img src='{html.escape(name)}'>"
        for title, name, caption in sections
    )
    (out / "index.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>DiffAE demo</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}img{image-rendering:pixelated;max-width:100%}"
        "td,th{padding:.2em .8em}</style>"
        f"<h1>Diffusion Autoencoders demo</h1><p>DDIM steps T={steps}; made in {seconds:.0f} s.</p>"
        "<table><tr><th></th><th>MSE</th><th>PSNR (dB)</th><th>SSIM</th>"
        "<th>SSIM, official (zero-padded: the paper's)</th></tr>"
        f"{rows}</table>{body}"
    )


# ----------------------------------------------------------------------------------------------------------------
# subcommands on the user's images
# ----------------------------------------------------------------------------------------------------------------


def encode_images(pipe, args, images=None):
    """The images' codes with the stochastic encoder the flags choose (`--inversion`, `--inversion_iterations`)."""
    images = load_images(args.images) if images is None else images
    return pipe.encode(
        images,
        num_inference_steps=args.steps,
        inversion=args.inversion,
        inversion_iterations=args.inversion_iterations,
    )


def stems(paths: Sequence[str]) -> List[str]:
    return [Path(path).stem for path in paths]


def planned_files(args, names: Sequence[str], suffix: str = ".png") -> List[Path]:
    """The files an image command will write into the folder --output, checked before any compute: named after
    the inputs, none an input, none existing unless --overwrite, the folder creatable."""
    out = Path(args.output)
    if out.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise SystemExit(f"error: --output {out} names an image; give a folder (images are named after their inputs)")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --output {out} exists and is not a folder")
    files = [out / f"{name}{suffix}" for name in names]
    return check_new_files(args, files)


def check_new_files(args, files: List[Path]) -> List[Path]:
    """Refuses outputs that collide, overwrite an input, or exist (without --overwrite), or whose folder cannot be
    written, before any compute."""
    if len(set(files)) != len(files):
        duplicate = next(f for f in files if files.count(f) > 1)
        raise SystemExit(f"error: two outputs would both be {duplicate}; give inputs or values with distinct names")
    inputs = {Path(p).resolve() for p in (getattr(args, "images", None) or []) + [getattr(args, "codes", None) or ""]}
    for file in files:
        if file.resolve() in inputs:
            raise SystemExit(f"error: the output {file} is one of the inputs")
        if file.exists() and not args.overwrite:
            raise SystemExit(f"error: {file} exists; pass --overwrite to replace it")
    folder = files[0].parent if files else Path(args.output)
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise SystemExit(f"error: cannot write into {existing}")
    return files


def write_atomically(save, path: Path) -> None:
    """`save(temporary_path)`, then a rename: a crash or a full disk never leaves a complete-looking file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"error: cannot write {path}: {e.strerror or e}") from e


def write_images(images, files: List[Path]) -> int:
    for image, file in zip(images, files, strict=True):
        write_atomically(lambda tmp, image=image: image.save(tmp, format="PNG"), file)
    print(f"wrote {len(files)} images to {files[0].parent}")
    return 0


def run_encode(args) -> int:
    from safetensors.torch import save_file

    (output,) = check_new_files(args, [Path(args.output)])
    pipe = load_pipeline(args.model)
    latents = encode_images(pipe, args)
    tensors = {"z_sem": latents.z_sem.contiguous(), "x_T": latents.x_T.contiguous()}
    metadata = {"inputs": json.dumps(stems(args.images))}  # decode names its images after them
    write_atomically(lambda tmp: save_file(tensors, str(tmp), metadata=metadata), output)
    print(f"wrote z_sem {tuple(latents.z_sem.shape)} and x_T {tuple(latents.x_T.shape)} to {output}")
    return 0


def run_decode(args) -> int:
    from safetensors import safe_open

    try:
        with safe_open(args.codes, framework="pt") as f:
            codes = {key: f.get_tensor(key) for key in f.keys()}
            names = json.loads((f.metadata() or {}).get("inputs", "null"))
    except Exception as e:  # safetensors raises its own error types for files that are not safetensors
        raise SystemExit(f"error: cannot read codes {args.codes}: {type(e).__name__}: {e}") from e
    if "z_sem" not in codes:
        found = ", ".join(sorted(codes)) or "nothing"
        raise SystemExit(f"error: {args.codes} has no z_sem tensor (found {found}); write it with `diffae encode`")
    if not isinstance(names, list) or len(names) != codes["z_sem"].shape[0]:
        names = [f"{Path(args.codes).stem}_{i:03d}" for i in range(codes["z_sem"].shape[0])]
    files = planned_files(args, [f"{name}_{'variation' if args.random_xT else 'decoded'}" for name in names])
    pipe = load_pipeline(args.model)
    x_T = None if args.random_xT else codes.get("x_T")
    images = pipe.decode(codes["z_sem"], x_T, args.steps, generator=torch.Generator().manual_seed(args.seed)).images
    return write_images(images, files)


def run_reconstruct(args) -> int:
    files = planned_files(args, [f"{name}_reconstruction" for name in stems(args.images)])
    pipe = load_pipeline(args.model)
    latents = encode_images(pipe, args)
    return write_images(pipe.decode(latents.z_sem, latents.x_T, args.steps).images, files)


def run_interpolate(args) -> int:
    if len(args.images) != 2:
        raise SystemExit("error: interpolate takes exactly two --images")
    if args.frames < 2:
        raise SystemExit(f"error: --frames must be at least 2 (both endpoints), got {args.frames}")
    a_name, b_name = stems(args.images)
    files = planned_files(args, [f"{a_name}_to_{b_name}_{i:03d}" for i in range(args.frames)])
    pipe = load_pipeline(args.model)
    a, b = (encode_images(pipe, args, [image]) for image in load_images(args.images))
    return write_images(pipe.interpolate(a, b, num_frames=args.frames, num_inference_steps=args.steps).images, files)


def run_edit(args) -> int:
    names = stems(args.images)
    files = planned_files(args, [f"{n}_{args.attribute}_{s:+g}" for s in args.strengths for n in names])
    pipe = load_pipeline(args.model)
    if pipe.classifier is None:
        raise ValueError(f"{args.model or 'the model'} has no classifier to edit along")
    pipe.classifier.attribute_index(args.attribute)  # an unknown attribute fails here, before the encoding
    for strength in (s for s in args.strengths if abs(s) > 1):
        print(f"warning: strength {strength:g} is far outside the usual |strength| <= 1 (paper: 0.3)", file=sys.stderr)
    latents = encode_images(pipe, args)
    images = []
    for strength in args.strengths:
        images += pipe.edit(
            latents, attribute=args.attribute, strength=strength, num_inference_steps=args.steps
        ).images
    return write_images(images, files)


def run_sample(args) -> int:
    if args.num < 1:
        raise SystemExit(f"error: --num must be at least 1, got {args.num}")
    files = planned_files(args, [f"sample_seed{args.seed}_{i:03d}" for i in range(args.num)])
    pipe = load_pipeline(args.model)
    images = pipe(
        batch_size=args.num, num_inference_steps=args.steps, latent_num_inference_steps=args.steps,
        attribute=args.attribute, generator=torch.Generator().manual_seed(args.seed),
    ).images  # fmt: skip
    return write_images(images, files)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffae", description="Diffusion Autoencoders with diffusers.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help_text, func, images=False):
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=func)
        p.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: bundled emoji model)")
        p.add_argument("--steps", type=int, default=20, help="DDIM steps for encoding and decoding")
        p.add_argument("--seed", type=int, default=0, help="random seed")
        if name != "demo":
            p.add_argument("--overwrite", action="store_true", help="replace output files that exist")
        if images:
            p.add_argument("--images", nargs="+", required=True, help="input image files")
            p.add_argument(
                "--inversion",
                choices=("ddim", "exact"),
                default="ddim",
                help="stochastic encoder: the official DDIM inversion, or exact inversion of the DDIM decoder "
                "(--steps x --inversion_iterations network calls)",
            )
            p.add_argument(
                "--inversion_iterations", type=int, default=3, help="network calls per step of --inversion exact"
            )
        return p

    p = command("demo", "run the demo on the bundled model and images", run_demo)
    p.add_argument("--output", default="demo_out", help="folder for the PNG grids and index.html")
    p.add_argument("--samples", default=None, help="folder of PNGs (+ metadata.jsonl); default: bundled emoji")
    p.add_argument("--num_images", type=int, default=48, help="how many sample images to use")
    p.add_argument("--edit_attributes", nargs="*", default=None, help="classifier heads to edit along")
    p.add_argument("--few_shot_attribute", default="is_woman", help="metadata column for the few-shot demo")
    p = command("encode", "images -> z_sem and x_T (safetensors)", run_encode, images=True)
    p.add_argument("--output", required=True, help="output .safetensors file")
    p = command("decode", "codes (safetensors) -> images", run_decode)
    p.add_argument("--codes", required=True, help="file written by `diffae encode`")
    p.add_argument("--random-xT", dest="random_xT", action="store_true", help="ignore x_T: stochastic variations")
    p.add_argument("--output", required=True, help="folder for the images, named after the inputs")
    p = command("reconstruct", "encode then decode images", run_reconstruct, images=True)
    p.add_argument("--output", required=True, help="folder for the images, named after the inputs")
    p = command("interpolate", "interpolate between exactly two images", run_interpolate, images=True)
    p.add_argument("--frames", type=int, default=8, help="frames, both images included")
    p.add_argument("--output", required=True, help="folder for the images, named after the inputs")
    p = command("edit", "edit an attribute of images", run_edit, images=True)
    p.add_argument("--attribute", required=True, help="a head of the pipeline's classifier")
    p.add_argument(
        "--strengths", type=float, nargs="+", default=[0.3], help="edit strengths alpha (paper: 0.3; < 0 away)"
    )
    p.add_argument("--output", required=True, help="folder for the images, named after the inputs")
    p = command("sample", "sample new images (optionally conditioned on an attribute)", run_sample)
    p.add_argument("--num", type=int, default=8, help="how many images")
    p.add_argument("--attribute", default=None, help="a binary classifier head to condition on (rejection sampling)")
    p.add_argument("--output", required=True, help="folder for the images")
    p = sub.add_parser("convert", help="convert an official checkpoint (see python -m diffusers_diffae.convert -h)")
    p.set_defaults(func=None)
    p = sub.add_parser(
        "evaluate", help="the paper's measurements on a pipeline and a dataset (see diffae evaluate -h)"
    )
    p.set_defaults(func=None)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        from .convert import main as convert_main

        return convert_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        from .evaluation.suite import main as evaluate_main

        return evaluate_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # pipeline input errors: one clear line instead of a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
