"""MLflow for federated runs: one MLflow run per federated run, metrics with step = round,
per-hospital metrics, curves and confusion matrices as PNG, a registered version per round."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from leukofed.card import build_card, card_html, card_markdown, with_version
from registry.client import Registry
from registry.model_versions import CANDIDATE_ALIAS
from services.aggregator.config import RunConfig
from services.aggregator.keras_ops import KerasModelOps

log = logging.getLogger(__name__)
CURVE_KEYS = ("val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1",
              "server_test_accuracy", "server_test_macro_f1",
              # the shortcut audit beside them (leukofed.audit): what the numbers mean
              "audit_recoloured_accuracy", "audit_spatial_accuracy",
              "audit_background_only_accuracy", "audit_follow_colour",
              "audit_histogram_accuracy",
              # calibration (leukofed.calibration): ECE before and after, conformal coverage
              "val_ece_before", "val_ece_after", "test_conformal_coverage",
              "server_test_set_refer_share",
              # the membership-inference audit (leukofed.membership): 0.5 is a coin
              "membership_auc", "membership_tpr_at_1pct_fpr")


def flat_params(cfg: RunConfig) -> dict[str, str]:
    out = {}
    for key, value in cfg.model_dump().items():
        if key == "strategy_params":
            out.update({f"strategy.{k}": str(v) for k, v in value.items()})
        else:
            out[key] = "all live" if key == "hospitals" and value is None else str(value)
    return {k: v[:500] for k, v in out.items()}


def round_metrics(summary: dict[str, Any]) -> dict[str, float]:
    metrics = {k: float(v) for k, v in summary["global"].items()}
    metrics.update({k: float(v) for k, v in summary.get("timings", {}).items()})
    metrics["participants"] = float(len(summary["participants"]))
    metrics["rejected"] = float(len(summary["rejected"]))
    metrics["examples"] = float(sum(summary["participants"].values()))
    metrics["bytes_per_hospital"] = (sum(summary["bytes"].values()) / len(summary["bytes"])
                                     if summary["bytes"] else 0.0)
    for hospital, values in summary["hospitals"].items():
        metrics.update({f"hospital/{hospital}/{k}": float(v) for k, v in values.items()})
    return {k: v for k, v in metrics.items() if v == v}  # MLflow rejects NaN in some stores


def plot_curves(rounds: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    xs = [r["round"] for r in rounds]
    for key in CURVE_KEYS:
        ys = [r["global"].get(key) for r in rounds]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=key)
    ax.set_xlabel("round")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def card_info(cfg: RunConfig, record: dict[str, Any], summary: dict[str, Any],
              model_name: str) -> dict[str, Any]:
    """What leukofed.card needs to describe one round's version, from the round summary."""
    confusion = summary.get("confusion", {})
    if "server_test" in confusion:
        test = {"source": "the aggregator's held-out test split",
                "confusion": confusion["server_test"]}
    elif "test" in confusion:
        test = {"source": "the hospitals' test splits, pooled", "confusion": confusion["test"]}
    else:
        test = None
    privacy = summary.get("privacy")
    glob = summary.get("global", {})
    return {
        "model_name": model_name, "version": f"round {summary['round']}",
        "run_id": record["id"], "created": time.strftime("%Y-%m-%d"),
        "model": cfg.model, "image_size": cfg.image_size,
        "recipe": {"cell_focus": cfg.cell_focus, "augmentation": cfg.augmentation,
                   "rotation_ensemble": cfg.rotation_ensemble},
        "training": {"hospitals": {h: {"num_examples": n,
                                       "class_counts": summary.get("class_counts", {}).get(h),
                                       "fingerprint": summary.get("fingerprints", {}).get(h, "")}
                                   for h, n in summary["participants"].items()},
                     "partition": None},
        "federation": {"strategy": cfg.strategy, "rounds": cfg.rounds,
                       "round": summary["round"],
                       "secure_aggregation": "secure_aggregation" in summary,
                       "privacy": _card_privacy(privacy)},
        "test": test,
        "calibration": summary.get("calibration"),
        "conformal_test": summary.get("server_conformal"),
        "audit": {k: v for k, v in glob.items() if k.startswith("audit_")} or None,
        "membership": summary.get("membership"),
        "referred_share": None,
        "acquisition_profile_images": (summary["acquisition_profile"]["count"]
                                       if summary.get("acquisition_profile") else None),
    }


