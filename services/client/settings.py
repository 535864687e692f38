"""Settings of one hospital's client worker, from environment variables (prefix
``LEUKOFED_CLIENT_``) or a ``.env`` file. Nothing else configures the worker."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from leukofed.labs import ACQUISITION_FILE, Acquisition, load_acquisition
from leukofed.transport import (
    DEFAULT_BROKER_URL,
    DEFAULT_VISIBILITY_TIMEOUT_S,
    check_hospital_id,
    check_tls,
    tls_options,
)


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEUKOFED_CLIENT_", env_file=".env",
                                      extra="ignore")

    hospital_id: str = Field(description="short id; the worker consumes queue hospital.<id>")
    data_dir: Path = Field(description="image archive, one sub-folder per class; only read")
    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str | None = Field(None, description="defaults to broker_url")
    state_dir: Path | None = Field(
        None, description="participation log and pause flag; default .run/client-<id>")
    cache_dir: Path = Field(Path(".cache"), description="decoded-image cache (local only)")
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S
    # TLS to the broker (rediss:// URLs; infra/security/make_certs.py): the broker is verified
    # against tls_ca_file; the client certificate is sent when the broker demands one.
    tls_ca_file: Path | None = Field(None, description="ca.crt: verify the broker (rediss://)")
    tls_cert_file: Path | None = Field(None, description="<id>.crt: this hospital's TLS cert")
    tls_key_file: Path | None = Field(None, description="<id>.key: its private key")
    # Per-hospital isolation (infra/security/gen_acl.py): every key and channel of this
    # worker's traffic lies under "<id>:", the only prefix its Redis ACL user may touch. The
    # aggregator must list this hospital in LEUKOFED_AGGREGATOR_ISOLATED_HOSPITALS.
    isolate: bool | None = Field(
        None, description="keys and channels under '<id>:' (ACL isolation); default: on "
                          "with credentials_dir, off without")
    # The folder a consortium hands each hospital (`make hospital-credentials HOSPITAL=<id>`):
    # tls/ca.crt, tls/<id>.crt, tls/<id>.key, keys/<id>.key, keys/aggregator.pub and
    # keys/hospitals/. It fills each file setting above and below that is not set.
    credentials_dir: Path | None = Field(
        None, description="folder with tls/ and keys/ for this hospital; fills every unset "
                          "TLS, signing and public-key setting, and turns isolation on")
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    block_size: int = 16
    # Simulated laboratory (leukofed.labs, `leukofed data partition --labs`): applied to every
    # image as it is read. Real hospitals have none; a malformed file stops the worker at start.
    acquisition_file: Path | None = Field(
        None, description="simulated laboratory applied when images are read (leukofed.labs); "
                          "default: <data_dir>/acquisition.json when that file exists")
    # Signing (leukofed.signing). With signing_key_file set, every update is signed with this
    # hospital's Ed25519 key; with aggregator_public_key_file set, only tasks signed by the
    # aggregator are executed (others are declined with the reason). Both off by default.
    signing_key_file: Path | None = Field(None, description="this hospital's <id>.key")
    aggregator_public_key_file: Path | None = Field(
        None, description="aggregator.pub; when set, unsigned or forged tasks are refused")
    peer_public_keys_dir: Path | None = Field(
        None, description="the other hospitals' <id>.pub: with it, secure aggregation checks "
        "that each neighbour's relayed keys are signed by that neighbour")
    # How long a signed task stays valid (issue 26, finding 11: it was 7 days). A task also
    # carries its round's deadline and is declined past it; this bounds what the deadline
    # does not, and how long the record of completed tasks must keep a nonce. 6 h: the
    # broker's visibility timeout, the longest a task waits before Celery redelivers it.
    # Set it to at least the longest round deadline this hospital takes part in.
    task_max_age_s: float = Field(
        6 * 3600.0, gt=0, le=7 * 24 * 3600.0,
        description="a signed task older than this is refused as expired (at least the "
        "longest round deadline of the runs this hospital joins)")
    # Secure aggregation: what this hospital does not take from the aggregator (the
    # neighbourhood is recomputed from the session's seed, docs/security.md section 8).
    secagg_min_neighbours: int = Field(
        2, ge=1, description="secure aggregation: refuse to share secrets with fewer "
        "neighbours than this")
    secagg_min_threshold: float = Field(
        0.6, gt=0.5, le=1.0, description="secure aggregation: share of the neighbours (and "
        "itself) needed to rebuild this hospital's secrets, at least; a run asking less "
        "gets this")

    # Example-level differential privacy (leukofed.dp_sgd): this hospital's own budget.
    max_epsilon: float | None = Field(
        None, gt=0, description="the largest epsilon this hospital accepts on its training "
        "images, over every run (example-level DP-SGD, RDP-composed, at epsilon_delta): it "
        "refuses a fit that would exceed it, and every task that would use its training "
        "images outside DP-SGD (a plain fit, BatchNorm or head statistics, the membership "
        "audit's member histogram); none: no limit")
    epsilon_delta: float = Field(1e-5, gt=0, lt=1, description="the delta at which "
                                 "max_epsilon is measured")

    @field_validator("hospital_id")
    @classmethod
    def _id(cls, value: str) -> str:
        return check_hospital_id(value)

    @model_validator(mode="after")
    def _credentials_and_tls(self) -> ClientSettings:
        if self.credentials_dir is not None:
            self._fill_from_credentials(self.credentials_dir)
        if self.isolate is None:
            self.isolate = self.credentials_dir is not None
        check_tls(self.broker_url, self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        return self

    def _fill_from_credentials(self, folder: Path) -> None:
        if not folder.is_dir():
            raise ValueError(f"credentials_dir {folder} is not a folder")
        h = self.hospital_id
        expected = {"tls_ca_file": folder / "tls" / "ca.crt",
                    "tls_cert_file": folder / "tls" / f"{h}.crt",
                    "tls_key_file": folder / "tls" / f"{h}.key",
                    "signing_key_file": folder / "keys" / f"{h}.key",
                    "aggregator_public_key_file": folder / "keys" / "aggregator.pub",
                    "peer_public_keys_dir": folder / "keys" / "hospitals"}
        for name, path in expected.items():
            if getattr(self, name) is None and path.exists():
                setattr(self, name, path)

    @model_validator(mode="after")
    def _acquisition(self) -> ClientSettings:
        self.acquisition()  # raises AcquisitionError (a ValueError) naming the file
        return self

    def startup_problems(self) -> list[str | None]:
        """What this hospital's worker lacks to start outside development mode."""
        from leukofed.startup import broker_problem

        return [None if self.signing_key_file else "no signing key "
                "(LEUKOFED_CLIENT_SIGNING_KEY_FILE): its answers could be forged",
                None if self.aggregator_public_key_file else "no aggregator public key "
                "(LEUKOFED_CLIENT_AGGREGATOR_PUBLIC_KEY_FILE): it would run anyone's tasks",
                broker_problem(self.broker_url)]

    def startup_secrets(self) -> dict[str, str | None]:
        return {"LEUKOFED_CLIENT_BROKER_URL": self.broker_url,
                "LEUKOFED_CLIENT_RESULT_BACKEND": self.result_backend}

    @property
    def acquisition_path(self) -> Path | None:
        """The simulated laboratory's file: the setting, else <data_dir>/acquisition.json."""
        if self.acquisition_file is not None:
            return self.acquisition_file
        default = self.data_dir / ACQUISITION_FILE
        return default if default.is_file() else None

    def acquisition(self) -> Acquisition | None:
        """This hospital's simulated laboratory, or None (images used as they are)."""
        path = self.acquisition_path
        return load_acquisition(path) if path is not None else None

    @property
    def tls(self) -> dict[str, object] | None:
        return tls_options(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)

    @property
    def state_path(self) -> Path:
        return self.state_dir or Path(".run") / f"client-{self.hospital_id}"
