"""Model cards for the release-gate tests (leukofed.gate): one that passes every floor, ways
to change one number of it, and a card logged where `leukofed promote` reads it (a run
artifact named by the version's ``model_card`` tag)."""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leukofed.card import build_card

# Rows true class, columns predicted, order [Benign, Early, Pre, Pro]: every recall >= 0.95,
# malignant sensitivity 299/300, specificity 95/96.
GOOD_CONFUSION = [[95, 1, 0, 0], [1, 97, 2, 0], [0, 1, 98, 1], [0, 0, 1, 99]]
# The demo champion: Benign recall and specificity 0.72, accuracy 0.87.
WEAK_CONFUSION = [[69, 20, 7, 0], [2, 86, 12, 0], [1, 4, 93, 2], [0, 1, 2, 97]]
GOOD_AUDIT = {"audit_original_macro_f1": "0.98", "audit_recoloured_macro_f1": "0.97",
              "audit_worst_macro_f1": "0.97", "audit_follow_colour": "0.02"}


def gate_card(confusion: list[list[int]] | None = None, achieved: float = 0.95,
              target: float = 0.95, refer_share: float = 0.04,
              audit: dict[str, str] | None = None, name: str = "gate-test",
              version: str = "1") -> dict[str, Any]:
    """A model card as the aggregator builds one (leukofed.card.build_card); ``audit={}``:
    without a shortcut audit."""
    return build_card({
        "model_name": name, "version": version,
        "test": {"source": "the aggregator's held-out test split",
                 "confusion": confusion or GOOD_CONFUSION},
        "calibration": {"temperature": 1.3, "ece_before": 0.05, "ece_after": 0.02,
                        "calibration": {"coverage": target}},
        "conformal_test": {"coverage": achieved, "refer_share": refer_share,
                           "accuracy_answered": 0.99},
        "audit": {k: float(v) for k, v in (GOOD_AUDIT if audit is None else audit).items()},
    }, n_boot=100)


def with_metric(card: dict[str, Any], key: str, value: float | None) -> dict[str, Any]:
    """A copy of ``card`` whose test metric ``key`` (e.g. ``recall_Pro``) is ``value``."""
    out = copy.deepcopy(card)
    out["metrics"]["values"][key]["value"] = value
    return out


def log_card(client: Any, card: dict[str, Any], folder: str) -> str:
    """Log ``card`` as ``folder/card.json`` of a new run; returns the ``model_card`` tag."""
    found = client.get_experiment_by_name("gate-cards")
    exp = found.experiment_id if found else client.create_experiment("gate-cards")
    run = client.create_run(exp).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "card.json"
        path.write_text(json.dumps(card))
        client.log_artifact(run, str(path), folder)
    client.set_terminated(run)
    return f"{run}:{folder}/card.json"


@contextlib.contextmanager
def sqlite_registry(tmp_path: Path, monkeypatch: Any, name: str) -> Iterator[tuple[Any, Any]]:
    """A real MLflow registry in a SQLite file, named by MLFLOW_TRACKING_URI for the CLI:
    yields (client, add), ``add(tags, card=...)`` registering a version whose model card is
    ``card`` (a card that passes the gate unless told; None: no card) and returning it."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # restored after the test
    for var in ("MIN_MACRO_F1", "MIN_SENSITIVITY", "MIN_SPECIFICITY", "MIN_CLASS_RECALL",
                "MAX_COVERAGE_SHORTFALL", "MAX_REFER_SHARE", "MAX_FOLLOW_COLOUR"):
        monkeypatch.delenv(f"LEUKOFED_GATE_{var}", raising=False)
    monkeypatch.delenv("LEUKOFED_MAX_FOLLOW_COLOUR", raising=False)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(name)

    def add(tags: dict[str, str], run: str = "r1", card: dict[str, Any] | None | str = "good"
            ) -> str:
        source = tmp_path / "model"
        source.mkdir(exist_ok=True)
        mv = client.create_model_version(name, str(source), tags={**tags, "run_id": run})
        if card is not None:
            card = gate_card(audit=_audit_of(tags)) if card == "good" else card
            client.set_model_version_tag(name, mv.version, "model_card", log_card(
                client, card, f"cards/version-{mv.version}"))
        return str(mv.version)

    try:
        yield client, add
    finally:
        mlflow.set_tracking_uri("")
        mlflow.set_registry_uri("")


def _audit_of(tags: dict[str, str]) -> dict[str, str]:
    """The card's audit is the version's (the aggregator writes both from one round)."""
    return {k: v for k, v in tags.items() if k.startswith("audit_")}
