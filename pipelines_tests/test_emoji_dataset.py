"""Tests of `training/prepare_emoji_dataset.py` and its `_emoji_*` modules on a tiny generated stand-in for the
npm packages (no network)."""

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "training"))

import _emoji_sources  # noqa: E402
import prepare_emoji_dataset as prep  # noqa: E402
from _emoji_attributes import emoji_attributes  # noqa: E402


# (unified, name, category, subcategory, {variation key: variation unified})
FAKE_EMOJI = [
    ("1F600", "GRINNING FACE", "Smileys & Emotion", "face-smiling", {}),
    (
        "1F468-200D-1F9B0", "MAN: RED HAIR", "People & Body", "person",
        {"1F3FB": "1F468-1F3FB-200D-1F9B0", "1F3FF": "1F468-1F3FF-200D-1F9B0"},
    ),
    (
        "1F469-200D-2764-FE0F-200D-1F468", "COUPLE WITH HEART: WOMAN, MAN", "People & Body", "family",
        {
            "1F3FB-1F3FF": "1F469-1F3FB-200D-2764-FE0F-200D-1F468-1F3FF",
            "1F3FF-1F3FF": "1F469-1F3FF-200D-2764-FE0F-200D-1F468-1F3FF",
        },
    ),
    (
        "1F46B", "MAN AND WOMAN HOLDING HANDS", "People & Body", "family",
        {"1F3FD": "1F46B-1F3FD", "1F3FB-1F3FE": "1F469-1F3FB-200D-1F91D-200D-1F468-1F3FE"},
    ),
    ("1F471-200D-2640-FE0F", "WOMAN: BLOND HAIR", "People & Body", "person", {"1F3FE": "1F471-1F3FE-200D-2640-FE0F"}),
    ("1F9D4-200D-2642-FE0F", "MAN: BEARD", "People & Body", "person", {}),
    ("1F474", "OLDER MAN", "People & Body", "person", {"1F3FC": "1F474-1F3FC"}),
    ("1F476", "BABY", "People & Body", "person", {}),
    ("1F468-200D-1F469-200D-1F467", "FAMILY: MAN, WOMAN, GIRL", "People & Body", "family", {}),
    ("1F44D", "THUMBS UP SIGN", "People & Body", "hand-fingers-closed", {"1F3FF": "1F44D-1F3FF"}),
    ("1F1EB-1F1F7", "France Flag", "Flags", "country-flag", {}),
    ("1F46E", "POLICE OFFICER", "People & Body", "person-role", {}),
    (
        "1F46E-200D-2640-FE0F", "WOMAN POLICE OFFICER", "People & Body", "person-role",
        {"1F3FD": "1F46E-1F3FD-200D-2640-FE0F"},
    ),
    ("1F4A9", "PILE OF POO", "Smileys & Emotion", "face-costume", {}),  # no Google image in this stand-in
]  # fmt: skip
NO_GOOGLE_IMAGE = "1F4A9"
IMAGES_PER_VENDOR = {"google": 23, "twitter": 24}


def sprite(index: int, mode: str) -> Image.Image:
    """64x64 sprite: transparent (with black hidden RGB) except an opaque coloured square in the middle."""
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[16:48, 16:48] = [(37 * index) % 256, 200, (90 + 13 * index) % 256, 255]
    if mode == "P":
        # Palette image with a transparent index (a tRNS chunk), as some real Twemoji/Noto sprites are.
        image = Image.fromarray((rgba[..., 3] > 0).astype(np.uint8), "P")
        image.putpalette([0, 0, 0, *rgba[32, 32, :3].tolist()])
        image.info["transparency"] = 0
        return image
    image = Image.fromarray(rgba, "RGBA")
    return image.convert("LA") if mode == "LA" else image


def pick(row: dict, *keys: str) -> tuple:
    return tuple(row[key] for key in keys)


