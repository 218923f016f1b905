"""`diffae app`: an interactive Gradio editor on a DiffAE pipeline (the bundled emoji model by default).

```
pip install "diffusers-diffae[app]"
diffae app [--model DIR_OR_REPO] [--host 127.0.0.1] [--port 7860] [--share]
python -m diffusers_diffae.app ...            # the same
```
Load a photo or a bundled sample, move the attribute sliders, interpolate two images, draw variations and samples;
download the image and its codes (safetensors) to go on in Python. [`EditorSession`] is the part without Gradio.
"""

import argparse
import os
import sys
from typing import Optional, Sequence

from ..precision import DTYPE_CHOICES
from .session import EditorSession, EncodedImage, EncodeSettings


__all__ = ["EditorSession", "EncodeSettings", "EncodedImage", "build_parser", "load_model", "main"]


def load_model(model: Optional[str] = None, dtype: str = "float32"):
    """The pipeline as `diffae` loads it (`model`: folder or Hub repo id; `None`: the bundled emoji model)."""
    from ..cli import load_pipeline

    return load_pipeline(argparse.Namespace(model=model, dtype=dtype))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffae app", description="Interactive DiffAE editor (Gradio).")
    parser.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: bundled emoji model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="float32", help="compute dtype (auto: bfloat16 where native)"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .ui import build_app, launch

    try:
        demo = build_app(EditorSession(load_model(args.model, args.dtype)), model=args.model)
    except (ImportError, ValueError) as e:  # a missing extra, a bad --model: one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0
