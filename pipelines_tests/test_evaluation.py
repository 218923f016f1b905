"""The codes of DiffAE and of the DDIM baseline through the pipelines' own loops, the claims checked on the
results, and the evaluation command end to end. The metrics and feature networks are tested in test_metrics.py."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler, DDIMScheduler

from diffusers_diffae import AttributeClassifier, DiffAEPipeline, DiffAEUNet2DModel, LatentMLPDenoiser, SemanticEncoder
from diffusers_diffae.evaluation import latent
from diffusers_diffae.evaluation.suite import (
    Evaluation,
    EvaluationData,
    binary_labels,
    build_parser,
    check_claims,
    load_pipeline,
    main,
    run,
)
from diffusers_diffae.presets import _ddim_config
from tiny import ENCODER, UNET, Z


# ---------------------------------------------------------------------------------------------------------------
# Tiny models for the loops and the command
# ---------------------------------------------------------------------------------------------------------------


def _unet(z_sem_channels):
    # random non-zero outputs (zero_init=False) so that the loops do something
    return DiffAEUNet2DModel(**{**UNET, "z_sem_channels": z_sem_channels, "zero_init": False}).eval()


def _pipeline():
    torch.manual_seed(0)
    config = _ddim_config(1000, "linear", clip_sample=True)
    encoder = SemanticEncoder(**ENCODER)
    classifier = AttributeClassifier(
        num_channels=Z, attribute_names=["red", "bright"], attribute_types=["binary", "binary"]
    )
    return DiffAEPipeline(
        unet=_unet(Z),
        encoder=encoder.eval(),
        scheduler=DDIMScheduler.from_config(config),
        inverse_scheduler=DDIMInverseScheduler.from_config(config),
        latent_denoiser=LatentMLPDenoiser(num_channels=Z, hidden_channels=32, num_layers=3).eval(),
        latent_scheduler=DDIMScheduler.from_config(_ddim_config(1000, "const0.008", clip_sample=False)),
        classifier=classifier,
    )


def _baseline(pipe):
    """The DDIM baseline as the evaluation loads it: the same sampler, a UNet without z_sem, no encoder."""
    return DiffAEPipeline(
        unet=_unet(None),
        encoder=None,
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
        inverse_scheduler=DDIMInverseScheduler.from_config(pipe.scheduler.config),
    )


def test_codes_and_decodes_are_the_pipelines_own_with_and_without_z_sem():
    """The evaluation inverts and decodes with the public `invert` / `decode` of the pipeline and of the DDIM
    baseline (a pipeline whose UNet has no z_sem), so its DiffAE and baseline rows run the same loops."""
    pipe, generator = _pipeline(), torch.Generator().manual_seed(1)
    baseline = _baseline(pipe)
    for p in (pipe, baseline):
        p.set_progress_bar_config(disable=True)
    images = torch.rand(2, 3, 16, 16, generator=generator)
    evaluation = Evaluation(pipe, EvaluationData(images), baseline=baseline, batch_size=4)
    x0 = images * 2 - 1
    z = pipe.encoder(x0).z_sem
    x_T = evaluation.x_T(4)
    assert torch.equal(evaluation.z_sem, z) and torch.equal(x_T, pipe.invert(x0, z, 4))
    decoded = evaluation.decode(x_T, z, 4)
    assert torch.equal(decoded, ((pipe.decode(z, x_T, 4, output_type="latent").images + 1) / 2).clamp(0, 1))
    # The baseline: same loops, no z_sem.
    x_T_base = evaluation.baseline_x_T(4)
    assert torch.equal(x_T_base, baseline.invert(x0, None, 4))
    assert x_T_base.shape == x0.shape and not torch.allclose(x_T_base, x_T)
    base_decoded = evaluation.decode(x_T_base, None, 3, baseline=True)
    assert torch.equal(
        base_decoded, ((baseline.decode(None, x_T_base, 3, output_type="latent").images + 1) / 2).clamp(0, 1)
    )
    assert base_decoded.shape == (2, 3, 16, 16) and 0 <= base_decoded.min() and base_decoded.max() <= 1
    fresh = baseline.decode(
        None, None, 3, batch_size=2, generator=torch.Generator().manual_seed(0), output_type="latent"
    ).images
    assert fresh.shape == (2, 3, 16, 16) and fresh.abs().max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="DDIM baseline without z_sem"):
        baseline.invert(x0, z, 2)
    with pytest.raises(ValueError, match="batch size"):
        baseline.decode(None, None, 2, output_type="latent").images
    for run_without_z_sem in (
        lambda: pipe.decode(None, x_T, 2, output_type="latent").images,
        lambda: pipe.invert(x0, None, 2),
    ):
        with pytest.raises(ValueError, match=rf"z_sem must have shape \(B, {Z}\)"):  # DiffAE needs its z_sem
            run_without_z_sem()


def test_binary_label_columns():
    assert binary_labels([True, False], "a").tolist() == [1, 0]
    assert binary_labels(["man", "woman", "man"], "gender=woman").tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="gender=<value>"):
        binary_labels(["man", "woman"], "gender")
    with pytest.raises(ValueError, match="binary"):
        binary_labels([0, 3, 5], "skin_tone")


def _tiny_dataset(path):
    import datasets
    import PIL.Image

    rng = np.random.default_rng(0)

    def split(n):
        images, red, bright = [], [], []
        for _ in range(n):
            r, b = int(rng.integers(2)), int(rng.integers(2))
            array = rng.uniform(0, 0.3, (16, 16, 3)) + (0.5 if b else 0.1)
            array[..., 0] += 0.3 * r
            images.append(PIL.Image.fromarray((array.clip(0, 1) * 255).astype(np.uint8)))
            red.append(bool(r))
            bright.append(b)
        return datasets.Dataset.from_dict({"image": images, "red": red, "bright": bright}).cast_column(
            "image", datasets.Image()
        )

    datasets.DatasetDict({"train": split(30), "test": split(16)}).save_to_disk(str(path))


class _ProjectionFeatures:
    """A cheap stand-in for Inception: a fixed random projection of 4x4-pooled pixels."""

    name = "random projection (test stand-in)"

    def __init__(self):
        self.weight = torch.randn(48, 12, generator=torch.Generator().manual_seed(0))

    def __call__(self, images):
        return F.adaptive_avg_pool2d(images.float(), 4).flatten(1) @ self.weight


def test_evaluation_command_end_to_end(tmp_path):
    pipe = _pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    _unet(None).save_pretrained(tmp_path / "baseline" / "unet")
    _tiny_dataset(tmp_path / "data")
    argv = [
        "--pipeline", str(tmp_path / "pipe"),
        "--dataset", str(tmp_path / "data"),
        "--baseline", str(tmp_path / "baseline"),
        "--attributes", "red,bright",
        "--output", str(tmp_path / "out"),
        "--steps", "2,3",
        "--max_images", "16",
        "--max_train_images", "30",
        "--probe_steps", "2",
        "--probe_folds", "3",
        "--interpolation_pairs", "3",
        "--interpolation_steps", "2",
        "--edit_steps", "2",
        "--num_samples", "6",
        "--conditional_attributes", "red",
        "--conditional_steps", "2",
    ]  # fmt: skip
    results = run(build_parser().parse_args(argv), features=_ProjectionFeatures())

    saved = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert saved["steps"] == [2, 3]
    rows = {(r["model"], r["T"]): r for r in saved["reconstruction"]["rows"]}
    assert set(rows) == {
        (m, T)
        for T in (2, 3)
        for m in ("DiffAE (inverted x_T)", "DiffAE (z_sem only, random x_T)", "DDIM baseline (inverted x_T)")
    }
    for row in rows.values():
        assert 0 <= row["mse"] <= 1 and math.isfinite(row["psnr"]) and -1 <= row["ssim"] <= 1
        assert -1 <= row["ssim_official"] <= 1
        assert row["psnr"] == pytest.approx(10 * math.log10(1 / row["mse"]), abs=3.0)  # mean of logs vs log of mean
    assert saved["reconstruction"]["lpips"].startswith("skipped:") or "lpips" in rows[("DiffAE (inverted x_T)", 2)]
    kept = saved["reconstruction"]["attributes_kept"]
    assert set(kept["input_auroc"]) == {"red", "bright"}
    assert kept["input_auroc"]["red"] > 0.9  # a pixel probe fitted on the train split reads red off the test inputs
    assert {(r["model"], r["T"]) for r in kept["rows"]} == set(rows)
    assert all(0 <= v <= 1 for r in kept["rows"] for v in r["auroc"].values())

    probe = saved["representation"]["attributes"]["red"]
    assert {"z_sem", "x_T", "pixels", "baseline x_T"} <= set(probe)
    assert probe["pixels"] > 0.9  # the red channel is linearly visible in the pixels of this toy data

    ppl = saved["interpolation"]["ppl"]
    assert set(ppl) == {"DiffAE", "DDIM baseline"}
    assert all(v > 0 and math.isfinite(v) for model in ppl.values() for v in model.values())
    assert "inception" in ppl["DiffAE"]  # the injected feature network takes the Inception slot

    edits = saved["manipulation"]["attributes"]["red"]
    for goal in ("to_positive", "to_negative"):
        if "skipped" not in edits[goal]:
            assert 0 <= edits[goal]["pixels_probe_success"] <= 1 and "Eq. 11" in edits[goal]["protocol"]
            assert 0 <= edits[goal]["z_sem_probe_moved"] <= 1

    fid_rows = {(r["model"], r["T"]) for r in saved["sampling"]["rows"]}
    assert ("DiffAE (latent DDIM + decoder)", 3) in fid_rows and ("DDIM baseline", 2) in fid_rows
    assert (
        "fid_conditional" in saved["sampling"]["conditional"]["red"]
        or "skipped" in saved["sampling"]["conditional"]["red"]
    )

    lat = saved["latent"]
    assert (lat["num_test_codes"], lat["num_train_codes"]) == (16, 30) and [r["T"] for r in lat["rows"]] == [2, 3]
    assert all(r["frechet_to_test"] >= 0 and 0 <= r["near_copies"] <= 1 for r in lat["rows"])

    assert results["claims"] and all(c["holds"] in (True, False, None) for c in results["claims"])
    assert any(c["source"] == "Appendix C" for c in results["claims"])
    report = (tmp_path / "out" / "evaluation.md").read_text()
    assert "## Latent DDIM in z_sem space" in report and "| training codes (floor) |" in report
    assert "## Reconstruction" in report and "## Linear-probe AUROC" in report and "## Sampling FID" in report
    assert "**Attributes kept**" in report and "| test inputs | – |" in report
    assert "| pixel probe moved toward goal |" in report
    assert "| holds |" in report or "| does not hold |" in report
    assert (tmp_path / "out" / "evaluation_reconstructions.png").is_file()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "out" / "evaluation_quality_vs_T.png").is_file()
    else:
        assert saved["plots"]["quality_vs_T"].startswith("skipped:")


def test_latent_section_tells_a_copying_sampler_from_a_fresh_one(monkeypatch):
    pipe = _pipeline()
    pipe.set_progress_bar_config(disable=True)
    images = torch.rand(192, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    test, train, fresh = images[:64], images[64:128], images[128:]
    evaluation = Evaluation(pipe, EvaluationData(test), train_data=EvaluationData(train), batch_size=32)
    pool = {"copy": evaluation.train_z_sem, "fresh": evaluation.encode_z_sem(fresh)}

    def measure(kind):
        codes = iter(pool[kind].split(32))

        def sample_z_sem(batch_size, num_inference_steps, generator=None):  # hands out the pool's codes in order
            return next(codes)

        monkeypatch.setattr(pipe, "sample_z_sem", sample_z_sem)
        results = {"latent": latent.evaluate(evaluation, [2], num_samples=64)}
        claim = next(c for c in check_claims(results) if c["source"] == "Appendix C")
        return results["latent"], claim

    copied, claim = measure("copy")
    assert copied["rows"][0]["near_copies"] == 1.0 and copied["rows"][0]["nearest_train_median"] == 0.0
    assert claim["holds"] is False and "100.0% near copies" in claim["measured"]
    fresh_codes, claim = measure("fresh")  # codes of unseen images from the test images' distribution
    assert fresh_codes["rows"][0]["near_copies"] <= 0.1 and claim["holds"] is True
    assert fresh_codes["rows"][0]["nearest_train_median"] > 0.5 * fresh_codes["test_nearest_train_median"]
    assert copied["train_frechet_to_test"] == fresh_codes["train_frechet_to_test"] > 0

    pipe.latent_denoiser = None
    assert latent.evaluate(evaluation, [2])["skipped"].startswith("skipped: the pipeline has no latent_denoiser")


def test_reconstruction_claims_use_the_official_ssim_when_measured():
    def claim(with_official):
        values = {  # plain SSIM says DDIM wins, the official zero-padded SSIM says z_sem alone does
            "DiffAE (inverted x_T)": (0.9, 0.95),
            "DiffAE (z_sem only, random x_T)": (0.5, 0.7),
            "DDIM baseline (inverted x_T)": (0.6, 0.65),
        }
        rows = []
        for m, (plain, official) in values.items():
            rows.append({"model": m, "T": 10, "mse": 0.01, "psnr": 20.0, "ssim": plain})
            if with_official:
                rows[-1]["ssim_official"] = official
        claims = check_claims({"reconstruction": {"rows": rows}})
        return next(c for c in claims if c["claim"].startswith("z_sem alone"))

    official = claim(True)
    assert official["holds"] is True and official["measured"] == "SSIM (official) 0.700 vs 0.650"
    plain = claim(False)  # a report from before the official SSIM was measured
    assert plain["holds"] is False and plain["measured"] == "SSIM 0.500 vs 0.600"


def test_attributes_kept_claim_compares_z_sem_only_decodes_with_the_inputs():
    def results(decoded_auroc):
        rows = [
            {"model": m, "T": 10, "mse": 0.01, "psnr": 20.0, "ssim": 0.5}
            for m in ("DiffAE (inverted x_T)", "DiffAE (z_sem only, random x_T)")
        ]
        kept = {
            "input_auroc": {"a": 0.90, "b": 0.80},
            "rows": [
                {"model": "DiffAE (inverted x_T)", "T": 10, "auroc": {"a": 0.5, "b": 0.5}},
                {"model": "DiffAE (z_sem only, random x_T)", "T": 10, "auroc": decoded_auroc},
            ],
        }
        claims = check_claims({"reconstruction": {"rows": rows, "attributes_kept": kept}})
        return next(c for c in claims if c["claim"].startswith("Decoding z_sem with random x_T keeps"))

    kept = results({"a": 0.86, "b": 0.79})  # within 0.05 of the inputs for both attributes
    assert kept["holds"] is True and kept["measured"] == "a: 0.860 vs 0.900, b: 0.790 vs 0.800"
    assert results({"a": 0.86, "b": 0.70})["holds"] is False  # b lost 0.10


def test_edit_claim_is_judged_on_the_probes_moving_toward_the_goal():
    def claim(z_sem_moved):
        row = {"pixels_probe_success": 0.2, "z_sem_probe_success": 0.1, "pixels_probe_moved": 0.95}
        results = {"manipulation": {"attributes": {"a": {"to_positive": dict(row, z_sem_probe_moved=z_sem_moved)}}}}
        return next(c for c in check_claims(results) if c["claim"].startswith("Linear edits of z_sem"))

    moved = claim(0.9)  # both probes moved for >= 90 %, although few images crossed into the goal class
    assert moved["holds"] is True
    assert moved["measured"] == "a to_positive: moved 95% / 90% (pixel / z_sem probe), goal class reached 20% / 10%"
    assert claim(0.85)["holds"] is False


def test_edit_claim_leaves_out_judges_that_cannot_tell_the_attribute():
    row = {"pixels_probe_success": 0.1, "z_sem_probe_success": 0.1, "features_probe_success": 0.3}

    def claim(pixels_moved, pixel_auroc, features_moved=0.95):
        moved = {"pixels_probe_moved": pixels_moved, "z_sem_probe_moved": 0.92, "features_probe_moved": features_moved}
        manip = {
            "attributes": {"a": {"to_positive": dict(row, **moved)}},
            "judge_auroc": {"a": {"pixels": pixel_auroc, "z_sem": 0.8, "features": 0.75}},
        }
        return next(c for c in check_claims({"manipulation": manip}) if c["claim"].startswith("Linear edits"))

    # A pixel judge at chance among the edited images says nothing about the edit: it is shown, not counted.
    blind = claim(0.6, 0.51)
    assert blind["holds"] is True
    assert blind["measured"] == (
        "a to_positive: moved 60% / 92% / 95% (pixel / z_sem / feature probe; blind, not counted: pixel AUROC 0.51), "
        "goal class reached 10% / 10% / 30%"
    )
    assert claim(0.6, 0.7)["holds"] is False  # a judge that can tell the attribute counts
    assert claim(0.95, 0.9, features_moved=0.8)["holds"] is False  # so does the feature judge


def _section_argv(tmp_path, section, *extra):
    """Saves the tiny pipeline and dataset under `tmp_path`; returns the arguments that evaluate one section on them
    for the attribute `red`."""
    _pipeline().save_pretrained(tmp_path / "pipe")
    _tiny_dataset(tmp_path / "data")
    return [
        "--pipeline", str(tmp_path / "pipe"),
        "--dataset", str(tmp_path / "data"),
        "--output", str(tmp_path / "out"),
        "--sections", section,
        "--attributes", "red",
        "--max_images", "16",
        "--max_train_images", "30",
        *extra,
    ]  # fmt: skip


def test_edits_can_be_limited_to_the_images_an_attribute_applies_to(tmp_path):
    import datasets

    argv = _section_argv(tmp_path, "manipulation", "--edit_steps", "2")
    test = datasets.load_from_disk(str(tmp_path / "data"))["test"]
    red, bright = np.array(test["red"]), np.array(test["bright"]) == 1
    results = run(build_parser().parse_args(argv + ["--edit_where", "bright"]), features=_ProjectionFeatures())
    manip = results["manipulation"]
    assert manip["where"] == "bright" and manip["edited_images"] == f"the {bright.sum()} test images where bright"
    edits = manip["attributes"]["red"]
    assert edits["to_positive"]["num_images"] == (~red & bright).sum()
    assert edits["to_negative"]["num_images"] == (red & bright).sum()
    claim = next(c for c in results["claims"] if c["claim"].startswith("Linear edits"))
    assert "of images where bright)" in claim["claim"]
    assert "edited: the" in (tmp_path / "out" / "evaluation.md").read_text()
    # Without the selector every test image is edited; the selector is not probed as an attribute of its own.
    full = run(build_parser().parse_args(argv), features=_ProjectionFeatures())["manipulation"]
    assert full["where"] is None and full["attributes"]["red"]["to_positive"]["num_images"] == (~red).sum()
    assert set(manip["attributes"]) == {"red"}
    with pytest.raises(ValueError, match="selects none of the 16 test images"):
        run(build_parser().parse_args(argv + ["--edit_where", "bright=7"]))
    # Each judging probe's AUROC on the real images it judges is reported next to the edits.
    judges = manip["judge_auroc"]["red"]
    assert set(judges) == {"pixels", "z_sem", "features"} and all(v is None or 0 <= v <= 1 for v in judges.values())
    assert "How well each judging probe" in (tmp_path / "out" / "evaluation.md").read_text()
    # The image-feature judge (here the stand-in network) scores the same edits as the other two.
    assert manip["judges"]["features"] == _ProjectionFeatures.name
    for row in edits.values():
        assert 0 <= row["features_probe_moved"] <= 1 and 0 <= row["features_probe_success"] <= 1
    report = (tmp_path / "out" / "evaluation.md").read_text()
    assert "feature probe moved toward goal" in report and "feature probe AUROC" in report
    # Without a feature network the two other judges remain and the report says why the third is missing.
    plain = run(build_parser().parse_args(argv + ["--features", "none"]))["manipulation"]
    assert plain["judges"]["features"] == "skipped: feature network disabled with --features none"
    assert set(plain["judge_auroc"]["red"]) == {"pixels", "z_sem"}
    assert "features_probe_moved" not in plain["attributes"]["red"]["to_positive"]
    assert "feature probe" not in (tmp_path / "out" / "evaluation.md").read_text()
    # The control edit moves each image as far along a random direction; every judge scores it like the edit.
    controlled = run(build_parser().parse_args(argv + ["--edit_control"]), features=_ProjectionFeatures())
    assert controlled["manipulation"]["control"] is True and manip["control"] is False
    for goal, row in controlled["manipulation"]["attributes"]["red"].items():
        assert row["pixels_probe_moved"] == full["attributes"]["red"][goal]["pixels_probe_moved"]  # the same edit
        assert all(0 <= row[f"{s}_control_moved"] <= 1 for s in ("pixels", "z_sem", "features"))
        assert row["control_pixel_change_mean"] > 0
    claim = next(c for c in controlled["claims"] if c["claim"].startswith("Linear edits"))
    assert "random direction moved" in claim["measured"]
    assert "edit / random" in (tmp_path / "out" / "evaluation.md").read_text()


class _CountingFeatures(_ProjectionFeatures):
    def __init__(self):
        super().__init__()
        self.images_seen = 0

    def __call__(self, images):
        self.images_seen += len(images)
        return super().__call__(images)


def test_feature_cache_skips_the_train_features_only_while_they_are_the_same(tmp_path):
    cache = tmp_path / "features.safetensors"
    argv = _section_argv(tmp_path, "manipulation", "--edit_steps", "2", "--feature_cache", str(cache))
    first_net, again_net = _CountingFeatures(), _CountingFeatures()
    first = run(build_parser().parse_args(argv), features=first_net)["manipulation"]
    again = run(build_parser().parse_args(argv), features=again_net)["manipulation"]
    assert cache.is_file() and first_net.images_seen - again_net.images_seen == 30  # the 30 train images
    assert again["attributes"] == first["attributes"] and again["judge_auroc"] == first["judge_auroc"]
    # Other train images (or another network) are recomputed, and the cache rewritten for them.
    fewer_net = _CountingFeatures()
    run(build_parser().parse_args(argv + ["--max_train_images", "20"]), features=fewer_net)
    assert fewer_net.images_seen - again_net.images_seen == 20
    # A file that is not a feature cache is an error and is left as it was.
    cache.write_text("my notes")
    with pytest.raises(ValueError, match="is not a safetensors feature cache"):
        run(build_parser().parse_args(argv), features=_CountingFeatures())
    assert cache.read_text() == "my notes"


def test_representation_folds_can_keep_groups_whole(tmp_path):
    argv = _section_argv(tmp_path, "representation", "--probe_steps", "2", "--probe_folds", "2")
    rep = run(build_parser().parse_args(argv + ["--probe_groups", "bright"]))["representation"]
    assert rep["groups"] == "bright" and "whole groups of `bright`" in rep["protocol"]
    assert 0 <= rep["attributes"]["red"]["z_sem"] <= 1
    # Probes fitted on the train split and scored on the test images: red is plain in the pixels of this toy data.
    assert rep["num_probe_train_images"] == 30 and rep["held_out"]["red"]["pixels"] > 0.9
    assert "images of the other split, AUROC on the test" in (tmp_path / "out" / "evaluation.md").read_text()
    # Two groups cannot fill three folds: the attribute is skipped with the reason, the run goes on.
    rep = run(build_parser().parse_args(argv + ["--probe_groups", "bright", "--probe_folds", "3"]))["representation"]
    assert "too few for 3 folds" in rep["attributes"]["red"]["skipped"]
    with pytest.raises(ValueError, match=r"no column\(s\) \['family'\]"):
        run(build_parser().parse_args(argv + ["--probe_groups", "family"]))


def test_subset_keeps_the_same_examples_of_both_splits(tmp_path):
    import datasets

    argv = _section_argv(tmp_path, "representation", "--probe_steps", "2", "--probe_folds", "2")
    data = datasets.load_from_disk(str(tmp_path / "data"))
    bright = {split: int(np.sum(np.array(data[split]["bright"]) == 1)) for split in ("train", "test")}
    results = run(build_parser().parse_args(argv + ["--subset", "bright=1"]))
    rep = results["representation"]
    assert results["subset"] == "bright=1"
    assert rep["num_images"] == bright["test"] and rep["num_probe_train_images"] == bright["train"]
    assert "only examples with `bright=1`" in (tmp_path / "out" / "evaluation.md").read_text()
    # Several values: `0|1` keeps everything.
    rep = run(build_parser().parse_args(argv + ["--subset", "bright=0|1"]))["representation"]
    assert rep["num_images"] == 16 and rep["num_probe_train_images"] == 30
    for spec, message in (
        ("bright", "must be COLUMN=VALUE"),
        ("shade=1", "no column 'shade'"),
        ("bright=7", r"keeps none of the 16 examples of split 'test'; bright has \['0', '1'\]"),
    ):
        with pytest.raises(ValueError, match=message):
            run(build_parser().parse_args(argv + ["--subset", spec]))


def test_evaluation_command_reports_bad_input(tmp_path, capsys):
    pipe = _pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    _tiny_dataset(tmp_path / "data")
    base = [
        "--pipeline",
        str(tmp_path / "pipe"),
        "--dataset",
        str(tmp_path / "data"),
        "--output",
        str(tmp_path / "out"),
    ]
    with pytest.raises(ValueError, match="unknown section"):
        run(build_parser().parse_args(base + ["--sections", "recon"]))
    assert main(base + ["--sections", "recon"]) == 1  # the command prints one line, not a traceback
    assert "error: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="no split 'validation'"):
        run(build_parser().parse_args(base + ["--split", "validation"]))
    with pytest.raises(ValueError, match=r"no column\(s\) \['smiling'\]"):
        run(build_parser().parse_args(base + ["--attributes", "smiling", "--sections", "representation"]))
    # A DiffAE UNet passed as the baseline is refused.
    with pytest.raises(ValueError, match="not a DDIM baseline"):
        run(build_parser().parse_args(base + ["--baseline", str(tmp_path / "pipe"), "--sections", "reconstruction"]))
    # Without features, FID says why it was skipped; without --baseline the baseline rows are absent.
    results = run(
        build_parser().parse_args(
            base
            + [
                "--sections",
                "reconstruction,sampling",
                "--steps",
                "2",
                "--max_images",
                "4",
                "--num_samples",
                "2",
                "--features",
                "none",
            ]
        )
    )
    assert results["sampling"]["skipped"].startswith("skipped:")
    assert results["reconstruction"]["baseline"].startswith("skipped:")
    assert check_claims({"reconstruction": {"rows": []}}) == []
    # A training checkpoint (EMA model folders, no model_index.json) loads with the official schedulers.
    pipe.unet.save_pretrained(tmp_path / "ckpt" / "unet_ema")
    pipe.encoder.save_pretrained(tmp_path / "ckpt" / "encoder_ema")
    loaded = load_pipeline(str(tmp_path / "ckpt"))
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert loaded.scheduler.config.clip_sample and loaded.scheduler.config.timestep_spacing == "leading"
    with pytest.raises(ValueError, match="neither a DiffAEPipeline"):
        load_pipeline(str(tmp_path / "data"))


def test_bundled_ddim_baseline_is_the_bundled_decoder_without_z_sem():
    """The shipped DDIM baseline (model_cards/ddim-emoji32-baseline.md) must be the bundled DiffAE decoder's
    architecture minus z_sem, with the same sampler, or the evaluation's DiffAE-vs-DDIM rows compare unlike things."""
    from diffusers import DDIMPipeline

    from diffusers_diffae.cli import ASSETS, BUNDLED_MODEL
    from diffusers_diffae.evaluation.suite import load_baseline

    pipe = DiffAEPipeline.from_pretrained(BUNDLED_MODEL)
    baseline = load_baseline(str(ASSETS / "ddim-emoji32-baseline"), pipe)
    assert isinstance(baseline, DiffAEPipeline) and baseline.encoder is None  # invert / decode with z_sem=None

    def public(config):
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    ours, theirs = public(pipe.unet.config), public(baseline.unet.config)
    assert ours.pop("z_sem_channels") is not None and theirs.pop("z_sem_channels") is None
    assert theirs == ours
    assert public(baseline.scheduler.config) == public(pipe.scheduler.config)
    assert not torch.equal(baseline.unet.conv_in.weight, pipe.unet.conv_in.weight)  # trained separately
    # The card's loading snippet: a plain diffusers DDIMPipeline that samples images of the model's size.
    ddim = DDIMPipeline.from_pretrained(ASSETS / "ddim-emoji32-baseline")
    ddim.set_progress_bar_config(disable=True)
    image = ddim(batch_size=1, num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_exact_inversion_option_reaches_every_inverted_code(tmp_path):
    argv = _section_argv(tmp_path, "reconstruction", "--steps", "2", "--features", "none", "--train_split", "")
    ddim = run(build_parser().parse_args(argv))
    exact = run(build_parser().parse_args(argv + ["--inversion", "exact", "--inversion_iterations", "2"]))
    assert ddim["inversion"] == {"inversion": "ddim", "inversion_iterations": 3}
    assert exact["inversion"] == {"inversion": "exact", "inversion_iterations": 2}
    assert ddim["pipeline"] == str(tmp_path / "pipe")  # as given, not made absolute
    mse = [
        next(row["mse"] for row in result["reconstruction"]["rows"] if row["model"] == "DiffAE (inverted x_T)")
        for result in (ddim, exact)
    ]
    assert mse[0] != mse[1]
    assert "x_T by exact inversion (2 network calls per step)" in (tmp_path / "out" / "evaluation.md").read_text()
