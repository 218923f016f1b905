"""End-to-end tests of the training scripts in training/ on tiny generated images (CPU, a few steps each).

Most runs call the scripts' `main()` in this process, which saves a package import per run; the kill-and-resume
test and the two-process `accelerate launch` test run real subprocesses.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import _checkpoints
import _models
import _tiny_data
import train_attribute_classifier
import train_diffae
import train_latent_ddim
from training_helpers import BUNDLED_PIPELINE, QUIET, TRAINING_DIR, copy_pipeline, max_abs_diff, run_main


# ------------------------------------------------------------------------------------------------------------------
# Autoencoder stage
# ------------------------------------------------------------------------------------------------------------------


def test_train_diffae_save_to_disk_writes_loadable_pipeline(trained_pipeline):
    from diffusers_diffae import DiffAEPipeline

    out = trained_pipeline
    # Checkpoints every 2 steps, at most 2 kept; each is complete and holds EMA folders and the RNG state.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    for name in ("unet", "encoder", "unet_ema", "encoder_ema", "optimizer.bin", "random_states_0.pkl"):
        assert (out / "checkpoint-6" / name).exists(), name
    assert json.loads((out / "checkpoint-6" / "training_state.json").read_text())["global_step"] == 6
    # The published weights are the EMA weights, which differ from the raw training weights.
    weights = "diffusion_pytorch_model.safetensors"
    assert max_abs_diff(out / "unet" / weights, out / "checkpoint-6" / "unet_ema" / weights) == 0
    assert max_abs_diff(out / "unet" / weights, out / "checkpoint-6" / "unet" / weights) > 0
    # Validation grids at step 3 and at the end.
    assert {p.name for p in (out / "validation").iterdir()} == {
        "step-0000003-reconstruction.png", "step-0000003-interpolation.png",
        "step-0000006-reconstruction.png", "step-0000006-interpolation.png",
    }  # fmt: skip
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "- diffae" in card and "2111.15640" in card

    pipe = DiffAEPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = torch.rand(2, 3, 16, 16)
    latents = pipe.encode(images, num_inference_steps=2)
    assert latents.z_sem.shape == (2, 16) and latents.x_T.shape == (2, 3, 16, 16)
    recon = pipe.decode(latents.z_sem, latents.x_T, num_inference_steps=2, output_type="np").images
    assert recon.shape == (2, 16, 16, 3) and np.isfinite(recon).all()


def test_train_baseline_from_imagefolder_and_push_to_hub(data, tmp_path, monkeypatch):
    """--no_semantic_encoder on an imagefolder (20x20 PNGs, random crops to 16): a DDIMPipeline-layout folder."""
    import huggingface_hub
    from diffusers import DDIMPipeline

    uploads = {}
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: uploads.setdefault("repo", repo_id))
    monkeypatch.setattr(
        huggingface_hub,
        "upload_folder",
        lambda **kw: uploads.update(files=sorted(os.listdir(kw["folder_path"])), **kw),
    )
    out = tmp_path / "baseline"
    code = run_main(
        train_diffae,
        ["--train_data_dir", data["folder"], "--cache_dir", data["cache"], "--model_config", data["config"],
         "--no_semantic_encoder", "--train_batch_size", 4, "--max_train_steps", 3, "--checkpointing_steps", 0,
         "--output_dir", out, "--push_to_hub", "--hub_model_id", "someone/diffae-baseline", *QUIET],
    )  # fmt: skip
    assert code == 0
    assert not (out / "encoder").exists()
    assert json.loads((out / "unet" / "config.json").read_text())["z_sem_channels"] is None
    pipe = DDIMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3)
    assert uploads["repo"] == "someone/diffae-baseline" and uploads["repo_id"] == "someone/diffae-baseline"
    assert {"model_index.json", "unet", "scheduler", "README.md"} <= set(uploads["files"])


def test_lazy_decoding_in_workers_matches_in_memory_cache(data, tmp_path):
    """Crops and flips depend only on (seed, epoch, index): decoding in a loader worker gives the same training."""
    common = ["--dataset_name", data["saved"], "--model_config", data["config"], "--train_batch_size", 8,
              "--max_train_steps", 4, "--checkpointing_steps", 4, "--random_flip", "--seed", 1, *QUIET]  # fmt: skip
    assert run_main(train_diffae, [*common, "--output_dir", tmp_path / "memory"]) == 0
    lazy = ["--cache_images_in_memory", "never", "--dataloader_num_workers", 1, "--output_dir", tmp_path / "lazy"]
    assert run_main(train_diffae, [*common, *lazy]) == 0
    weights = Path("checkpoint-4") / "unet" / "diffusion_pytorch_model.safetensors"
    assert max_abs_diff(tmp_path / "memory" / weights, tmp_path / "lazy" / weights) == 0


def test_channels_last_training_is_the_same_fp32_maths(data, tmp_path):
    """--memory_format: auto picks channels_last from 64 px up; a loss and its gradients match the official layout."""
    import copy

    from diffusers import DDPMScheduler

    from tiny import official_schedulers, tiny_encoder, tiny_unet

    assert _models.resolve_memory_format("auto", 32) == torch.contiguous_format
    assert _models.resolve_memory_format("auto", 64) == torch.channels_last
    assert _models.resolve_memory_format("contiguous", 256) == torch.contiguous_format
    scheduler = DDPMScheduler.from_config(official_schedulers()[0].config)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(4, 3, 16, 16, generator=generator)
    timesteps = torch.tensor([0, 10, 500, 999])
    losses, grads = [], []
    for fmt in (torch.contiguous_format, torch.channels_last):
        module = train_diffae.DiffAETrainingModule(
            copy.deepcopy(tiny_unet()), copy.deepcopy(tiny_encoder()), scheduler
        )
        module.to(memory_format=fmt).train()
        loss = module(x0.contiguous(memory_format=fmt), timesteps, noise.contiguous(memory_format=fmt)).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    assert (grads[1] - grads[0]).abs().max() <= 1e-4 * grads[0].abs().max()

    out = tmp_path / "channels_last"
    code = run_main(
        train_diffae,
        ["--dataset_name", data["saved"], "--model_config", data["config"], "--train_batch_size", 8,
         "--max_train_steps", 2, "--checkpointing_steps", 2, "--memory_format", "channels_last", "--seed", 1,
         "--mixed_precision", "no", "--output_dir", out, *QUIET],
    )  # fmt: skip
    assert code == 0
    weights = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # Resumed in bf16 autocast at a lower learning rate: the card records both stretches of each, not just the
    # last invocation's flags (load_state restores the checkpoint's rate; the new one must win).
    resumed = ["--resume_from_checkpoint", "latest", "--max_train_steps", 3, "--checkpointing_steps", 0,
               "--mixed_precision", "bf16", "--learning_rate", 5e-5]  # fmt: skip
    assert run_main(train_diffae, ["--dataset_name", data["saved"], "--model_config", data["config"],
                                   "--train_batch_size", 8, "--memory_format", "channels_last", "--seed", 1,
                                   "--output_dir", out, *QUIET, *resumed]) == 0  # fmt: skip
    card = (out / "README.md").read_text()
    assert "- mixed precision: no (steps 0-2), bf16 (steps 2-3)\n" in card
    assert "learning rate 0.0001 (steps 0-2), 5e-05 (steps 2-3) (constant)" in card


def test_kill_and_resume_matches_uninterrupted_run(data, tmp_path):
    """kill -9 mid-run, resume from `latest`: the weights after N steps equal an uninterrupted N-step run."""
    steps = 12  # two epochs of 6 steps: the resumed run crosses an epoch boundary
    common = ["--dataset_name", data["saved"], "--model_config", data["config"], "--train_batch_size", 8,
              "--use_ema", "--ema_warmup", "--random_flip", "--checkpointing_steps", 2, "--seed", 3,
              "--validation_steps", 6, *QUIET]  # fmt: skip
    reference = tmp_path / "reference"
    assert run_main(train_diffae, [*common, "--max_train_steps", steps, "--output_dir", reference]) == 0

    # The same run in a subprocess that would go on for 100000 steps (after the reference, not beside it: two
    # multi-threaded trainings on a small machine fight over its cores).
    resumed = tmp_path / "resumed"
    process = subprocess.Popen(
        [sys.executable, str(TRAINING_DIR / "train_diffae.py"), *map(str, common), "--max_train_steps", "100000",
         "--output_dir", str(resumed)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "killed_run.log").open("w"),
    )  # fmt: skip
    deadline = time.time() + 180
    while not (resumed / "checkpoint-4").exists():
        assert process.poll() is None, (tmp_path / "killed_run.log").read_text()[-3000:]
        assert time.time() < deadline, "the run never wrote checkpoint-4"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    latest = _checkpoints.resolve_resume_checkpoint("latest", str(resumed))
    assert 4 <= _checkpoints.checkpoint_step(latest) < steps
    # Wreckage of a crash while saving: neither is a complete checkpoint, so `latest` must skip both.
    (resumed / f"checkpoint-{steps + 100}").mkdir()
    (resumed / f".tmp-checkpoint-{steps + 102}").mkdir()
    assert _checkpoints.resolve_resume_checkpoint("latest", str(resumed)) == latest

    assert (
        run_main(
            train_diffae,
            [*common, "--max_train_steps", steps, "--output_dir", resumed, "--resume_from_checkpoint", "latest"],
        )
        == 0
    )
    weights = "diffusion_pytorch_model.safetensors"
    for part in ("unet", "encoder", "unet_ema", "encoder_ema"):
        diff = max_abs_diff(
            reference / f"checkpoint-{steps}" / part / weights, resumed / f"checkpoint-{steps}" / part / weights
        )
        assert diff <= 1e-6, (part, diff)
    for part in ("unet", "encoder"):  # the published (EMA) pipelines
        assert max_abs_diff(reference / part / weights, resumed / part / weights) <= 1e-6
    assert not list(resumed.glob(".tmp-*"))


def test_two_process_accelerate_launch(data, tmp_path):
    """DDP on CPU: `accelerate launch --multi_gpu --num_processes 2` starts two gloo processes."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        str(TRAINING_DIR / "train_diffae.py"), "--dataset_name", data["saved"], "--model_config", data["config"],
        "--train_batch_size", "4", "--max_train_steps", "3", "--checkpointing_steps", "2", "--use_ema",
        "--output_dir", str(out), "--seed", "0", *map(str, QUIET),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "MULTI_CPU with 2 process(es)" in result.stderr
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(out / "checkpoint-2"))
    from diffusers_diffae import DiffAEPipeline

    assert DiffAEPipeline.from_pretrained(out).unet.config.sample_size == 16


