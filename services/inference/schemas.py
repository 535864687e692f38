"""Response shapes of the v1 REST API (they also document it in /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    name: str
    version: str
    alias: str | None


class Prediction(BaseModel):
    filename: str
    label: str = Field(description="The class with the highest probability")
    probabilities: dict[str, float] = Field(
        description="One entry per class, in the model's class order; they sum to 1. "
                    "Calibrated (temperature scaling) when `calibrated` is true, else the "
                    "model's raw scores")
    calibrated: bool = Field(
        False, description="Whether the probabilities are calibrated and a prediction set "
                           "was computed (the model version carries a valid calibration)")
    temperature: float | None = Field(
        None, description="The calibration temperature T (probabilities are "
                          "softmax(log p / T)); null when not calibrated")
    coverage: float | None = Field(
        None, description="Target coverage of the prediction set (e.g. 0.95: the set holds "
                          "the true class for 95% of images of every class); null when not "
                          "calibrated")
    calibration_note: str | None = Field(
        None, description="Why the probabilities are not calibrated and there is no "
                          "prediction set; null when they are")
    prediction_set: list[str] | None = Field(
        None, description="The classes in the conformal prediction set, in class order: "
                          "one class is an answer; two or more (the model cannot tell them "
                          "apart) or none (no class fits) refer the image. Null when not "
                          "calibrated")
    malignant: Literal["yes", "no", "unsure"] = Field(
        description="yes: every class in the prediction set is malignant (any class but "
                    "Benign); no: the set is exactly {Benign}; unsure: anything else, an "
                    "empty set included. Without a calibration it follows `label`. Not to "
                    "be used when `refer` is true")
    in_distribution: bool | None = Field(
        None, description="Whether the image's acquisition statistics (colour, contrast, "
                          "cell size and count, sharpness...) lie within the training "
                          "images'; null when this model version cannot check")
    refer: bool | None = Field(
        None, description="True: refer the image to a hematologist and do not use the "
                          "label: it is unlike the training images, or its prediction set is "
                          "not a single class (see refer_reasons); false: neither; null: "
                          "the set is a single class (or there is no calibration) but the "
                          "out-of-distribution check could not run")
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


class CalibrationInfo(BaseModel):
    available: bool = Field(description="Whether answers carry calibrated probabilities "
                                        "and prediction sets")
    temperature: float | None = None
    coverage: float | None = Field(None, description="Target coverage of the prediction sets")
    quantiles: dict[str, float] | None = Field(
        None, description="Per class threshold q_k: class k is in the set when "
                          "1 - calibrated p_k <= q_k")
    note: str | None = Field(None, description="Why there is no calibration")


class CardInfo(BaseModel):
    available: bool
    url: str | None = Field(None, description="GET it (Markdown; ?format=html or json)")
    summary: str | None = Field(None, description="The card's key numbers, plain text")
    note: str | None = Field(None, description="Why there is no card")


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
    signature: str = Field(description="'verified: ...' when the ONNX file's aggregator "
                           "signature was checked; 'unchecked: ...' in development mode")
    loaded_at: str
    run_id: str | None
    max_batch_size: int
    max_queue_delay_ms: float
    ood_check: str = Field(description="'available', or 'unavailable: ' and why")
    calibration: CalibrationInfo
    card: CardInfo
