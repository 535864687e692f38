"""Aggregator settings, from ``LEUKOFED_AGGREGATOR_*`` environment variables or ``.env``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from leukofed.transport import (
    DEFAULT_BROKER_URL,
    DEFAULT_VISIBILITY_TIMEOUT_S,
    check_hospital_id,
    check_tls,
    tls_options,
)
from registry.model_versions import DEFAULT_MODEL_NAME


class AggregatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEUKOFED_AGGREGATOR_", env_file=".env",
                                      extra="ignore")

    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str | None = Field(None, description="defaults to broker_url")
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S
    # TLS to the broker (rediss:// URLs; infra/security/make_certs.py).
    tls_ca_file: Path | None = Field(None, description="ca.crt: verify the broker (rediss://)")
    tls_cert_file: Path | None = Field(None, description="aggregator.crt: client certificate")
    tls_key_file: Path | None = Field(None, description="aggregator.key: its private key")
    # Per-hospital isolation (infra/security/gen_acl.py): one Celery connection per hospital,
    # each under that hospital's "<id>:" key prefix, as the hospitals' workers use with
    # LEUKOFED_CLIENT_ISOLATE=true. Listed hospitals are the ones polled for liveness; a run
    # naming another hospital gets a connection for it on first use.
    isolated_hospitals: str = Field(
        "", description="comma list of hospital ids isolated by key prefix; empty = off")
    # Per-hospital limits on the broker (services/aggregator/broker_guard.py), isolated mode
    # only: a hospital whose keys hold more is cut back, largest keys first; the sum of the
    # quotas plus what hospitals can send in one interval must stay under Redis' maxmemory.
    broker_quota_mb: float = Field(
        256.0, ge=0, description="isolated mode: most broker memory one hospital's keys may "
        "hold (MB); over it the aggregator deletes that hospital's largest keys (0: off)")
    broker_guard_interval_s: float = Field(
        2.0, gt=0, description="how often the broker guard measures each hospital's keys "
        "and the broker's memory alarm (seconds)")
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
    # Each run asks every hospital to describe itself (its declared split sizes) before
    # counting anything it sends. A worker's first describe scans its archive and hashes
    # every image, and a worker still busy with an earlier task answers after it: the
    # default leaves minutes, not the 3 s that once left hospitals undeclared.
    describe_deadline_s: float = Field(
        120.0, gt=0, description="seconds a hospital has to declare its data (describe) "
        "before a run's round goes on without counting it; its first answer hashes every "
        "image")
    # Many hospitals (docs/scale.md): tasks out at once per round step (0: all), which
    # bounds the weights waiting in Redis; and the memory a round that holds every update
    # (median, Krum, central DP) may use before it is refused.
    max_in_flight: int = Field(64, ge=0, description="tasks out at once per step (0: all)")
    max_held_updates_mb: float = Field(
        2048.0, gt=0, description="memory for rules that hold every update of a round")
    resume_on_start: bool = True
    host: str = "127.0.0.1"
    port: int = 8001
    allowed_hosts: str = Field(
        "", description="Host headers answered (comma list); empty: any in development "
        "mode, else localhost and 127.0.0.1")
    # /metrics is open to probes; each liveness ping reaches every hospital's worker.
    metrics_liveness_max_age_s: float = Field(
        15.0, ge=0, description="/metrics pings the hospitals at most this often (seconds); "
        "scrapes in between report the last answer")
    # HTTPS for the API (`serve`), e.g. server.crt/.key from infra/security/make_certs.py.
    https_cert_file: Path | None = Field(None, description="serve HTTPS with this certificate")
    https_key_file: Path | None = Field(None, description="the HTTPS certificate's key")
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
    # Promotion (services/aggregator/promotion.py, issue 26 finding 6): with a signing key and
    # MLflow, the aggregator signs an "approved for serving" statement for each promotion,
    # logs it in <state_dir>/promotions.jsonl, and watches these aliases: a move made in the
    # MLflow UI passes the release gate and is approved, or is put back with the reason.
    promotion_aliases: str = Field(
        "champion", description="aliases the promotion watcher judges (comma list; empty: "
        "no watcher)")
    promotion_watch_s: float = Field(
        5.0, gt=0, description="seconds between two looks at the watched aliases")
    approval_ttl_s: float = Field(
        7 * 24 * 3600.0, gt=60, description="how long a signed approval is valid; the "
        "watcher renews the current one at half of it")

    @field_validator("isolated_hospitals")
    @classmethod
    def _hospitals(cls, value: str) -> str:
        ids = [check_hospital_id(h.strip()) for h in value.split(",") if h.strip()]
        return ",".join(dict.fromkeys(ids))

    @model_validator(mode="after")
    def _tls(self) -> AggregatorSettings:
        check_tls(self.broker_url, self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if bool(self.https_cert_file) != bool(self.https_key_file):
            raise ValueError("https_cert_file and https_key_file go together")
        return self

    def startup_problems(self, admin_token: str | None) -> list[str | None]:
        """What the aggregator lacks to start outside development mode (leukofed.startup)."""
        from leukofed.startup import broker_problem

        return [None if admin_token else "no admin token (LEUKOFED_AGGREGATOR_ADMIN_TOKEN or "
                "_ADMIN_TOKEN_FILE): anyone reaching the API could start runs",
                None if self.signing_key_file else "no signing key "
                "(LEUKOFED_AGGREGATOR_SIGNING_KEY_FILE): tasks and models would go unsigned",
                None if self.hospital_keys_dir else "no hospital public keys "
                "(LEUKOFED_AGGREGATOR_HOSPITAL_KEYS_DIR): unsigned answers would be taken",
                broker_problem(self.broker_url)]

    def startup_secrets(self, admin_token: str | None) -> dict[str, str | None]:
        return {"LEUKOFED_AGGREGATOR_ADMIN_TOKEN": admin_token,
                "LEUKOFED_AGGREGATOR_BROKER_URL": self.broker_url,
                "LEUKOFED_AGGREGATOR_RESULT_BACKEND": self.result_backend}

    @property
    def isolated(self) -> list[str]:
        return [h for h in self.isolated_hospitals.split(",") if h]

    @property
    def tls(self) -> dict[str, object] | None:
        return tls_options(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)

    @property
    def tracking_uri(self) -> str:
        import os

        return (self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or "http://127.0.0.1:5000")
