"""The ONNX flavor is saved with explicit requirements: MLflow's inference of them starts a
subprocess per version (2.2 s of a 2.9 s save on 2 cores) and found the same packages."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def test_onnx_model_is_saved_with_pinned_requirements_without_inferring_them(
        tmp_path: Path, monkeypatch) -> None:
    import mlflow.models
    from onnx import TensorProto, helper

    from registry.publish import onnx_requirements, save_mlflow_onnx

    def inferred(*args, **kwargs):
        raise AssertionError("requirements were inferred (a subprocess per version)")

    monkeypatch.setattr(mlflow.models, "infer_pip_requirements", inferred)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())

    saved = save_mlflow_onnx(tmp_path / "m.onnx", tmp_path / "out", np.zeros((1, 4), np.float32))

    assert saved.read_bytes() == (tmp_path / "m.onnx").read_bytes()
    requirements = (tmp_path / "out" / "requirements.txt").read_text().split()
    assert [r.split("==")[0] for r in onnx_requirements()] == ["onnx", "onnxruntime", "numpy"]
    assert set(onnx_requirements()) <= set(requirements)
