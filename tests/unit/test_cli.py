"""The installed `leukofed` entry point end to end on a tiny synthetic dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LEUKOFED = str(Path(sys.executable).parent / "leukofed")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LEUKOFED, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.parametrize("cmd", [[], ["data"], ["data", "split"], ["data", "partition"],
                                 ["train", "central"], ["evaluate"], ["export-onnx"]])
def test_help_on_every_command(cmd: list[str]) -> None:
    result = run(*cmd, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_split_train_evaluate_export(synthetic_dataset, tmp_path: Path) -> None:
    data = synthetic_dataset(per_class=48)  # 3 blocks of 16 per class: val is not empty
    (data / "Pre" / "broken.png").write_bytes(b"\x89PNG broken")
    split = run("data", "split", str(data), str(tmp_path / "split.json"))
    assert split.returncode == 0, split.stderr
    assert "broken.png" in split.stderr  # reported, not fatal

    out = tmp_path / "central"
    train = run("train", "central", str(data), "--out", str(out), "--model", "compact_cnn",
                "--image-size", "32", "--epochs", "2", "--batch-size", "16",
                "--split-manifest", str(tmp_path / "split.json"), cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "epoch 2/2" in train.stdout and "test accuracy" in train.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"accuracy", "macro_f1", "ece", "confusion_matrix",
                                    "malignant_sensitivity", "malignant_specificity"}
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    # The shortcut audit and the refer share come with every centralized training ...
    assert "recoloured" in train.stdout and "referred" in train.stdout
    assert 0.0 <= metrics["audit"]["audit_follow_colour"] <= 1.0
    assert 0.0 <= metrics["test_referred_share"] <= 1.0
    # ... and the calibration a served version answers with, and its model card.
    assert metrics["calibration"]["nll_after"] <= metrics["calibration"]["nll_before"] + 1e-12
    card = (out / "card.md").read_text()
    assert "# Model card" in card and f"{metrics['test']['accuracy']:.3f}" in card

    evaluated = run("evaluate", str(out / "model.keras"), str(data))
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["n"] == 192
    # ... and with every evaluation of a model that carries its training stain targets.
    assert "recoloured" in evaluated.stderr
    assert set(result["audit"]) >= {"audit_recoloured_accuracy", "audit_follow_colour",
                                    "audit_histogram_accuracy"}
    assert 0.0 <= result["referred_share"] <= 1.0
    cal = result["calibration"]
    assert cal["target_coverage"] == 0.95 and cal["temperature"] > 0
    assert 0.0 <= cal["refer_share"] <= 1.0 and 0.0 <= cal["coverage"] <= 1.0

    exported = run("export-onnx", str(out / "model.keras"), str(tmp_path / "m.onnx"),
                   "--parity-data", str(data))
    assert exported.returncode == 0, exported.stderr
    assert "parity max |diff|" in exported.stdout and (tmp_path / "m.onnx").exists()
