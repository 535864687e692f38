"""Keras to ONNX with tf2onnx, refusing any model whose ONNX twin disagrees with Keras.

The ONNX graph takes float32 RGB 0-255 NHWC images with a dynamic batch dimension
(scaling is inside the graph). Classes, image size and preprocessing are written into
the ONNX metadata_props, so a server needs nothing but the .onnx file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


class ParityError(RuntimeError):
    """ONNX Runtime and Keras disagree beyond the tolerance: the export is not written."""


@dataclass
class ExportReport:
    path: Path
    sha256: str
    max_abs_diff: float
    parity_images: int
    opset: int
    size_bytes: int


def to_onnx_bytes(model: Any, metadata: dict[str, Any], opset: int = DEFAULT_OPSET) -> bytes:
    """Convert with an explicit input_signature (Keras 3 needs one) and embed metadata."""
    import tensorflow as tf
    import tf2onnx

    size = int(metadata["image_size"])
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    # Name the output as the metadata describes, whatever Keras called it.
    old = proto.graph.output[0].name
    if old != OUTPUT_NAME:
        for node in proto.graph.node:
            node.output[:] = [OUTPUT_NAME if o == old else o for o in node.output]
        proto.graph.output[0].name = OUTPUT_NAME
    for value_info in (*proto.graph.input, *proto.graph.output):
        value_info.type.tensor_type.shape.dim[0].dim_param = "batch"
    for key, value in onnx_metadata(metadata).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def onnx_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    return {
        "leukofed.classes": json.dumps(metadata["classes"]),
        "leukofed.image_size": str(metadata["image_size"]),
        "leukofed.preprocessing": json.dumps(metadata["preprocessing"]),
        "leukofed.architecture": str(metadata.get("architecture", "")),
        "leukofed.metadata": json.dumps(metadata),
    }


def read_onnx_metadata(session: Any) -> dict[str, Any]:
    """The leukofed metadata of an onnxruntime InferenceSession."""
    props = session.get_modelmeta().custom_metadata_map
    if "leukofed.metadata" not in props:
        raise ValueError("ONNX model has no leukofed metadata")
    return json.loads(props["leukofed.metadata"])


def cpu_session(onnx_bytes: bytes, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def parity_diff(model: Any, onnx_bytes: bytes, images: np.ndarray) -> float:
    """Max absolute difference of the probabilities, Keras vs ONNX Runtime, on ``images``."""
    x = images.astype(np.float32)
    keras_out = np.asarray(model(x, training=False))
    onnx_out = cpu_session(onnx_bytes).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return float(np.max(np.abs(keras_out - onnx_out)))


def parity_batch(image_size: int, folder: str | Path | None = None, count: int = 16) -> np.ndarray:
    """Images for the parity check: real ones from ``folder`` when given, else seeded noise."""
    if folder is not None:
        from leukofed.data import scan_dataset
        from leukofed.preprocessing import load_image

        records = scan_dataset(folder).records  # verified: a broken file is skipped
        records = records[:: max(1, len(records) // count)][:count]
        return np.stack([load_image(r.path, image_size) for r in records])
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, image_size, image_size, 3), dtype=np.uint8)


def export_onnx(
    model: Any,
    metadata: dict[str, Any],
    out_path: str | Path,
    parity_images: np.ndarray,
    tolerance: float = PARITY_TOLERANCE,
    opset: int = DEFAULT_OPSET,
) -> ExportReport:
    """Export, check parity on real images (uint8 or float 0-255, N x S x S x 3), write.

    Raises ParityError, writing nothing, when the two runtimes disagree beyond tolerance.
    """
    if len(parity_images) == 0:
        raise ValueError("parity check needs at least one image")
    onnx_bytes = to_onnx_bytes(model, metadata, opset)
    diff = parity_diff(model, onnx_bytes, parity_images)
    if not diff <= tolerance:  # also catches NaN
        raise ParityError(
            f"ONNX and Keras outputs differ by {diff:.3g} > {tolerance:g}; not written"
        )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(onnx_bytes)
    tmp.replace(out)
    return ExportReport(
        out, hashlib.sha256(onnx_bytes).hexdigest(), diff, len(parity_images), opset,
        len(onnx_bytes),
    )
