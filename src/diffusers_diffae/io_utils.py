"""Files of the `diffae` command and the converter: reading inputs with one-line errors, checking outputs before any
compute, and writing them atomically.

Every error of the command line is a `SystemExit` with one line `error: ...` that names the file and the problem.
Outputs are checked before the model is loaded (none is an input, none exists unless `--overwrite`, the folder can be
written), and all outputs of a run are first written to hidden temporary files beside their targets and renamed only
once every one of them is complete: a full disk or a crash leaves the output folder as it was.
"""

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import PIL.Image


ASSETS = Path(__file__).resolve().parent / "demo_assets"
BUNDLED_MODEL = ASSETS / "diffae-emoji32"
BUNDLED_SAMPLES = ASSETS / "samples"
PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------


def load_images(paths: Sequence[str]) -> List[PIL.Image.Image]:
    """Opens and decodes every image (any mode: the pipeline converts 16-bit and transparent ones itself)."""
    images = []
    for path in paths:
        if Path(path).is_dir():
            raise SystemExit(f"error: cannot read image {path}: it is a folder, not an image file")
        if Path(path).is_file() and Path(path).stat().st_size == 0:
            raise SystemExit(f"error: cannot read image {path}: the file is empty")
        try:
            with PIL.Image.open(path) as image:
                image.load()
                images.append(image)
        except PIL.UnidentifiedImageError as e:
            raise SystemExit(f"error: cannot read image {path}: not an image format Pillow can read") from e
        except PIL.Image.DecompressionBombError as e:
            raise SystemExit(f"error: cannot read image {path}: {e}") from e
        except OSError as e:  # missing, unreadable, truncated
            raise SystemExit(f"error: cannot read image {path}: {e.strerror or e}") from e
    if not images:
        raise SystemExit("error: no images given")
    return images


def read_codes(path: str) -> Tuple[Dict, Optional[list]]:
    """The tensors of a `diffae encode` file and the input names stored with them (or `None`)."""
    from safetensors import safe_open

    if Path(path).is_dir():
        raise SystemExit(f"error: cannot read codes {path}: it is a folder, not a .safetensors file")
    try:
        with safe_open(path, framework="pt") as f:
            codes = {key: f.get_tensor(key) for key in f.keys()}
            names = json.loads((f.metadata() or {}).get("inputs", "null"))
    except Exception as e:  # safetensors raises its own error types for files that are not safetensors
        raise SystemExit(f"error: cannot read codes {path}: {type(e).__name__}: {e}") from e
    if "z_sem" not in codes:
        found = ", ".join(sorted(codes)) or "nothing"
        raise SystemExit(f"error: {path} has no z_sem tensor (found {found}); write it with `diffae encode`")
    z_sem = codes["z_sem"]
    if z_sem.ndim != 2 or z_sem.shape[0] == 0:
        raise SystemExit(f"error: z_sem in {path} must have shape (B, D) with B >= 1, got {tuple(z_sem.shape)}")
    return codes, names if isinstance(names, list) else None


def read_metadata(folder: Path) -> List[dict]:
    """Rows of `folder/metadata.jsonl` (each needs a `file_name`), or one row per PNG of the folder without it."""
    if not folder.is_dir():
        raise SystemExit(f"error: --samples {folder} is not a folder")
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return [{"file_name": p.name} for p in sorted(folder.glob("*.png"))]
    rows = []
    for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {meta}, line {number}: not valid JSON ({e.msg}, column {e.colno})") from e
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise SystemExit(f'error: {meta}, line {number}: the row needs a "file_name" string naming an image')
        rows.append(row)
    return rows


def classifier_heads(model: Optional[str]) -> Optional[Dict[str, str]]:
    """`{attribute: "binary" | "continuous"}` of a local pipeline folder's classifier read from its config.json
    (no model is loaded); `{}` for a local folder without a classifier, `None` when it cannot be known here (a Hub
    repo id)."""
    folder = Path(model) if model else BUNDLED_MODEL
    if not (folder / "model_index.json").is_file():
        return None
    config = folder / "classifier" / "config.json"
    if not config.is_file():
        return {}
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # loading reports a broken component itself
    names = values.get("attribute_names") or []
    types = values.get("attribute_types") or ["binary"] * len(names)
    return dict(zip(names, types))


