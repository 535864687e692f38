"""Registry helpers for federated runs: one version per (run, round), found again after a
restart. Promotion and every other read or write of the services: registry.client."""

from __future__ import annotations

import logging
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from registry.model_versions import DEFAULT_MODEL_NAME, log_and_register

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
