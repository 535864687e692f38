"""The round protocol's typed structures: what a hospital receives with every task, what it
answers, and what the aggregator keeps of a run.

One definition per field and one default. ``RoundConfig`` is validated when the hospital
decodes it (a value of the wrong type or out of range is refused with the field's name,
instead of failing somewhere in training); the aggregator builds it from the run's
configuration (services/aggregator/rounds.py).

The answers (``FitAnswer``, ``CalibrateAnswer``, ``EvaluateAnswer``, ``DescribeAnswer``) are
built by the hospital (services/client/hospital.py) and decoded by the aggregator after
their signature is checked (leukofed.validation): a malformed answer is refused with the
field's name, never a crash further on. On the wire every structure is a plain map
(msgpack); ``encode`` gives exactly the map the hospital signs (leukofed.signing covers
chosen fields of it), so typing changed no signed byte. Keys the other side does not know
are ignored, so an older peer still works with a newer one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypedDict, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from leukofed.labels import CLASSES

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
    # Train on log p + log(local class prior) (leukofed.train.logit_prior) instead of
    # inverse-frequency class weights: the same class-balanced target at every hospital.
    logit_adjustment: bool = False
    bn_mode: Literal["average", "local"] = "average"
    fp16: bool = False
    seed: int = 0
    jit_compile: bool = False  # XLA measured slower on CPU for most models
    deadline: float = 0.0  # epoch seconds; a task received after it is declined as expired
    calibration_images: int = Field(512, ge=1)  # calibrate: un-augmented training images
    # calibrate: what to measure on the global weights: BatchNorm statistics, or the
    # per-class feature statistics under the classifier head (leukofed.head_rebalance)
    measure: Literal["batchnorm", "head"] = "batchnorm"
    # evaluate: the membership-inference audit (leukofed.membership). Members: up to this
    # many training images (a fixed sample); non-members: the val and test splits. 0: off.
    membership_images: int = Field(0, ge=0)
    # ...and the round whose global model is the calibrated attack's reference: the hospital
    # keeps its images' losses under that model (in memory, never sent).
    membership_reference_round: int = Field(1, ge=1)
    # Local differential privacy (leukofed.privacy): the hospital clips its update delta to
    # dp_clip_norm and adds N(0, (dp_noise_multiplier * dp_clip_norm)^2) before sending.
    dp_mode: Literal["", "local"] = ""
    dp_clip_norm: float = Field(0.0, ge=0)
    dp_noise_multiplier: float = Field(0.0, ge=0)
    # Example-level DP (leukofed.dp_sgd): DP-SGD in the hospital's optimizer, each image's
    # gradient clipped to dp_clip_norm; noise dp_noise_multiplier, or 0: the hospital
    # calibrates it so that dp_rounds rounds spend dp_target_epsilon at dp_delta. The
    # hospital refuses a round that would exceed the target or its own limit.
    dp_level: Literal["", "example"] = ""
    dp_target_epsilon: float = Field(0.0, ge=0)
    dp_delta: float = Field(0.0, ge=0, lt=1)
    dp_rounds: int = Field(0, ge=0)
    # Secure aggregation (leukofed.secagg): session and stage inputs; None: plain answers.
    secure: dict[str, object] | None = None
    # describe: the aggregator's fresh challenge, signed back in the declaration, so a
    # declaration made for another run or task is never taken for this one.
    nonce: str = ""

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
            raise ValueError(f"round configuration refused: {_fields(exc)}") from None

    @classmethod
    def build(cls, **fields: Any) -> WireMap:
        """The aggregator's side: validated, no unknown field (a typo would otherwise be
        dropped silently by every hospital), as the dict that crosses the wire."""
        unknown = set(fields) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"not round configuration fields: {sorted(unknown)}")
        return cls.model_validate(fields).model_dump()


# ---------------------------------------------------------------- answers

WireMap = dict[str, object]  # a structure as it crosses the broker (msgpack map)
WireAnswer = WireMap  # an answer before its signature is checked and it is decoded
DeclaredSplits = dict[str, int]  # "train"/"val"/"test" -> images a hospital declared

# Numbers a hospital reports: a string, a bool or a NaN where a number belongs is refused.
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Count = Annotated[int, Field(strict=True, ge=0)]
Blob = bytes  # (a field named "bytes" shadows the type inside the answer classes)
Opaque = dict[str, object]  # checked where it is used (leukofed.ood, .calibration, .audit)


def _fields(exc: ValidationError) -> str:
    """Each refused field with its reason, on one line."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(answer)'}: {e['msg']}"
                     for e in exc.errors())


