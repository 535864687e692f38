"""A federated run's configuration, as the REST API accepts it. Invalid configs fail here,
before anything is dispatched, with a message saying what to fix (HTTP 422)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from leukofed.models import (
    DEFAULT_AUGMENTATION,
    DEFAULT_CELL_FOCUS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_ROTATION_ENSEMBLE,
    MODEL_NAMES,
)
from leukofed.strategies import STRATEGIES, make_strategy
from leukofed.transport import check_hospital_id
from services.aggregator.strategy_config import (
    FedAvgParams,
    StrategyParams,
    as_kwargs,
    typed_params,
)


class PrivacyConfig(BaseModel):
    """Differential privacy. ``level`` "client" (leukofed.privacy, DP-FedAvg): protects
    whether a whole hospital took part; ``mode`` "central": the aggregator clips every update
    and adds the noise; "local": each hospital does it before sending. ``level`` "example"
    (leukofed.dp_sgd, DP-SGD): protects each training image; every hospital clips each
    image's gradient to ``clip_norm``, adds noise at every local step, accounts its own
    epsilon and stops at ``target_epsilon`` (its noise multiplier calibrated to reach it in
    ``rounds`` rounds unless ``noise_multiplier`` is given)."""

    model_config = ConfigDict(extra="forbid")

    level: Literal["client", "example"] = Field(
        "client", description="'client': one hospital is the unit (DP-FedAvg); 'example': one "
        "training image is the unit (DP-SGD in each hospital's optimizer)")
    mode: Literal["central", "local"] = "central"
    noise_multiplier: float = Field(1.0, ge=0, le=1000,
                                    description="noise std / clip norm; 0 = clipping only")
    clip_norm: float = Field(1.0, gt=0, description="L2 bound of one hospital's update delta")
    adaptive_clipping: bool = Field(False, description="central only: follow a norm quantile")
    target_quantile: float = Field(0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(0.2, gt=0)
    count_noise: float | None = Field(None, gt=0, description="std of the noised unclipped "
                                      "count; default selected/20")
    delta: float = Field(1e-5, gt=0, lt=1)
    target_epsilon: float | None = Field(None, gt=0, description="stop before exceeding it")

    @model_validator(mode="after")
    def _adaptive(self) -> PrivacyConfig:
        if self.adaptive_clipping and self.mode != "central":
            raise ValueError("adaptive_clipping needs mode 'central'")
        if self.level == "example":
            self._check_example()
        return self

    @model_validator(mode="before")
    @classmethod
    def _example_noise(cls, data: Any) -> Any:
        """At level 'example' a noise multiplier left out is 0: each hospital calibrates its
        own to reach target_epsilon in the run's rounds (its sampling rate is its own)."""
        if isinstance(data, dict) and data.get("level") == "example" and \
                "noise_multiplier" not in data:
            data = {**data, "noise_multiplier": 0.0}
        return data

    def _check_example(self) -> None:
        if self.mode != "central" or self.adaptive_clipping or self.count_noise is not None:
            raise ValueError("level 'example' takes clip_norm (per image), delta, "
                             "target_epsilon and optionally noise_multiplier; mode 'local', "
                             "adaptive_clipping and count_noise are for level 'client'")
        if self.noise_multiplier <= 0 and self.target_epsilon is None:
            raise ValueError("level 'example' needs target_epsilon (each hospital calibrates "
                             "its noise to it) or a noise_multiplier > 0")

    @property
    def example(self) -> bool:
        """Example-level DP-SGD at the hospitals: no mechanism at the aggregator."""
        return self.level == "example"

    @property
    def central(self) -> bool:
        """Client-level DP whose clipping and noise the aggregator applies."""
        return self.level == "client" and self.mode == "central"

    @property
    def calibrated(self) -> bool:
        """Example level without a noise multiplier: each hospital calibrates its own."""
        return self.example and self.noise_multiplier <= 0


