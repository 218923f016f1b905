"""Build the offline emoji attribute dataset used to train and evaluate the bundled DiffAE.

Source: the npm packages `emoji-datasource-google` (Noto Emoji images, Apache-2.0) and `emoji-datasource-twitter`
(Twemoji images, CC-BY-4.0), version 16.0.0. `npm pack` only downloads the tarballs (no JavaScript runs); their
sha1 is always checked, and only `package/emoji.json` and `package/img/<vendor>/64/*.png` are extracted.

```
python training/prepare_emoji_dataset.py --output_dir /data/emoji --download_dir /data/npm_cache
python training/prepare_emoji_dataset.py --output_dir /data/emoji32 --download_dir /data/npm_cache --resolution 32
```

Each 64x64 RGBA sprite is composited onto white and stored as RGB at `--resolution`. Attributes (skin tone, gender,
hair, age, number of people) are derived from the code points and names in `emoji.json`; see `training/DATASET.md`.
The result is a `datasets.DatasetDict` with `train` and `test` splits, saved with `save_to_disk`, plus a dataset
card `README.md`. The split hashes the base emoji (code points without skin-tone modifiers), so every skin tone and
both vendors of a held-out emoji are in `test`.
"""

import argparse
import hashlib
import io
import json
import logging
import shutil
import string
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from _emoji_attributes import HAIR_TYPES, SKIN_TONE_NAMES, SKIN_TONES, emoji_attributes
from _emoji_sources import PACKAGES, SPRITE_SIZE, download_package, extract_package, find_package_root


logger = logging.getLogger("prepare_emoji_dataset")