def _aggregation_tag(secure: dict[str, Any] | None) -> str:
    """Which protocol produced the version: what the aggregator could see of each update."""
    if not secure:
        return "plain (the aggregator saw each hospital's update)"
    return (f"{secure['protocol']} ({secure['bits']}-bit, {secure['neighbours']} neighbours, "
            f"threshold {secure['threshold_fraction']}): the aggregator saw only the sum")


def _card_privacy(privacy: dict[str, Any] | None) -> dict[str, Any] | None:
    """The card's privacy: epsilon and delta; at the example level each hospital's too."""
    if not privacy:
        return None
    out: dict[str, Any] = {"epsilon": float(privacy["epsilon"]),
                           "delta": float(privacy["delta"])}
    if privacy.get("level") == "example":
        out.update(level="example", hospitals={h: float(v["epsilon"]) for h, v in
                                               privacy.get("hospitals", {}).items()})
    return out


def _privacy_tag(privacy: dict[str, Any] | None) -> str:
    """The budget spent up to this version, as every registered version carries it."""
    if not privacy:
        return "none (no differential privacy in this run)"
    if privacy.get("level") == "example":
        spent = ", ".join(f"{h} {float(v['epsilon']):.4g}"
                          for h, v in sorted(privacy.get("hospitals", {}).items()))
        return (f"example-level DP-SGD (unit: one training image): epsilon "
                f"{float(privacy['epsilon']):.4g} at delta {float(privacy['delta']):g}, the "
                f"largest hospital's (per hospital: {spent or 'none'}; clip norm "
                f"{float(privacy['clip_norm']):.4g} per image, RDP accountant)")
    return (f"{privacy['mode']} DP-FedAvg: epsilon {float(privacy['epsilon']):.4g} at delta "
            f"{float(privacy['delta']):g} (noise multiplier {privacy['noise_multiplier']:g}, "
            f"clip norm {float(privacy['clip_norm']):.4g}, sampling rate "
            f"{privacy['sampling_rate']:g}, RDP accountant)")


