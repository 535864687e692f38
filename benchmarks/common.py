"""What every benchmark records next to its numbers: machine, versions, date, command."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shlex
import sys
from pathlib import Path
from typing import Any

# Benchmarks start the services bare (no keys, tokens or TLS) to measure them: the services'
# development mode (leukofed.startup); a deployment never runs with it.
os.environ.setdefault("LEUKOFED_DEV_MODE", "1")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for mod in ("tensorflow", "keras", "onnxruntime", "tf2onnx", "numpy"):
        with contextlib.suppress(ImportError, AttributeError):
            versions[mod] = __import__(mod).__version__
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def header(command: str | None = None) -> dict[str, Any]:
    return {"date": now_iso(),
            "command": command or " ".join(shlex.quote(a) for a in sys.argv),
            "machine": machine()}


def carry_earlier(doc: dict[str, Any], path: str | Path) -> None:
    """``--append``: keep an earlier run's scenarios in ``doc`` and chain its command and
    date with this run's, so the file says how every row it holds was made."""
    if not Path(path).exists():
        return
    earlier = json.loads(Path(path).read_text())
    for key, value in earlier.items():  # other sections (a join scenario) stay too
        doc.setdefault(key, value)
    doc["scenarios"] = earlier["scenarios"]
    doc["command"] = f"{earlier['command']}; {doc['command']}"
    doc["date"] = f"{earlier['date']}; {doc['date']}"


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=float))


def robustness(predict: Any, audit_set: Any, profile: Any, test_x: Any, test_y: Any,
               seed: int = 0, probe_images: int = 120, outside_labs: int = 5
               ) -> dict[str, Any]:
    """What a model's numbers mean, for the benchmark tables: the shortcut audit
    (leukofed.audit), accuracy on an unseen simulated laboratory (leukofed.labs), and the
    share of images referred (``referral_shares``)."""

    from leukofed.audit import run_audit
    from leukofed.labs import apply_batch, unseen_lab
    from leukofed.metrics import classification_metrics

    out: dict[str, Any] = {"audit": run_audit(predict, audit_set)}
    lab = apply_batch(test_x, unseen_lab(seed, "inside"))
    m = classification_metrics(test_y, predict(lab))
    out["unseen_lab"] = {"accuracy": float(m["accuracy"]), "macro_f1": float(m["macro_f1"]),
                         "referred": referred_share(profile, lab)}
    out["referred"] = referral_shares(profile, test_x, seed, probe_images, outside_labs)
    return out


def referred_share(profile: Any, images: Any = None, described: Any = None) -> float:
    """Share of the images (or of their acquisition descriptors, when already computed)
    that the acquisition profile (leukofed.ood) refers to a hematologist."""
    import numpy as np

    from leukofed.ood import descriptors

    rows = descriptors(images) if described is None else described
    return float(np.mean([profile.judge(d).refer for d in rows]))


# The columns referral_shares fills besides the in-distribution test images, in table order.
REFERRAL_KINDS = ("grayscale", "magnified_2x", "magnified_0.5x", "blank_field", "natural_photo",
                  "outside_labs")


def referral_shares(profile: Any, test_x: Any, seed: int = 0, probe_images: int = 120,
                    outside_labs: int = 5) -> dict[str, float]:
    """Share of images the acquisition profile (leukofed.ood) refers: the in-distribution
    test images, each kind of out-of-distribution probe (leukofed.probes) made from a subset
    of them, and laboratories outside the training range. It needs no model."""
    return referral_shares_by_rule({"": profile}, test_x, seed, probe_images, outside_labs)[""]


def referral_shares_by_rule(profiles: dict[str, Any], test_x: Any, seed: int = 0,
                            probe_images: int = 120,
                            outside_labs: int = 5) -> dict[str, dict[str, float]]:
    """``referral_shares`` for several profiles (rules) over the same images: each image's
    acquisition descriptor, the slow part, is computed once and judged by every rule."""
    import numpy as np

    from leukofed.labs import apply_batch, unseen_lab
    from leukofed.ood import descriptors
    from leukofed.probes import probe_sets

    step = max(1, len(test_x) // probe_images)
    subset = test_x[::step][:probe_images]
    per_lab = max(1, len(subset) // outside_labs)
    groups = {"in_distribution_test": [test_x], **{k: [v] for k, v in
                                                    probe_sets(subset, seed).items()},
              "outside_labs": [apply_batch(subset[i * per_lab:(i + 1) * per_lab],
                                           unseen_lab(seed + 100 + i, "outside"))
                               for i in range(outside_labs)]}
    described = {k: [descriptors(images) for images in sets] for k, sets in groups.items()}
    # A group of several image sets (the outside laboratories) is the mean of their shares.
    return {rule: {k: float(np.mean([referred_share(profile, described=desc) for desc in sets]))
                   for k, sets in described.items()}
            for rule, profile in profiles.items()}


def conformal_rows(val_probs: Any, val_y: Any, test_probs: Any, test_y: Any, test_refer: Any,
                   coverages: tuple[float, ...] = (0.90, 0.95, 0.99)) -> dict[str, Any]:
    """Calibration and prediction sets as a served version would answer (leukofed.calibration):
    the temperature and quantiles fitted from validation sums, measured on the test split.
    ``test_refer`` is the acquisition profile's refer decision per test image: an image is
    answered only when its set is one class and it is in distribution."""

    from leukofed.calibration import (
        Calibration,
        answered_report,
        calibration_report,
        calibration_sums,
        validate_sums,
    )

    out: dict[str, Any] = {"rows": []}
    val, test = (validate_sums(calibration_sums(val_probs, val_y)),
                 validate_sums(calibration_sums(test_probs, test_y)))
    for coverage in coverages:
        report = calibration_report(val, coverage, test)
        answered = answered_report(Calibration.from_dict(report["calibration"]), test_probs,
                                   test_y, test_refer)
        out["rows"].append({"coverage_target": coverage, "temperature": report["temperature"],
                            **{k: answered[k] for k in (
                                "coverage", "class_coverage", "mean_set_size",
                                "set_refer_share", "refer_share", "accuracy_answered")}})
        out.update({k: report[k] for k in ("temperature", "ece_before", "ece_after",
                                           "test_ece_before", "test_ece_after")})
    return out
