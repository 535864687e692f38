"""onnxruntime sessions: provider choice (CUDA when it really works, else CPU) and threads."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from leukofed.export import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderError(RuntimeError):
    """The configuration demands a GPU and no working CUDA provider exists."""


def session_options(threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    # Spinning workers burn the cores that uvicorn needs for HTTP and decoding between
    # batches; on a small machine the wake-up cost is cheaper than the stolen CPU.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def make_session(onnx_bytes: bytes, provider: str = "auto", threads: int = 0) -> Any:
    """An InferenceSession on CUDA when asked for or available, on CPU otherwise.

    ``provider="cuda"`` raises ProviderError unless the session really runs on CUDA
    (onnxruntime silently falls back to CPU when the CUDA libraries fail to load).
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    want_cuda = provider == "cuda" or (provider == "auto" and CUDA in available)
    if provider == "cuda" and CUDA not in available:
        raise ProviderError(
            f"provider=cuda but onnxruntime offers only {available}: install onnxruntime-gpu "
            "with a matching CUDA, or set LEUKOFED_INFERENCE_PROVIDER=cpu"
        )
    providers = [CUDA, CPU] if want_cuda else [CPU]
    session = ort.InferenceSession(onnx_bytes, session_options(threads), providers=providers)
    in_use = session.get_providers()
    if provider == "cuda" and CUDA not in in_use:
        raise ProviderError(f"CUDAExecutionProvider did not initialise (session uses {in_use})")
    if want_cuda and CUDA not in in_use:
        log.warning("CUDA provider listed but unusable; serving on %s", in_use)
    return session


def run(session: Any, images: np.ndarray) -> np.ndarray:
    """Probabilities (N, classes) for float32 0-255 NHWC images."""
    return session.run([OUTPUT_NAME], {INPUT_NAME: images.astype(np.float32, copy=False)})[0]


def probe_provider(provider: str, threads: int = 0) -> list[str]:
    """Open a one-node model with the configured provider, so a demand for CUDA that
    cannot be met stops the service at start-up instead of at the first model load."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    return list(make_session(data, provider, threads).get_providers())
