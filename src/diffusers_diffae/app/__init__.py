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

from .session import EditorSession, EncodedImage, EncodeSettings


__all__ = ["EditorSession", "EncodeSettings", "EncodedImage", "build_parser", "load_model", "main"]


def load_model(model: Optional[str] = None):
    """`DiffAEPipeline.from_pretrained(model)`, the bundled emoji model when `model` is `None`; a load failure
    exits with one line."""
    from ..cli import BUNDLED_MODEL
    from ..pipelines import DiffAEPipeline

    path = model or str(BUNDLED_MODEL)
    try:
        pipe = DiffAEPipeline.from_pretrained(path)
    except OSError as e:  # a missing folder, an unreachable repo, unreadable weights
        reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise SystemExit(f"error: cannot load a DiffAE pipeline from {path}: {reason}") from e
    pipe.set_progress_bar_config(leave=False)
    return pipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffae app", description="Interactive DiffAE editor (Gradio).")
    parser.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: bundled emoji model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .ui import build_app, launch

    try:
        demo = build_app(EditorSession(load_model(args.model)), model=args.model)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0
