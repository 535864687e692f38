"""ONNX export: parity with Keras on real images, metadata inside, refusal on mismatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leukofed import export
from leukofed.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    ParityError,
    cpu_session,
    export_onnx,
    parity_batch,
    read_onnx_metadata,
)
from leukofed.models import build_model, model_metadata
from leukofed.train import Trainer, fit


@pytest.fixture(scope="module")
def trained_model():
    # A briefly trained model: untrained softmax outputs are near-uniform and would make
    # parity trivially easy.
    model = build_model("compact_cnn", 32, seed=0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = (x.mean(axis=(1, 2, 3)) // 64).astype(np.int64).clip(0, 3)
    fit(Trainer(model), (x, y), None, epochs=2, batch_size=16, progress=False)
    return model, model_metadata(model, "compact_cnn", 32)


def test_parity_metadata_and_dynamic_batch(trained_model, tmp_path: Path) -> None:
    model, meta = trained_model
    images = parity_batch(32, None, 8)
    report = export_onnx(model, meta, tmp_path / "m.onnx", images)
    assert report.max_abs_diff <= 1e-4 and report.opset >= 17
    session = cpu_session(report.path.read_bytes())
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert read_onnx_metadata(session)["classes"] == ["Benign", "Early", "Pre", "Pro"]
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    assert inp.shape == ["batch", 32, 32, 3]
    for n in (1, 5):
        probs = session.run(None, {INPUT_NAME: images[:n].astype(np.float32)})[0]
        assert probs.shape == (n, 4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.ptp(np.asarray(model(images.astype(np.float32)))) > 0.01  # not a flat model


@pytest.mark.realdata
def test_parity_on_real_images(trained_model, real_data: Path, tmp_path: Path) -> None:
    model, meta = trained_model
    images = parity_batch(32, real_data, 12)
    assert images.shape == (12, 32, 32, 3)
    report = export_onnx(model, meta, tmp_path / "m.onnx", images)
    assert report.max_abs_diff <= 1e-4


def test_export_refuses_a_model_that_fails_parity(trained_model, tmp_path: Path,
                                                  monkeypatch) -> None:
    model, meta = trained_model
    other = build_model("compact_cnn", 32, seed=1)  # a different network's ONNX
    real_convert = export.to_onnx_bytes
    monkeypatch.setattr(export, "to_onnx_bytes",
                        lambda m, md, opset=17: real_convert(other, md, opset))
    out = tmp_path / "bad.onnx"
    with pytest.raises(ParityError, match="not written"):
        export_onnx(model, meta, out, parity_batch(32, None, 4))
    assert not out.exists() and not list(tmp_path.iterdir())
