"""The local stack's keys and secrets (scripts/stack.sh: `make up`, `make demo`, `leukofed
simulate`), made once, so that it runs with signatures checked as compose does.

    python -m leukofed.local_keys DIR a b c

makes in DIR (0700, narrowed when it existed wider), keeping whatever is already there:

* ``aggregator.key``/``.pub``: signs every task and every registered version's ONNX file;
  the hospitals and the inference service check with ``aggregator.pub``;
* ``<id>.key``/``.pub`` per hospital, and ``hospitals/<id>.pub`` (the hospitals' public
  keys only: what the aggregator and each hospital's peers read);
* ``admin-token`` (the aggregator's API; ``LEUKOFED_AGGREGATOR_ADMIN_TOKEN_FILE``) and
  ``inference-api-key`` (``LEUKOFED_INFERENCE_API_KEY``).

The key pairs are leukofed.signing's (what ``make keys`` writes, into the same ``.run/keys``
by default, so keys made that way are used). Every private file is 0600 from the moment it
exists (``write_private``); one an earlier run or a copy left wider is narrowed. Running it
again changes nothing but what is missing, e.g. the key of a hospital added since.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
from pathlib import Path

from leukofed.signing import AGGREGATOR, generate_keypair, private_dir, write_private
from leukofed.transport import check_hospital_id

ADMIN_TOKEN = "admin-token"
INFERENCE_API_KEY = "inference-api-key"
HOSPITAL_KEYS = "hospitals"


def ensure(folder: Path, hospitals: list[str]) -> list[str]:
    """Make what is missing in ``folder``; returns the names of the files it wrote."""
    folder = private_dir(Path(folder))  # first: nothing below is ever reachable by others
    public = private_dir(folder / HOSPITAL_KEYS)
    made: list[str] = []
    for name in [AGGREGATOR, *(check_hospital_id(h) for h in hospitals)]:
        if not (folder / f"{name}.key").exists():
            generate_keypair(folder, name, overwrite=True)  # a lone .pub is replaced
            made += [f"{name}.key", f"{name}.pub"]
    for h in hospitals:
        if not (public / f"{h}.pub").is_file() or \
                (public / f"{h}.pub").read_bytes() != (folder / f"{h}.pub").read_bytes():
            shutil.copyfile(folder / f"{h}.pub", public / f"{h}.pub")
    for name in (ADMIN_TOKEN, INFERENCE_API_KEY):
        if not (folder / name).is_file() or not (folder / name).read_text().strip():
            write_private(folder / name, secrets.token_urlsafe(32).encode())
            made.append(name)
    for path in folder.iterdir():
        if path.is_file() and (path.suffix == ".key" or path.name in (ADMIN_TOKEN,
                                                                      INFERENCE_API_KEY)):
            os.chmod(path, 0o600)
    return made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m leukofed.local_keys",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("hospitals", nargs="*", help="hospital ids")
    args = parser.parse_args(argv)
    made = ensure(args.folder, args.hospitals)
    print(f"  keys in {args.folder}: " + (f"made {', '.join(made)}" if made else "reused"))


if __name__ == "__main__":
    main()
