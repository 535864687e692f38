"""Reading a dataset folder: one sub-folder per class, bad files reported, duplicates dropped.

A *group* is a block of consecutive file numbers within one class folder (neighbouring
numbers often show the same patient). Splits and hospital partitions keep groups whole.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from leukofed.labels import CLASSES, canonical_class
from leukofed.preprocessing import ImageDecodeError, decode_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
DEFAULT_BLOCK_SIZE = 16
_NUMBER = re.compile(r"(\d+)(?!.*\d)")


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    label: int
    sha256: str
    group: str

    @property
    def class_name(self) -> str:
        return CLASSES[self.label]


@dataclass(frozen=True)
class BadFile:
    path: Path
    reason: str


@dataclass
class Dataset:
    root: Path
    records: list[ImageRecord]
    bad_files: list[BadFile] = field(default_factory=list)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (dropped, kept)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.records)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(r.label for r in self.records)
        return {name: counts.get(i, 0) for i, name in enumerate(CLASSES)}


def fingerprint(records: list[ImageRecord]) -> str:
    """Hash over sorted (content hash, label) pairs: which data a model saw, path-independent."""
    lines = sorted(f"{r.sha256}:{CLASSES[r.label]}" for r in records)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def group_of(path: Path, class_name: str, block_size: int, sha256: str) -> str:
    """Group key: class, file-name stem without its number, and the number's block."""
    match = _NUMBER.search(path.stem)
    if match is None:
        return f"{class_name}/{path.stem}#{sha256[:12]}"  # a file without a number: its own group
    prefix = path.stem[: match.start()]
    return f"{class_name}/{prefix}#{int(match.group(1)) // block_size}"


def class_folders(root: Path) -> dict[int, list[Path]]:
    """Map each class index to its sub-folders (either naming variant); unknown folders ignored."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    folders: dict[int, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        name = canonical_class(sub.name)
        if name is None:
            log.warning("ignoring folder %s: not one of the classes %s", sub, CLASSES)
            continue
        folders.setdefault(CLASSES.index(name), []).append(sub)
    if not folders:
        raise ValueError(f"no class folders in {root}; expected sub-folders named {CLASSES}")
    return folders


def scan_dataset(
    root: str | Path, block_size: int = DEFAULT_BLOCK_SIZE, verify: bool = True
) -> Dataset:
    """Read a class-per-folder dataset. Bad files are reported and skipped, never fatal.

    ``verify`` fully decodes each image, which catches truncated files that a header check
    would let through.
    """
    root = Path(root)
    records: list[ImageRecord] = []
    bad: list[BadFile] = []
    duplicates: list[tuple[Path, Path]] = []
    seen: dict[str, ImageRecord] = {}
    for label, folders in sorted(class_folders(root).items()):
        for folder in folders:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                if path.name.startswith("."):
                    continue
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    bad.append(BadFile(path, f"not an image file type ({path.suffix or 'none'})"))
                    continue
                try:
                    data = path.read_bytes()
                    if verify:
                        decode_image(data)
                    elif not data:
                        raise ImageDecodeError("empty file")
                except (OSError, ImageDecodeError) as exc:
                    bad.append(BadFile(path, str(exc)))
                    continue
                digest = hashlib.sha256(data).hexdigest()
                if digest in seen:
                    kept = seen[digest]
                    duplicates.append((path, kept.path))
                    if kept.label != label:
                        log.warning("%s duplicates %s with another label", path, kept.path)
                    continue
                rec = ImageRecord(
                    path, label, digest, group_of(path, CLASSES[label], block_size, digest)
                )
                seen[digest] = rec
                records.append(rec)
    for b in bad:
        log.warning("skipped %s: %s", b.path, b.reason)
    return Dataset(root, records, bad, duplicates)