def make_fake_source(root: Path) -> Path:
    """`<root>/emoji-datasource-<vendor>/package/{emoji.json,img/<vendor>/64/*.png}` for both vendors."""
    for vendor in ("google", "twitter"):
        package = root / f"emoji-datasource-{vendor}" / "package"
        image_dir = package / "img" / vendor / "64"
        image_dir.mkdir(parents=True)
        entries, index = [], 0
        for unified, name, category, subcategory, variations in FAKE_EMOJI:
            has_image = not (vendor == "google" and unified == NO_GOOGLE_IMAGE)
            entry = {
                "name": name,
                "unified": unified,
                "short_name": name.lower().replace(" ", "_"),
                "image": unified.lower() + ".png",
                "category": category,
                "subcategory": subcategory,
                f"has_img_{vendor}": has_image,
            }
            codes = [unified] if has_image else []
            if variations:
                entry["skin_variations"] = {
                    key: {"unified": value, "image": value.lower() + ".png", f"has_img_{vendor}": True}
                    for key, value in variations.items()
                }
                codes += list(variations.values())
            entries.append(entry)
            for code in codes:
                mode = {"1F600": "LA", "1F1EB-1F1F7": "P"}.get(code, "RGBA")
                sprite(index, mode).save(image_dir / (code.lower() + ".png"))
                index += 1
        (package / "emoji.json").write_text(json.dumps(entries), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def fake_source(tmp_path_factory) -> Path:
    return make_fake_source(tmp_path_factory.mktemp("emoji_source"))


@pytest.fixture(scope="module")
def built(fake_source, tmp_path_factory):
    """The tiny dataset built once at 64 px; returns (output_dir, {unified+vendor: row})."""
    from datasets import load_from_disk

    output_dir = tmp_path_factory.mktemp("emoji_out") / "dataset"
    prep.main(["--source_dir", str(fake_source), "--output_dir", str(output_dir), "--test_fraction", "0.5"])
    dataset = load_from_disk(str(output_dir))
    rows = {}
    for split, data in dataset.items():
        for row in data:
            rows[(row["vendor"], row["unified"])] = {**row, "split": split}
    return output_dir, dataset, rows


def test_attributes_from_code_points():
    attributes = emoji_attributes("1F468-1F3FF-200D-1F9B0", "person")
    assert pick(attributes, "skin_tone", "gender", "hair", "age") == (5, "man", "red", "adult")
    assert attributes["dark_skin"] and attributes["hair_red"] and attributes["is_man"] and not attributes["light_skin"]

    couple = emoji_attributes("1F469-1F3FB-200D-2764-FE0F-200D-1F468-1F3FF", "family")
    assert (couple["skin_tone"], couple["skin_tone_2"], couple["mixed_skin_tone"]) == (1, 5, True)
    assert (couple["gender"], couple["num_people"]) == ("mixed", 2)

    # One modifier on a two-person character colours both people.
    same = emoji_attributes("1F46B-1F3FD", "family")
    assert (same["skin_tone"], same["skin_tone_2"], same["mixed_skin_tone"], same["num_people"]) == (3, 3, False, 2)

    assert emoji_attributes("1F46E", "person-role")["gender"] == "person"
    assert emoji_attributes("1F46E-200D-2640-FE0F", "person-role")["gender"] == "woman"
    assert emoji_attributes("1F9D4-200D-2642-FE0F", "person")["hair"] == "beard"
    assert emoji_attributes("1F471-200D-2640-FE0F", "person")["hair_blond"]
    family = emoji_attributes("1F468-200D-1F469-200D-1F467", "family")
    assert (family["num_people"], family["gender"], family["age"]) == (3, "mixed", "mixed")
    assert emoji_attributes("1F474", "person")["is_older"]
    assert emoji_attributes("1F476", "person")["is_child_or_baby"]
    hand = emoji_attributes("1F44D-1F3FF", "hand-fingers-closed")
    assert (hand["is_person"], hand["skin_tone"], hand["has_skin_tone"], hand["gender"]) == (False, 5, True, "none")
    flag = emoji_attributes("1F1EB-1F1F7", "country-flag")
    assert (flag["num_people"], flag["skin_tone"], flag["has_skin_tone"], flag["hair"]) == (0, 0, False, "none")


def test_columns_and_known_rows(built):
    output_dir, dataset, rows = built
    assert set(dataset) == {"train", "test"}
    assert dataset["train"].column_names == prep.COLUMNS
    for vendor, count in IMAGES_PER_VENDOR.items():
        assert sum(key[0] == vendor for key in rows) == count
    assert ("google", NO_GOOGLE_IMAGE) not in rows and ("twitter", NO_GOOGLE_IMAGE) in rows

    red = rows[("twitter", "1F468-1F3FF-200D-1F9B0")]
    assert red["base_unified"] == "1F468-200D-1F9B0"
    assert red["name"] == "MAN: RED HAIR (dark skin tone)"
    assert pick(red, "skin_tone", "gender", "hair", "hair_red", "is_person") == (5, "man", "red", True, True)
    couple = rows[("google", "1F469-1F3FB-200D-2764-FE0F-200D-1F468-1F3FF")]
    assert (couple["skin_tone"], couple["skin_tone_2"], couple["gender"], couple["num_people"]) == (1, 5, "mixed", 2)
    assert couple["base_unified"] == "1F469-200D-2764-FE0F-200D-1F468"
    # The two-tone form of U+1F46B is a ZWJ sequence; it still groups with its base entry.
    hands = rows[("google", "1F469-1F3FB-200D-1F91D-200D-1F468-1F3FE")]
    assert pick(hands, "base_unified", "gender", "skin_tone", "skin_tone_2") == ("1F46B", "mixed", 1, 4)
    plain = rows[("google", "1F468-200D-1F9B0")]
    assert pick(plain, "skin_tone", "has_skin_tone", "dark_skin", "light_skin") == (0, False, False, False)
    assert rows[("google", "1F46E-1F3FD-200D-2640-FE0F")]["is_woman"]

    card = (output_dir / "README.md").read_text()
    assert "CC-BY-4.0" in card and "Twemoji by X Corp. and contributors" in card and "Apache" in card
    assert "$" not in card.replace("$$", "")  # every template field was filled


def test_images_composited_on_white(built):
    _, _, rows = built
    # RGBA, LA (grey + alpha) and palette-with-transparency sprites.
    sprites = [
        ("google", "1F468-200D-1F9B0"),
        ("twitter", "1F44D-1F3FF"),
        ("google", "1F600"),
        ("twitter", "1F1EB-1F1F7"),
    ]
    for key in sprites:
        image = rows[key]["image"]
        assert image.mode == "RGB" and image.size == (64, 64)
        pixels = np.asarray(image).astype(int)
        # Transparent corners (black hidden RGB in the sprite) become white; the opaque middle keeps its colour.
        assert (pixels[:8, :8] == 255).all(), key
        middle = pixels[24:40, 24:40]
        assert (middle == middle[0, 0]).all() and (middle[0, 0] < 250).any(), key
        if key[1] != "1F600":  # LA sprites are grey
            assert middle[0, 0, 1] == 200, key


def test_split_keeps_base_emoji_together(built):
    _, dataset, rows = built
    assert len(dataset["train"]) > 0 and len(dataset["test"]) > 0
    split_of_base = {}
    for row in rows.values():
        assert split_of_base.setdefault(row["base_unified"], row["split"]) == row["split"], row["unified"]
    # Both vendors and all tones of the red-hair man are in one split.
    assert len({rows[(v, u)]["split"] for v in ("google", "twitter")
                for u in ("1F468-200D-1F9B0", "1F468-1F3FB-200D-1F9B0", "1F468-1F3FF-200D-1F9B0")}) == 1  # fmt: skip


def test_deterministic_and_resolution(built, fake_source, tmp_path):
    output_dir, _, _ = built
    again = tmp_path / "again"
    prep.main(["--source_dir", str(fake_source), "--output_dir", str(again), "--test_fraction", "0.5"])
    for split in ("train", "test"):
        first = (output_dir / split / "data-00000-of-00001.arrow").read_bytes()
        second = (again / split / "data-00000-of-00001.arrow").read_bytes()
        assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()

    from datasets import load_from_disk

    small = tmp_path / "small"
    prep.main(["--source_dir", str(fake_source), "--output_dir", str(small), "--test_fraction", "0.5",
               "--resolution", "32", "--vendors", "twitter", "--max_images", "10"])  # fmt: skip
    data = load_from_disk(str(small))
    assert sum(len(split) for split in data.values()) == 10
    assert set(data["train"]["vendor"]) | set(data["test"]["vendor"]) == {"twitter"}
    image = (data["train"] if len(data["train"]) else data["test"])[0]["image"]
    assert image.size == (32, 32) and (np.asarray(image)[:3, :3] == 255).all()

    with pytest.raises(FileExistsError, match="--overwrite"):
        prep.main(["--source_dir", str(fake_source), "--output_dir", str(small)])


def test_demo_samples(built, tmp_path):
    _, dataset, rows = built
    test_rows = [dict(row, image={"bytes": b"png", "path": None}) for row in rows.values() if row["split"] == "test"]
    out = prep.export_demo_samples(test_rows, tmp_path / "samples", num_samples=4, vendors=["google", "twitter"])
    metadata = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(metadata) == 4 and len({m["file_name"] for m in metadata}) == 4
    assert all((out / m["file_name"]).read_bytes() == b"png" for m in metadata)
    assert all(m["base_unified"] in {r["base_unified"] for r in test_rows} for m in metadata)
    assert "Twemoji by X Corp. and contributors" in (out / "ATTRIBUTION.md").read_text() or all(
        m["vendor"] == "google" for m in metadata
    )
    with pytest.raises(ValueError, match="demo samples"):
        prep.export_demo_samples(test_rows, tmp_path / "too_many", num_samples=len(test_rows) + 1, vendors=["google"])


def test_missing_emoji_json_and_images(fake_source, tmp_path):
    with pytest.raises(FileNotFoundError, match="emoji.json"):
        prep.main(["--source_dir", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "out")])

    broken = make_fake_source(tmp_path / "broken")
    (broken / "emoji-datasource-google" / "package" / "img" / "google" / "64" / "1f474.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 23 images .* missing .* 1f474\.png"):
        prep.main(["--source_dir", str(broken), "--output_dir", str(tmp_path / "out"), "--vendors", "google"])


