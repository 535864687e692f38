"""What each privacy level costs: one table from the federated benchmarks' runs.

Reads the example-level (DP-SGD) runs and their non-private companions written by
``bench_federated.py`` (default ``benchmarks/results/federated-example-dp.json``) and the
client-level runs of ``make bench-privacy`` (``federated-privacy.json``), and writes
``benchmarks/results/privacy.json`` (``rows[]``: level, epsilon, delta, accuracy,
malignant sensitivity and specificity, the membership audit's AUC and TPR at 1% FPR, the
recolouring gap, the referred share, the colour-histogram forest, time) with a table in
``docs/benchmarks-privacy.md``. No training here: it only reads results.

    .venv/bin/python benchmarks/privacy_table.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import header, write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# Targets of issue 27 at epsilon <= 8 (delta <= 1e-5).
TARGET_EPSILON, TARGET_ACCURACY, TARGET_SENSITIVITY, TARGET_AUC = 8.0, 0.85, 0.95, 0.55


def level_of(s: dict[str, Any]) -> str:
    privacy = s.get("privacy") or {}
    if not privacy:
        return "none"
    return "example" if privacy.get("level") == "example" else "client"


def row(s: dict[str, Any], source: str, config: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    """One scenario of a bench_federated results file as a row of the privacy table
    (``config``: the file's run configuration, for scenarios that do not carry theirs)."""
    config = config or {}
    final, summary = s.get("final") or {}, s["summary"]
    # The same offline audit for every row where it was run (audit_final_versions.py): a
    # DP version has no federated colour audit, its hospitals send no stain statistics.
    audit = final.get("audit_offline") or final.get("audit") or {}
    membership = final.get("membership") or {}
    malignant = final.get("malignant") or {}
    privacy = s.get("privacy") or {}
    level = level_of(s)
    original, recoloured = audit.get("audit_original_accuracy"), audit.get(
        "audit_recoloured_accuracy")
    rounds = s.get("rounds") or []
    return {
        "scenario": s["scenario"], "source": source, "level": level,
        "epsilon": summary.get("dp_epsilon") if level != "none" else None,
        "target_epsilon": privacy.get("target_epsilon"),
        "delta": privacy.get("delta", 1e-5) if level != "none" else None,
        "noise_multiplier": privacy.get("noise_multiplier"),
        "norm": s.get("norm", "batch"), "recipe": s.get("recipe", "new"),
        "image_size": s.get("image_size") or (64 if s.get("recipe") == "old"
                                               else config.get("image_size")),
        "hospitals": s["hospitals"],
        "scheme": s["scheme"], "labs": s.get("labs", False),
        "batch_size": s.get("batch_size", config.get("batch_size")), "rounds": len(rounds),
        "local_epochs": s.get("local_epochs", config.get("local_epochs")),
        "accuracy": summary.get("final_test_accuracy"),
        "macro_f1": summary.get("final_test_macro_f1"),
        "best_round_accuracy": summary.get("best_test_accuracy"),
        "malignant_sensitivity": malignant.get("sensitivity"),
        "malignant_specificity": malignant.get("specificity"),
        "membership_auc": membership.get("membership_auc"),
        "tpr_at_1pct_fpr": membership.get("membership_tpr_at_1pct_fpr"),
        "recoloured_accuracy": recoloured,
        "recolouring_gap_points": (100 * (original - recoloured)
                                   if original is not None and recoloured is not None
                                   else None),
        "follow_colour": audit.get("audit_follow_colour"),
        "colour_forest_accuracy": audit.get("audit_histogram_accuracy"),
        "audit_source": ("offline" if final.get("audit_offline") else
                         "federated" if final.get("audit") else None),
        # The card's refer share: test images whose 95% prediction set is not one class.
        "referred_test": (final.get("calibration") or {}).get("server_test_set_refer_share"),
        # Outside the version's acquisition profile (none under example-level DP).
        "outside_profile_test": (final.get("referred") or {}).get("in_distribution_test"),
        "mean_round_s": summary.get("mean_round_s"),
        "mean_fit_wall_s": (sum(r["fit_wall_s"] for r in rounds) / len(rounds)
                            if rounds else None),
    }


def build(example: Path, client: Path) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for path in (example, client):
        if path.is_file():
            doc = json.loads(path.read_text())
            name = (str(path.resolve().relative_to(ROOT.resolve()))
                    if path.resolve().is_relative_to(ROOT.resolve()) else str(path))
            rows += [row(s, name, doc.get("config")) for s in doc["scenarios"]]
    # The time cost: each DP row's local training against the non-private row of the same
    # configuration (same norm, batch, budget), as a ratio of fit wall time.
    for r in rows:
        base = next((b for b in rows if b["level"] == "none" and b["norm"] == r["norm"]
                     and b["batch_size"] == r["batch_size"] and b["rounds"] == r["rounds"]
                     and b["source"] == r["source"]), None)
        r["fit_time_ratio_to_non_private"] = (
            r["mean_fit_wall_s"] / base["mean_fit_wall_s"]
            if base and r["mean_fit_wall_s"] and base["mean_fit_wall_s"] else None)
    meets = [r for r in rows if r["level"] == "example" and r["epsilon"] is not None
             and r["epsilon"] <= TARGET_EPSILON and (r["accuracy"] or 0) >= TARGET_ACCURACY
             and (r["malignant_sensitivity"] or 0) >= TARGET_SENSITIVITY
             and r["membership_auc"] is not None and r["membership_auc"] <= TARGET_AUC]
    doc = header()
    doc.update({"rows": rows, "targets": {
        "epsilon_at_most": TARGET_EPSILON, "delta_at_most": 1e-5,
        "accuracy_at_least": TARGET_ACCURACY, "malignant_sensitivity_at_least":
        TARGET_SENSITIVITY, "membership_auc_at_most": TARGET_AUC},
        "target_met_by": [r["scenario"] for r in meets]})
    return doc


def plot(doc: dict[str, Any], path: Path) -> None:
    """Accuracy and malignant specificity against epsilon (example level), the non-private
    rows of the same sources as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in doc["rows"] if r["level"] == "example" and r["epsilon"]),
                  key=lambda r: r["epsilon"])
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    if rows:
        eps = [r["epsilon"] for r in rows]
        ax.plot(eps, [r["accuracy"] for r in rows], "o-", label="accuracy (DP-SGD)")
        ax.plot(eps, [r["malignant_specificity"] or 0 for r in rows], "s--",
                label="malignant specificity (DP-SGD)")
    sources = {r["source"] for r in rows}
    for r, style in zip([r for r in doc["rows"] if r["level"] == "none"
                         and r["source"] in sources], (":", "-.", "--")):
        ax.axhline(r["accuracy"], color="grey", linestyle=style,
                   label=f"no DP: {r['norm'].capitalize()}Norm, batch {r['batch_size']} "
                         f"({r['accuracy']:.3f})")
    ax.axhline(TARGET_ACCURACY, color="red", linewidth=0.8, label="target accuracy")
    ax.axvline(TARGET_EPSILON, color="red", linewidth=0.8, linestyle=":")
    ax.set(xscale="log", ylim=(0, 1), xlabel="epsilon at delta 1e-5 (log)",
           ylabel="on the aggregator's test split",
           title="Example-level DP, 3 hospitals: what each epsilon costs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown(doc: dict[str, Any]) -> str:
    def f(v: Any, nd: int = 3) -> str:
        return "-" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)

    m = doc["machine"]
    lines = [
        "# What each privacy level costs", "",
        f"- built by: `{doc['command']}` from the runs below (each row's `source`)",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {doc['date']}",
        "- *level*: `none` (no differential privacy), `example` (DP-SGD at each hospital: "
        "each training image's gradient clipped, Gaussian noise at every local step, RDP "
        "accountant, delta 1e-5; the unit is one image), `client` (noise on each "
        "hospital's whole update; older 64-px runs of `make bench-privacy`)",
        "- accuracy, malignant sensitivity / specificity: the final round's model on the "
        "aggregator's 422 held-out test images; *recoloured*: the same images recoloured "
        "to another class's stain (gap in points, share of answers that follow the colour); "
        "*forest*: the colour-histogram forest on the same split (cross-fitted on the test "
        "split, as the aggregator does); *referred*: share of the test images whose 95% "
        "prediction set is not one class (the card's refer share); *outside*: share outside "
        "the version's acquisition profile (none is built under example-level DP: its "
        "hospitals send no image statistics); *AUC / TPR@1%*: the "
        "federated membership-inference audit of the final version (0.5 is a coin); "
        "*fit x*: local training wall time against the non-private row of the same "
        "configuration",
        f"- target (issue 27) at epsilon <= {TARGET_EPSILON:g}: accuracy >= "
        f"{TARGET_ACCURACY}, malignant sensitivity >= {TARGET_SENSITIVITY}, membership "
        f"AUC <= {TARGET_AUC}; met by: "
        + (", ".join(doc["target_met_by"]) or "**no row**"), "",
        "| level | epsilon | norm | px | batch | rounds x epochs | accuracy | macro-F1 "
        "| sens. / spec. | AUC | TPR@1% | recoloured (gap, follow) | forest | referred "
        "| outside | round s | fit x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        eps = r["epsilon"]
        eps_s = "-" if r["level"] == "none" else ("inf" if eps is None else f"{eps:.2f}")
        rec = ("-" if r["recoloured_accuracy"] is None else
               f"{r['recoloured_accuracy']:.3f} ({r['recolouring_gap_points']:.1f}, "
               f"{100 * (r['follow_colour'] or 0):.1f}%)")
        lines.append(
            f"| {r['level']} | {eps_s} | {r['norm']} | {f(r['image_size'])} "
            f"| {f(r['batch_size'])} "
            f"| {r['rounds']} x {f(r['local_epochs'])} | {f(r['accuracy'])} "
            f"| {f(r['macro_f1'])} | {f(r['malignant_sensitivity'], 2)} / "
            f"{f(r['malignant_specificity'], 2)} | {f(r['membership_auc'])} "
            f"| {f(r['tpr_at_1pct_fpr'])} | {rec} | {f(r['colour_forest_accuracy'])} "
            f"| {f(r['referred_test'])} | {f(r['outside_profile_test'])} "
            f"| {f(r['mean_round_s'], 1)} "
            f"| {f(r['fit_time_ratio_to_non_private'], 2)} |")
    if doc.get("plot_png"):
        lines += ["", f"![accuracy against epsilon](../{doc['plot_png']})"]
    lines += ["", "Scenarios: " + "; ".join(f"`{r['scenario']}` ({r['source']})"
                                            for r in doc["rows"]), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--example", default=str(RESULTS / "federated-example-dp.json"))
    p.add_argument("--client", default=str(RESULTS / "federated-privacy.json"))
    p.add_argument("--out", default=str(RESULTS / "privacy.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks-privacy.md"))
    args = p.parse_args()
    doc = build(Path(args.example), Path(args.client))
    doc["plot_png"] = "docs/img/privacy-epsilon.png"
    plot(doc, ROOT / doc["plot_png"])
    write_json(args.out, doc)
    Path(args.doc).write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
