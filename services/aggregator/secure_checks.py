"""What the aggregator checks of an unmasked secure sum before anything divides by it
(issue 26, finding 4: a hospital set its count coordinate so the sum's count became 6e-05
instead of 400, the mean update 67108 instead of 0.01, and that version was registered).

It sees only the sum, so both checks are on the aggregate:

* **the count.** Every hospital adds exactly its cap to the ``count`` coordinate (weight
  times 1): fit, all its training images, which the keys stage held to its verified
  declaration; calibration, the images it measured; central DP, weight 1. So the count is
  the survivors' caps added up (their number under DP), less under one quantisation step
  per hospital (each truncates towards zero). Anything else is a hospital that wrote its
  own count.
* **the mean.** Every coordinate a hospital adds is its weight times a value clipped to that
  coordinate's range, so the weighted mean lies within the range. A vector pushed past its
  range (it is only numbers mod 2^bits) can still reach up to the whole bound the sum was
  scaled for, which is more than the survivors' weight after a drop-out and under DP.

A sum that fails either is refused (``SecureAborted``): the round is aborted with the reason
in the run's events and the run goes on (rounds.py), or the averaged BatchNorm statistics
stay (secure_steps.secure_calibrate).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from services.aggregator.secure import SecureAborted, SecureSum

if TYPE_CHECKING:
    from leukofed.secagg import VectorSpec

RELATIVE = 1e-9  # float64 rounding of the dequantised sums; the steps are counted apart


def checked_count(result: SecureSum, spec: VectorSpec, unit_weights: bool = False) -> float:
    """The sum's total weight, once the count is what the survivors declared and every
    coordinate's mean lies within its range; SecureAborted (with the numbers) otherwise.
    ``unit_weights``: every hospital weighed its vector by 1 (central DP)."""
    info = result.summary
    caps: dict[str, int] = info["caps"]  # the survivors': each at most its declaration
    expected = float(len(caps)) if unit_weights else float(sum(caps.values()))
    step = float(info["total_weight_bound"]) / (2.0 ** (int(info["bits"]) - 1) - 1.0)
    slack = len(caps) * step + RELATIVE * expected
    count = float(result.extras["count"])

    def refused(why: str) -> SecureAborted:
        # The sum cannot say whose vector broke it (that would take seeing one vector):
        # the event names the hospitals whose vectors it holds, the culprit among them.
        return SecureAborted(f"secure {info['purpose']} refused: {why}; not used (a sum of "
                             f"the vectors of {', '.join(sorted(caps))}, which cannot tell "
                             "whose it was)")

    if not (math.isfinite(count) and expected - slack <= count <= expected + slack):
        raise refused(f"the unmasked count is {count:.6g}, the {len(caps)} survivors' "
                      f"declared weights add up to {expected:g} (a hospital's vector is "
                      "not what it declared)")
    for name, value in result.extras.items():  # "unclipped": 0 or 1 per unit weight
        if name != "count" and not -slack <= value <= count + slack:
            raise refused(f"the unmasked {name} is {value:.6g}, outside 0..{count:g}")
    for name, bound in zip(spec.names, spec.ranges, strict=True):
        worst = float(np.max(np.abs(result.sums[name]), initial=0.0)) / count
        if not worst <= bound * expected / count * (1.0 + RELATIVE):
            raise refused(f"the mean of {name} reaches {worst:.6g}, beyond the {bound:g} "
                          "each hospital's values were clipped to")
    return count
