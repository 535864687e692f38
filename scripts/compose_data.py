"""The image folders the container demo mounts: OUT/hospitals/<id>/<Class>/ for each hospital
and OUT/server/test/<Class>/ for the aggregator's held-out test split.

    python scripts/compose_data.py OUT --data ../shared/data/all-pbs --hospitals 2
    python scripts/compose_data.py OUT --synthetic --hospitals 2 --per-class 12

Real images are split by blocks of file numbers (the test blocks stay at the aggregator) and
partitioned with label skew, as in `make demo`, but with hard links: a container sees only the
folder it mounts, so a symbolic link into the dataset would lead nowhere. Nothing is copied;
OUT must be on the dataset's file system. Without real images, --synthetic writes small
coloured images (for trying the stack, never evidence about a model).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leukofed.partition import hospital_ids, partition_records, write_partition  # noqa: E402


def real(data: Path, out: Path, hospitals: int, seed: int) -> None:
    from leukofed.data import scan_dataset
    from leukofed.splits import group_split

    split = group_split(scan_dataset(data).records, 0.15, 0.15, seed)
    parts = partition_records(split["train"] + split["val"], hospitals, "dirichlet", 0.5, seed)
    params = {"source": str(data.resolve()), "scheme": "dirichlet", "alpha": 0.5, "seed": seed}
    write_partition(parts, out / "hospitals", params, force=True, links="hard")
    write_partition({"test": split["test"]}, out / "server", params, force=True, links="hard")


def synthetic(out: Path, hospitals: int, per_class: int) -> None:
    from leukofed.synthetic import write_synthetic_dataset

    for i, h in enumerate(hospital_ids(hospitals)):
        write_synthetic_dataset(out / "hospitals" / h, per_class, seed_offset=10_000 * (i + 1))
    write_synthetic_dataset(out / "server" / "test", max(4, per_class // 2), seed_offset=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--hospitals", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    if args.synthetic:
        synthetic(args.out, args.hospitals, args.per_class)
    elif args.data and args.data.is_dir():
        real(args.data, args.out, args.hospitals, args.seed)
    else:
        parser.error(f"no dataset at {args.data}; pass --data DIR or --synthetic")
    # The containers run as uid 10001 and mount these read-only: everything world-readable
    # (a hard link shares its mode with the dataset's file, so only ever add read bits).
    for path in [args.out, *args.out.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    for h in sorted(p.name for p in (args.out / "hospitals").iterdir() if p.is_dir()):
        n = sum(1 for _ in (args.out / "hospitals" / h).rglob("*.*"))
        print(f"hospital {h}: {n} images in {args.out / 'hospitals' / h}")
    print(f"server test split: {sum(1 for _ in (args.out / 'server/test').rglob('*.*'))} images")


if __name__ == "__main__":
    main()
