"""Registry helpers for federated runs: one version per (run, round), found again after a
restart, and promotion to champion by a person (or the demo standing in for one)."""

from __future__ import annotations

import getpass
import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from registry.store import CHAMPION_ALIAS, DEFAULT_MODEL_NAME, log_and_register, set_alias

log = logging.getLogger(__name__)


def _versions(model_name: str, filter_extra: str = "") -> list[Any]:
    query = f"name='{model_name}'" + (f" and {filter_extra}" if filter_extra else "")
    try:
        return list(MlflowClient().search_model_versions(query, max_results=10_000))
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return []
        raise


def find_versions(run_id: str, model_name: str = DEFAULT_MODEL_NAME) -> dict[int, str]:
    """{round: version} of every version registered for federated run ``run_id``."""
    out: dict[int, str] = {}
    for mv in _versions(model_name, f"tags.run_id='{run_id}'"):
        if mv.tags.get("run_id") == run_id and str(mv.tags.get("round", "")).isdigit():
            out[int(mv.tags["round"])] = str(mv.version)
    return out


def find_version(run_id: str, server_round: int,
                 model_name: str = DEFAULT_MODEL_NAME) -> str | None:
    return find_versions(run_id, model_name).get(int(server_round))


def register_round(model: Any, metadata: dict[str, Any], run_id: str, server_round: int,
                   tags: dict[str, Any], model_name: str = DEFAULT_MODEL_NAME,
                   move_candidate: bool = True) -> str:
    """Register a round's global model once: if (run_id, round) already has a version (the
    aggregator crashed after registering), that version is returned and nothing is added."""
    existing = find_version(run_id, server_round, model_name)
    if existing is not None:
        log.info("run %s round %s already registered as version %s", run_id, server_round,
                 existing)
        return existing
    return log_and_register(model, metadata, model_name,
                            tags={**tags, "run_id": run_id, "round": int(server_round)},
                            move_candidate=move_candidate)


def best_version(metric: str = "val_macro_f1", run_id: str | None = None,
                 model_name: str = DEFAULT_MODEL_NAME) -> tuple[str, float] | None:
    """The version with the highest numeric tag ``metric`` (optionally within one run)."""
    best: tuple[str, float] | None = None
    for mv in _versions(model_name, f"tags.run_id='{run_id}'" if run_id else ""):
        try:
            value = float(mv.tags[metric])
        except (KeyError, ValueError):
            continue
        if value == value and (best is None or value > best[1]):  # skip NaN
            best = (str(mv.version), value)
    return best


HISTORY_TAG = "leukofed.alias_history"  # on the registered model: the last moves, JSON
HISTORY_LENGTH = 30


def alias_history(model_name: str = DEFAULT_MODEL_NAME) -> list[dict[str, Any]]:
    """The alias moves ``promote`` recorded, oldest first (who, when, from, to, ONNX digest)."""
    try:
        raw = MlflowClient().get_registered_model(model_name).tags.get(HISTORY_TAG, "[]")
        history = json.loads(raw)
    except (MlflowException, ValueError):
        return []
    return history if isinstance(history, list) else []


def promote(version: str | int, alias: str = CHAMPION_ALIAS,
            model_name: str = DEFAULT_MODEL_NAME) -> dict[str, str]:
    """Point ``alias`` (champion by default) at ``version``; returns its lineage tags.

    The move is appended to the registered model's ``leukofed.alias_history`` tag with the
    MLflow user and the version's signed ONNX digest, so an auditor can see who moved the
    champion and to which file (a move made elsewhere, e.g. the MLflow UI, is not in it:
    compare the history's last entry with the alias)."""
    from registry.publish import TAG_SHA

    client = MlflowClient()
    mv = client.get_model_version(model_name, str(version))  # raises if missing
    try:
        before = str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        before = None
    set_alias(version, alias, model_name)
    entry = {"alias": alias, "version": str(version), "from": before,
             "by": os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser(),
             "at": datetime.now(UTC).isoformat(timespec="seconds"),
             "onnx_sha256": mv.tags.get(TAG_SHA)}
    history = [*alias_history(model_name), entry][-HISTORY_LENGTH:]
    client.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history))
    return dict(mv.tags)