def test_init_from_the_bundled_pipeline_starts_from_its_weights(tmp_path):
    """--init_from PIPELINE_FOLDER continues from the bundled emoji model's unet and encoder: one Adam step at a
    tiny learning rate moves each weight by at most that rate, and the bundled folder is left untouched."""
    from diffusers_diffae import DiffAEPipeline

    data = _tiny_data.write_saved_dataset(str(tmp_path / "data32"), n=8, size=32, seed=0)
    before = {p: p.read_bytes() for p in BUNDLED_PIPELINE.rglob("*") if p.is_file()}
    out = tmp_path / "continued"
    code = run_main(
        train_diffae,
        ["--dataset_name", data, "--init_from", BUNDLED_PIPELINE, "--train_batch_size", 4, "--max_train_steps", 1,
         "--learning_rate", 1e-6, "--checkpointing_steps", 0, "--seed", 0, "--output_dir", out, *QUIET],
    )  # fmt: skip
    assert code == 0
    assert {p: p.read_bytes() for p in BUNDLED_PIPELINE.rglob("*") if p.is_file()} == before
    weights = "diffusion_pytorch_model.safetensors"
    for part in ("unet", "encoder"):
        assert 0 < max_abs_diff(BUNDLED_PIPELINE / part / weights, out / part / weights) <= 2e-6, part
    pipe = DiffAEPipeline.from_pretrained(out)
    assert pipe.unet.config.z_sem_channels == 128 and pipe.encoder.config.out_channels == 128
    assert "- initialised from: `" in (out / "README.md").read_text()