def test_bad_sha1_is_refused_without_download(tmp_path):
    download_dir = tmp_path / "npm"
    download_dir.mkdir()
    (download_dir / "emoji-datasource-google-16.0.0.tgz").write_bytes(b"not the real tarball")
    # `npm` must never run: the cached file is checked first and refused.
    args = ["--download_dir", str(download_dir), "--output_dir", str(tmp_path / "out"), "--vendors", "google",
            "--npm", str(tmp_path / "no-npm-here")]  # fmt: skip
    with pytest.raises(ValueError, match="sha1 mismatch"):
        prep.main(args)


def _tarball(path: Path, members: dict) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_safe_extraction(fake_source, tmp_path):
    png = (fake_source / "emoji-datasource-google" / "package" / "img" / "google" / "64" / "1f600.png").read_bytes()
    good = _tarball(tmp_path / "good.tgz", {
        "package/emoji.json": b"[]",
        "package/img/google/64/1f600.png": png,
        "package/img/google/32/1f600.png": png,  # other sizes and sheets are not extracted
        "package/README.md": b"readme",
    })  # fmt: skip
    root = _emoji_sources.extract_package(good, tmp_path / "extracted", "google")
    extracted = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name[0] != ".")
    assert extracted == ["emoji.json", "img/google/64/1f600.png"]

    for bad_name in ("../evil.png", "/tmp/evil.png", "package/img/google/64/../../../../evil.png"):
        bad = _tarball(tmp_path / "bad.tgz", {"package/emoji.json": b"[]", bad_name: png})
        with pytest.raises(ValueError, match="unsafe path"):
            _emoji_sources.extract_package(bad, tmp_path / "bad_out", "google")
        assert not (tmp_path / "evil.png").exists()

    with pytest.raises(ValueError, match="sha1 mismatch"):
        _emoji_sources.verify_sha1(good, "0" * 40)
