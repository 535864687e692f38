"""Helpers shared by the inference tests and the benchmark: a tiny registered model and
the service under real uvicorn in a subprocess. Not imported by the service itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def tiny_onnx(image_size: int = 32, seed: int = 0, classes: tuple[str, ...] | None = None,
              version_note: str = "") -> bytes:
    """A small ONNX classifier built without TensorFlow (mean colour -> softmax), with
    leukofed metadata; for unit tests that need a real onnxruntime session."""
    from onnx import TensorProto, helper, numpy_helper

    from leukofed.labels import CLASSES
    from leukofed.preprocessing import PREPROCESSING

    classes = classes or CLASSES
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 0.05, (3, len(classes))).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                       ["batch", image_size, image_size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                       ["batch", len(classes)])],
        initializer=[numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
                     numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    meta = {"classes": list(classes), "image_size": image_size, "preprocessing": PREPROCESSING,
            "architecture": f"tiny{version_note}"}
    from leukofed.export import onnx_metadata

    for key, value in onnx_metadata(meta).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def register_tiny_model(tracking_uri: str, model_name: str, seed: int, image_size: int = 32,
                        champion: bool = False) -> str:
    """Build a compact_cnn, log and register it in MLflow; returns the version."""
    import mlflow

    from leukofed.models import build_model, model_metadata
    from registry.store import log_and_register, set_alias

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    model = build_model("compact_cnn", image_size=image_size, seed=seed, dropout=0.0)
    meta = model_metadata(model, "compact_cnn", image_size)
    mlflow.set_experiment(f"inference-tests-{model_name}")
    with mlflow.start_run():
        version = log_and_register(model, meta, model_name=model_name, tags={"seed": seed})
    if champion:
        set_alias(version, "champion", model_name)
    return version


@dataclass
class ServiceProcess:
    """``python -m services.inference`` on a port, configured by LEUKOFED_INFERENCE_* env."""

    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        env = {**os.environ, **self.env, "LEUKOFED_INFERENCE_PORT": str(self.port),
               "LEUKOFED_INFERENCE_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.inference"], cwd=ROOT,
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_live(timeout)
        return self

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_live(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"service not live after {timeout}s:\n{self.log()}")

    def wait_ready(self, timeout: float = 120.0, version: str | None = None) -> dict:
        deadline = time.monotonic() + timeout
        body: Any = None
        while time.monotonic() < deadline:
            status, body = self.get("/readyz")
            if status == 200 and (version is None or body["model"]["version"] == version):
                return body
            time.sleep(0.25)
        raise TimeoutError(f"not ready (version {version}) after {timeout}s: {body}\n"
                           f"{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()
