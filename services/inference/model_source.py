"""Which model is served: follow an alias (or a fixed version) and hot-swap atomically.

The watcher polls the registry. When the alias moves it loads the new version beside the
old one (its signed ONNX file from the store, a session, a warm-up run) and only then
replaces the single ``current`` reference. A batch takes that reference once when it
starts, so requests in flight finish on the model they started with and none fails during
a swap. A version that failed its parity check, or whose ONNX file is not the one the
aggregator signed, is refused for good and the previous one keeps serving; one not
published yet, and transient errors (MLflow unreachable), are retried each poll.

Each version's metadata may carry its training images' acquisition profile
(``leukofed.ood``); the served model judges every input against it, so an answer on an
image unlike the training data says "refer to a hematologist". A version without a profile
(or with a malformed one, which is logged, never fatal) is served with the check marked
unavailable. Its calibration (temperature and conformal prediction sets) and its model
card are loaded the same way (``answers.load_calibration``, ``answers.load_card``): absent
or malformed ones are logged once and said in every answer, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from leukofed.approval import NotApproved
from leukofed.calibration import Calibration
from leukofed.export import ParityError, read_onnx_metadata
from leukofed.ood import AcquisitionProfile
from registry.client import RegistryError

from . import runtime
from .answers import (
    NO_CALIBRATION,
    NO_CARD,
    Answer,
    ModelCard,
    answers,
    load_calibration,
    load_card,
)
from .approvals import ServingApprovals
from .onnx_files import (
    UNCHECKED,
    ExportError,
    NotPublished,
    OnnxArtifact,
    OnnxStore,
    UntrustedModel,
    VersionInfo,
)
from .settings import InferenceSettings

log = logging.getLogger(__name__)

NO_PROFILE = ("this model version carries no acquisition profile; out-of-distribution "
              "check unavailable")
ADVICE_REFER = ("Refer to a hematologist: this image is unlike the images the model was "
                "trained on, so its label is not reliable and must not be used.")
ADVICE_SUPPORT = ("Decision support, not a diagnosis: the image resembles the model's "
                  "training images; review the result with the full clinical and "
                  "laboratory picture.")
ADVICE_UNCHECKED = ("Decision support, not a diagnosis: whether this image resembles the "
                    "model's training images could not be checked; review the result with "
                    "particular care.")


def load_profile(metadata: dict[str, Any], version: str = "?"
                 ) -> tuple[AcquisitionProfile | None, str]:
    """The version's acquisition profile, or None and why it is unavailable.

    A malformed profile is logged and treated as absent: it must never stop serving."""
    raw = metadata.get("acquisition_profile")
    if raw is None:
        return None, NO_PROFILE
    try:
        profile = AcquisitionProfile.from_dict(raw)  # checks shapes, finiteness, bounds
        profile.judge(profile.mean)  # one dry run: judging cannot fail later on shapes
    except Exception as exc:
        log.error("version %s has a malformed acquisition profile (%s: %s); serving it "
                  "without the out-of-distribution check", version, type(exc).__name__, exc)
        why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return None, (f"this model version's acquisition profile is malformed ({why}); "
                      "out-of-distribution check unavailable")
    return profile, ""


@dataclass(frozen=True)
class Referral:
    """The out-of-distribution verdict on one model input, in the API's words."""

    in_distribution: bool | None  # None: not checked
    refer: bool | None  # None: unknown (no profile); True: refer to a hematologist
    reasons: tuple[str, ...]
    distance: float | None

    @property
    def advice(self) -> str:
        if self.refer:
            return ADVICE_REFER
        return ADVICE_SUPPORT if self.refer is False else ADVICE_UNCHECKED

    def fields(self) -> dict[str, Any]:
        return {"in_distribution": self.in_distribution, "refer": self.refer,
                "refer_reasons": list(self.reasons), "ood_distance": self.distance,
                "advice": self.advice}


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    alias: str | None
    run_id: str | None
    session: Any
    metadata: dict[str, Any]
    sha256: str
    onnx_origin: str
    parity_max_abs_diff: float | None
    providers: list[str]
    signature: str = UNCHECKED  # "verified: ..." when the aggregator's signature was checked
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    profile: AcquisitionProfile | None = field(default=None, compare=False, repr=False)
    profile_note: str = NO_PROFILE  # why there is no profile (when there is none)
    calibration: Calibration | None = field(default=None, compare=False, repr=False)
    calibration_note: str = NO_CALIBRATION  # why there is no calibration (when none)
    card: ModelCard | None = field(default=None, compare=False, repr=False)
    card_note: str = NO_CARD  # why there is no model card (when none)

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    def predict(self, images: np.ndarray) -> np.ndarray:
        return runtime.run(self.session, images)

    def answers(self, probs: np.ndarray, referrals: list[Referral]) -> list[Answer]:
        """The answers for the model's RAW probabilities (N, C) and their referrals:
        calibrated probabilities, prediction sets, malignant, refer (``answers.answers``)."""
        return answers(self.classes, probs, referrals, self.calibration,
                       self.calibration_note)

    def judge(self, images: np.ndarray) -> list[Referral]:
        """One Referral per model input (N, S, S, 3; 0-255, exactly what the model saw).

        CPU work (a few ms per image): call it off the event loop."""
        if self.profile is None:
            return [Referral(None, None, (self.profile_note,), None)] * len(images)
        out = []
        for image in images:
            try:
                (verdict,) = self.profile.judge_images(image[None])
            except Exception as exc:  # never lose the answer; refer, to be safe
                log.exception("out-of-distribution check failed on one image")
                out.append(Referral(None, True, (
                    f"the out-of-distribution check failed on this image "
                    f"({type(exc).__name__}); treat it as unlike the training images",), None))
                continue
            if not np.isfinite(verdict.distance):  # a statistic could not be measured
                out.append(Referral(False, True, (*verdict.reasons, "the image's acquisition "
                                    "statistics could not be measured"), None))
                continue
            out.append(Referral(verdict.in_distribution, verdict.refer, verdict.reasons,
                                verdict.distance))
        return out