class MlflowTracker:
    """A federated run in MLflow, through the registry (the only module that talks to it)."""

    def __init__(self, registry: Registry, experiment: str, model_ops: KerasModelOps,
                 signing_key: Any | None = None) -> None:
        self.registry = registry
        self.experiment = experiment
        self.model_name = registry.model_name
        self.model_ops = model_ops
        # The aggregator's Ed25519 key: it signs each version's ONNX file, which is what the
        # inference service checks before serving it (registry.publish).
        self.signing_key = signing_key

    def start(self, record: dict[str, Any], cfg: RunConfig) -> str:
        run_id, exp_id = self.registry.open_run(
            self.experiment, cfg.name or f"federated-{record['id']}",
            {"leukofed.run_id": record["id"], "kind": "federated"}, flat_params(cfg),
            record.get("mlflow_run_id"))
        record["mlflow_experiment_id"] = exp_id
        return run_id

    def log_round(self, record: dict[str, Any], summary: dict[str, Any]) -> None:
        from leukofed.labels import CLASSES
        from leukofed.metrics import plot_confusion_matrix

        run_id = record["mlflow_run_id"]
        step = int(summary["round"])
        self.registry.log_metrics(run_id, round_metrics(summary), step)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            plot_curves(record["rounds"], d / "curves.png")
            self.registry.log_artifact(run_id, d / "curves.png")
            for split, cm in summary.get("confusion", {}).items():
                p = plot_confusion_matrix(cm, CLASSES, d / f"confusion_{split}_round{step:04d}.png",
                                          title=f"{split}, round {step}")
                self.registry.log_artifact(run_id, p, "confusion")
            (d / f"round{step:04d}.json").write_text(json.dumps(summary, indent=1))
            self.registry.log_artifact(run_id, d / f"round{step:04d}.json", "rounds")

    def register(self, record: dict[str, Any], cfg: RunConfig, summary: dict[str, Any],
                 weights: dict[str, Any]) -> str | None:
        glob = summary["global"]
        tags: dict[str, Any] = {
            "mlflow_run_id": record["mlflow_run_id"], "strategy": cfg.strategy,
            "strategy_params": json.dumps(cfg.strategy_kwargs(), sort_keys=True),
            "bn_mode": cfg.bn_mode, "fp16": cfg.fp16, "model": cfg.model,
            "image_size": cfg.image_size,
            "hospitals": ",".join(sorted(summary["participants"])),
            "example_counts": json.dumps(summary["participants"], sort_keys=True),
            "dataset_fingerprints": json.dumps(summary["fingerprints"], sort_keys=True),
            "privacy": _privacy_tag(summary.get("privacy")),
            "aggregation": _aggregation_tag(summary.get("secure_aggregation")),
        }
        # Whose measured BatchNorm statistics the version carries (the lineage of those too).
        calibration = summary.get("bn_calibration")
        tags["bn_calibration"] = (json.dumps(calibration["hospitals"], sort_keys=True)
                                  if calibration else "none (averaged statistics)")
        # Whose feature sums refitted the classifier head (leukofed.head_rebalance).
        head = summary.get("head_rebalance")
        tags["head_rebalance"] = (",".join(head["hospitals"]) or "none usable"
                                  if head else "off (averaged head)")
        if summary.get("privacy"):
            tags["dp_epsilon"] = f"{float(summary['privacy']['epsilon']):.6g}"
            tags["dp_delta"] = f"{float(summary['privacy']['delta']):g}"
        tags.update({k: f"{float(v):.6g}" for k, v in glob.items()
                     if k.endswith(("accuracy", "macro_f1", "loss"))
                     or k.startswith(("audit_", "membership_"))})
        extra: dict[str, Any] = {"run_id": record["id"], "round": summary["round"]}
        # What the training data looked like travels with the model: the inference service
        # refers images unlike it (leukofed.ood), `leukofed evaluate` recolours with the
        # stain targets (leukofed.audit).
        if summary.get("acquisition_profile"):
            extra["acquisition_profile"] = summary["acquisition_profile"]
        if summary.get("stain_targets"):
            extra["stain_targets"] = summary["stain_targets"]
        tags["acquisition_profile"] = (
            f"{summary['acquisition_profile']['count']} training images"
            if summary.get("acquisition_profile") else "none (refer check unavailable)")
        # The temperature and conformal quantiles travel with the model too: the inference
        # service answers with calibrated probabilities and a prediction set.
        if summary.get("calibration"):
            extra["calibration"] = summary["calibration"]["calibration"]
            tags["calibration"] = (f"temperature {summary['calibration']['temperature']:.4g}, "
                                   f"coverage {cfg.coverage:g}")
        else:
            tags["calibration"] = "none (no validation sums from hospitals)"
        tags.update({k: f"{float(v):.6g}" for k, v in glob.items()
                     if "ece" in k or "coverage" in k or k.endswith(("refer_share",
                                                                     "answered"))})
        # Audits skipped on a version that cannot be promoted (audit_plan): the gate says so.
        for audit, reason in (summary.get("audit_skipped") or {}).items():
            tags[f"skipped_{audit}_audit"] = reason
        # Where registering a version's time goes, in the run record (run status).
        timings = summary.setdefault("timings", {})
        clock = time.perf_counter
        start = clock()
        extra["card"] = build_card(card_info(cfg, record, summary, self.model_name))
        metadata = self.model_ops.metadata(cfg, extra)
        model = self.model_ops.keras_model(cfg, weights)
        timings["card_s"] = clock() - start
        start = clock()
        version = self.registry.register_round(model, metadata, record["mlflow_run_id"],
                                               record["id"], int(summary["round"]), tags)
        timings["register_keras_s"] = clock() - start
        start = clock()
        # ONNX is made where the model is made, checked against Keras and signed; only then
        # does `candidate` move, so nothing following it ever sees an unpublished version.
        self.registry.publish_onnx(version, record["mlflow_run_id"], model, metadata,
                                   self.model_ops.parity_images(cfg), self.signing_key,
                                   record["id"], int(summary["round"]))
        self.registry.set_alias(version, CANDIDATE_ALIAS)
        timings["onnx_s"] = clock() - start
        start = clock()
        self._log_card(record["mlflow_run_id"], with_version(extra["card"], version), version)
        timings["card_s"] += clock() - start
        return version

    def _log_card(self, run_id: str, card: dict[str, Any], version: str) -> None:
        """The model card as Markdown, HTML and JSON artifacts of the run, and a version tag
        that says where (``leukofed promote`` prints its summary from there)."""
        folder = f"cards/version-{version}"
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "card.md").write_text(card_markdown(card))
            (d / "card.html").write_text(card_html(card))
            (d / "card.json").write_text(json.dumps(card, indent=1))
            for name in ("card.md", "card.html", "card.json"):
                self.registry.log_artifact(run_id, d / name, folder)
        self.registry.set_version_tag(version, "model_card", f"{run_id}:{folder}/card.json")

    def finish(self, record: dict[str, Any]) -> None:
        if not record.get("mlflow_run_id"):
            return
        status = {"completed": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}.get(
            record["status"])
        if status:
            self.registry.finish_run(record["mlflow_run_id"], status, record.get("reason"))