CARD_TEMPLATE = Path(__file__).resolve().with_name("emoji_dataset_card.md")


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def composite_on_white(image: Image.Image) -> Image.Image:
    """RGBA/LA/P (with transparency) sprite -> RGB on a white background."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_sprite(path: Path, resolution: int) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        rgb = composite_on_white(image)
    if rgb.size != (resolution, resolution):
        # Downscale after compositing: resampling straight alpha would bleed the hidden RGB of transparent pixels.
        rgb = rgb.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return rgb


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------


def emoji_records(emoji_json: List[dict], vendor: str) -> Iterable[Dict[str, str]]:
    """One record per image the vendor has: every base emoji and each of its skin-tone variations."""
    flag = f"has_img_{vendor}"
    for entry in emoji_json:
        for key in ("unified", "name", "short_name", "image", "category", "subcategory"):
            if key not in entry:
                raise ValueError(f"emoji.json entry {entry.get('unified', entry)!r} has no {key!r} field")
        base = {
            "name": entry["name"],
            "short_name": entry["short_name"],
            "base_unified": entry["unified"].upper(),
            "category": entry["category"],
            "subcategory": entry["subcategory"],
        }
        if entry.get(flag, False):
            yield {**base, "unified": entry["unified"].upper(), "image_file": entry["image"]}
        for key in sorted(entry.get("skin_variations") or {}):
            variation = entry["skin_variations"][key]
            if not variation.get(flag, False):
                continue
            modifiers = key.upper().split("-")
            if not all(cp in SKIN_TONES for cp in modifiers):
                raise ValueError(f"emoji.json entry {entry['unified']!r} has an unknown skin variation key {key!r}")
            tones = " and ".join(SKIN_TONE_NAMES[SKIN_TONES[cp]] for cp in modifiers)
            yield {
                **base,
                "name": f"{entry['name']} ({tones} skin tone)",
                "unified": variation["unified"].upper(),
                "image_file": variation["image"],
            }


def hash_fraction(key: str, salt: str) -> float:
    """A stable number in [0, 1) for a string (sha256, so it does not depend on Python's hash seed)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode("utf-8")).hexdigest()
    return int(digest[:16], 16) / float(1 << 64)


def split_stratum(base_unified: str, subcategory: str, category: str) -> Tuple[str, ...]:
    """Group of similar base emoji that the split samples from separately (hair types, ages and groups are rare)."""
    attributes = emoji_attributes(base_unified, subcategory)
    if attributes["is_person"]:
        group = "one" if attributes["num_people"] == 1 else "group"
        return ("person", str(attributes["hair"]), str(attributes["age"]), group)
    return ("other", category)


def assign_splits(rows: Sequence[dict], test_fraction: float, salt: str) -> Dict[str, str]:
    """`base_unified` -> "train" or "test", deterministic and stratified.

    Within each stratum the bases are ordered by a salted sha256 of `base_unified`, and the first
    `round(test_fraction * n)` go to test, at least one when the stratum has two or more bases; a stratum of one
    base goes to test when its hash is below `test_fraction`. Whole bases move together, so every skin tone and
    vendor of a held-out emoji is in test, and rare attributes (each hair type has only three bases) are present
    in both splits instead of depending on luck.
    """
    strata: Dict[Tuple[str, ...], List[str]] = {}
    seen = set()
    for row in rows:
        if row["base_unified"] not in seen:
            seen.add(row["base_unified"])
            key = split_stratum(row["base_unified"], row["subcategory"], row["category"])
            strata.setdefault(key, []).append(row["base_unified"])
    splits = {}
    for bases in strata.values():
        bases.sort(key=lambda base: (hash_fraction(base, salt), base))
        if len(bases) == 1:
            num_test = int(hash_fraction(bases[0], salt) < test_fraction)
        else:
            num_test = max(1, round(test_fraction * len(bases)))
        for i, base in enumerate(bases):
            splits[base] = "test" if i < num_test else "train"
    return splits


def load_vendor_rows(package_root: Path, vendor: str, resolution: int, max_images: Optional[int]) -> List[dict]:
    """Rows (attributes + PNG bytes) for one vendor's extracted package."""
    emoji_json_path = package_root / "emoji.json"
    if not emoji_json_path.is_file():
        raise FileNotFoundError(f"emoji.json not found at {emoji_json_path}")
    with open(emoji_json_path, encoding="utf-8") as f:
        emoji_json = json.load(f)
    if not isinstance(emoji_json, list):
        raise ValueError(
            f"{emoji_json_path} should hold a JSON list of emoji entries, got {type(emoji_json).__name__}"
        )
    records = list(emoji_records(emoji_json, vendor))
    if max_images is not None and len(records) > max_images:
        # Keep a hash-chosen subset, so a quick run still mixes people, flags, objects and smileys.
        order = sorted(range(len(records)), key=lambda i: hash_fraction(records[i]["unified"], "max_images"))
        chosen = set(order[:max_images])
        records = [record for i, record in enumerate(records) if i in chosen]

    image_dir = package_root / "img" / vendor / str(SPRITE_SIZE)
    missing = [record["image_file"] for record in records if not (image_dir / record["image_file"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(records)} images listed in {emoji_json_path} are missing from {image_dir}, "
            f"e.g. {', '.join(missing[:5])}"
        )

    rows = []
    for record in records:
        image = load_sprite(image_dir / record["image_file"], resolution)
        attributes = emoji_attributes(record["unified"], record["subcategory"])
        rows.append({"image": {"bytes": png_bytes(image), "path": None}, "vendor": vendor, **record, **attributes})
    return rows


COLUMNS = [
    "image", "vendor", "name", "short_name", "unified", "base_unified", "image_file", "category", "subcategory",
    "skin_tone", "skin_tone_2", "has_skin_tone", "mixed_skin_tone", "gender", "hair", "age", "num_people",
    "is_person", "is_man", "is_woman", "dark_skin", "light_skin", "hair_red", "hair_curly", "hair_white",
    "hair_bald", "hair_blond", "beard", "is_older", "is_child_or_baby",
]  # fmt: skip


def dataset_features():
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    string_columns = {"vendor", "name", "short_name", "unified", "base_unified", "image_file", "category",
                      "subcategory", "gender", "hair", "age"}  # fmt: skip
    int_columns = {"skin_tone", "skin_tone_2", "num_people"}
    features = {}
    for column in COLUMNS:
        if column == "image":
            features[column] = ImageFeature()
        elif column in string_columns:
            features[column] = Value("string")
        elif column in int_columns:
            features[column] = Value("int32")
        else:
            features[column] = Value("bool")
    return Features(features)


def split_rows(rows: Sequence[dict], test_fraction: float, salt: str) -> Dict[str, List[dict]]:
    splits = assign_splits(rows, test_fraction, salt)
    rows_by_split: Dict[str, List[dict]] = {"train": [], "test": []}
    for row in rows:
        rows_by_split[splits[row["base_unified"]]].append(row)
    return rows_by_split


def build_dataset_dict(rows_by_split: Dict[str, List[dict]]):
    from datasets import Dataset, DatasetDict

    features = dataset_features()
    return DatasetDict(
        {
            name: Dataset.from_dict({c: [row[c] for row in rows] for c in COLUMNS}, features=features)
            for name, rows in rows_by_split.items()
        }
    )


# ----------------------------------------------------------------------------------------------------------------
# Dataset card
# ----------------------------------------------------------------------------------------------------------------


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def attribute_counts(rows: Sequence[dict], column: str) -> Counter:
    return Counter(row[column] for row in rows)


def count_tables(rows_by_split: Dict[str, List[dict]], vendors: Sequence[str]) -> str:
    """Markdown tables of the attribute counts per vendor and split."""
    groups = [(split, vendor) for split in ("train", "test") for vendor in vendors]
    header = ["value"] + [f"{split} {vendor}" for split, vendor in groups]
    sections = []
    for column, order in (
        ("skin_tone", list(range(6))),
        ("gender", ["none", "man", "woman", "person", "mixed"]),
        ("hair", ["none", *HAIR_TYPES]),
        ("age", ["none", "baby", "child", "adult", "older", "mixed"]),
        ("num_people", None),
        ("category", None),
    ):
        counts = {g: attribute_counts([r for r in rows_by_split[g[0]] if r["vendor"] == g[1]], column) for g in groups}
        values = order or sorted(set().union(*counts.values()), key=lambda v: (-sum(c[v] for c in counts.values()), v))
        table_rows = []
        for value in values:
            label = f"{value} ({SKIN_TONE_NAMES[value]})" if column == "skin_tone" else value
            table_rows.append([label] + [counts[g][value] for g in groups])
        sections.append(f"**{column}**\n\n" + _markdown_table(header, table_rows))
    return "\n\n".join(sections)


def write_dataset_card(output_dir: Path, rows_by_split: Dict[str, List[dict]], args: argparse.Namespace) -> Path:
    template = string.Template(CARD_TEMPLATE.read_text(encoding="utf-8"))
    vendors = list(args.vendors)
    sources = _markdown_table(
        ["vendor", "npm package", "sha1", "images from", "image licence"],
        [
            [v, f"`{PACKAGES[v].npm_name}@{PACKAGES[v].version}`", f"`{PACKAGES[v].sha1}`",
             PACKAGES[v].image_source, PACKAGES[v].image_license]
            for v in vendors
        ],
    )  # fmt: skip
    split_sizes = _markdown_table(
        ["split", *vendors, "total", "base emoji"],
        [
            [split]
            + [sum(r["vendor"] == v for r in rows) for v in vendors]
            + [len(rows), len({r["base_unified"] for r in rows})]
            for split, rows in rows_by_split.items()
        ],
    )
    licenses = sorted({PACKAGES[v].image_license.lower() for v in vendors} | {"mit"})
    card = template.substitute(
        license_list="\n".join(f"- {license}" for license in licenses),
        resolution=args.resolution,
        test_fraction=args.test_fraction,
        split_salt=args.split_salt,
        max_images="all" if args.max_images is None else f"at most {args.max_images} per vendor",
        sources=sources,
        attributions="\n".join(f"- {PACKAGES[v].attribution}" for v in vendors),
        split_sizes=split_sizes,
        count_tables=count_tables(rows_by_split, vendors),
        command=" ".join(["python", "training/prepare_emoji_dataset.py", *args.command_line]),
    )
    path = output_dir / "README.md"
    path.write_text(card, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Demo samples: a small, diverse, held-out bundle
# ----------------------------------------------------------------------------------------------------------------

# Column -> weight of a repeated value; a base emoji repeats only when nothing else is left.
DEMO_DIVERSITY_WEIGHTS = {
    "base_unified": 100, "vendor": 1, "gender": 1, "skin_tone": 1, "hair": 1, "age": 1, "category": 2,
    "subcategory": 1,
}  # fmt: skip
# (share of the bundle, which rows): portraits for edits and probes first, then groups, then other emoji.
DEMO_BUCKETS = (
    (1 / 6, lambda r: r["num_people"] == 1 and r["hair"] != "none"),
    (5 / 12, lambda r: r["num_people"] == 1 and r["hair"] == "none"),
    (1 / 12, lambda r: r["num_people"] >= 2),
    (1 / 3, lambda r: r["num_people"] == 0 and r["category"] != "Component"),  # not the bare skin-tone swatches
)


def choose_demo_samples(rows: Sequence[dict], num_samples: int) -> List[dict]:
    """A small diverse subset: each bucket of `DEMO_BUCKETS` gets its share, filled greedily.

    Each pick is the row whose values are rarest (weighted by `DEMO_DIVERSITY_WEIGHTS`) among the picks so far;
    ties go to a stable hash of the row, so the bundle is reproducible. A bucket that runs short is made up by the
    next ones, so `num_samples` rows come back whenever `rows` has that many.
    """
    chosen: List[dict] = []
    seen = {column: Counter() for column in DEMO_DIVERSITY_WEIGHTS}
    ordered = sorted(rows, key=lambda r: hash_fraction(r["vendor"] + r["unified"], "demo"))
    quotas = [round(share * num_samples) for share, _ in DEMO_BUCKETS]
    quotas[-1] = num_samples - sum(quotas[:-1])
    shortfall = 0
    # The last pass takes any row left, to make up for buckets that ran short.
    passes = [*zip([belongs for _, belongs in DEMO_BUCKETS], quotas), (lambda r: True, 0)]
    for belongs, quota in passes:
        pool = [r for r in ordered if belongs(r) and not any(r is c for c in chosen)]
        wanted = quota + shortfall
        picked = min(wanted, len(pool))
        for _ in range(picked):
            scores = [sum(w * seen[c][r[c]] for c, w in DEMO_DIVERSITY_WEIGHTS.items()) for r in pool]
            row = pool.pop(int(np.argmin(scores)))
            chosen.append(row)
            for column in DEMO_DIVERSITY_WEIGHTS:
                seen[column][row[column]] += 1
        shortfall = wanted - picked
    return chosen


def export_demo_samples(rows: Sequence[dict], output_dir: Path, num_samples: int, vendors: Sequence[str]) -> Path:
    """Write `num_samples` PNGs, `metadata.jsonl` (imagefolder format) and `ATTRIBUTION.md` into `output_dir`."""
    chosen = choose_demo_samples(rows, num_samples)
    if len(chosen) < num_samples:
        raise ValueError(f"only {len(chosen)} images are available for {num_samples} demo samples")
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(output_dir.glob("*.png")) + [output_dir / "metadata.jsonl"]:
        stale.unlink(missing_ok=True)
    with open(output_dir / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for row in chosen:
            file_name = f"{row['vendor']}_{row['unified'].lower()}.png"
            (output_dir / file_name).write_bytes(row["image"]["bytes"])
            record = {"file_name": file_name, **{c: row[c] for c in COLUMNS if c != "image"}}
            metadata.write(json.dumps(record, ensure_ascii=False) + "\n")
    used_vendors = [v for v in vendors if any(r["vendor"] == v for r in chosen)]
    attribution = [
        "# Sample emoji: sources and licences",
        "",
        f"These {len(chosen)} images are held-out (test split) emoji from the dataset built by",
        "`training/prepare_emoji_dataset.py`, composited onto white and downscaled. File names are",
        "`<vendor>_<code points>.png`; `metadata.jsonl` lists their attributes.",
        "",
    ]
    for vendor in used_vendors:
        package = PACKAGES[vendor]
        attribution.append(
            f"- `{vendor}_*.png`: {package.attribution}. Images from {package.image_source}, "
            f"distributed in the npm package `{package.npm_name}@{package.version}`."
        )
    attribution += [
        "",
        "Twemoji graphics are licensed under CC-BY-4.0 (https://creativecommons.org/licenses/by/4.0/);",
        "Noto Emoji graphics under the Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0).",
        "The images were resized and composited onto a white background. The emoji metadata (names, categories)",
        "comes from emoji-datasource by Cal Henderson, MIT licence (https://github.com/iamcal/emoji-data).",
        "",
    ]
    (output_dir / "ATTRIBUTION.md").write_text("\n".join(attribution), encoding="utf-8")
    return output_dir


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, required=True, help="Where the DatasetDict and README.md go.")
    parser.add_argument(
        "--download_dir",
        type=Path,
        default=Path.home() / ".cache" / "diffusers_diffae" / "emoji-datasource",
        help="Cache for the npm tarballs and their extracted sprites; tarballs already there are reused after a "
        "sha1 check.",
    )
    parser.add_argument(
        "--source_dir",
        type=Path,
        default=None,
        help="Use already-extracted packages instead of downloading: <source_dir>/emoji-datasource-<vendor>/ with "
        "emoji.json and img/<vendor>/64/*.png (a `package/` level in between is accepted).",
    )
    parser.add_argument(
        "--vendors", nargs="+", choices=sorted(PACKAGES), default=["google", "twitter"], help="Image sets to include."
    )
    parser.add_argument(
        "--resolution", type=int, default=64, help="Output size in pixels (8-64); below 64 the sprites are "
        "downscaled with Lanczos after compositing.",
    )  # fmt: skip
    parser.add_argument(
        "--test_fraction", type=float, default=0.1, help="Fraction of base emoji held out for the test split."
    )
    parser.add_argument(
        "--split_salt", type=str, default="diffae-emoji-v1", help="Salt of the sha256 split hash; change it for "
        "a different (still deterministic) split.",
    )  # fmt: skip
    parser.add_argument(
        "--max_images", type=int, default=None, help="Keep at most this many images per vendor (a hash-chosen "
        "subset), for quick runs.",
    )  # fmt: skip
    parser.add_argument("--npm", type=str, default="npm", help="npm executable used for `npm pack`.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing dataset in --output_dir (only a directory "
        "that holds a saved DatasetDict is ever deleted).",
    )  # fmt: skip
    parser.add_argument(
        "--demo_samples_dir", type=Path, default=None, help="Also write a small diverse bundle of test-split PNGs "
        "with metadata.jsonl and ATTRIBUTION.md here (the demo's sample images).",
    )  # fmt: skip
    parser.add_argument("--num_demo_samples", type=int, default=48, help="Number of images in the demo bundle.")
    args = parser.parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)

    if not 8 <= args.resolution <= SPRITE_SIZE:
        parser.error(f"--resolution must be between 8 and {SPRITE_SIZE}, got {args.resolution}")
    if not 0.0 < args.test_fraction < 1.0:
        parser.error(f"--test_fraction must be strictly between 0 and 1, got {args.test_fraction}")
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max_images must be positive, got {args.max_images}")
    if args.num_demo_samples < 1:
        parser.error(f"--num_demo_samples must be positive, got {args.num_demo_samples}")
    args.vendors = [v for v in PACKAGES if v in set(args.vendors)]  # fixed order, no duplicates
    return args


def prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output_dir} is not empty; pass --overwrite to replace the dataset there")
        if not (output_dir / "dataset_dict.json").is_file():
            raise FileExistsError(f"{output_dir} is not empty and holds no saved DatasetDict; refusing to delete it")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    start = time.perf_counter()

    # 1. sources: extracted packages, or npm tarballs (downloaded once, sha1-checked, safely extracted)
    package_roots = {}
    for vendor in args.vendors:
        if args.source_dir is not None:
            package_roots[vendor] = find_package_root(args.source_dir, vendor)
        else:
            tarball = download_package(PACKAGES[vendor], args.download_dir, npm=args.npm)
            root = args.download_dir / PACKAGES[vendor].npm_name
            package_roots[vendor] = extract_package(tarball, root, vendor, expected_sha1=PACKAGES[vendor].sha1)

    # 2. images and attributes
    rows = []
    for vendor in args.vendors:
        vendor_rows = load_vendor_rows(package_roots[vendor], vendor, args.resolution, args.max_images)
        logger.info("%s: %d images", vendor, len(vendor_rows))
        rows.extend(vendor_rows)

    # 3. split by base emoji and save
    prepare_output_dir(args.output_dir, args.overwrite)
    rows_by_split = split_rows(rows, args.test_fraction, args.split_salt)
    dataset = build_dataset_dict(rows_by_split)
    for name, split in dataset.items():
        if len(split) == 0:
            logger.warning("the %s split is empty; raise --max_images or change --test_fraction", name)
    dataset.save_to_disk(str(args.output_dir))
    card = write_dataset_card(args.output_dir, rows_by_split, args)

    # 4. optional demo bundle from the held-out split
    if args.demo_samples_dir is not None:
        export_demo_samples(rows_by_split["test"], args.demo_samples_dir, args.num_demo_samples, args.vendors)
        logger.info("wrote %d demo samples to %s", args.num_demo_samples, args.demo_samples_dir)

    sizes = ", ".join(f"{name} {len(split)}" for name, split in dataset.items())
    logger.info(
        "saved %s (%s images) and %s in %.1f s", args.output_dir, sizes, card.name, time.perf_counter() - start
    )
    return args.output_dir


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