class AnswerInvalid(ValueError):
    """An answer that does not decode; the message names each refused field."""


_A = TypeVar("_A", bound="_Answer")


class _Answer(BaseModel):
    # "signature" and fields of newer hospitals ride along on the wire, unread here.
    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())

    status: Literal["ok"] = "ok"
    hospital: str = ""
    run_id: str = ""
    round: int = Field(0, ge=0)

    @classmethod
    def decode(cls: type[_A], wire: object) -> _A:
        """From the wire; AnswerInvalid naming each bad field when it does not hold."""
        if not isinstance(wire, dict):
            raise AnswerInvalid(f"answer is a {type(wire).__name__}, not a map")
        try:
            return cls.model_validate(wire)
        except ValidationError as exc:
            raise AnswerInvalid(_fields(exc)) from None

    def encode(self) -> WireMap:
        """The map that crosses the wire (what the hospital signs); unset options left out."""
        return self.model_dump(exclude_none=True)


class FitReport(_Answer):
    """What a fit answer says beside its tensors (a secure-aggregation answer too)."""

    bytes: Count = 0
    sha256: str = ""
    metrics: dict[str, Number] = {}
    timings: dict[str, Number] = {}
    class_counts: dict[str, Count] = {}
    dataset_fingerprint: str = ""
    # Sent only when RoundConfig.send_profile: acquisition profile sufficient statistics and
    # per-class stain sums. A malformed one leaves the hospital out of the profile only.
    acquisition: Opaque | None = None
    stain_sums: Opaque | None = None

    @field_validator("class_counts")
    @classmethod
    def _classes(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(CLASSES))
        if unknown:
            raise ValueError(f"not classes: {unknown}")
        return value


class FitAnswer(FitReport):
    """A hospital's trained weights (leukofed.wire format) and how many images made them."""

    weights: Blob
    num_examples: Annotated[int, Field(strict=True, gt=0)]


class CalibrateAnswer(_Answer):
    """BatchNorm statistics of the global model measured on ``num_examples`` images."""

    weights: Blob
    num_examples: Annotated[int, Field(strict=True, gt=0)]
    bytes: Count = 0
    sha256: str = ""
    seconds: Number = 0.0


class SplitResult(BaseModel):
    """One split's evaluation: aggregate counts only (hospital.split_metrics)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    n: Count
    loss: Number | None = None
    accuracy: Number | None = None
    confusion_matrix: list[list[Count]] | None = None
    calibration: Opaque | None = None  # leukofed.calibration.calibration_sums


class EvaluateAnswer(_Answer):
    splits: dict[Literal["val", "test"], SplitResult]
    num_examples: Count = 0
    seconds: Number = 0.0
    # Histograms of the membership attack's statistic (leukofed.membership), when asked.
    membership: Opaque | None = None


class DescribeAnswer(_Answer):
    """A hospital's declaration at enrolment; its split sizes bound every later claim."""

    class_counts: dict[str, Count] = {}
    num_images: Count = 0
    splits: dict[str, Count]
    split_counts: dict[str, dict[str, Count]] = {}
    dataset_fingerprint: str = ""
    bad_files: Count = 0
    paused: bool = False
    nonce: str = ""  # the challenge of the describe task it answers (RoundConfig.nonce)

    @classmethod
    def declared_splits(cls, wire: object) -> DeclaredSplits | None:
        """The declared train/val/test sizes, or None when the answer does not give all."""
        try:
            splits = cls.decode(wire).splits
        except AnswerInvalid:
            return None
        if not {"train", "val", "test"} <= set(splits):
            return None
        return {k: int(splits[k]) for k in ("train", "val", "test")}


class Status(_Answer):
    """A task a hospital did not carry out: declined (paused, expired, refused) or error."""

    status: Literal["declined", "error"]  # type: ignore[assignment]
    reason: str = ""
    message: str = ""

    def encode(self) -> WireMap:
        return self.model_dump(exclude_unset=True)  # only what was said


