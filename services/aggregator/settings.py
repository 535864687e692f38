"""Aggregator settings, from ``LEUKOFED_AGGREGATOR_*`` environment variables or ``.env``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from leukofed.transport import DEFAULT_BROKER_URL, DEFAULT_VISIBILITY_TIMEOUT_S
from registry.store import DEFAULT_MODEL_NAME


class AggregatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEUKOFED_AGGREGATOR_", env_file=".env",
                                      extra="ignore")

    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str | None = Field(None, description="defaults to broker_url")
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S
    mlflow_tracking_uri: str | None = Field(
        None, description="default: $MLFLOW_TRACKING_URI, else http://127.0.0.1:5000")
    mlflow_experiment: str = "leukofed-federated"
    model_name: str = DEFAULT_MODEL_NAME
    state_dir: Path = Field(Path(".run/aggregator"), description="run records and checkpoints")
    cache_dir: Path = Path(".cache")
    server_test_dir: Path | None = Field(
        None, description="default held-out server-side test set (class folders)")
    server_test_manifest: Path | None = Field(
        None, description="default split manifest whose test split is evaluated server-side")
    poll_interval_s: float = 0.25
    ping_timeout_s: float = 1.0
    resume_on_start: bool = True
    host: str = "127.0.0.1"
    port: int = 8001
    tracking: bool = Field(True, description="log to MLflow and register models")
    # Signing (leukofed.signing), off by default. signing_key_file: the aggregator's Ed25519
    # key; every task is signed with it. hospital_keys_dir: one <hospital>.pub per hospital;
    # when set, every update must carry a valid signature of the hospital that was asked.
    # Admin token for /v1/* (services/aggregator/auth.py); unset = open API. Prefer the file.
    admin_token: SecretStr | None = Field(None, description="bearer token for the API")
    admin_token_file: Path | None = Field(None, description="file holding the admin token")
    signing_key_file: Path | None = Field(None, description="aggregator.key: sign tasks")
    hospital_keys_dir: Path | None = Field(
        None, description="folder of <hospital>.pub; when set, unsigned updates are rejected")

    @property
    def tracking_uri(self) -> str:
        import os

        return (self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or "http://127.0.0.1:5000")