class ModelSource:
    def __init__(self, settings: InferenceSettings,
                 resolver: Callable[[], VersionInfo | None] | None = None,
                 fetch_onnx: Callable[[VersionInfo], OnnxArtifact] | None = None,
                 approvals: ServingApprovals | None = None) -> None:
        self.settings = settings
        self.current: ServedModel | None = None
        self.status = "starting: the registry has not been asked yet"
        self.last_error: str | None = None
        self.refused: dict[str, str] = {}
        # The version the alias named at the last successful look-up: an answer calls the
        # served version by the alias only while the alias still names it.
        self.alias_version: str | None = None
        self.swaps = 0
        self.on_swap: list[Callable[[ServedModel], None]] = []
        self._lock = threading.Lock()  # one refresh at a time
        if resolver is None or fetch_onnx is None:
            from leukofed.signing import load_public_key
            from registry.client import Registry

            self._registry = Registry(settings.tracking_uri, settings.model_name)
            key = (load_public_key(settings.model_public_key_file)
                   if settings.model_public_key_file else None)
            if key is not None and not settings.model_version and approvals is None:
                # Signed mode, following an alias: only an approved version is served.
                approvals = ServingApprovals(key, settings.model_alias,
                                             settings.onnx_cache_dir)
            schemes = [x.strip().lower() for x in settings.artifact_schemes.split(",")
                       if x.strip()]
            store = OnnxStore(settings.onnx_cache_dir, self._registry, key, schemes,
                              approve=approvals.check if approvals is not None else None)
        self.approvals = approvals
        self._resolve = resolver or self._resolve_registry
        self._fetch = fetch_onnx or store.get

    @property
    def ready(self) -> bool:
        return self.current is not None

    def alias_of(self, model: ServedModel) -> str | None:
        """The alias ``model`` is served under, or None once the alias has moved on (the
        new version still loading, or refused): never "champion" for a former champion."""
        if model.alias is None or self.alias_version != model.version:
            return None
        return model.alias

    def _resolve_registry(self) -> VersionInfo | None:
        s = self.settings
        if s.model_version:
            try:
                return self._registry.version(s.model_version)
            except RegistryError as exc:
                if exc.missing:
                    return None
                raise
        return self._registry.alias(s.model_alias)

    def _missing_reason(self) -> str:
        s = self.settings
        if s.model_version:
            return f"model {s.model_name!r} has no version {s.model_version}"
        return (f"no version of model {s.model_name!r} has the alias {s.model_alias!r} yet: "
                "promote one (MLflow UI or `leukofed promote`)")

    def refresh(self) -> ServedModel | None:
        """Resolve the target once and swap to it when it changed. Thread-safe."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> ServedModel | None:
        s = self.settings
        try:
            info = self._resolve()
        except Exception as exc:
            self._note(f"cannot read the registry at {s.tracking_uri}: {exc}")
            return self.current
        self.alias_version = None if info is None else info.version
        if info is None:
            self._note(self._missing_reason())
            return self.current
        if self.current is not None and self.current.version == info.version:
            if self.approvals is not None:  # a renewed approval raises the newest seen
                self.approvals.observe(info, self.current.sha256)
            return self.current
        if info.version in self.refused:
            return self.current
        self.status = f"loading version {info.version} of {info.name!r}"
        try:
            served = self._load(info)
        except NotPublished as exc:
            self._note(str(exc))
            return self.current
        except NotApproved as exc:  # asked again at the next poll; the current one serves
            reason = (f"version {info.version} is @{s.model_alias} but not approved for "
                      f"serving ({exc.reason}: {exc}); still serving "
                      f"{self.current.version if self.current else 'nothing'}")
            if self.last_error != reason:
                log.warning("%s", reason)
            self._note(reason)
            return self.current
        except (ParityError, ExportError) as exc:
            why = ("not the file the aggregator signed" if isinstance(exc, UntrustedModel)
                   else "failed the ONNX parity check" if isinstance(exc, ParityError)
                   else "not servable")
            reason = f"version {info.version} refused ({why}): {exc}"
            self.refused[info.version] = reason
            self._note(reason)
            log.error("%s; still serving %s", reason,
                      self.current.version if self.current else "nothing")
            return self.current
        except Exception as exc:
            self._note(f"loading version {info.version} failed (will retry): {exc}")
            log.exception("loading version %s failed", info.version)
            return self.current
        old, self.current = self.current, served  # the atomic swap: one reference
        self.swaps += 1
        self.status = f"serving version {served.version}"
        self.last_error = None
        log.info("now serving %s version %s (was %s), ONNX from %s, providers %s, "
                 "signature %s", served.name, served.version,
                 old.version if old else "nothing", served.onnx_origin, served.providers,
                 served.signature)
        for hook in self.on_swap:
            hook(served)
        return served

    def _note(self, message: str) -> None:
        self.last_error = message
        if self.current is None:
            self.status = message

    def _load(self, info: VersionInfo) -> ServedModel:
        artifact = self._fetch(info)
        s = self.settings
        session = runtime.make_session(artifact.data, s.provider, s.threads)
        metadata = read_onnx_metadata(session)
        profile, note = load_profile(metadata, info.version)
        calibration, calibration_note = load_calibration(metadata, info.version)
        card, card_note = load_card(metadata, info.version)
        size = int(metadata["image_size"])
        # Warm up at both ends of the batch range so the first requests do not pay for it.
        for n in {1, s.max_batch_size}:
            runtime.run(session, np.zeros((n, size, size, 3), np.float32))
        return ServedModel(
            name=info.name, version=info.version,
            alias=None if s.model_version else s.model_alias, run_id=info.run_id,
            session=session, metadata=metadata, sha256=artifact.sha256,
            onnx_origin=artifact.origin, parity_max_abs_diff=artifact.parity_max_abs_diff,
            providers=list(session.get_providers()), signature=artifact.signature,
            profile=profile, profile_note=note,
            calibration=calibration, calibration_note=calibration_note, card=card,
            card_note=card_note,
        )

    async def watch(self) -> None:
        """Poll forever (cancel to stop); the first check happens at once."""
        while True:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(self.settings.poll_interval_s)
