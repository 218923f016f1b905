"""Hub round trips against a loopback Hub (`fake_hub.py`): push_to_hub, model cards, loading by repo id.

huggingface_hub and diffusers read `HF_ENDPOINT` / `HF_HUB_OFFLINE` at import time (and conftest.py makes the test
process offline), so the client side runs once in a fresh Python process pointed at the fake Hub: this file run as
a script (`python test_hub.py client <workdir>`). It prints one JSON object that the tests below assert on, next to
what the server itself stored.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

from fake_hub import FakeHub


USER = "fake-user"
PIPELINE_REPO = f"{USER}/diffae-tiny"
MODEL_REPOS = {
    "unet": f"{USER}/diffae-tiny-unet",
    "encoder": f"{USER}/diffae-tiny-encoder",
    "latent_denoiser": f"{USER}/diffae-tiny-latent",
    "classifier": f"{USER}/diffae-tiny-classifier",
}
SAVED_REPO = f"{USER}/diffae-saved"
SAVED_UNET_REPO = f"{USER}/diffae-saved-unet"
CLIENT_TIMEOUT_S = 600


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n"), readme[:200]
    return yaml.safe_load(readme.split("---\n")[1])


# ----------------------------------------------------------------------------------------------------------------
# Client (runs in a subprocess with HF_ENDPOINT pointing at the fake Hub)
# ----------------------------------------------------------------------------------------------------------------


def run_client(workdir: str) -> dict:
    import torch
    from diffusers import DiffusionPipeline
    from huggingface_hub import HfApi, ModelCard, snapshot_download

    from diffusers_diffae import DiffAEPipeline
    from test_loading import MODEL_COMPONENTS, fixed_codes, make_tiny_pipeline

    def same_weights(a, b) -> bool:
        sa, sb = a.state_dict(), b.state_dict()
        return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)

    def same_pipeline(loaded) -> bool:
        return all(same_weights(getattr(pipe, name), getattr(loaded, name)) for name in MODEL_COMPONENTS)

    def cache(name: str) -> str:  # a fresh cache per load, so that every load really downloads
        return os.path.join(workdir, "caches", name)

    results = {}
    pipe = make_tiny_pipeline()

    # 1. push_to_hub: the pipeline (to the default namespace) and every model, each to its own repo.
    commit = pipe.push_to_hub(PIPELINE_REPO.split("/")[1])
    results["pipeline_commit_url"] = commit.commit_url
    for name, repo in MODEL_REPOS.items():
        getattr(pipe, name).push_to_hub(repo)
    pipe.save_pretrained(os.path.join(workdir, "saved"), push_to_hub=True, repo_id=SAVED_REPO)
    pipe.unet.save_pretrained(os.path.join(workdir, "saved-unet"), push_to_hub=True, repo_id=SAVED_UNET_REPO)
    results["card_data"] = ModelCard.load(PIPELINE_REPO).data.to_dict()

    # 2. Load by repo id: DiffAEPipeline (snapshot first), plain diffusers with the community file, single models.
    loaded = DiffAEPipeline.from_pretrained(PIPELINE_REPO, cache_dir=cache("subclass"))
    z_sem, x_T = fixed_codes()
    before = pipe.decode(z_sem, x_T, num_inference_steps=2, output_type="pt").images
    after = loaded.decode(z_sem, x_T, num_inference_steps=2, output_type="pt").images
    results["subclass"] = {
        "class": type(loaded).__qualname__,
        "is_installed_class": type(loaded) is DiffAEPipeline,
        "same_weights": same_pipeline(loaded),
        "same_images": bool(torch.equal(before, after)),
        "attribute_names": loaded.classifier.attribute_names,
        "name_or_path": loaded.name_or_path,
    }
    # Offline spellings (local_files_only=True behaves as HF_HUB_OFFLINE=1): the cached snapshot is loaded.
    offline = DiffAEPipeline.from_pretrained(PIPELINE_REPO, cache_dir=cache("subclass"), local_files_only=True)
    results["subclass_from_cache"] = same_pipeline(offline)
    snapshot = snapshot_download(PIPELINE_REPO, cache_dir=cache("subclass"), local_files_only=True)
    offline_plain = DiffusionPipeline.from_pretrained(snapshot, custom_pipeline="diffae", trust_remote_code=True)
    results["plain_from_cache"] = type(offline_plain) is DiffAEPipeline and same_pipeline(offline_plain)

    plain = DiffusionPipeline.from_pretrained(
        PIPELINE_REPO, custom_pipeline="diffae", trust_remote_code=True, cache_dir=cache("plain")
    )
    results["plain"] = {
        "is_installed_class": type(plain) is DiffAEPipeline,
        "component_classes_installed": all(
            type(getattr(plain, name)) is type(getattr(pipe, name)) for name in MODEL_COMPONENTS
        ),
        "same_weights": same_pipeline(plain),
    }
    try:
        DiffusionPipeline.from_pretrained(PIPELINE_REPO, custom_pipeline="diffae", cache_dir=cache("untrusted"))
        results["untrusted_error"] = None
    except ValueError as e:
        results["untrusted_error"] = str(e)

    results["models"] = {}
    for name in MODEL_COMPONENTS:
        model_cls = type(getattr(pipe, name))
        from_subfolder = model_cls.from_pretrained(PIPELINE_REPO, subfolder=name, cache_dir=cache("sub-" + name))
        from_model_repo = model_cls.from_pretrained(MODEL_REPOS[name], cache_dir=cache("repo-" + name))
        from_cache = model_cls.from_pretrained(
            MODEL_REPOS[name], cache_dir=cache("repo-" + name), local_files_only=True
        )
        results["models"][name] = {
            "subfolder_same": same_weights(getattr(pipe, name), from_subfolder),
            "model_repo_same": same_weights(getattr(pipe, name), from_model_repo),
            "from_cache_same": same_weights(getattr(pipe, name), from_cache),
        }

    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        DiffAEPipeline.from_pretrained(f"{USER}/no-such-repo", cache_dir=cache("missing"))
        results["missing_repo_error"] = None
    except RepositoryNotFoundError as e:
        results["missing_repo_error"] = type(e).__name__

    # 3. A card edited on the Hub survives the next push; only missing metadata is added.
    edited = "---\nlicense: apache-2.0\n---\n# My own card\n\nHand-written notes.\n"
    HfApi().upload_file(path_or_fileobj=edited.encode(), path_in_repo="README.md", repo_id=PIPELINE_REPO)
    pipe.push_to_hub(PIPELINE_REPO, commit_message="second push")
    return results


# ----------------------------------------------------------------------------------------------------------------
# Tests (server in this process, client in a subprocess)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hub-client")
    with FakeHub(user=USER) as hub:
        env = {**os.environ, **hub.client_env(str(workdir / "hf_home"))}
        env["DIFFUSERS_DISABLE_REMOTE_CODE"] = "0"  # the plain-diffusers spelling runs diffae.py
        proc = subprocess.run(
            [sys.executable, __file__, "client", str(workdir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_S,
        )
        if proc.returncode != 0:
            pytest.fail(f"hub client failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        yield hub, results


def test_pipeline_push_uploads_loadable_folder_and_card(hub_run):
    hub, results = hub_run
    assert results["pipeline_commit_url"].startswith(hub.endpoint + f"/{PIPELINE_REPO}/commit/")
    files = hub.files(PIPELINE_REPO)
    for expected in (
        "model_index.json",
        "diffae.py",
        "README.md",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusers_diffae.models.unet_diffae.py",
        "encoder/diffusers_diffae.models.semantic_encoder.py",
        "classifier/config.json",
        "latent_scheduler/scheduler_config.json",
        "inverse_scheduler/scheduler_config.json",
    ):
        assert expected in files
    assert hub.commit_messages(PIPELINE_REPO)[:2] == ["initial commit", "Upload DiffAEPipeline"]
    data = results["card_data"]  # the card as first pushed (ModelCard.load from the Hub)
    assert data["library_name"] == "diffusers"
    assert data["license"] == "mit"
    assert data["pipeline_tag"] == "unconditional-image-generation"
    assert {"diffusers", "diffae", "diffusion-autoencoder", "arxiv:2111.15640"} <= set(data["tags"])


def test_pipeline_card_body(hub_run):
    hub, _ = hub_run
    readme = hub.read(SAVED_REPO, "README.md").decode()  # save_pretrained(push_to_hub=True) writes the same card
    assert front_matter(readme)["library_name"] == "diffusers"
    assert "https://arxiv.org/abs/2111.15640" in readme
    assert f'DiffAEPipeline.from_pretrained("{SAVED_REPO}")' in readme
    assert (
        f'DiffusionPipeline.from_pretrained("{SAVED_REPO}", custom_pipeline="diffae", trust_remote_code=True)'
        in readme
    )
    assert "`AttributeClassifier`" in readme and "`a` (binary), `b` (continuous)" in readme
    assert "diffae.py" in hub.files(SAVED_REPO)


def test_model_push_uses_diffusers_model_card(hub_run):
    hub, _ = hub_run
    for repo in [*MODEL_REPOS.values(), SAVED_UNET_REPO]:  # push_to_hub and save_pretrained(push_to_hub=True)
        files = hub.files(repo)
        assert {"README.md", "config.json", "diffusion_pytorch_model.safetensors"} <= set(files), repo
        assert front_matter(hub.read(repo, "README.md").decode())["library_name"] == "diffusers"


def test_load_by_repo_id_with_diffae_pipeline(hub_run):
    hub, results = hub_run
    subclass = results["subclass"]
    assert subclass["is_installed_class"]
    assert subclass["same_weights"] and subclass["same_images"]
    assert subclass["attribute_names"] == ["a", "b"]
    assert subclass["name_or_path"] == PIPELINE_REPO
    assert results["subclass_from_cache"]  # local_files_only=True reuses the downloaded snapshot
    assert results["plain_from_cache"]
    assert ("GET", f"/api/models/{PIPELINE_REPO}/revision/main") in hub.requests
    assert any(path.startswith(f"/{PIPELINE_REPO}/resolve/") for _, path in hub.requests)


def test_load_by_repo_id_with_plain_diffusers(hub_run):
    _, results = hub_run
    assert results["plain"] == {"is_installed_class": True, "component_classes_installed": True, "same_weights": True}
    assert results["untrusted_error"] is not None and "trust_remote_code=True" in results["untrusted_error"]


def test_load_single_models_by_repo_id(hub_run):
    _, results = hub_run
    for name, checks in results["models"].items():
        assert checks == {"subfolder_same": True, "model_repo_same": True, "from_cache_same": True}, name


def test_existing_card_is_kept_on_push(hub_run):
    hub, _ = hub_run
    assert hub.commit_messages(PIPELINE_REPO)[-1] == "second push"
    readme = hub.read(PIPELINE_REPO, "README.md").decode()
    assert "Hand-written notes." in readme
    data = front_matter(readme)
    assert data["license"] == "apache-2.0"  # the author's choice wins
    assert data["library_name"] == "diffusers"
    assert {"diffae", "diffusion-autoencoder"} <= set(data["tags"])


def test_model_card_without_hub():
    from diffusers_diffae.hub_utils import create_model_card
    from test_loading import make_tiny_pipeline

    pipe = make_tiny_pipeline()
    card = create_model_card(pipe, "someone/diffae", tags=["faces"], model_description="Trained on nothing.")
    assert card.data.library_name == "diffusers" and card.data.license == "mit"
    assert card.data.tags[-1] == "faces" and "diffae" in card.data.tags
    assert 'DiffAEPipeline.from_pretrained("someone/diffae")' in card.text
    assert "Trained on nothing." in card.text
    assert 'pipe.edit(latents, attribute="a"' in card.text
    assert card.data.pipeline_tag == "unconditional-image-generation"


def test_missing_repo_is_reported(hub_run):
    hub, results = hub_run
    assert results["missing_repo_error"] == "RepositoryNotFoundError"
    assert f"{USER}/no-such-repo" not in hub.repo_ids()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "client":
        sys.exit("usage: python test_hub.py client <workdir>")
    print(json.dumps(run_client(sys.argv[2])))
