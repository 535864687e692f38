"""The only door to MLflow for the services: one explicit tracking URI, never MLflow's
process-wide one, and MLflow's errors turned into ``RegistryError`` with one readable line.

The aggregator writes through it (a federated run's MLflow run, its metrics and plots, a
registered version per round, its signed ONNX file, the ``candidate`` alias); the inference
service and ``leukofed promote`` read through it (a version or an alias with its tags, an
artifact), and ``promote`` moves an alias and records the move. Registering a Keras model
uses MLflow's fluent API, which only knows a global URI: that call is made here, with this
registry's URI set just for it.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from registry.model_versions import CANDIDATE_ALIAS, CHAMPION_ALIAS, DEFAULT_MODEL_NAME

log = logging.getLogger(__name__)

HISTORY_TAG = "leukofed.alias_history"  # on the registered model: the last moves, JSON
HISTORY_LENGTH = 30
# A registered model's tag is a VARCHAR(5000) in MLflow's SQL stores (PostgreSQL enforces it):
# the oldest moves are dropped until the history fits.
HISTORY_MAX_CHARS = 5000
OVERRIDE_TAG = "leukofed.gate_override"  # on a version promoted past the release gate
REASON_LENGTH = 500  # an override's reason, as recorded
_FLUENT = threading.Lock()  # MLflow's fluent API is process-wide: one registration at a time


class RegistryError(RuntimeError):
    """MLflow refused or failed; ``code`` is MLflow's error code (e.g. PERMISSION_DENIED)."""

    def __init__(self, message: str, code: str = "", missing: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.missing = missing  # the model, version or alias does not exist


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]


@contextlib.contextmanager
def _mlflow_errors(what: str) -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        lines = str(getattr(exc, "message", exc)).strip().splitlines()
        missing = "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc)
        raise RegistryError(f"{what}: {exc.error_code}: {lines[0][:300] if lines else ''}",
                            str(exc.error_code), missing) from exc


