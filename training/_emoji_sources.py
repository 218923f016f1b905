"""The npm packages of the emoji dataset: pinned versions, download with `npm pack`, sha1 check, safe extraction.

`npm pack` only downloads a tarball (no JavaScript runs); its sha1 is always checked against the registry's
`shasum`, and only `package/emoji.json` and `package/img/<vendor>/64/*.png` are extracted.
"""

import hashlib
import logging
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional


logger = logging.getLogger("prepare_emoji_dataset")


@dataclass(frozen=True)
class EmojiPackage:
    vendor: str
    npm_name: str
    version: str
    sha1: str
    image_source: str
    image_license: str
    attribution: str


PACKAGES: Dict[str, EmojiPackage] = {
    "google": EmojiPackage(
        vendor="google",
        npm_name="emoji-datasource-google",
        version="16.0.0",
        sha1="a80ac3e8106cbd4d8648ce758aa099e8827b6157",
        image_source="Noto Emoji v2.048 (https://github.com/googlefonts/noto-emoji)",
        image_license="Apache-2.0",
        attribution="Noto Emoji by Google (Apache License 2.0)",
    ),
    "twitter": EmojiPackage(
        vendor="twitter",
        npm_name="emoji-datasource-twitter",
        version="16.0.0",
        sha1="e2bd39a8acb77e158106f8249dd7b4cd93fa1b14",
        image_source="Twemoji v16.0.1, jdecked fork (https://github.com/jdecked/twemoji)",
        image_license="CC-BY-4.0",
        attribution="Twemoji by X Corp. and contributors (CC-BY-4.0)",
    ),
}
SPRITE_SIZE = 64


def tarball_name(package: EmojiPackage) -> str:
    return f"{package.npm_name}-{package.version}.tgz"


def file_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def verify_sha1(path: Path, expected: str) -> None:
    """Raise `ValueError` when the file's sha1 differs from the npm registry's `shasum`."""
    actual = file_sha1(path)
    if actual != expected:
        raise ValueError(
            f"sha1 mismatch for {path}: expected {expected} (npm registry shasum), got {actual}. "
            "The file is corrupt or not the pinned release; delete it and run again to re-download."
        )


def download_package(package: EmojiPackage, download_dir: Path, npm: str = "npm") -> Path:
    """Fetch the package tarball with `npm pack` unless a copy with the right sha1 is already there."""
    download_dir.mkdir(parents=True, exist_ok=True)
    tarball = download_dir / tarball_name(package)
    if tarball.is_file():
        # An existing file that fails the check is an error, not a silent re-download: it may be someone's edit.
        verify_sha1(tarball, package.sha1)
        logger.info("using cached %s (sha1 ok)", tarball)
        return tarball
    command = [npm, "pack", f"{package.npm_name}@{package.version}", "--ignore-scripts", "--pack-destination", "."]
    logger.info("downloading %s@%s with: %s", package.npm_name, package.version, " ".join(command))
    try:
        subprocess.run(command, cwd=download_dir, check=True, stdout=subprocess.PIPE)
    except FileNotFoundError as error:
        raise RuntimeError(
            f"`{npm}` was not found. Install npm, or pass --source_dir with already-extracted packages."
        ) from error
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"`{' '.join(command)}` failed with exit status {error.returncode}") from error
    if not tarball.is_file():
        raise FileNotFoundError(f"`npm pack` finished but {tarball} does not exist")
    verify_sha1(tarball, package.sha1)
    return tarball


def _wanted_member(name: str, vendor: str) -> Optional[str]:
    """Path inside the package root for the members we keep (`emoji.json` and 64 px sprites), else None."""
    if name == "package/emoji.json":
        return "emoji.json"
    prefix = f"package/img/{vendor}/{SPRITE_SIZE}/"
    if name.startswith(prefix) and name.endswith(".png") and "/" not in name[len(prefix) :]:
        return name[len("package/") :]
    return None


def _check_member_path(name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise ValueError(f"refusing to extract unsafe path {name!r} from the tarball")


def extract_package(tarball: Path, package_root: Path, vendor: str, expected_sha1: Optional[str] = None) -> Path:
    """Extract `emoji.json` and `img/<vendor>/64/*.png` from an npm tarball into `package_root`.

    Every member name is checked (no absolute paths, no `..`), and only regular files are written, so a crafted
    tarball cannot write outside `package_root`. A marker file with the tarball's sha1 makes re-runs skip this.
    """
    sha1 = expected_sha1 or file_sha1(tarball)
    marker = package_root / f".extracted-{sha1}"
    if marker.is_file():
        return package_root
    if package_root.exists():
        shutil.rmtree(package_root)
    staging = package_root.with_name(package_root.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    num_images = 0
    with tarfile.open(tarball, mode="r:gz") as archive:
        for member in archive:
            _check_member_path(member.name)
            relative = _wanted_member(member.name, vendor)
            if relative is None:
                continue
            if not member.isfile():
                raise ValueError(f"refusing to extract {member.name!r}: not a regular file (type {member.type!r})")
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source, open(target, "wb") as destination:
                shutil.copyfileobj(source, destination)
            num_images += relative.endswith(".png")
    if not (staging / "emoji.json").is_file():
        raise FileNotFoundError(f"{tarball} has no package/emoji.json; is it an emoji-datasource package?")
    staging.rename(package_root)
    marker.write_text(f"{tarball.name}\n")
    logger.info("extracted emoji.json and %d sprites of %s into %s", num_images, vendor, package_root)
    return package_root


def find_package_root(source_dir: Path, vendor: str) -> Path:
    """The extracted package of one vendor: `<source_dir>/emoji-datasource-<vendor>[/package]`."""
    base = source_dir / PACKAGES[vendor].npm_name
    for candidate in (base, base / "package"):
        if (candidate / "emoji.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"emoji.json for vendor {vendor!r} not found: expected {base / 'emoji.json'} "
        f"(or {base / 'package' / 'emoji.json'}) with sprites under img/{vendor}/{SPRITE_SIZE}/"
    )