# ---------------------------------------------------------------- secure aggregation

# A Shamir share point as the hospital sends it: ASCII digits (str.isdigit() would also take
# "²" or "٣", which int() then refuses), 1..65535 (two bytes in the encrypted share).
SharePoint = Annotated[str, Field(strict=True, pattern=r"^[0-9]{1,5}$")]
# A share value in the 521-bit Shamir field, lower-case hex (leukofed.secagg).
ShareValue = Annotated[str, Field(strict=True, pattern=r"^[0-9a-f]{1,132}$")]


class SecAggReveal(BaseModel):
    """Stage 4 of secure aggregation (leukofed.secagg.Party.reveal): for each hospital whose
    share the sender holds, ``[kind, x, share]``: ``b``, a share of a survivor's self-mask
    seed; ``s``, of a dropped hospital's mask key. Decoded by the aggregator after the
    signature over the raw fields is checked (services/aggregator/secure.py)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    purpose: Annotated[str, Field(strict=True)]
    reveals: Annotated[dict[Annotated[str, Field(strict=True, max_length=64)],
                            tuple[Literal["b", "s"], SharePoint, ShareValue]],
                       Field(max_length=10_000)]

    @field_validator("reveals")
    @classmethod
    def _points(cls, value: dict[str, tuple[str, str, str]]
                ) -> dict[str, tuple[str, str, str]]:
        bad = sorted(peer for peer, (_, x, _) in value.items() if not 0 < int(x) < 2**16)
        if bad:
            raise ValueError(f"share points outside 1..65535 for {bad[:3]}")
        return value

    @classmethod
    def decode(cls, wire: object) -> SecAggReveal:
        """From the wire; AnswerInvalid naming each bad field when it does not hold."""
        if not isinstance(wire, dict):
            raise AnswerInvalid(f"reveal answer is a {type(wire).__name__}, not a map")
        try:
            return cls.model_validate(wire)
        except ValidationError as exc:
            raise AnswerInvalid(_fields(exc)) from None


# ---------------------------------------------------------------- the run record


# One round as a run record keeps it (services/aggregator/round_logic.round_summary builds
# it). Functional form: one key is "global", a keyword in Python.
RoundSummary = TypedDict("RoundSummary", {
    "round": int, "attempt": int, "selected": list[str], "participants": dict[str, int],
    "rejected": dict[str, str], "failed": dict[str, str], "global": dict[str, float],
    "confusion": dict[str, list[list[int]]], "hospitals": dict[str, dict[str, float]],
    "bytes": dict[str, int], "sha256": dict[str, str], "fingerprints": dict[str, str],
    "acquisition_profile": "dict[str, object] | None",
    "stain_targets": "list[list[list[float]]] | None",
    "calibration": "dict[str, object] | None", "server_conformal": "dict[str, object] | None",
    "membership": "dict[str, object] | None",
    "class_counts": dict[str, dict[str, int]], "timings": dict[str, float],
    "privacy": dict[str, object], "bn_calibration": dict[str, object],
    "head_rebalance": dict[str, object], "secure_aggregation": dict[str, object],
    # which audits this version skipped and why ({"colour"|"membership": reason}; audit_plan)
    "audit_skipped": dict[str, str],
}, total=False)


class RunRecord(TypedDict, total=False):
    """A run as the aggregator stores it (services/aggregator/run_records.py, run.json)."""

    id: str
    config: dict[str, object]  # services.aggregator.config.RunConfig, dumped
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    reason: str | None
    created: float
    updated: float
    current_round: int
    completed_round: int
    registered_round: int
    rounds: list[RoundSummary]
    versions: dict[str, str]  # round -> registered model version
    mlflow_run_id: str | None
    rng_state: dict[str, object] | None
    events: list[dict[str, object]]
    cancel_requested: bool
    aborted_rounds: list[dict[str, object]]
    rejections: dict[str, dict[str, int]]  # hospital -> reason -> count
    # Hospitals whose laboratory the run answers: those its first selection could choose,
    # and later ones once out of probation (services/aggregator/round_logic.profile_members).
    established_hospitals: list[str]
