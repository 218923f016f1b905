"""The Gradio interface of the editor: components and events around an [`EditorSession`]; it computes nothing itself."""

import os
from pathlib import Path
from typing import List, Optional

import PIL.Image

from ..cli import BUNDLED_SAMPLES
from ..io_utils import load_images, read_metadata
from .session import EditorSession, EncodeSettings


CSS = """
.pixelated img, #input-image img {
  image-rendering: pixelated; width: 100% !important; height: 100% !important; object-fit: contain !important;
}
#edit-sliders { max-height: 34em; overflow-y: auto; }
"""
DEFAULT = EncodeSettings()


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError('the editor needs the `app` extra: pip install "diffusers-diffae[app]"') from e
    return gr


def sample_files(folder: Path = BUNDLED_SAMPLES) -> List[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def _open(path) -> PIL.Image.Image:
    return load_images([str(path)])[0]


def edit_snippet(model: str, codes: str, strengths: dict, steps: int, target: Optional[tuple] = None) -> str:
    """Python that redoes the shown edit with the pipeline from the downloaded codes."""
    load = f'"{model}"' if model else "str(BUNDLED_MODEL)"
    lines = [
        "import torch",
        "from safetensors.torch import load_file",
        "from diffusers_diffae import DiffAELatents, DiffAEPipeline",
        "from diffusers_diffae.cli import BUNDLED_MODEL",
        "",
        f"pipe = DiffAEPipeline.from_pretrained({load})",
        f'codes = load_file("{codes}")',
        'latents = DiffAELatents(codes["z_sem"], codes["x_T"])',
    ]
    moves = {a: s for a, s in strengths.items() if s}
    if target is not None:
        call = (
            f'pipe.edit(latents, attribute="{target[0]}", target_probability={target[1]}, num_inference_steps={steps})'
        )
    elif not moves:
        call = f"pipe.decode(latents.z_sem, latents.x_T, num_inference_steps={steps})"
    elif len(moves) == 1:
        ((a, s),) = moves.items()
        call = f'pipe.edit(latents, attribute="{a}", strength={s}, num_inference_steps={steps})'
    else:
        lines.append(f"strengths = {moves!r}")
        lines.append(
            "d = sum(s * torch.nn.functional.normalize(pipe.classifier.direction(a).float(), dim=0) "
            "for a, s in strengths.items())"
        )
        call = f"pipe.edit(latents, direction=d, strength=d.norm().item(), num_inference_steps={steps})"
    return "\n".join(lines + [f"image = {call}.images[0]"])


def build_app(session: EditorSession, model: Optional[str] = None, samples: Path = BUNDLED_SAMPLES):
    """The editor as a `gradio.Blocks`; `model` is the folder or repo id shown in the Python snippets."""
    gr = _gradio()
    attributes = session.attributes
    binary = session.binary_attributes() if attributes else []
    files = sample_files(samples)
    names = [f.name for f in files]

    def settings(enc_steps, inversion, iterations):
        return EncodeSettings(int(enc_steps), inversion, int(iterations))

    def encode(image, name, align, unaligned_ok, enc_steps, inversion, iterations):
        hint = "tick 'use unaligned if no face is found'"
        try:
            return session.encode(image, settings(enc_steps, inversion, iterations), align, unaligned_ok, name, hint)
        except ValueError as e:  # FaceNotFoundError included: shown to the user, nothing else happens
            raise gr.Error(str(e)) from e

    def downloads(key, image, strengths, dec_steps, target=None):
        extra = {"decode_steps": int(dec_steps), "strengths": strengths}
        if target is not None:
            extra["target_probability"] = {target[0]: target[1]}
        codes = session.save_codes(key, extra)
        png = session.save_image(image, f"{session.get(key).name}_{key[:8]}_edited.png")
        return [str(png), str(codes)], edit_snippet(model, codes.name, strengths, int(dec_steps), target)

    with gr.Blocks(title="Diffusion Autoencoders editor", analytics_enabled=False) as demo:
        key = gr.State(None)
        name = gr.State("image")
        gr.Markdown("## Diffusion Autoencoders: interactive editor\n" + session.describe())
        with gr.Accordion("Advanced: steps and inversion", open=False):
            with gr.Row():
                enc_steps = gr.Slider(2, 250, DEFAULT.num_inference_steps, step=1, label="encode (inversion) steps")
                dec_steps = gr.Slider(2, 250, DEFAULT.num_inference_steps, step=1, label="decode steps")
                inversion = gr.Radio(["exact", "ddim"], value=DEFAULT.inversion, label="inversion")
                iterations = gr.Slider(
                    1, 10, DEFAULT.inversion_iterations, step=1, label="exact inversion: network calls per step"
                )

        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(
                        type="pil", image_mode=None, label="Input (upload, or pick a sample below)",
                        sources=["upload", "clipboard"], format="png", height=220, elem_id="input-image",
                    )  # fmt: skip
                    with gr.Row():
                        align = gr.Checkbox(False, label="align face (FFHQ)", elem_id="align")
                        unaligned_ok = gr.Checkbox(False, label="use unaligned if no face is found")
                    gallery = gr.Gallery(
                        [str(f) for f in files], label="Bundled held-out samples", columns=8, height=180,
                        allow_preview=False, format="png", elem_classes="pixelated",
                    )  # fmt: skip
                    note = gr.Markdown(elem_id="input-note")
                with gr.Column(scale=2):
                    with gr.Row(elem_classes="pixelated"):
                        seen = gr.Image(label="What the model sees", format="png", height=220, interactive=False)
                        recon = gr.Image(label="Reconstruction (before)", format="png", height=220, interactive=False)
                        edited = gr.Image(
                            label="Edited (after)", format="png", height=220, interactive=False, elem_id="edited-image"
                        )
                    mode = gr.Radio(["strength", "target probability"], value="strength", label="edit mode")
                    with gr.Group(elem_id="edit-sliders") as strength_box:
                        sliders = [
                            gr.Slider(-1.0, 1.0, 0.0, step=0.05, label=a, elem_id=f"slider-{a}") for a in attributes
                        ]
                    with gr.Group(visible=False) as target_box:
                        target_attr = gr.Dropdown(binary, value=binary[0] if binary else None, label="attribute")
                        target_p = gr.Slider(0.01, 0.99, 0.5, step=0.01, label="target probability (Eq. 11)")
                    reset = gr.Button("Reset")
                    probs = gr.Label(label="classifier on the input's z_sem", num_top_classes=6, show_heading=False)
                    with gr.Accordion("Downloads and Python", open=False):
                        files_out = gr.File(
                            label="edited image and codes (safetensors)", file_count="multiple", elem_id="edit-files"
                        )
                        code = gr.Code(language="python", label="the same edit from Python")

        with gr.Tab("Interpolate"):
            with gr.Row():
                pick_a = gr.Dropdown(names, value=names[0] if names else None, label="image A (bundled sample)")
                pick_b = gr.Dropdown(names, value=names[min(1, len(names) - 1)] if names else None, label="image B")
            with gr.Row(elem_classes="pixelated"):
                image_a = gr.Image(type="pil", image_mode=None, label="A", format="png", height=160, elem_id="image-a")
                image_b = gr.Image(type="pil", image_mode=None, label="B", format="png", height=160, elem_id="image-b")
                frame = gr.Image(label="frame", format="png", height=160, interactive=False, elem_id="interp-frame")
            with gr.Row():
                num_frames = gr.Slider(2, 16, 8, step=1, label="frames")
                run_interp = gr.Button("Interpolate", elem_id="run-interp")
            frame_index = gr.Slider(0, 7, 0, step=1, label="frame (0 = A)", elem_id="frame-index")
            strip = gr.Gallery(label="all frames", columns=8, height=140, format="png", elem_classes="pixelated")
            interp_files = gr.File(
                label="codes of A and B (safetensors)", file_count="multiple", elem_id="interp-files"
            )
            frames = gr.State([])

        with gr.Tab("Variations and sampling"):
            gr.Markdown("Variations keep the Edit tab's z_sem and draw new x_T; samples come from the latent DDIM.")
            with gr.Row():
                count = gr.Slider(1, 16, 8, step=1, label="images")
                seed = gr.Number(0, precision=0, label="seed (torch.Generator().manual_seed)")
            with gr.Row():
                run_var = gr.Button("Variations of the Edit tab's image")
                run_sample = gr.Button("Sample", interactive=session.can_sample)
            with gr.Row():
                cond = gr.Dropdown(["(unconditional)"] + binary, value="(unconditional)", label="condition on")
                head_source = gr.Radio(
                    ["pipeline classifier", "few-shot head from labelled bundled samples"],
                    value="pipeline classifier", label="attribute head",
                )  # fmt: skip
                shots = gr.Slider(2, 24, 8, step=1, label="few-shot: examples per class")
                min_p = gr.Slider(0.05, 0.95, 0.5, step=0.05, label="rejection threshold (paper: 0.5)")
            results = gr.Gallery(label="results", columns=8, height=200, format="png", elem_classes="pixelated")
            results_code = gr.Code(language="python", label="the same call from Python")

        # -------------------------------------------------------------------------------------------------------
        # events
        # -------------------------------------------------------------------------------------------------------

        encode_inputs = [image, name, align, unaligned_ok, enc_steps, inversion, iterations]

        def on_input(
            image_value, name_value, align_v, unaligned_v, enc, inv, it, dec, *strength_values,
            progress=gr.Progress(track_tqdm=True),
        ):  # fmt: skip
            if image_value is None:
                return None, None, None, None, {}, "", None, ""
            k = encode(image_value, name_value, align_v, unaligned_v, enc, inv, it)
            encoded = session.get(k)
            strengths = dict(zip(attributes, strength_values))
            before = session.reconstruct(k, int(dec))
            after = session.edit(k, strengths, int(dec)) if any(strength_values) else before
            files_value, snippet = downloads(k, after, strengths, dec)
            outputs = session.probabilities(k)
            binary_p = {a: v for a, v in outputs.items() if a in binary}
            values = "".join(f"; {a} = {v:.3g}" for a, v in outputs.items() if a not in binary)
            return k, encoded.model_input, before, after, binary_p, encoded.note + values, files_value, snippet

        input_outputs = [key, seen, recon, edited, probs, note, files_out, code]
        for trigger in (image.change, align.change, unaligned_ok.change, enc_steps.release, inversion.change,
                        iterations.release, dec_steps.release):  # fmt: skip
            trigger(on_input, encode_inputs + [dec_steps] + sliders, input_outputs, trigger_mode="always_last")

        def on_pick(evt: gr.SelectData):
            return _open(files[evt.index]), files[evt.index].stem

        gallery.select(on_pick, None, [image, name])

        def on_slider(k, dec, *strength_values):
            if k is None:
                raise gr.Error("load an image first")
            strengths = dict(zip(attributes, strength_values))
            after = session.edit(k, strengths, int(dec))
            return (after, *downloads(k, after, strengths, dec))

        for slider in sliders:
            slider.release(
                on_slider, [key, dec_steps] + sliders, [edited, files_out, code], trigger_mode="always_last",
                show_progress="hidden",
            )  # fmt: skip

        def on_target(k, attribute, p, dec):
            if k is None or attribute is None:
                raise gr.Error("load an image first")
            after = session.edit_to_target(k, attribute, float(p), int(dec))
            return (after, *downloads(k, after, {}, dec, (attribute, float(p))))

        target_p.release(on_target, [key, target_attr, target_p, dec_steps], [edited, files_out, code])
        target_attr.change(on_target, [key, target_attr, target_p, dec_steps], [edited, files_out, code])
        mode.change(
            lambda m: (gr.update(visible=m == "strength"), gr.update(visible=m != "strength")),
            mode, [strength_box, target_box],
        )  # fmt: skip

        def on_reset(k, dec):
            zero = [0.0] * len(sliders)
            if k is None:
                return (*zero, None, None, "")
            after = session.reconstruct(k, int(dec))
            return (*zero, after, *downloads(k, after, {}, dec))

        reset.click(on_reset, [key, dec_steps], sliders + [edited, files_out, code])

        pick_a.change(lambda n: _open(samples / n) if n else None, pick_a, image_a)
        pick_b.change(lambda n: _open(samples / n) if n else None, pick_b, image_b)
        demo.load(
            lambda a, b: (_open(samples / a) if a else None, _open(samples / b) if b else None),
            [pick_a, pick_b], [image_a, image_b],
        )  # fmt: skip

        def on_interpolate(a, b, n, align_v, unaligned_v, enc, inv, it, dec):
            if a is None or b is None:
                raise gr.Error("give two images")
            ka = encode(a, "a", align_v, unaligned_v, enc, inv, it)
            kb = encode(b, "b", align_v, unaligned_v, enc, inv, it)
            out = session.interpolate(ka, kb, int(n), int(dec))
            codes = [str(session.save_codes(k, {"decode_steps": int(dec)})) for k in (ka, kb)]
            return out, out, out[0], gr.update(maximum=len(out) - 1, value=0), codes

        run_interp.click(
            on_interpolate,
            [image_a, image_b, num_frames, align, unaligned_ok, enc_steps, inversion, iterations, dec_steps],
            [frames, strip, frame, frame_index, interp_files],
        )
        # `input`: the user moves it; the reset to 0 after an interpolation already shows frame 0.
        frame_index.input(
            lambda fs, i: fs[int(i)] if fs else None, [frames, frame_index], frame, trigger_mode="always_last"
        )

        def on_variations(k, n, s, dec):
            if k is None:
                raise gr.Error("load an image in the Edit tab first")
            code_text = (
                f"z_sem = latents.z_sem.repeat({int(n)}, 1)  # latents from the Edit tab's downloaded codes\n"
                f"images = pipe.decode(z_sem, None, {int(dec)}, generator=torch.Generator().manual_seed({int(s)})).images"
            )
            return session.variations(k, int(n), int(s), int(dec)), code_text

        run_var.click(on_variations, [key, count, seed, dec_steps], [results, results_code])

        def on_sample(n, s, dec, condition, source, k_shots, p):
            attribute = None if condition == "(unconditional)" else condition
            head, head_note = None, ""
            if attribute is not None and source != "pipeline classifier":
                rows = [r for r in read_metadata(samples) if attribute in r]
                positives = [r for r in rows if r[attribute]][: int(k_shots)]
                negatives = [r for r in rows if not r[attribute]][: int(k_shots)]
                chosen = positives + negatives
                try:
                    head = session.few_shot_head(
                        [_open(samples / r["file_name"]) for r in chosen], [r[attribute] for r in chosen], attribute
                    )
                except ValueError as e:
                    raise gr.Error(str(e)) from e
                head_note = (
                    f"# pipe.classifier replaced by a one-head classifier fitted on {len(positives)} + "
                    f"{len(negatives)} labelled samples (as `diffae demo` fits it)\n"
                )
            try:
                images = session.sample(int(n), int(s), int(dec), attribute, float(p), head)
            except ValueError as e:
                raise gr.Error(str(e)) from e
            condition_args = f', attribute="{attribute}", min_probability={float(p)}' if attribute else ""
            code_text = head_note + (
                f"images = pipe(batch_size={int(n)}, num_inference_steps={int(dec)}, "
                f"latent_num_inference_steps={int(dec)}, generator=torch.Generator().manual_seed({int(s)})"
                f"{condition_args}).images"
            )
            return images, code_text

        run_sample.click(on_sample, [count, seed, dec_steps, cond, head_source, shots, min_p], [results, results_code])
    return demo


def launch(demo, host: str = "127.0.0.1", port: Optional[int] = None, share: bool = False, block: bool = True, **kw):
    """Starts the server (the bundled samples readable by the page); returns `(app, local_url, share_url)`."""
    gr = _gradio()
    return demo.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=not block, css=CSS,
        allowed_paths=[str(BUNDLED_SAMPLES)], theme=gr.themes.Default(), **kw,
    )  # fmt: skip