def check_attribute(model: Optional[str], attribute: str, binary: bool = False) -> None:
    """Refuses an attribute the model's classifier lacks (or a continuous one where a binary one is needed) before
    the model is loaded, when the folder tells."""
    heads = classifier_heads(model)
    if heads is None:
        return
    if not heads:
        raise SystemExit(f"error: {model or 'the bundled model'} has no classifier; it cannot use --attribute")
    if attribute not in heads:
        raise SystemExit(f"error: unknown attribute {attribute!r}; the classifier has: {', '.join(heads)}")
    if binary and heads[attribute] != "binary":
        raise SystemExit(f"error: attribute {attribute!r} is a continuous head; sampling needs a binary one")


# ----------------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------------


def planned_files(args, names: Sequence[str], suffix: str = ".png") -> List[Path]:
    """The files an image command will write into the folder --output, named after the inputs and checked before
    any compute (see `check_new_files`)."""
    out = Path(args.output)
    if out.suffix.lower() in IMAGE_SUFFIXES:
        raise SystemExit(f"error: --output {out} names an image; give a folder (images are named after their inputs)")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --output {out} exists and is not a folder")
    return check_new_files(args, [out / f"{name}{suffix}" for name in names])


def check_new_files(args, files: List[Path]) -> List[Path]:
    """Refuses outputs that collide, overwrite an input, exist (without --overwrite) or are folders, or whose
    folder cannot be written, before any compute."""
    if len(set(files)) != len(files):
        duplicate = next(f for f in files if files.count(f) > 1)
        raise SystemExit(f"error: two outputs would both be {duplicate}; give inputs or values with distinct names")
    inputs = [*(getattr(args, "images", None) or []), getattr(args, "codes", None)]
    inputs = {Path(p).resolve() for p in inputs if p}
    for file in files:
        if file.resolve() in inputs:
            raise SystemExit(f"error: the output {file} is one of the inputs")
        if file.is_dir():
            raise SystemExit(f"error: the output {file} is a folder")
        if file.exists() and not args.overwrite:
            raise SystemExit(f"error: {file} exists; pass --overwrite to replace it")
    folder = files[0].parent if files else Path(args.output)
    check_writable(folder)
    return files


