"""The class list every model carries, and the mapping from public folder names to it."""

from __future__ import annotations

import re

# Canonical order. It travels with every saved model and ONNX file; serving never
# infers it from a folder listing.
CLASSES: tuple[str, ...] = ("Benign", "Early", "Pre", "Pro")
BENIGN_INDEX = 0

# Both public naming variants, compared case-insensitively after stripping a
# leading "[Malignant]" tag: "Early" and "[Malignant] early Pre-B" are the same class.
_ALIASES: dict[str, str] = {
    "benign": "Benign",
    "early": "Early",
    "early pre-b": "Early",
    "pre": "Pre",
    "pre-b": "Pre",
    "pro": "Pro",
    "pro-b": "Pro",
}


def canonical_class(folder_name: str) -> str | None:
    """Return the canonical class of a folder name, or None when it is not a class folder."""
    name = folder_name.strip().lower()
    name = re.sub(r"^\[?malignant\]?\s*", "", name)
    name = re.sub(r"\s+", " ", name).strip()
    return _ALIASES.get(name)
