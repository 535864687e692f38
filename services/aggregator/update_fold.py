"""Fit answers folded in as they arrive, so a round's memory does not grow with hospitals.

The gather step hands each fit answer to ``UpdateFold.take`` the moment it is read off
Redis (and forgotten there). The answer goes through the same checks as ever
(leukofed.validation.check_tensor_answers: signature first, then counts, structure, wire
format, norm); a usable update is added to a RunningSum and its tensors dropped, and only
its small report (metrics, timings, class counts) is kept. The strategy then aggregates
the one mean, which for the streaming rules (``Strategy.streams``) is the same result.

Rules that need every update (median, Krum, central DP's per-update clipping) hold them
all; ``held_updates_problem`` says when a round would need more memory than allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from leukofed.protocol import FitReport, WireAnswer
from leukofed.strategies import ClientResult, RunningSum

Tensors = dict
# (answers) -> ({hospital: (typed answer, tensors)}, {hospital: reason})
Check = Callable[[Mapping[str, WireAnswer]], tuple[dict[str, tuple[object, Tensors]],
                                                   dict[str, str]]]


class UpdateFold:
    def __init__(self, check: Check) -> None:
        self.check = check
        self.sum = RunningSum()
        self.reports: dict[str, FitReport] = {}
        self.participants: dict[str, int] = {}
        self.rejected: dict[str, str] = {}

    def take(self, hospital: str, answer: WireAnswer) -> WireAnswer:
        """Check one answer and fold it in; returns what the round keeps of it (no tensors)."""
        usable, rejected = self.check({hospital: answer})
        self.rejected.update(rejected)
        if hospital in usable:
            typed, tensors = usable[hospital]
            n = int(typed.num_examples)  # type: ignore[attr-defined]
            self.sum.add(tensors, n)
            self.participants[hospital] = n
            if isinstance(typed, FitReport):
                self.reports[hospital] = FitReport.model_construct(
                    **{k: getattr(typed, k) for k in FitReport.model_fields})
        return {"status": "ok", "hospital": hospital}

    def accepted(self) -> list[ClientResult]:
        """The round's one result for the strategy: the example-weighted mean."""
        if not self.participants:
            return []
        return [ClientResult(f"mean of {len(self.participants)}", self.sum.mean(),
                             sum(self.participants.values()))]


def held_updates_problem(strategy_name: str, hospitals: int, update_bytes: int,
                         limit_mb: float) -> str | None:
    """Why a round that holds every update cannot run, or None when it fits."""
    need_mb = hospitals * update_bytes / 2**20
    if need_mb <= limit_mb:
        return None
    return (f"{strategy_name} holds every update of a round in memory: {hospitals} hospitals "
            f"x {update_bytes / 2**20:.1f} MB = {need_mb:.0f} MB, over the aggregator's "
            f"limit of {limit_mb:.0f} MB (LEUKOFED_AGGREGATOR_MAX_HELD_UPDATES_MB). Select "
            "fewer hospitals per round (fraction) or use a rule that aggregates as updates "
            "arrive (fedavg, fedprox, fedavgm, fedadagrad, fedadam, fedyogi)")
