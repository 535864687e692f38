"""Patient-safe train/validation/test splits: stratified by class, whole groups only."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from leukofed.data import Dataset, ImageRecord, fingerprint
from leukofed.labels import CLASSES

SPLIT_NAMES = ("train", "val", "test")
MANIFEST_VERSION = 1


@dataclass
class Split:
    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]

    def __getitem__(self, name: str) -> list[ImageRecord]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def grouped(records: list[ImageRecord]) -> dict[str, list[ImageRecord]]:
    groups: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        groups[r.group].append(r)
    return dict(sorted(groups.items()))


def group_split(
    records: list[ImageRecord],
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Split:
    """Assign whole groups to splits, per class, so each split gets its share of every class.

    Groups are shuffled with ``seed``; test is filled first, then validation, the rest train
    (a class with very few groups always keeps its last group for training).
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1:
        raise ValueError("fractions must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction + test_fraction must be below 1")
    out: dict[str, list[ImageRecord]] = {name: [] for name in SPLIT_NAMES}
    by_class: dict[int, list[list[ImageRecord]]] = defaultdict(list)
    for members in grouped(records).values():
        by_class[members[0].label].append(members)
    for label in sorted(by_class):
        groups = by_class[label]
        random.Random(seed * 1000 + label).shuffle(groups)
        total = sum(len(g) for g in groups)
        targets = {"test": test_fraction * total, "val": val_fraction * total}
        filled = {"test": 0, "val": 0}
        train_has_class = False
        for i, members in enumerate(groups):
            name = next((n for n in ("test", "val") if filled[n] < targets[n]), "train")
            if i == len(groups) - 1 and not train_has_class:
                name = "train"  # tiny data: never leave a class out of training
            train_has_class |= name == "train"
            if name != "train":
                filled[name] += len(members)
            out[name].extend(members)
    return Split(**{k: sorted(v, key=lambda r: str(r.path)) for k, v in out.items()})


def write_manifest(
    path: str | Path, dataset: Dataset, split: Split, seed: int, block_size: int
) -> None:
    def entry(r: ImageRecord) -> dict[str, object]:
        return {
            "path": str(r.path.relative_to(dataset.root)),
            "label": CLASSES[r.label],
            "sha256": r.sha256,
            "group": r.group,
        }

    doc = {
        "version": MANIFEST_VERSION,
        "root": str(dataset.root.resolve()),
        "classes": list(CLASSES),
        "seed": seed,
        "block_size": block_size,
        "dataset_fingerprint": dataset.fingerprint,
        "fingerprints": {n: fingerprint(split[n]) for n in SPLIT_NAMES},
        "counts": {n: len(split[n]) for n in SPLIT_NAMES},
        "splits": {n: [entry(r) for r in split[n]] for n in SPLIT_NAMES},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1))


def read_manifest(path: str | Path, root: str | Path | None = None) -> Split:
    """Load a split manifest; ``root`` overrides the dataset folder recorded in it."""
    doc = json.loads(Path(path).read_text())
    if doc.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: unsupported split manifest version {doc.get('version')}")
    base = Path(root or doc["root"])

    def record(e: dict[str, str]) -> ImageRecord:
        return ImageRecord(base / e["path"], CLASSES.index(e["label"]), e["sha256"], e["group"])

    return Split(**{n: [record(e) for e in doc["splits"][n]] for n in SPLIT_NAMES})