def test_lora_finetune_trains_only_the_adapter(trained_pipeline, data, tmp_path):
    from diffusers_diffae import DiffAEPipeline

    base = copy_pipeline(trained_pipeline, tmp_path / "base")
    before = {p: p.read_bytes() for p in base.rglob("*.safetensors")}
    out = tmp_path / "lora"
    code = run_main(
        train_diffae,
        ["--train_data_dir", data["folder"], "--cache_dir", data["cache"], "--init_from", base, "--use_lora",
         "--lora_rank", 2, "--lora_encoder",
         "--learning_rate", 1e-2, "--train_batch_size", 8, "--max_train_steps", 3, "--checkpointing_steps", 3,
         "--output_dir", out, *QUIET],
    )  # fmt: skip
    assert code == 0
    assert {p: p.read_bytes() for p in base.rglob("*.safetensors")} == before  # the base is untouched
    trained = load_file(str(out / "checkpoint-3" / "trainable_parameters.safetensors"))
    assert trained and all("lora_" in name for name in trained)
    assert any(name.startswith("encoder.") for name in trained)
    assert not (out / "model_index.json").exists()

    pipe = DiffAEPipeline.from_pretrained(base)
    x, t, z = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 16)
    with torch.no_grad():
        reference = pipe.unet(x, t, z).sample
        pipe.unet.load_lora_adapter(str(out / "unet_lora"), prefix=None, use_safetensors=True)
        adapted = pipe.unet(x, t, z).sample
        pipe.encoder.load_lora_adapter(str(out / "encoder_lora"), prefix=None, use_safetensors=True)
        assert pipe.encoder(x.clamp(-1, 1)).z_sem.shape == (2, 16)
    assert (adapted - reference).abs().max() > 1e-6  # the trained adapter changes the output
    pipe.unet.disable_adapters()
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, t, z).sample, reference, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Latent DDIM and classifier stages
# ------------------------------------------------------------------------------------------------------------------


