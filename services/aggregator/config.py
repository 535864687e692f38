"""A federated run's configuration, as the REST API accepts it. Invalid configs fail here,
before anything is dispatched, with a message saying what to fix (HTTP 422)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from leukofed.models import MODEL_NAMES
from leukofed.strategies import make_strategy
from leukofed.transport import check_hospital_id


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field("", description="free text shown in listings and MLflow")
    model: str = Field("compact_cnn", description=f"one of {MODEL_NAMES}")
    image_size: int = Field(64, ge=16, le=512)
    alpha: float = Field(0.35, gt=0, le=1.4, description="MobileNetV2 width multiplier")
    rounds: int = Field(10, ge=1, le=10_000)
    local_epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0, le=10)
    class_balanced: bool = True
    strategy: str = "fedavg"
    strategy_params: dict[str, Any] = Field(default_factory=dict)
    bn_mode: Literal["average", "local"] = "average"
    hospitals: list[str] | None = Field(None, description="default: every live hospital")
    fraction: float = Field(1.0, gt=0, le=1, description="share of hospitals sampled per round")
    min_fit_clients: int = Field(1, ge=1)
    round_deadline_s: float = Field(600.0, gt=0, le=7 * 24 * 3600)
    max_round_retries: int = Field(2, ge=0, le=100)
    seed: int = Field(0, ge=0, lt=2**31)
    fp16: bool = False
    max_norm_ratio: float = Field(10.0, gt=0)
    jit_compile: bool = Field(
        False, description="XLA for the local train step (measured slower on CPU for most models)")
    server_test_dir: str | None = None
    server_test_manifest: str | None = None
    register_models: bool = True

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value not in MODEL_NAMES:
            raise ValueError(f"unknown model {value!r}; choose from {list(MODEL_NAMES)}")
        return value

    @field_validator("hospitals")
    @classmethod
    def _hospitals(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("hospitals must not be empty (omit it to use every live hospital)")
        for h in value:
            check_hospital_id(h)
        if len(set(value)) != len(value):
            raise ValueError("hospitals must not repeat")
        return value

    @field_validator("server_test_dir", "server_test_manifest")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        if value and not Path(value).exists():
            raise ValueError(f"not found on the aggregator: {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        try:
            make_strategy(self.strategy, bn_mode=self.bn_mode, **self.strategy_params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"strategy: {exc}") from exc
        if self.hospitals is not None and self.min_fit_clients > len(self.hospitals):
            raise ValueError(f"min_fit_clients={self.min_fit_clients} exceeds the "
                             f"{len(self.hospitals)} hospitals listed")
        return self
