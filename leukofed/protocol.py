"""The round protocol's typed structures: what a hospital receives with every task.

One definition per field and one default, validated when the hospital decodes it (a value
of the wrong type or out of range is refused with the field's name, instead of failing
somewhere in training). The aggregator builds it from the run's configuration
(services/aggregator/rounds.py); on the wire it is a plain dict (msgpack), and keys a
hospital does not know are ignored, so an older hospital still works with a newer
aggregator.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_IMAGE_SIZE = 128  # the one default input size (leukofed.models re-exports it)


class RoundConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())

    run_id: str = ""
    round: int = Field(0, ge=0)
    model: str = "compact_cnn"
    image_size: int = Field(DEFAULT_IMAGE_SIZE, ge=16, le=1024)
    cell_focus: bool = True
    rotation_ensemble: bool = True
    augmentation: Literal["stain", "basic"] = "stain"
    # fit: send the acquisition profile and stain sums of the training images (off in
    # differentially private runs: they are exact statistics outside the privacy budget)
    send_profile: bool = True
    alpha: float = Field(0.35, gt=0)  # MobileNetV2 width
    norm: Literal["batch", "group"] = "batch"  # "group" for differential privacy
    local_epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0)
    proximal_mu: float = Field(0.0, ge=0)
    class_balanced: bool = True
    bn_mode: Literal["average", "local"] = "average"
    fp16: bool = False
    seed: int = 0
    jit_compile: bool = False  # XLA measured slower on CPU for most models
    deadline: float = 0.0  # epoch seconds; a task received after it is declined as expired
    calibration_images: int = Field(512, ge=1)  # calibrate: un-augmented training images
    # Local differential privacy (leukofed.privacy): the hospital clips its update delta to
    # dp_clip_norm and adds N(0, (dp_noise_multiplier * dp_clip_norm)^2) before sending.
    dp_mode: Literal["", "local"] = ""
    dp_clip_norm: float = Field(0.0, ge=0)
    dp_noise_multiplier: float = Field(0.0, ge=0)
    # Secure aggregation (leukofed.secagg): session and stage inputs; None: plain answers.
    secure: dict[str, Any] | None = None

    @classmethod
    def decode(cls, config: Any) -> RoundConfig:
        """From the wire; ValueError naming each bad field (one line) when it is invalid."""
        if config is None:
            return cls()
        if not isinstance(config, dict):
            raise ValueError(f"round configuration is a {type(config).__name__}, not a map")
        try:
            return cls.model_validate(config)
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                               for e in exc.errors())
            raise ValueError(f"round configuration refused: {fields}") from None

    @classmethod
    def build(cls, **fields: Any) -> dict[str, Any]:
        """The aggregator's side: validated, no unknown field (a typo would otherwise be
        dropped silently by every hospital), as the dict that crosses the wire."""
        unknown = set(fields) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"not round configuration fields: {sorted(unknown)}")
        return cls.model_validate(fields).model_dump()
