"""Which versions a round audits: the colour audit (leukofed.audit, about 10 s of
aggregator CPU a version at compact_cnn @128 on 2 cores) and the membership audit
(leukofed.membership, about 5 s per hospital) cost more than the rest of a version's
registration, and only a version the release gate (leukofed.gate) can pass needs them.

With ``RunConfig.audits == "promotable"`` a version is audited when its numbers on the
aggregator's test split already reach every other floor of the gate (the aggregator's own
``LEUKOFED_GATE_*`` floors), and always where the run needs it whatever the numbers: the
membership audit's reference round (each hospital keeps that model's losses for the
calibrated attack of later rounds) and the run's last round (its final version carries the
whole card). The membership audit is decided before the hospitals evaluate, on the floors
that need no calibration; the colour audit after, on all of them but the audits'. A version
not audited is still registered, exported and signed; it says why (``audit_skipped``), and
the gate refuses it as not audited. Without a server test split nothing can be judged early
and every version is audited as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from leukofed.card import build_card
from leukofed.gate import GateFloors, check_gate
from services.aggregator.config import RunConfig

# Gate rows that are the audits themselves, and rows that need the hospitals' calibration.
AUDIT_ROWS = frozenset({"follow_colour", "membership_auc"})
CALIBRATION_ROWS = frozenset({"coverage", "refer_share"})


def server_card(confusion: Sequence[Sequence[int]], calibration: dict[str, Any] | None,
                conformal: dict[str, Any] | None) -> dict[str, Any]:
    """The parts of a model card the gate reads, from the server test split alone (point
    estimates; the bootstrap intervals are not read, so a few draws do)."""
    return build_card({"model_name": "-", "version": "-",
                       "test": {"source": "the aggregator's held-out test split",
                                "confusion": [list(row) for row in confusion]},
                       "calibration": calibration, "conformal_test": conformal}, n_boot=8)


def audit_skipped(cfg: RunConfig, floors: GateFloors, confusion: Sequence[Sequence[int]] | None,
                  calibration: dict[str, Any] | None, conformal: dict[str, Any] | None,
                  forced: bool,
                  before_calibration: bool = False) -> str | None:
    """None when this version is to be audited, else why not (for the run record, the
    version's ``audit_skipped`` tag and the gate's note). ``forced``: a round that is
    always audited; ``before_calibration``: judge only the floors the server test split
    decides alone (the calibration rows are not known yet)."""
    if cfg.audits == "every" or forced or confusion is None:
        return None
    verdict = check_gate(server_card(confusion, calibration, conformal), {}, floors)
    ignored = AUDIT_ROWS | (CALIBRATION_ROWS if before_calibration else frozenset())
    failed = [c for c in verdict.failed if c.name not in ignored]
    if not failed:
        return None
    return ("cannot be promoted: " + "; ".join(c.describe() for c in failed)
            + " on the aggregator's test split (run config audits: promotable)")