def check_writable(folder: Path) -> None:
    """`folder`, or the nearest folder above it that exists (it is created on writing), must be writable."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise SystemExit(f"error: cannot write into {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: cannot write into {existing}: permission denied (or a read-only file system)")


class OutputWriteError(OSError):
    """Outputs could not be written (a full disk, a read-only file system); the message says where and what was
    written."""


def write_atomically(saves: Sequence[Tuple[Callable[[Path], None], Path]]) -> None:
    """Runs each `save(temporary_path)` into a hidden file beside its target, then renames all of them: a failure
    (a full disk, a read-only file system) removes the temporary files and leaves every target as it was. Raises
    [`OutputWriteError`]."""
    temporary, created = [], []
    try:
        for save, path in saves:
            missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            created += missing
            tmp = path.with_name(f".{path.name}.partial")
            temporary.append(tmp)
            save(tmp)
    except BaseException as e:  # a full disk, a read-only file system, Ctrl-C: the targets stay as they were
        for tmp in temporary:
            tmp.unlink(missing_ok=True)
        for folder in created:  # deepest first: the folders this run made, left empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if not isinstance(e, OSError):
            raise
        where = e.filename or (temporary[-1] if temporary else "")
        raise OutputWriteError(
            f"cannot write {Path(str(where)).parent if where else 'the outputs'}: {e.strerror or e}; nothing was written"
        ) from e
    for done, (tmp, (_, path)) in enumerate(zip(temporary, saves)):
        try:
            os.replace(tmp, path)
        except OSError as e:  # a rename in one folder: only a folder removed meanwhile or a changed mount get here
            for left in temporary[done:]:
                left.unlink(missing_ok=True)
            raise OutputWriteError(f"cannot rename {tmp} to {path}: {e.strerror or e}; {done} of {len(saves)} "
                                   "outputs were written") from e  # fmt: skip


def write_all(saves: Sequence[Tuple[Callable[[Path], None], Path]]) -> None:
    """[`write_atomically`] for the command line: a failure is a one-line `SystemExit`."""
    try:
        write_atomically(saves)
    except OutputWriteError as e:
        raise SystemExit(f"error: {e}") from e


def write_images(images, files: List[Path]) -> int:
    """Writes PIL `images` as PNGs to `files` (all or none) and says where."""
    write_all(
        [
            (lambda tmp, image=image: image.save(tmp, format="PNG"), file)
            for image, file in zip(images, files, strict=True)
        ]
    )
    print(f"wrote {len(files)} images to {files[0].parent}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# pipeline folders (the converter)
# ----------------------------------------------------------------------------------------------------------------


class OutputFolderError(OSError):
    """The output folder cannot be used or written; the message says why and that nothing was written."""


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def recover_crashed_save(output_dir: PathLike) -> None:
    """Tidies what a [`save_pipeline_atomically`] killed mid-way left beside `output_dir` (hidden folders named after
    its process id, which no longer runs): a partial folder is removed; a previous pipeline moved aside is put back
    when the new one never took its place, and removed when it did. Folders of running processes are left alone."""
    out = Path(output_dir).resolve()
    if not out.parent.is_dir():
        return
    for kind in ("partial", "replaced"):
        for folder in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            pid = folder.name.rsplit("-", 1)[1]
            if not pid.isdigit() or _process_is_running(int(pid)):
                continue
            if kind == "replaced" and not out.exists():
                os.replace(folder, out)
                print(f"warning: put back the pipeline folder {out}, which an interrupted save had moved aside",
                      file=sys.stderr)  # fmt: skip
            else:
                shutil.rmtree(folder, ignore_errors=True)


def check_output_folder(output_dir: PathLike, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> None:
    """Refuses, before any loading, an output that is a file, a non-empty folder (without `overwrite`; with it, only
    a pipeline folder, one with `model_index.json`, is replaced), a folder holding one of the `inputs`, or a place
    that cannot be written. Raises [`OutputFolderError`]. What an interrupted save left is tidied first
    ([`recover_crashed_save`])."""
    recover_crashed_save(output_dir)
    out = Path(output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"the output {output_dir} is an existing file; give a folder for the pipeline")
    for source in inputs:
        if out == Path(source).resolve() or out in Path(source).resolve().parents:
            raise OutputFolderError(f"the output folder {output_dir} holds the input {source}; choose another")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputFolderError(
                f"the output folder {output_dir} exists and is not empty; pass --overwrite (overwrite=True) to "
                "replace it"
            )
        if not (out / "model_index.json").is_file():
            raise OutputFolderError(
                f"the output folder {output_dir} is not a pipeline folder (no model_index.json); refusing to replace "
                "it even with --overwrite"
            )
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(f"cannot write into {existing}: permission denied (or a read-only file system)")


def save_pipeline_atomically(pipe, output_dir: PathLike, overwrite: bool = False) -> None:
    """`pipe.save_pretrained` into a hidden sibling folder, renamed to `output_dir` once complete; a previous
    pipeline folder there is replaced only with `overwrite`. A full disk or a crash leaves no folder at
    `output_dir` that looks complete: the partial folder is removed (or, after a crash, stays hidden until the next
    save to `output_dir` tidies it, putting back a previous pipeline a crash left aside).
    Raises [`OutputFolderError`]."""
    out = Path(output_dir).resolve()
    check_output_folder(out, overwrite)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(partial)
        if out.exists():
            os.replace(out, replaced)
        os.replace(partial, out)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        if replaced.exists() and not out.exists():
            os.replace(replaced, out)  # the previous folder back in place
        raise OutputFolderError(
            f"cannot write the pipeline to {output_dir}: {e.strerror or e}; nothing was written"
        ) from e
    shutil.rmtree(replaced, ignore_errors=True)