def test_latent_ddim_stage_adds_sampler(trained_pipeline, data, tmp_path):
    from diffusers_diffae import DiffAEPipeline

    folder = copy_pipeline(trained_pipeline, tmp_path / "pipe")
    args = ["--pipeline", folder, "--dataset_name", data["saved"], "--hidden_channels", 32, "--num_layers", 3,
            "--train_batch_size", 16, "--max_train_steps", 8, "--checkpointing_steps", 4, "--use_ema",
            "--ema_warmup", "--seed", 0, "--logging_steps", 4, "--num_validation_images", 2,
            "--validation_inference_steps", 2, "--latent_validation_inference_steps", 2]  # fmt: skip
    assert run_main(train_latent_ddim, args) == 0
    cache = folder / "latent_training" / "z_sem.safetensors"
    assert cache.is_file() and (folder / "latent_training" / "checkpoint-8" / "latent_denoiser_ema").is_dir()

    pipe = DiffAEPipeline.from_pretrained(folder)
    z_sem = load_file(str(cache))["z_sem"].double()
    assert z_sem.shape == (48, 16)
    for stats in (pipe.latent_denoiser, pipe.encoder):  # unbiased std, stored in both components
        torch.testing.assert_close(stats.z_sem_mean.double(), z_sem.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(stats.z_sem_std.double(), z_sem.std(0), atol=1e-6, rtol=1e-5)
    betas = pipe.latent_scheduler.betas
    assert torch.allclose(betas, torch.full_like(betas, 0.008)) and not pipe.latent_scheduler.config.clip_sample
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, latent_num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3)
    assert "## Latent DDIM" in (folder / "README.md").read_text()


