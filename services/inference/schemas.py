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
    in_distribution: bool | None = Field(
        None, description="Whether the image's acquisition statistics (colour, contrast, "
                          "cell size and count, sharpness...) lie within the training "
                          "images'; null when this model version cannot check")
    refer: bool | None = Field(
        None, description="True: the image is unlike the training images, refer it to a "
                          "hematologist and do not use the label; null: not checked (the "
                          "model version carries no acquisition profile)")
    refer_reasons: list[str] = Field(
        default_factory=list, description="Why the image is referred (or why it could not "
                                          "be checked), in words")
    ood_distance: float | None = Field(
        None, description="Mahalanobis distance of the image's acquisition statistics to "
                          "the training images'; null when not checked")
    advice: str = Field("", description="What to do with this answer, in one sentence")


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