class Registry:
    def __init__(self, tracking_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.client = MlflowClient(tracking_uri, tracking_uri)

    # ------------------------------------------------------------ versions (read)

    def version(self, version: str | int) -> VersionInfo:
        with _mlflow_errors(f"version {version} of {self.model_name}"):
            mv = self.client.get_model_version(self.model_name, str(version))
        return VersionInfo(self.model_name, str(mv.version), mv.run_id, dict(mv.tags or {}))

    def alias(self, alias: str) -> VersionInfo | None:
        """The version ``alias`` names, or None when the model or the alias does not exist."""
        try:
            with _mlflow_errors(f"alias {alias} of {self.model_name}"):
                mv = self.client.get_model_version_by_alias(self.model_name, alias)
        except RegistryError as exc:
            if exc.missing:
                return None
            raise
        return VersionInfo(self.model_name, str(mv.version), mv.run_id, dict(mv.tags or {}))

    def download(self, artifact_uri: str, dst: Path) -> Path:
        import mlflow.artifacts

        with _mlflow_errors(f"download {artifact_uri}"):
            return Path(mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=self.tracking_uri))

    def run_artifact_text(self, run_id: str, path: str) -> str:
        with tempfile.TemporaryDirectory() as tmp, _mlflow_errors(f"artifact {path}"):
            local = self.client.download_artifacts(run_id, path, tmp)
            return Path(local).read_text()

    def _versions(self, run_id: str | None = None) -> list[Any]:
        query = f"name='{self.model_name}'" + (f" and tags.run_id='{run_id}'" if run_id else "")
        try:
            with _mlflow_errors("search versions"):
                return list(self.client.search_model_versions(query, max_results=10_000))
        except RegistryError as exc:
            if exc.missing:
                return []
            raise

    def find_versions(self, run_id: str) -> dict[int, str]:
        """{round: version} of every version registered for federated run ``run_id``."""
        return {int(mv.tags["round"]): str(mv.version) for mv in self._versions(run_id)
                if mv.tags.get("run_id") == run_id and str(mv.tags.get("round", "")).isdigit()}

    def ranked_versions(self, metric: str, run_id: str | None = None) -> list[VersionInfo]:
        """Every version with a numeric tag ``metric`` (optionally within one run), highest
        first; ties keep the newer version first. Versions without it (or NaN) are left out."""
        found: list[tuple[float, int, VersionInfo]] = []
        for mv in self._versions(run_id):
            try:
                value = float(mv.tags[metric])
            except (KeyError, ValueError):
                continue
            if value == value:  # skip NaN
                found.append((value, int(mv.version), VersionInfo(
                    self.model_name, str(mv.version), mv.run_id, dict(mv.tags or {}))))
        return [info for _, _, info in sorted(found, key=lambda f: (-f[0], -f[1]))]

    # ------------------------------------------------------------ aliases (write)

    def set_alias(self, version: str | int, alias: str = CANDIDATE_ALIAS) -> None:
        with _mlflow_errors(f"move @{alias}"):
            self.client.set_registered_model_alias(self.model_name, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        with _mlflow_errors(f"remove @{alias}"):
            self.client.delete_registered_model_alias(self.model_name, alias)

    def alias_history(self) -> list[dict[str, Any]]:
        """The alias moves ``promote`` recorded, oldest first (who, when, from, to, digest,
        and what the release gate said)."""
        from mlflow.exceptions import MlflowException

        try:
            history = json.loads(self.client.get_registered_model(self.model_name)
                                 .tags.get(HISTORY_TAG, "[]"))
        except (MlflowException, ValueError):
            return []
        return history if isinstance(history, list) else []

    def promote(self, version: str | int, alias: str = CHAMPION_ALIAS,
                gate: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Point ``alias`` at ``version``; returns its tags. The move is appended to the
        registered model's ``leukofed.alias_history`` tag with the MLflow user and the
        version's signed ONNX digest (a move made elsewhere, e.g. the MLflow UI, is not:
        compare the history's last entry with the alias).

        ``gate`` is what the release gate said (``leukofed.gate``), recorded in the entry:
        ``{"gate": "passed"}``, or for a forced move ``{"gate": "overridden", "reason": ...,
        "failed": [...]}``; an override is also written on the version itself (tag
        ``leukofed.gate_override``: who, when, alias, reason, floors failed), so it stays
        readable after the history has rolled over."""
        from registry.publish import TAG_SHA

        info = self.version(version)  # raises if missing
        before = self.alias(alias)
        self.set_alias(version, alias)
        entry: dict[str, Any] = {
            "alias": alias, "version": str(version),
            "from": before.version if before else None,
            "by": os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser(),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "onnx_sha256": info.tags.get(TAG_SHA), **dict(gate or {})}
        if isinstance(entry.get("reason"), str):
            entry["reason"] = entry["reason"][:REASON_LENGTH]
        history = [*self.alias_history(), entry][-HISTORY_LENGTH:]
        while len(history) > 1 and len(json.dumps(history)) > HISTORY_MAX_CHARS:
            history = history[1:]  # oldest first out: the tag must fit the store's column
        with _mlflow_errors("record the move"):
            self.client.set_registered_model_tag(self.model_name, HISTORY_TAG,
                                                 json.dumps(history))
            if entry.get("gate") == "overridden":
                self.client.set_model_version_tag(self.model_name, str(version),
                                                  OVERRIDE_TAG, json.dumps(entry))
        return info.tags

    # ------------------------------------------------------------ runs (write)

    def open_run(self, experiment: str, run_name: str, tags: Mapping[str, str],
                 params: Mapping[str, str], run_id: str | None = None) -> tuple[str, str]:
        """(run id, experiment id): ``run_id`` resumed (marked running again), or a new run
        with ``tags`` and ``params`` in ``experiment`` (created when missing)."""
        with _mlflow_errors("open the MLflow run"):
            if run_id:
                run = self.client.get_run(run_id)
                if run.info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
                return run_id, run.info.experiment_id
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags))
            for key, value in params.items():
                self.client.log_param(run.info.run_id, key, value)
            return run.info.run_id, exp_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        with _mlflow_errors("log metrics"):
            for i in range(0, len(batch), 500):
                self.client.log_batch(run_id, metrics=batch[i:i + 500])

    def log_artifact(self, run_id: str, path: Path, folder: str | None = None) -> None:
        with _mlflow_errors(f"log {Path(path).name}"):
            self.client.log_artifact(run_id, str(path), folder)

    def finish_run(self, run_id: str, status: str, reason: str | None = None) -> None:
        with _mlflow_errors("finish the MLflow run"):
            if reason:
                self.client.set_tag(run_id, "leukofed.reason", reason[:4000])
            self.client.set_terminated(run_id, status)

    # ------------------------------------------------------------ versions (write)

    def register_round(self, model: Any, metadata: dict[str, Any], mlflow_run_id: str,
                       federated_run: str, server_round: int, tags: dict[str, Any]) -> str:
        """Log the Keras ``model`` into ``mlflow_run_id`` and register it once per
        (federated run, round): after a crash between the two, the existing version is
        returned. ``candidate`` is not moved (the caller does, once the ONNX is published)."""
        import mlflow

        from registry.model_versions import log_and_register

        existing = self.find_versions(federated_run).get(int(server_round))
        if existing is not None:  # the aggregator crashed after registering: nothing added
            log.info("run %s round %s already registered as version %s", federated_run,
                     server_round, existing)
            return existing
        with _FLUENT, _mlflow_errors("register the round's model"):
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            run = self.client.get_run(mlflow_run_id)
            # start_run(run_id) refuses a run outside the process's active experiment.
            mlflow.set_experiment(experiment_id=run.info.experiment_id)
            with mlflow.start_run(run_id=mlflow_run_id):
                version = log_and_register(
                    model, metadata, self.model_name, move_candidate=False,
                    tags={**tags, "run_id": federated_run, "round": int(server_round)})
            # Leaving start_run() marks the run FINISHED; the federated run is still going.
            self.client.update_run(mlflow_run_id, status="RUNNING")
        return version

    def publish_onnx(self, version: str, run_id: str, model: Any, metadata: dict[str, Any],
                     parity_images: Any, signing_key: Any | None, run: str, round: int
                     ) -> None:
        from registry.publish import publish_onnx

        with _mlflow_errors(f"publish version {version}"):
            publish_onnx(self.client, self.model_name, version, run_id, model, metadata,
                         parity_images, signing_key, run, round)

    def set_version_tag(self, version: str, key: str, value: str) -> None:
        with _mlflow_errors(f"tag version {version}"):
            self.client.set_model_version_tag(self.model_name, version, key, value)

    def delete_version_tag(self, version: str, key: str) -> None:
        with _mlflow_errors(f"untag version {version}"):
            self.client.delete_model_version_tag(self.model_name, version, key)
