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
the `--output` folder, named after their inputs (`a_reconstruction.png`, `a_is_woman_+0.5.png`, ...). Inputs,
flags and outputs are checked before the model is loaded; outputs are written through temporary files and renamed
once all are complete, and an existing file is replaced only with `--overwrite` (see docs/reliability.md).
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .image_processor import resize_notice
from .io_utils import (  # noqa: F401  (ASSETS and BUNDLED_* are part of this module's interface)
    ASSETS,
    BUNDLED_MODEL,
    BUNDLED_SAMPLES,
    check_attribute,
    check_new_files,
    classifier_heads,
    load_images,
    planned_files,
    read_codes,
    write_all,
    write_images,
)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(args):
    """The pipeline of `--model` (default: the bundled one) in the `--dtype` it asks for; one line on failure."""
    from .pipelines import DiffAEPipeline
    from .precision import resolve_dtype

    model = getattr(args, "model", None)
    path = model or str(BUNDLED_MODEL)
    if model is None and not (BUNDLED_MODEL / "model_index.json").is_file():
        raise SystemExit(f"error: the bundled model is missing at {BUNDLED_MODEL}; pass --model DIR")
    dtype = resolve_dtype(getattr(args, "dtype", "float32"), "cpu")
    try:
        pipe = DiffAEPipeline.from_pretrained(path, dtype=dtype)
    except OSError as e:  # unreachable Hub repo, missing or unreadable weights: one line, not a traceback
        reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        if type(e).__name__ == "LocalEntryNotFoundError":
            reason = "no such folder, and the Hub repo is not in the cache and cannot be reached"
        raise SystemExit(f"error: cannot load a DiffAE pipeline from {path}: {reason}") from e
    pipe.set_progress_bar_config(leave=False)
    return pipe


def report_resize(images, resolution: int) -> None:
    """Says once per run how many inputs are resized or cropped to the model's resolution, and from what size."""
    notice = resize_notice([image.size for image in images], resolution)
    if notice:
        print(f"note: {notice}", file=sys.stderr)


def encode_images(pipe, args, images):
    """The images' codes with the stochastic encoder the flags choose (`--inversion`, `--inversion_iterations`),
    after a note on the resize (or the face alignment) they get."""
    if getattr(args, "align", False):  # FFHQ-style face alignment first (the `align` extra)
        from .alignment import align_for_pipeline

        images = align_for_pipeline(pipe, images, args.unaligned_ok, unaligned_hint="pass --unaligned_ok")
        print(f"note: faces aligned (FFHQ recipe) to {pipe.resolution}x{pipe.resolution}", file=sys.stderr)
    else:
        report_resize(images, pipe.resolution)
    return pipe.encode(
        images,
        num_inference_steps=args.steps,
        inversion=args.inversion,
        inversion_iterations=args.inversion_iterations,
    )


def stems(paths: Sequence[str]):
    return [Path(path).stem for path in paths]


