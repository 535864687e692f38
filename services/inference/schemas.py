"""Response shapes of the v1 REST API (they also document it in /docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    name: str
    version: str
    alias: str | None


class Prediction(BaseModel):
    filename: str
    label: str = Field(description="The class with the highest probability")
    probabilities: dict[str, float] = Field(
        description="One entry per class, in the model's class order; they sum to 1")


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]


class Heatmap(BaseModel):
    method: str = "occlusion"
    explained_class: str
    media_type: str = "image/png"
    png_base64: str = Field(description="Translucent RGBA PNG to lay over the image "
                                        "stretched to a square (as the model saw it)")
    grid: int
    elapsed_ms: float


class ExplainResponse(BaseModel):
    model: ModelRef
    prediction: Prediction
    heatmap: Heatmap


class TensorSpec(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str | None
    classes: list[str]
    architecture: str | None
    input: TensorSpec
    output: TensorSpec
    image_size: int
    preprocessing: dict
    provider: str
    providers: list[str]
    onnx_sha256: str
    onnx_origin: str
    parity_max_abs_diff: float | None
    loaded_at: str
    run_id: str | None
    max_batch_size: int
    max_queue_delay_ms: float