class SecureAggregationConfig(BaseModel):
    """Secure aggregation (leukofed.secagg): the aggregator learns only the sum of the
    hospitals' updates. ``"on"`` in a run config means these defaults."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.6, gt=0.5, le=1.0, description="share of a hospital's "
                             "neighbours needed to rebuild its secrets when unmasking (one "
                             "of 3 neighbours may drop out at 0.6)")
    neighbours: int = Field(0, ge=0, le=10_000, description="neighbours per hospital "
                            "(SecAgg+); 0: automatic, everyone up to 10 hospitals, then "
                            "2*ceil(log2 n)+2")
    bits: Literal[16, 24, 32] = Field(24, description="width of the masked vector's numbers")
    update_range: float = Field(1.0, gt=0, le=1e6, description="bound of one coordinate of "
                                "a weight update; each hospital clips to it before masking")
    update_clip_norm: float | None = Field(
        None, gt=0, description="L2 bound of each hospital's update, applied by the hospital "
        "before masking: the per-update norm check the aggregator cannot make on a masked "
        "vector; none by default")
    stage_deadline_s: float = Field(60.0, gt=0, le=24 * 3600, description="deadline of the "
                                    "key, share and reveal stages")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field("", description="free text shown in listings and MLflow")
    model: str = Field("compact_cnn", description=f"one of {MODEL_NAMES}")
    image_size: int = Field(DEFAULT_IMAGE_SIZE, ge=16, le=512)
    alpha: float = Field(0.35, gt=0, le=1.4, description="MobileNetV2 width multiplier")
    norm: Literal["batch", "group"] = Field(
        "batch", description="compact_cnn normalisation; 'group' has no moving statistics, "
        "which differential privacy needs (docs/architecture.md)")
    cell_focus: bool = Field(DEFAULT_CELL_FOCUS, description="keep only the stained cells "
                             "(leukofed.models.CellFocus): the model cannot read background")
    rotation_ensemble: bool = Field(
        DEFAULT_ROTATION_ENSEMBLE, description="answer from the four right-angle rotations "
        "of each image, averaged (inference only: 4x the compute, +1 point measured)")
    augmentation: Literal["stain", "basic"] = Field(
        DEFAULT_AUGMENTATION, description="'stain': stain transfer between images of any "
        "class, crops, colour jitter (docs/shortcuts.md); 'basic': the old flips and small "
        "jitter, with which a model reads colour")
    rounds: int = Field(10, ge=1, le=10_000)
    local_epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0, le=10)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="hospitals' learning rate over the rounds: 'cosine' decays "
        "it from learning_rate to near zero by the last round, as centralized training does "
        "over its epochs (leukofed.strategies.round_learning_rate; docs/benchmarks-federated-"
        "ablation.md); 'constant' keeps learning_rate in every round")
    class_balanced: bool = True
    logit_adjustment: bool = Field(
        True, description="hospitals train on their class prior added to the logits "
        "(balanced softmax) instead of inverse-frequency weights of their own counts: every "
        "hospital then aims at the same class-balanced model and classes it lacks are not "
        "pushed down (leukofed.train.logit_prior); needs class_balanced")
    strategy: str = Field("fedavg", description="aggregation strategy: one of "
                          "fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, fedmedian, "
                          "fedtrimmedavg, krum, multikrum")
    strategy_params: StrategyParams = Field(
        default_factory=FedAvgParams,
        description="the parameters of the chosen strategy (the model named after it)")
    bn_mode: Literal["average", "local"] = "average"
    bn_calibration: Literal["auto", "on", "off"] = Field(
        "auto", description="after each server step, hospitals measure BatchNorm statistics "
        "of the new global weights and the aggregator pools them; auto: on for every "
        "strategy whose global weights are not the clients' average (all but fedavg, "
        "fedprox), off with bn_mode 'local' or differential privacy")
    calibration_images: int = Field(512, ge=1, le=100_000,
                                    description="training images per hospital for it (and "
                                    "for head_rebalance)")
    head_rebalance: bool = Field(
        False, description="after each round, hospitals send per-class sums of the "
        "classifier head's input features on their training images and the aggregator "
        "refits a class-balanced head on them (leukofed.head_rebalance). Off by default: "
        "measured, it lifts Benign recall (0.74 -> 0.82 at 3 hospitals, 0.20 -> 0.65 at 10) "
        "but costs Early recall more (docs/federated-recipe.md). Never under secure "
        "aggregation, differential privacy, bn_mode 'local' or robust strategies")
    membership_images: int = Field(
        512, ge=0, le=100_000, description="membership-inference audit of every version "
        "(leukofed.membership, docs/privacy.md): each hospital scores up to this many of its "
        "training images (members) and its val and test images (non-members) and sends "
        "histograms of the per-image loss; the aggregator reads the attack's AUC and TPR at "
        "1% and 0.1% FPR from them. 0: off")
    audits: Literal["promotable", "every"] = Field(
        "promotable", description="which versions get the colour audit and the membership "
        "audit: 'promotable' audits a version only when its server-test numbers already "
        "reach the release gate's other floors (LEUKOFED_GATE_* of the aggregator), and "
        "always round 1 (the membership reference) and the last round; the others are "
        "registered, exported and signed as ever, tagged skipped_colour_audit or "
        "skipped_membership_audit with the reason, and the gate refuses "
        "them as not audited. 'every': every version (about 10 s of aggregator CPU and 5 s "
        "per hospital a round at compact_cnn @128 on 2 cores; docs/ml-engineer.md)")
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
    join_probation_margin: float | None = Field(
        0.05, ge=0, le=1, description="a hospital that joins after the run's first round "
        "has its laboratory answered (its acquisition statistics in the served profile, "
        "leukofed.ood) only once the new model's accuracy on its own validation images is "
        "within this margin of the established hospitals' at its class mix (at least 20 "
        "images; services/aggregator/round_logic.profile_members); until then its images are "
        "referred. None: every participant's laboratory answered from the round it joins")
    coverage: float = Field(0.95, ge=0.5, lt=1, description="conformal prediction sets: "
                            "the share of images whose set holds the true class, per class "
                            "(leukofed.calibration); a set of more than one class says refer")
    server_test_dir: str | None = None
    server_test_manifest: str | None = None
    register_models: bool = True
    privacy: PrivacyConfig | None = Field(None, description="differential privacy; off if null")
    secure_aggregation: SecureAggregationConfig | None = Field(
        None, description="'on' (defaults), 'off' (null) or its parameters: the aggregator "
        "sees only the sum of the updates (docs/security.md)")

    @model_validator(mode="before")
    @classmethod
    def _strategy_params(cls, data: Any) -> Any:
        """Read ``strategy_params`` as the model of the chosen strategy: an unknown
        strategy, or a parameter it does not take, is refused here with its name."""
        if isinstance(data, dict):
            data = {**data, "strategy_params": typed_params(data.get("strategy", "fedavg"),
                                                            data.get("strategy_params"))}
        return data

    @field_validator("secure_aggregation", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.strip().lower() in ("on", "true"):
                return {}
            if value.strip().lower() in ("off", "false"):
                return None
            raise ValueError(f"secure_aggregation is 'on', 'off' or its parameters, "
                             f"not {value!r}")
        return value

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
        if self.norm != "batch" and self.model != "compact_cnn":
            raise ValueError(f"norm={self.norm!r} is available for compact_cnn only")
        try:
            make_strategy(self.strategy, bn_mode=self.bn_mode, **self.strategy_kwargs())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"strategy: {exc}") from exc
        if self.privacy is not None and self.privacy.adaptive_clipping and \
                self.privacy.noise_multiplier > 0:
            from leukofed.privacy import adaptive_split

            n = len(self.hospitals) if self.hospitals else self.min_fit_clients
            sigma_b = self.privacy.count_noise or n / 20.0
            try:
                adaptive_split(self.privacy.noise_multiplier, sigma_b)
            except ValueError as exc:
                raise ValueError(f"privacy: {exc}") from exc
        if self.bn_calibration == "on" and self.bn_mode == "local":
            raise ValueError("bn_calibration 'on' contradicts bn_mode 'local' (FedBN keeps "
                             "statistics at the hospitals)")
        if self.bn_calibration == "on" and self.privacy is not None:
            raise ValueError("bn_calibration 'on' would release statistics outside the "
                             "privacy accounting; use norm 'group' with differential privacy")
        if self.privacy is not None and self.privacy.example and self.norm != "group":
            raise ValueError("privacy level 'example' needs norm 'group' (model compact_cnn): "
                             "BatchNorm mixes the images of a batch, so clipping one image's "
                             "gradient would bound nothing (leukofed.dp_sgd)")
        if self.secure_aggregation is not None:
            self._check_secure()
        if self.hospitals is not None and self.min_fit_clients > len(self.hospitals):
            raise ValueError(f"min_fit_clients={self.min_fit_clients} exceeds the "
                             f"{len(self.hospitals)} hospitals listed")
        return self

    def _check_secure(self) -> None:
        """What secure aggregation rules out, refused here with the reason."""
        if STRATEGIES[self.strategy.strip().lower()].robust:
            raise ValueError(f"strategy {self.strategy!r} needs every hospital's update, and "
                             "secure aggregation gives the aggregator only their sum; use "
                             "fedavg, fedprox or a server optimizer (each hospital clips its "
                             "update to secure_aggregation.update_range instead of the "
                             "per-update norm check)")
        if self.fp16:
            raise ValueError("fp16 does not apply under secure aggregation: "
                             "secure_aggregation.bits sets the width of what is sent")
        if self.privacy is not None and self.privacy.level == "client" and \
                self.privacy.mode == "local":
            raise ValueError("privacy mode 'local' with secure aggregation adds every "
                             "hospital's noise to the sum; use mode 'central', whose noise "
                             "goes onto the unmasked sum")
        if self.min_fit_clients < 2:
            raise ValueError("secure aggregation needs min_fit_clients >= 2: the sum of one "
                             "hospital's update is that update")

    def strategy_kwargs(self) -> dict[str, Any]:
        """The strategy's parameters as leukofed.strategies.make_strategy takes them."""
        return as_kwargs(self.strategy_params)

    def rebalances_head(self) -> bool:
        """Whether rounds refit the classifier head (see head_rebalance). Not under secure
        aggregation or differential privacy (per-hospital sums outside both), FedBN (the
        features depend on each hospital's statistics) or a robust strategy (one
        hospital's sums would move the pooled ones: nothing bounds them as a median does)."""
        return (self.head_rebalance and self.secure_aggregation is None
                and self.privacy is None and self.bn_mode != "local"
                and not STRATEGIES[self.strategy.strip().lower()].robust)

    def calibrates_batchnorm(self) -> bool:
        """Whether rounds end with the BatchNorm calibration step (see bn_calibration)."""
        if self.bn_calibration == "off" or self.bn_mode == "local" or self.privacy is not None:
            return False
        if self.bn_calibration == "on":
            return True
        return not STRATEGIES[self.strategy.strip().lower()].weights_are_client_average
