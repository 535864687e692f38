"""Fault drills against real processes: a hospital worker that stalls or sends a bad update.

Test-only: production workers (services/client/worker.py) carry none of it. A drill worker
is the same Celery app with a HospitalClient subclass overriding its two seams and, for fit
answers, its signature:

    celery -A drills worker ...   (tests/integration on PYTHONPATH; fedstack.Worker does it)

with ``LEUKOFED_DRILL_FAULT`` = nan | shape | norm | unsigned | forged | replay | inflate
(a comma list cycles by round: "nan,shape,norm") and/or ``LEUKOFED_DRILL_DELAY_S`` (stall
before training). ``inflate``: the fit answer claims 10**9 examples, genuinely signed.

Declarations (issue 26, finding 1): ``LEUKOFED_DRILL_DESCRIBE`` = a comma list of honest |
replay | unsigned | late, one per describe task in turn (replay: the first declaration this
worker made, whatever it is asked now; late: answered after ``LEUKOFED_DRILL_DESCRIBE_DELAY_S``),
and ``LEUKOFED_DRILL_EVALUATION=perfect``: every evaluation answer claims 10**6 test images,
all right, genuinely signed.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from leukofed.protocol import RoundConfig
from services.client.hospital import HospitalClient

log = logging.getLogger(__name__)

FAULT_ENV = "LEUKOFED_DRILL_FAULT"
DELAY_ENV = "LEUKOFED_DRILL_DELAY_S"
FAULTS = ("", "nan", "shape", "norm", "unsigned", "forged", "replay", "inflate")
DESCRIBE_ENV = "LEUKOFED_DRILL_DESCRIBE"
DESCRIBE_DELAY_ENV = "LEUKOFED_DRILL_DESCRIBE_DELAY_S"
DESCRIBES = ("honest", "replay", "unsigned", "late")
EVALUATION_ENV = "LEUKOFED_DRILL_EVALUATION"
PERFECT = {"n": 10**6, "loss": 0.0, "accuracy": 1.0,
           "confusion_matrix": [[250_000 if i == j else 0 for j in range(4)] for i in range(4)]}


def fault_for(faults: str, server_round: int) -> str:
    """The drill of this round: a comma list cycles by round (round 1 takes the first)."""
    names = faults.split(",")
    if any(n not in FAULTS for n in names):
        raise ValueError(f"{FAULT_ENV} must be one of {FAULTS} or a comma list of them")
    return names[(max(server_round, 1) - 1) % len(names)]


class DrillClient(HospitalClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.faults = os.environ.get(FAULT_ENV, "")
        fault_for(self.faults, 1)  # a typo fails at start
        self.delay_s = float(os.environ.get(DELAY_ENV, "0") or 0)
        self._previous_update: dict[str, Any] | None = None
        self.describes = [d for d in os.environ.get(DESCRIBE_ENV, "").split(",") if d]
        if set(self.describes) - set(DESCRIBES):
            raise ValueError(f"{DESCRIBE_ENV} must be a comma list of {DESCRIBES}")
        self.describe_delay_s = float(os.environ.get(DESCRIBE_DELAY_ENV, "0") or 0)
        self.perfect_evaluation = os.environ.get(EVALUATION_ENV) == "perfect"
        self._described = 0
        self._first_declaration: dict[str, Any] | None = None

    def _fault(self, cfg: RoundConfig) -> str:
        return fault_for(self.faults, cfg.round) if self.faults else ""

    def _before_training(self, cfg: RoundConfig) -> None:
        if self.delay_s:
            log.warning("DRILL: stalling %.1f s before training", self.delay_s)
            time.sleep(self.delay_s)

    def _trained_weights(self, weights: dict[str, np.ndarray], cfg: RoundConfig
                         ) -> dict[str, np.ndarray]:
        fault = self._fault(cfg)
        if fault not in ("nan", "shape", "norm"):  # signature drills act in _sign_answer
            return weights
        log.warning("DRILL: sending a %r update", fault)
        floats = [n for n, w in weights.items() if np.issubdtype(w.dtype, np.floating)]
        if fault == "nan":
            weights[floats[0]] = np.full_like(weights[floats[0]], np.nan)
        elif fault == "shape":
            name = next(n for n in floats if weights[n].ndim >= 1 and weights[n].shape[0] > 1)
            weights[name] = weights[name][:-1]
        else:
            weights = {n: w * np.asarray(1000.0, w.dtype) if n in floats else w
                       for n, w in weights.items()}
        return weights

    def describe(self, auth: Any = None, config: dict[str, Any] | None = None,
                 blob: bytes = b"", task_id: str = "") -> dict[str, Any]:
        how = self.describes[self._described % len(self.describes)] if self.describes else ""
        self._described += 1
        if how == "late":
            log.warning("DRILL: declaring %.1f s late", self.describe_delay_s)
            time.sleep(self.describe_delay_s)
        answer = super().describe(auth, config, blob, task_id)
        if answer.get("status") != "ok":
            return answer
        self._first_declaration = self._first_declaration or answer
        if how == "replay":
            log.warning("DRILL: replaying my first declaration")
            return self._first_declaration
        if how == "unsigned":
            answer.pop("signature", None)
        return answer

    def _sign_answer(self, answer: dict[str, Any], cfg: RoundConfig,
                     kind: str = "update", blob: bytes = b"", task_id: str = "",
                     key: Any = None) -> dict[str, Any]:
        if kind == "evaluation" and self.perfect_evaluation:
            log.warning("DRILL: a perfect evaluation on 10**6 images")
            answer = {**answer, "splits": {"test": dict(PERFECT)}, "num_examples": PERFECT["n"]}
        if kind != "update":  # the signature drills act on fit updates only
            return super()._sign_answer(answer, cfg, kind, blob, task_id, key)
        fault = self._fault(cfg)
        if fault == "inflate":  # then signed with this hospital's own key, as it would
            log.warning("DRILL: claiming 10**9 examples")
            answer = {**answer, "num_examples": 10**9}
        previous, self._previous_update = self._previous_update, answer
        if fault == "unsigned":
            return answer
        if fault == "replay" and previous is not None:
            log.warning("DRILL: replaying the previous round's update")
            return previous
        if fault == "forged":  # a key that is not this hospital's: what an impostor has
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            log.warning("DRILL: signing with a key that is not ours")
            key = Ed25519PrivateKey.generate()
        return super()._sign_answer(answer, cfg, kind, blob, task_id, key)


def __getattr__(name: str) -> Any:
    # `celery -A drills` looks up `app`; built on first access, as services.client.worker.
    if name in ("app", "celery"):
        from services.client.worker import create_app

        value = create_app(client_factory=DrillClient)
        globals()["app"] = globals()["celery"] = value
        return value
    raise AttributeError(name)
