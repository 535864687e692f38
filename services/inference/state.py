"""What the routers share: settings, the model source and the batcher (on app.state)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from .batcher import MicroBatcher
from .decode_budget import DecodeBudget
from .metrics import Metrics
from .model_source import ModelSource, ServedModel
from .settings import InferenceSettings


@dataclass
class ServiceState:
    settings: InferenceSettings
    source: ModelSource
    batcher: MicroBatcher
    metrics: Metrics
    decode: DecodeBudget

    def model_ref(self, model: ServedModel) -> dict[str, str | None]:
        return {"name": model.name, "version": model.version,
                "alias": self.source.alias_of(model)}


def get_state(request: Request) -> ServiceState:
    return request.app.state.service
