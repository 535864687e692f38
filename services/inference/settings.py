"""Configuration of the inference service, from environment variables (prefix LEUKOFED_INFERENCE_).

Every field can be set as ``LEUKOFED_INFERENCE_<FIELD>``; the tracking URI also falls back
to MLflow's own ``MLFLOW_TRACKING_URI`` so one variable configures the whole stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from leukofed.preprocessing import DEFAULT_MAX_PIXELS

ENV_PREFIX = "LEUKOFED_INFERENCE_"


class InferenceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore",
                                      protected_namespaces=())

    tracking_uri: str = Field(
        "http://127.0.0.1:5000",
        validation_alias=AliasChoices(f"{ENV_PREFIX}TRACKING_URI", "MLFLOW_TRACKING_URI",
                                      "tracking_uri"),
    )
    model_name: str = "leukofed-all"
    # A fixed version wins over the alias; with neither moving, the watcher just idles.
    model_alias: str = "champion"
    model_version: str | None = None
    # 1 s: a promotion reaches the answers within about a second plus the load (a download
    # and a session: no conversion here); one small registry request per second per replica.
    poll_interval_s: float = Field(1.0, gt=0)

    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0)
    # A 24-megapixel camera frame per image; a compressed PNG of 187 KB can claim 64 MP.
    max_pixels: int = Field(24_000_000, gt=0, le=DEFAULT_MAX_PIXELS)
    # All images of one request together, checked from their headers before any is
    # decoded. Memory is bounded by decode_memory_bytes, in each mode's real bytes.
    max_request_pixels: int = Field(96_000_000, gt=0, description="all images of one "
                                    "request together, from their headers, before any "
                                    "decoding (413 above it)")
    # What decoding may hold at once, all requests together (services/inference/
    # decode_budget.py): each request reserves its images' real decode bytes from their
    # headers (a 24 MP JPEG 120 MB, a 24 MP 16-bit TIFF 222 MB, a 24 MP RGBA PNG 408 MB)
    # and keeps them until its answer; uvicorn itself accepts any number of requests.
    decode_memory_bytes: int = Field(
        512 * 1024 * 1024, gt=0, description="decoding memory of all requests in flight "
        "together, in the real bytes of each image's mode (a request needing more: 413; "
        "one finding it taken waits decode_wait_s, then 429)")
    decode_wait_s: float = Field(10.0, ge=0, description="how long a request waits for "
                                 "decode memory before it is answered 429 (Retry-After)")
    max_files: int = Field(32, gt=0)
    # Proxies whose X-Forwarded-For uvicorn believes (the client IP the rate limit keys
    # on); "" believes none, "*" every sender (only behind a proxy that overwrites it).
    forwarded_allow_ips: str = Field("127.0.0.1", description="proxies whose "
                                     "X-Forwarded-For is believed (comma list, '*' for any; "
                                     "empty: none)")

    # Dynamic batching: max_batch_size=1 turns it off (every request runs alone). A queue
    # delay of 0 is greedy, as Triton's default: a batch takes whatever queued while the
    # previous one ran, so one client pays no wait and many clients still get batches.
    # 8, not 32: on a 2-core CPU onnxruntime's images/s peaks at batch 4-8 for MobileNetV2
    # and falls beyond (cache-bound; docs/benchmarks-inference.md). Raise it on a GPU.
    max_batch_size: int = Field(8, gt=0)
    max_queue_delay_ms: float = Field(0.0, ge=0)

    api_key: SecretStr | None = None
    # Per-client-IP token bucket (services/inference/http_guards.py); 0 turns it off (the
    # default, so benchmarks and tests that hammer one port are unaffected). Health probes
    # and /metrics are never limited. A deployment facing many users: e.g. 5/s, burst 20.
    rate_limit_per_s: float = Field(
        0.0, ge=0, description="requests per second per client IP; 0 = no rate limit")
    rate_limit_burst: int = Field(
        20, ge=1, description="requests a client may send at once before the rate applies")
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0)  # 0: onnxruntime uses every core
    onnx_cache_dir: Path = Path.home() / ".cache" / "leukofed" / "onnx"
    # The aggregator's public key (aggregator.pub from `make keys`): a version is served
    # only when its ONNX file carries the aggregator's valid signature. Unset: any published
    # version is served, unchecked (development mode only).
    model_public_key_file: Path | None = Field(
        None, description="aggregator.pub: serve only versions whose ONNX it signed")
    # Where a version's ONNX file may be downloaded from (issue 26, finding 6): the schemes
    # of the addresses the aggregator signs; file://, http:// and the rest are refused.
    artifact_schemes: str = Field(
        "runs,models,mlflow-artifacts", description="URI schemes an ONNX file may be "
        "downloaded from (comma list); any other address is refused before it is fetched")

    host: str = "127.0.0.1"
    port: int = 8000
    allowed_hosts: str = Field(
        "", description="Host headers answered (comma list); empty: any in development "
        "mode, else localhost and 127.0.0.1")
    # HTTPS served by uvicorn itself (server.crt/.key from infra/security/make_certs.py),
    # for deployments without a TLS-terminating proxy in front. Both or neither.
    https_cert_file: Path | None = Field(None, description="serve HTTPS with this certificate")
    https_key_file: Path | None = Field(None, description="the HTTPS certificate's key")

    @field_validator("model_version", "api_key", "model_public_key_file", "https_cert_file",
                     "https_key_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _https_pair(self) -> InferenceSettings:
        if bool(self.https_cert_file) != bool(self.https_key_file):
            raise ValueError("https_cert_file and https_key_file go together")
        return self

    def startup_problems(self) -> list[str | None]:
        """What this service lacks to start outside development mode (leukofed.startup)."""
        return [None if self.api_key else "no API key (LEUKOFED_INFERENCE_API_KEY): anyone "
                "who reaches the port could use the model",
                None if self.model_public_key_file else "no aggregator public key "
                "(LEUKOFED_INFERENCE_MODEL_PUBLIC_KEY_FILE): any file tagged in MLflow "
                "would be served"]

    def startup_secrets(self) -> dict[str, str | None]:
        return {"LEUKOFED_INFERENCE_API_KEY": self.api_key.get_secret_value()
                if self.api_key else None}

    @property
    def target(self) -> str:
        """What the service follows: a fixed version number or an alias."""
        return self.model_version or self.model_alias
