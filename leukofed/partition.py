"""Simulated hospitals: split a dataset into per-hospital folders, keeping groups whole.

Schemes: ``iid`` (every hospital gets each class in the same proportion), ``dirichlet``
(label skew: per class, hospital shares drawn from Dir(alpha)), ``quantity`` (size skew:
hospital sizes drawn from Dir(alpha), class mix kept). Every image lands in exactly one
hospital, and a block of consecutive file numbers (a patient proxy) never spans two.

With simulated laboratories (leukofed.labs) each hospital folder also holds its
``acquisition.json``, and ``unseen-lab/acquisition.json`` describes a test-only laboratory.
"""

from __future__ import annotations

import json
import os
import string
from collections import defaultdict
from pathlib import Path

import numpy as np

from leukofed.data import ImageRecord, fingerprint
from leukofed.labels import CLASSES
from leukofed.labs import ACQUISITION_FILE, UNSEEN_LAB_DIR, Acquisition, write_acquisition
from leukofed.splits import grouped

SCHEMES = ("iid", "dirichlet", "quantity")
MANIFEST_NAME = "partition.json"


def hospital_ids(n: int) -> list[str]:
    """Short ids usable in queue names (hospital.a, hospital.b, ...)."""
    if n <= 26:
        return list(string.ascii_lowercase[:n])
    return [f"h{i + 1:03d}" for i in range(n)]


def _shares(scheme: str, n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    if scheme == "iid":
        return np.full(n, 1.0 / n)
    return rng.dirichlet(np.full(n, alpha))


def partition_records(
    records: list[ImageRecord],
    n_hospitals: int,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    max_tries: int = 100,
) -> dict[str, list[ImageRecord]]:
    """Assign whole groups to hospitals; redraws (seeded) until no hospital is empty."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {SCHEMES}")
    if n_hospitals < 1:
        raise ValueError("need at least one hospital")
    if alpha <= 0:
        raise ValueError("alpha must be positive")
    groups = list(grouped(records).values())
    if len(groups) < n_hospitals:
        raise ValueError(f"{len(groups)} groups cannot fill {n_hospitals} hospitals")
    by_class: dict[int, list[list[ImageRecord]]] = defaultdict(list)
    for members in groups:
        by_class[members[0].label].append(members)
    ids = hospital_ids(n_hospitals)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        assigned: dict[str, list[ImageRecord]] = {h: [] for h in ids}
        size_shares = _shares(scheme, n_hospitals, alpha, rng) if scheme == "quantity" else None
        for label in sorted(by_class):
            class_groups = list(by_class[label])
            rng.shuffle(class_groups)  # type: ignore[arg-type]
            shares = size_shares if size_shares is not None else _shares(
                scheme, n_hospitals, alpha, rng
            )
            total = sum(len(g) for g in class_groups)
            targets = shares * total
            counts = np.zeros(n_hospitals)
            # Greedy: each group goes to the hospital furthest below its target.
            for members in class_groups:
                h = int(np.argmax(targets - counts))
                counts[h] += len(members)
                assigned[ids[h]].extend(members)
        if all(assigned.values()):
            return {h: sorted(v, key=lambda r: str(r.path)) for h, v in assigned.items()}
    raise ValueError(
        f"could not give every one of {n_hospitals} hospitals data in {max_tries} draws; "
        "raise alpha or use fewer hospitals"
    )


def class_count_table(parts: dict[str, list[ImageRecord]]) -> str:
    """A fixed-width table of images per hospital and class."""
    header = f"{'hospital':<10}" + "".join(f"{c:>8}" for c in CLASSES) + f"{'total':>8}"
    lines = [header, "-" * len(header)]
    for h, recs in parts.items():
        counts = [sum(1 for r in recs if r.label == i) for i in range(len(CLASSES))]
        lines.append(f"{h:<10}" + "".join(f"{c:>8}" for c in counts) + f"{sum(counts):>8}")
    return "\n".join(lines)


def write_partition(
    parts: dict[str, list[ImageRecord]],
    out: str | Path,
    params: dict[str, object],
    force: bool = False,
    labs: dict[str, Acquisition] | None = None,
    unseen: Acquisition | None = None,
    links: str = "symbolic",
) -> Path:
    """Create OUT/<hospital>/<Class>/<file> as symbolic links plus OUT/partition.json.

    ``links="hard"`` makes hard links instead (same file system only): what a container
    needs, since a symbolic link into a folder it does not mount leads nowhere.

    With ``labs`` (one Acquisition per hospital) also OUT/<hospital>/acquisition.json, and
    with ``unseen`` OUT/unseen-lab/acquisition.json (no images: a test-only laboratory);
    both are recorded in the manifest. Images are never copied."""
    if labs is not None and set(labs) != set(parts):
        raise ValueError(f"labs for {sorted(labs)} but hospitals {sorted(parts)}")
    if links not in ("symbolic", "hard"):
        raise ValueError(f"links must be 'symbolic' or 'hard', not {links!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; pass force=True (--force) to replace it")
    if out.exists() and force:
        _remove_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, object] = {"version": 1, "classes": list(CLASSES), **params}
    hospitals: dict[str, object] = {}
    for h, recs in parts.items():
        for r in recs:
            link = out / h / r.class_name / r.path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if links == "hard":
                try:
                    os.link(r.path.resolve(), link)
                except OSError as exc:  # EXDEV: another file system; never fall back to a copy
                    raise ValueError(f"cannot hard-link {r.path} into {out}: {exc.strerror}; "
                                     "choose an OUT on the images' file system") from exc
            else:
                os.symlink(r.path.resolve(), link)
        entry: dict[str, object] = {
            "count": len(recs),
            "class_counts": {
                c: sum(1 for r in recs if r.label == i) for i, c in enumerate(CLASSES)
            },
            "fingerprint": fingerprint(recs),
            "groups": sorted({r.group for r in recs}),
        }
        if labs is not None:
            write_acquisition(out / h / ACQUISITION_FILE, labs[h])
            entry["acquisition"] = labs[h].to_dict()
        hospitals[h] = entry
    manifest["hospitals"] = hospitals
    if unseen is not None:
        write_acquisition(out / UNSEEN_LAB_DIR / ACQUISITION_FILE, unseen)
        manifest["unseen_lab"] = {"path": f"{UNSEEN_LAB_DIR}/{ACQUISITION_FILE}",
                                  "acquisition": unseen.to_dict()}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return out / MANIFEST_NAME


def _remove_previous(out: Path) -> None:
    """Remove only what an earlier partition wrote: links (symbolic, or hard: a file with
    another name elsewhere), their folders, the manifest and the laboratories' acquisition
    files."""
    for path in sorted(out.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        ours = path.name == MANIFEST_NAME or (path.name == ACQUISITION_FILE
                                              and path.parent.parent == out)
        hard_link = path.is_file() and not path.is_symlink() and path.stat().st_nlink > 1
        if path.is_symlink() or ours or hard_link:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
