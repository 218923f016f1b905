"""`diffae demo`: every operation of the paper on a pipeline and a folder of images, as PNG grids and index.html."""

import html
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import PIL.Image
import torch

from .image_utils import image_grid
from .io_utils import BUNDLED_SAMPLES, check_writable, load_images, read_metadata, write_all


# The files a demo writes; `edit_<attribute>.png` besides them.
DEMO_FILES = ("index.html", "metrics.json", "reconstructions.png", "interpolations.png", "variations.png",
              "samples.png", "few_shot_samples.png")  # fmt: skip


def grid(rows: Sequence[torch.Tensor]) -> PIL.Image.Image:
    """Rows of (N, C, H, W) images in [0, 1] as one image, enlarged twice so small emoji stay crisp."""
    return image_grid(rows, scale=2, padding=2)


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


def check_demo_output(out: Path, overwrite: bool) -> None:
    """Before any compute: --output is a folder that can be written, without a previous demo's files unless
    --overwrite."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --output {out} exists and is not a folder")
    if out.is_dir() and not overwrite:
        previous = sorted(p.name for p in out.iterdir() if p.name in DEMO_FILES or p.name.startswith("edit_"))
        if previous:
            raise SystemExit(f"error: {out} holds a previous demo ({', '.join(previous[:3])}, ...); "
                             "pass --overwrite to replace it")  # fmt: skip
    check_writable(out)


def run_demo(args, load_pipeline, report_resize) -> int:
    start = time.time()
    out = Path(args.output)
    check_demo_output(out, args.overwrite)
    samples_dir = Path(args.samples) if args.samples else BUNDLED_SAMPLES
    meta = read_metadata(samples_dir)[: args.num_images]
    if not meta:
        raise SystemExit(f"error: no sample images in {samples_dir}")
    images = load_images([str(samples_dir / m["file_name"]) for m in meta])
    torch.manual_seed(args.seed)
    pipe = load_pipeline(args)
    report_resize(images, pipe.resolution)
    steps, n = args.steps, len(images)
    generator = torch.Generator().manual_seed(args.seed)
    sections, numbers, grids = [], {}, {}

    dtype = str(pipe.unet.dtype).removeprefix("torch.")
    print(f"[1/6] encoding {n} images (z_sem + DDIM inversion, T={steps}, {dtype})")
    x = (pipe.preprocess(images) + 1) / 2
    latents = pipe.encode(x, num_inference_steps=steps)

    print("[2/6] reconstructing: z_sem only (random x_T) and full (inverted x_T)")
    full = pipe.decode(latents.z_sem, latents.x_T, steps, output_type="pt").images
    semantic = pipe.decode(latents.z_sem, None, steps, generator=generator, output_type="pt").images
    numbers["reconstruction (inverted x_T)"] = reconstruction_metrics(full, x)
    numbers["z_sem only (random x_T)"] = reconstruction_metrics(semantic, x)
    shown = min(n, 12)
    grids["reconstructions.png"] = grid([x[:shown], semantic[:shown], full[:shown]])
    caption = "Rows: input | z_sem only with random x_T | full reconstruction (inverted x_T)."
    sections.append(("Reconstructions", "reconstructions.png", caption))

    print("[3/6] interpolating and stochastic variations")
    pairs = [(i, (i + n // 2) % n) for i in range(min(4, n // 2))]
    rows = []
    for i, j in pairs:
        a = type(latents)(latents.z_sem[i : i + 1], latents.x_T[i : i + 1])
        b = type(latents)(latents.z_sem[j : j + 1], latents.x_T[j : j + 1])
        rows.append(pipe.interpolate(a, b, num_frames=8, num_inference_steps=steps, output_type="pt").images)
    if rows:
        grids["interpolations.png"] = grid(rows)
        sections.append(("Interpolations", "interpolations.png", "lerp on z_sem, slerp on x_T (paper §5.2)."))
    # Variations and each edit grid are decoded as one batch: on 2 CPU cores a batch of 24-30 runs about 20 % more
    # images per second than one call per input (5-8 images).
    shown_var = min(4, n)
    z = latents.z_sem[:shown_var].repeat_interleave(6, dim=0)
    varied = pipe.decode(z, None, steps, generator=generator, output_type="pt").images
    grids["variations.png"] = grid(rows_per_input(x[:shown_var], varied))
    caption = "Input, then the same z_sem decoded from six random x_T (paper Fig. 3)."
    sections.append(("Stochastic variations", "variations.png", caption))

    print("[4/6] editing attributes")
    if pipe.classifier is not None:
        strengths = [-0.6, -0.3, 0.0, 0.3, 0.6]
        for attribute in args.edit_attributes or _default_edit_attributes(pipe.classifier):
            if attribute not in pipe.classifier.attribute_names:
                print(f"      (the classifier has no {attribute!r}: skipped)")
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
            grids[name] = grid(rows_per_input(x[:shown_edit], edited))
            caption = f"Input, then strength {strengths} along the classifier direction; x_T kept."
            sections.append((f"Edit: {attribute}", name, caption))
    else:
        print("      (the model has no classifier: skipped)")

    print("[5/6] sampling unconditionally")
    if pipe.latent_denoiser is not None:
        sampler = {"num_inference_steps": steps, "latent_num_inference_steps": steps, "generator": generator}
        uncond = pipe(batch_size=16, output_type="pt", **sampler).images
        grids["samples.png"] = grid([uncond[:8], uncond[8:]])
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
                grids["few_shot_samples.png"] = grid([cond])
                k = int(labels.sum())
                caption = f"A linear head fitted on {k} positive and {len(labels) - k} negative examples, then "
                caption += "rejection sampling (paper §5.6)."
                sections.append((f"Few-shot conditional samples: {attribute}", "few_shot_samples.png", caption))
        else:
            print("      (no labelled attribute in the samples' metadata: skipped)")
    else:
        print("      (the model has no latent DDIM: skipped)")

    page = _index_html(sections, numbers, steps, dtype, time.time() - start)
    saves = [(lambda tmp, image=image: image.save(tmp, format="PNG"), out / name) for name, image in grids.items()]
    saves.append((lambda tmp: tmp.write_text(json.dumps(numbers, indent=2)), out / "metrics.json"))
    saves.append((lambda tmp: tmp.write_text(page, encoding="utf-8"), out / "index.html"))
    write_all(saves)
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


def _index_html(sections, numbers: Dict, steps: int, dtype: str, seconds: float) -> str:
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
    return (
        "<!doctype html><meta charset='utf-8'><title>DiffAE demo</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}img{image-rendering:pixelated;max-width:100%}"
        "td,th{padding:.2em .8em}</style>"
        f"<h1>Diffusion Autoencoders demo</h1><p>DDIM steps T={steps}; compute dtype {dtype}; made in {seconds:.0f} s.</p>"
        "<table><tr><th></th><th>MSE</th><th>PSNR (dB)</th><th>SSIM</th>"
        "<th>SSIM, official (zero-padded: the paper's)</th></tr>"
        f"{rows}</table>{body}"
    )