def bundled_heads_text(binary_only: bool = False) -> str:
    """The bundled classifier's heads for --help, read from its config.json (no model is loaded)."""
    heads = classifier_heads(None) or {}
    binary = [name for name, kind in heads.items() if kind == "binary"]
    continuous = [name for name, kind in heads.items() if kind != "binary"]
    if not heads:
        return "(the bundled model is missing)"
    text = f"binary: {', '.join(binary)}"
    return text if binary_only or not continuous else f"{text}; continuous: {', '.join(continuous)}"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each flag's default, except for required flags and `None` defaults (their help says
    what leaving them out means)."""

    def _get_help_string(self, action):
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


# argparse types: bad numbers are refused while parsing, before anything is read or loaded


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def probability_below_one(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------------------------------


def run_demo(args) -> int:
    from .cli_demo import run_demo as demo

    return demo(args, load_pipeline, report_resize)


def run_encode(args) -> int:
    from safetensors.torch import save_file

    output = Path(args.output)
    if output.suffix != ".safetensors" and not output.is_dir():
        raise SystemExit(f"error: --output {output} must be a .safetensors file")
    (output,) = check_new_files(args, [output])
    images = load_images(args.images)
    pipe = load_pipeline(args)
    latents = encode_images(pipe, args, images)
    tensors = {"z_sem": latents.z_sem.contiguous(), "x_T": latents.x_T.contiguous()}
    metadata = {"inputs": json.dumps(stems(args.images))}  # decode names its images after them
    write_all([(lambda tmp: save_file(tensors, str(tmp), metadata=metadata), output)])
    print(f"wrote z_sem {tuple(latents.z_sem.shape)} and x_T {tuple(latents.x_T.shape)} to {output}")
    return 0


def run_decode(args) -> int:
    codes, names = read_codes(args.codes)
    if names is None or len(names) != codes["z_sem"].shape[0]:
        names = [f"{Path(args.codes).stem}_{i:03d}" for i in range(codes["z_sem"].shape[0])]
    files = planned_files(args, [f"{name}_{'variation' if args.random_xT else 'decoded'}" for name in names])
    pipe = load_pipeline(args)
    x_T = None if args.random_xT else codes.get("x_T")
    images = pipe.decode(codes["z_sem"], x_T, args.steps, generator=torch.Generator().manual_seed(args.seed)).images
    return write_images(images, files)


def run_reconstruct(args) -> int:
    files = planned_files(args, [f"{name}_reconstruction" for name in stems(args.images)])
    images = load_images(args.images)
    pipe = load_pipeline(args)
    latents = encode_images(pipe, args, images)
    return write_images(pipe.decode(latents.z_sem, latents.x_T, args.steps).images, files)


def run_interpolate(args) -> int:
    if len(args.images) != 2:
        raise SystemExit(f"error: interpolate takes exactly two --images (the endpoints), got {len(args.images)}")
    a_name, b_name = stems(args.images)
    files = planned_files(args, [f"{a_name}_to_{b_name}_{i:03d}" for i in range(args.frames)])
    images = load_images(args.images)
    pipe = load_pipeline(args)
    latents = encode_images(pipe, args, images)
    a, b = (type(latents)(latents.z_sem[i : i + 1], latents.x_T[i : i + 1]) for i in range(2))
    return write_images(pipe.interpolate(a, b, num_frames=args.frames, num_inference_steps=args.steps).images, files)


def run_edit(args) -> int:
    names = stems(args.images)
    files = planned_files(args, [f"{n}_{args.attribute}_{s:+g}" for s in args.strengths for n in names])
    check_attribute(args.model, args.attribute)  # from the folder's classifier config, before loading
    unusual = [f"{s:g}" for s in args.strengths if abs(s) > 1]
    if unusual:
        print(f"warning: --strengths {' '.join(unusual)} outside the usual range [-1, 1] (paper: 0.3) move z_sem far "
              "from the codes the model knows; expect artefacts", file=sys.stderr)  # fmt: skip
    images = load_images(args.images)
    pipe = load_pipeline(args)
    if pipe.classifier is None:
        raise SystemExit(f"error: {args.model or 'the model'} has no classifier to edit along")
    pipe.classifier.attribute_index(args.attribute)  # a Hub model's unknown attribute fails here, before encoding
    latents = encode_images(pipe, args, images)
    outputs = []
    for strength in args.strengths:
        outputs += pipe.edit(
            latents, attribute=args.attribute, strength=strength, num_inference_steps=args.steps
        ).images
    return write_images(outputs, files)


def run_sample(args) -> int:
    files = planned_files(args, [f"sample_seed{args.seed}_{i:03d}" for i in range(args.num)])
    if args.attribute is not None:
        check_attribute(args.model, args.attribute, binary=True)
    pipe = load_pipeline(args)
    generator = torch.Generator().manual_seed(args.seed)
    if args.attribute is None:
        steps = {"num_inference_steps": args.steps, "latent_num_inference_steps": args.steps}
        return write_images(pipe(batch_size=args.num, generator=generator, **steps).images, files)
    max_candidates = args.max_candidates or 200 * args.num
    try:
        z_sem = pipe.sample_z_sem_with_attribute(
            args.num, args.attribute, args.min_probability, args.steps, generator, max_candidates
        )
    except ValueError as e:  # the API's advice names its arguments; name the flags instead
        reason, advice, _ = str(e).partition(". Lower min_probability")
        if not advice:
            raise
        raise SystemExit(
            f"error: {reason}; lower --min_probability (now {args.min_probability:g}) or raise --max_candidates "
            f"(now {max_candidates})"
        ) from e
    return write_images(pipe.decode(z_sem, None, args.steps, generator=generator).images, files)


# ----------------------------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .precision import DTYPE_CHOICES

    parser = argparse.ArgumentParser(prog="diffae", description="Diffusion Autoencoders with diffusers.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help_text, func, images=None):
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        p.add_argument("--model", default=None, help="pipeline folder or Hub repo id; none: the bundled emoji model")
        p.add_argument(
            "--dtype",
            choices=DTYPE_CHOICES,
            default="auto",
            help="compute dtype; auto: bfloat16 on CPUs and GPUs with native bfloat16, else float32",
        )
        p.add_argument("--steps", type=int_at_least(1), default=20, help="DDIM steps for encoding and decoding")
        p.add_argument("--seed", type=int, default=0, help="random seed")
        p.add_argument("--overwrite", action="store_true", help="replace output files that exist")
        if images:
            p.add_argument("--images", nargs="+", required=True, help=images)
            p.add_argument(
                "--inversion",
                choices=("ddim", "exact"),
                default="ddim",
                help="stochastic encoder: the official DDIM inversion, or exact inversion of the DDIM decoder "
                "(--steps x --inversion_iterations network calls)",
            )
            p.add_argument(
                "--inversion_iterations",
                type=int_at_least(1),
                default=3,
                help="network calls per step of --inversion exact",
            )
            p.add_argument("--align", action="store_true", help="FFHQ-style face alignment first (`align` extra)")
            p.add_argument("--unaligned_ok", action="store_true", help="with --align: keep an image with no face")
        return p

    folder_help = "folder for the images, named after the inputs (created if missing)"
    p = command("demo", "run the demo on the bundled model and images", run_demo)
    p.add_argument("--output", default="demo_out", help="folder for the PNG grids and index.html")
    p.add_argument(
        "--samples", default=None, help="folder of PNGs (+ metadata.jsonl with a file_name per row); none: bundled"
    )
    p.add_argument("--num_images", type=int_at_least(1), default=48, help="how many sample images to use")
    p.add_argument("--edit_attributes", nargs="*", default=None, help="classifier heads to edit along; none: 3")
    p.add_argument("--few_shot_attribute", default="is_woman", help="metadata column for the few-shot demo")
    p = command("encode", "images -> z_sem and x_T (safetensors)", run_encode, images="input image files")
    p.add_argument("--output", required=True, help="output .safetensors file")
    p = command("decode", "codes (safetensors) -> images", run_decode)
    p.add_argument("--codes", required=True, help="file written by `diffae encode`")
    p.add_argument("--random-xT", dest="random_xT", action="store_true", help="ignore x_T: stochastic variations")
    p.add_argument("--output", required=True, help=folder_help)
    p = command("reconstruct", "encode then decode images", run_reconstruct, images="input image files")
    p.add_argument("--output", required=True, help=folder_help)
    two = "exactly two image files: the first and the last frame"
    p = command("interpolate", "interpolate between exactly two images", run_interpolate, images=two)
    p.add_argument("--frames", type=int_at_least(2), default=8, help="frames, both images included")
    p.add_argument("--output", required=True, help=folder_help)
    p = command("edit", "edit an attribute of images", run_edit, images="input image files")
    p.add_argument(
        "--attribute",
        required=True,
        help=f"a head of the model's classifier; the bundled model's: {bundled_heads_text()}",
    )
    p.add_argument(
        "--strengths",
        type=finite_float,
        nargs="+",
        default=[0.3],
        help="edit strengths alpha, usually within [-1, 1] (paper: 0.3; < 0 away from the attribute)",
    )
    p.add_argument("--output", required=True, help=folder_help)
    p = command("sample", "sample new images (optionally conditioned on an attribute)", run_sample)
    p.add_argument("--num", type=int_at_least(1), default=8, help="how many images")
    p.add_argument(
        "--attribute",
        default=None,
        help="a binary classifier head to condition on (rejection sampling); none: unconditional; "
        f"the bundled model's: {bundled_heads_text(binary_only=True)}",
    )
    p.add_argument(
        "--min_probability",
        type=probability_below_one,
        default=0.5,
        help="with --attribute: reject candidates the classifier gives a lower probability (paper: 0.5)",
    )
    p.add_argument(
        "--max_candidates",
        type=int_at_least(1),
        default=None,
        help="with --attribute: give up after this many candidates; none: 200 x --num",
    )
    p.add_argument("--output", required=True, help="folder for the images")
    p = sub.add_parser("convert", help="convert an official checkpoint (see diffae convert -h)")
    p.set_defaults(func=None)
    p = sub.add_parser(
        "evaluate", help="the paper's measurements on a pipeline and a dataset (see diffae evaluate -h)"
    )
    p.set_defaults(func=None)
    sub.add_parser("app", help="interactive editor in the browser (`app` extra; see diffae app -h)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        from .convert import main as convert_main

        return convert_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        from .evaluation.suite import main as evaluate_main

        return evaluate_main(argv[1:])
    if argv[:1] == ["app"]:
        from .app import main as app_main

        return app_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # pipeline input errors: one clear line instead of a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
