"""What the interactive editor computes, without any user interface: every image comes from the public API of one
`DiffAEPipeline` (`encode`, `decode`, `edit`, `interpolate`, `__call__`), which the editor only calls."""

import hashlib
import json
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import PIL.Image
import torch
import torch.nn.functional as F

from ..image_processor import resize_notice
from ..io_utils import write_atomically
from ..pipelines import DiffAELatents


@dataclass(frozen=True)
class EncodeSettings:
    """How an image is encoded: inversion steps and the stochastic encoder's options (`DiffAEPipeline.encode`).

    The default, exact inversion at 10 steps, costs three network calls per step once per image and lets a 10-step
    decode return to the input (docs/results has the inversion report); the official DDIM inversion needs many more
    steps for that, and every slider move pays for the decode steps."""

    num_inference_steps: int = 10
    inversion: str = "exact"
    inversion_iterations: int = 3


@dataclass
class EncodedImage:
    """One encoded image: what the model saw, its codes and how they were made."""

    name: str
    model_input: PIL.Image.Image  # the image at the model resolution, as the pipeline preprocessed it
    latents: DiffAELatents  # z_sem (1, D), x_T (1, C, H, W)
    settings: EncodeSettings
    note: str  # what was done to the image on its way in (alignment, resizing)


class EditorSession:
    r"""
    The editor's state on one pipeline: codes cached per (image, encode settings), and thin calls into the pipeline.

    Every call runs under one lock, since a pipeline's schedulers keep the timesteps of the call in progress.

    Args:
        pipe ([`DiffAEPipeline`]): the model.
        cache_size (`int`): how many encoded images to keep.
        output_dir (`str`, *optional*): where downloads are written (default: a new temporary folder).
    """

    def __init__(self, pipe, cache_size: int = 32, output_dir: Optional[str] = None):
        if pipe.encoder is None:
            raise ValueError("the editor needs a pipeline with a semantic encoder (not the DDIM baseline)")
        self.pipe = pipe
        self.cache_size = cache_size
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="diffae-app-"))
        self._lock = threading.Lock()
        self._encoded: "OrderedDict[str, EncodedImage]" = OrderedDict()

    # ------------------------------------------------------------------------------------------------------------
    # the model
    # ------------------------------------------------------------------------------------------------------------

    @property
    def attributes(self) -> List[str]:
        return self.pipe.classifier.attribute_names if self.pipe.classifier is not None else []

    def binary_attributes(self) -> List[str]:
        return [a for a in self.attributes if self.pipe.classifier.attribute_type(a) == "binary"]

    @property
    def can_sample(self) -> bool:
        return self.pipe.latent_denoiser is not None and self.pipe.latent_scheduler is not None

    def describe(self) -> str:
        """One paragraph on the model: resolution, channels, what it can do."""
        c, r = self.pipe.image_shape[0], self.pipe.resolution
        heads = (
            f"{len(self.attributes)} attribute heads ({', '.join(self.attributes)})"
            if self.attributes
            else "no attribute classifier (editing off)"
        )
        sampler = "a latent DDIM for sampling" if self.can_sample else "no latent DDIM (sampling off)"
        kind = "RGB" if c == 3 else "greyscale"
        return (
            f"Model resolution **{r}x{r}** ({kind}); z_sem has {self.pipe.z_sem_width} dimensions; {heads}; {sampler}. "
            f"Every input is resized as the pipeline does: shorter side to {r} px, then the centre {r}x{r}."
        )

    # ------------------------------------------------------------------------------------------------------------
    # encoding, once per image and settings
    # ------------------------------------------------------------------------------------------------------------

    def encode(
        self,
        image: PIL.Image.Image,
        settings: EncodeSettings = EncodeSettings(),
        align: bool = False,
        unaligned_ok: bool = False,
        name: str = "image",
        unaligned_hint: str = "unaligned_ok=True",
    ) -> str:
        """Encodes `image` (optionally FFHQ-aligned first) unless these pixels were encoded with these settings;
        returns the key of its [`EncodedImage`]. Alignment errors (`FaceNotFoundError`) propagate."""
        notes = [f"input {image.width}x{image.height} {image.mode}"]
        if align:
            from ..alignment import FaceNotFoundError, align_for_pipeline

            try:
                image = align_for_pipeline(self.pipe, image, unaligned_hint=unaligned_hint)[0]
                notes.append(f"face aligned (FFHQ recipe) to {image.width}x{image.height}")
            except FaceNotFoundError:
                if not unaligned_ok:
                    raise
                notes.append("no face found: used unaligned, as asked")
        notes.append(resize_notice([image.size], self.pipe.resolution) or "used at the model resolution as it is")
        x = self.pipe.preprocess(image)  # (1, C, H, W) in [-1, 1], exactly what encode sees
        digest = hashlib.sha256(x.numpy().tobytes() + repr(settings).encode()).hexdigest()[:16]
        with self._lock:
            if digest in self._encoded:  # the same pixels: only the name and the notes may differ
                self._encoded.move_to_end(digest)
                self._encoded[digest].name, self._encoded[digest].note = name, "; ".join(notes)
                return digest
            latents = self.pipe.encode(
                image,
                num_inference_steps=settings.num_inference_steps,
                inversion=settings.inversion,
                inversion_iterations=settings.inversion_iterations,
            )
            model_input = self.pipe.image_processor.postprocess(x, "pil")[0]
            self._encoded[digest] = EncodedImage(name, model_input, latents, settings, "; ".join(notes))
            while len(self._encoded) > self.cache_size:
                self._encoded.popitem(last=False)
        return digest

    def get(self, key: str) -> EncodedImage:
        if key not in self._encoded:
            raise ValueError("this image is no longer encoded here (cache full or app restarted); load it again")
        return self._encoded[key]

    def probabilities(self, key: str) -> Dict[str, float]:
        """The classifier's output per head on the image's z_sem: a probability for binary heads, else the value."""
        if self.pipe.classifier is None:
            return {}
        with self._lock:
            logits = self.pipe.classifier(self.get(key).latents.z_sem.float()).logits[0]
        return {
            name: (
                torch.sigmoid(logit).item() if self.pipe.classifier.attribute_type(name) == "binary" else logit.item()
            )
            for name, logit in zip(self.attributes, logits)
        }

    # ------------------------------------------------------------------------------------------------------------
    # images from codes
    # ------------------------------------------------------------------------------------------------------------

    def reconstruct(self, key: str, num_inference_steps: int) -> PIL.Image.Image:
        latents = self.get(key).latents
        with self._lock:
            return self.pipe.decode(latents.z_sem, latents.x_T, num_inference_steps).images[0]

    def edit(self, key: str, strengths: Dict[str, float], num_inference_steps: int) -> PIL.Image.Image:
        """The image moved along every head with a non-zero strength; one head is `pipe.edit(attribute=...)`.

        Several heads move along the sum of their unit directions (in normalised z_sem, the space where
        `DiffAEPipeline.edit` moves), passed to `pipe.edit` as one `direction`."""
        moves = {a: float(s) for a, s in strengths.items() if s}
        if not moves:
            return self.reconstruct(key, num_inference_steps)
        latents = self.get(key).latents
        with self._lock:
            if len(moves) == 1:
                ((attribute, strength),) = moves.items()
                return self.pipe.edit(
                    latents, attribute=attribute, strength=strength, num_inference_steps=num_inference_steps
                ).images[0]
            direction = self.combined_direction(moves)
            return self.pipe.edit(
                latents, direction=direction, strength=direction.norm().item(), num_inference_steps=num_inference_steps
            ).images[0]

    def combined_direction(self, strengths: Dict[str, float]) -> torch.Tensor:
        """`sum_i s_i w_i / |w_i|` (D,): `edit(direction=d, strength=|d|)` moves by `sqrt(D) d`, the sum of the
        single-head moves."""
        unit = [F.normalize(self.pipe.classifier.direction(a).detach().float(), dim=0) for a in strengths]
        return sum(s * w for s, w in zip(strengths.values(), unit))

    def edit_to_target(
        self, key: str, attribute: str, target_probability: float, num_inference_steps: int
    ) -> PIL.Image.Image:
        """`pipe.edit(..., target_probability=p)`: the strength that brings the head's output to `p` (Eq. 11)."""
        latents = self.get(key).latents
        with self._lock:
            return self.pipe.edit(
                latents,
                attribute=attribute,
                target_probability=target_probability,
                num_inference_steps=num_inference_steps,
            ).images[0]

    def interpolate(self, key_a: str, key_b: str, num_frames: int, num_inference_steps: int) -> List[PIL.Image.Image]:
        a, b = self.get(key_a).latents, self.get(key_b).latents
        with self._lock:
            return self.pipe.interpolate(a, b, num_frames=num_frames, num_inference_steps=num_inference_steps).images

    def variations(self, key: str, count: int, seed: int, num_inference_steps: int) -> List[PIL.Image.Image]:
        """The image's z_sem decoded from `count` fresh x_T drawn with `seed` (paper Fig. 3)."""
        z_sem = self.get(key).latents.z_sem.repeat(count, 1)
        with self._lock:
            generator = torch.Generator().manual_seed(int(seed))
            return self.pipe.decode(z_sem, None, num_inference_steps, generator=generator).images

    def sample(
        self,
        count: int,
        seed: int,
        num_inference_steps: int,
        attribute: Optional[str] = None,
        min_probability: float = 0.5,
        head=None,
    ) -> List[PIL.Image.Image]:
        """`pipe(batch_size=count, generator=Generator().manual_seed(seed), ...)`; with `attribute`, conditional
        sampling by rejection (paper §5.6) with the pipeline's classifier, or with `head` (a one-head
        `AttributeClassifier`, e.g. a few-shot one) in its place for this call."""
        with self._lock:
            saved = self.pipe.classifier
            if head is not None:
                self.pipe.classifier = head
            try:
                return self.pipe(
                    batch_size=count,
                    num_inference_steps=num_inference_steps,
                    latent_num_inference_steps=num_inference_steps,
                    generator=torch.Generator().manual_seed(int(seed)),
                    attribute=attribute,
                    min_probability=min_probability,
                ).images
            finally:
                self.pipe.classifier = saved

    def few_shot_head(self, images: Sequence[PIL.Image.Image], labels: Sequence[bool], attribute: str):
        """A one-head classifier fitted on a few labelled images (paper §5.6), as `diffae demo` fits it."""
        from ..cli_demo import few_shot_head

        labels = torch.tensor([float(bool(v)) for v in labels])
        if not 0 < labels.sum() < len(labels):
            raise ValueError(
                f"few-shot {attribute!r} needs positive and negative examples, got {int(labels.sum())} of {len(labels)}"
            )
        with self._lock:
            z_sem = self.pipe.encode(list(images), stochastic=False).z_sem
            return few_shot_head(self.pipe, z_sem, labels, attribute)

    # ------------------------------------------------------------------------------------------------------------
    # downloads
    # ------------------------------------------------------------------------------------------------------------

    def save_codes(self, key: str, extra: Optional[dict] = None) -> Path:
        """The image's codes as safetensors (`z_sem`, `x_T`), readable by `diffae decode` and `safetensors.torch`."""
        from safetensors.torch import save_file

        encoded = self.get(key)
        metadata = {"inputs": json.dumps([encoded.name]), "encode_settings": json.dumps(vars(encoded.settings))}
        metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
        tensors = {"z_sem": encoded.latents.z_sem.contiguous(), "x_T": encoded.latents.x_T.contiguous()}
        return self._write(f"{encoded.name}_{key[:8]}_codes.safetensors", lambda p: save_file(tensors, p, metadata))

    def save_image(self, image: PIL.Image.Image, name: str) -> Path:
        return self._write(name, lambda p: image.save(p, format="PNG"))

    def _write(self, name: str, save) -> Path:
        path = self.output_dir / name
        write_atomically([(lambda tmp: save(str(tmp)), path)])
        return path