def test_attribute_classifier_reports_auroc_and_few_shot_modes(trained_pipeline, data, tmp_path):
    from diffusers_diffae import DiffAEPipeline

    folder = copy_pipeline(trained_pipeline, tmp_path / "pipe")
    base = ["--pipeline", folder, "--dataset_name", data["saved"], "--max_train_steps", 300, "--seed", 0]
    assert run_main(train_attribute_classifier, [*base, "--label_columns", "red,circle,size"]) == 0
    report = json.loads((folder / "classifier_report.json").read_text())
    for name in ("red", "circle"):
        assert report["attributes"][name]["type"] == "binary" and 0 <= report["attributes"][name]["auroc"] <= 1
    assert report["attributes"]["size"]["type"] == "continuous" and report["attributes"]["size"]["mse"] >= 0
    assert report["train_rows"] + report["validation_rows"] == 48
    card = (folder / "README.md").read_text()
    assert "## Attribute classifier" in card and "| red | binary | AUROC" in card

    pipe = DiffAEPipeline.from_pretrained(folder)
    assert pipe.classifier.attribute_names == ["red", "circle", "size"]
    assert pipe.classifier.config.attribute_types == ["binary", "binary", "continuous"]
    assert pipe.classifier.config.target_logits[0] is not None and pipe.classifier.config.target_logits[2] is None
    pipe.set_progress_bar_config(disable=True)
    edited = pipe.edit(torch.rand(1, 3, 16, 16), attribute="red", strength=0.3, num_inference_steps=2,
                       encode_num_inference_steps=2, output_type="np").images  # fmt: skip
    assert edited.shape == (1, 16, 16, 3)

    # PU from an imagefolder: labels come from its metadata.jsonl (24 images of 20x20, centre-cropped to 16).
    folder_data = ["--train_data_dir", data["folder"], "--cache_dir", data["cache"]]
    for mode, expected in (("binary", {"positives": 4, "negatives": 4}), ("pu", {"positives": 4})):
        out = tmp_path / f"few_shot_{mode}"
        source = ["--dataset_name", data["saved"]] if mode == "binary" else folder_data
        code = run_main(
            train_attribute_classifier,
            ["--pipeline", folder, *source, "--max_train_steps", 100, "--seed", 0, "--label_columns", "red",
             "--few_shot", 4, "--few_shot_mode", mode, "--output_dir", out],
        )  # fmt: skip
        assert code == 0
        few = json.loads((out / "classifier_report.json").read_text())
        assert expected.items() <= few["few_shot"].items()
        assert few["attributes"]["red"]["auroc"] is not None
        assert DiffAEPipeline.from_pretrained(out).classifier.attribute_names == ["red"]
        if mode == "pu":  # positives are oversampled to balance the unlabelled rows
            assert few["train_rows"] == 4 * few["few_shot"]["positive_repeats"] + few["few_shot"]["unlabeled"]
            assert few["few_shot"]["positive_repeats"] * 4 >= few["few_shot"]["unlabeled"]
        else:
            assert few["train_rows"] == 8


def test_linear_heads_learn_binary_and_continuous_targets():
    """The head training and evaluation on codes with a known linear structure (the tiny encoder's codes are too
    weak to show learning): one logistic and one regression head."""
    from types import SimpleNamespace

    from diffusers_diffae import AttributeClassifier

    generator = torch.Generator().manual_seed(0)
    z = torch.randn(400, 8, generator=generator)
    targets = torch.stack([(z[:, 0] - z[:, 3] > 0).float(), 2 * z[:, 1] + 0.5], dim=1)
    classifier = AttributeClassifier(
        num_channels=8, attribute_names=["a", "b"], attribute_types=["binary", "continuous"]
    )
    args = SimpleNamespace(learning_rate=1e-2, weight_decay=0.0, train_batch_size=32, max_train_steps=600, seed=0)
    losses = train_attribute_classifier.train_heads(
        classifier, z[:300], targets[:300], ["binary", "continuous"], args, "cpu"
    )
    assert losses[-1] < losses[0] / 5
    report = train_attribute_classifier.evaluate(
        classifier.eval(), z[300:], targets[300:], ["a", "b"], ["binary", "continuous"]
    )
    assert report["a"]["auroc"] > 0.97 and report["a"]["accuracy"] > 0.9
    assert report["b"]["r2"] > 0.95 and report["b"]["pearson"] > 0.97


def test_binary_auroc_matches_hand_computed_values():
    auroc = train_attribute_classifier.binary_auroc
    # 4 pairs (positive, negative): (0.35, 0.1) yes, (0.35, 0.4) no, (0.8, 0.1) yes, (0.8, 0.4) yes -> 3/4.
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # Ties count one half: positives {1, 3}, negatives {1, 2}: 0.5 + 0 + 1 + 1 = 2.5 of 4 pairs.
    assert auroc([1, 1, 2, 3], [0, 1, 0, 1]) == pytest.approx(0.625)
    assert auroc([0.2, 0.9], [1, 0]) == 0.0 and auroc([0.2, 0.9], [0, 1]) == 1.0
    assert np.isnan(auroc([0.1, 0.2], [1, 1]))
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=200).round(1), rng.random(200) < 0.3
    pairs = scores[labels][:, None] - scores[~labels][None, :]
    assert auroc(scores, labels) == pytest.approx(((pairs > 0) + 0.5 * (pairs == 0)).mean())
