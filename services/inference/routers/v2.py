"""The Open Inference Protocol (KServe V2) REST routes, so Triton and KServe clients work.

Tensors are exactly what ``GET /v2/models/{name}`` describes: input ``image`` FP32
[-1, S, S, 3] (RGB 0-255, NHWC, preprocessing as in /v1/model; UINT8 is accepted too)
and output ``probabilities`` FP32 [-1, 4]. Both the JSON tensor encoding and the binary
tensor data extension (``Inference-Header-Content-Length``) are supported, in requests
and responses; tritonclient uses the binary form by default.

A version that carries an acquisition profile has two more outputs: ``refer`` BOOL [-1]
(refer the image to a hematologist) and ``ood_distance`` FP32 [-1]. A version that carries
a calibration returns *calibrated* ``probabilities`` and has ``refer`` (with or without a
profile) plus ``prediction_set`` BOOL [-1, C] (row i, column k: class k is in image i's
conformal prediction set; columns in the order of ``parameters.classes``) and
``malignant`` BYTES [-1] ("yes", "no" or "unsure", as in /v1/predict); ``refer`` is then
also true when an image's set is not a single class. The response ``parameters`` say
whether each check ran (``ood_check``, ``calibration``), the ``temperature`` and
``coverage``, and why each image is referred (``refer_reasons``: a JSON-encoded list of
lists of strings, since V2 parameters are scalars). A request that names its ``outputs``
gets only those, as the protocol says.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

import leukofed
from leukofed.export import INPUT_NAME, OUTPUT_NAME
from leukofed.http_errors import error_response

from ..answers import Answer
from ..batcher import NotReadyError, ShapeError
from ..model_source import ServedModel
from ..security import require_api_key
from ..state import ServiceState, get_state

HEADER_LEN = "Inference-Header-Content-Length"
DTYPES = {"FP32": np.float32, "UINT8": np.uint8}
REFER_NAME = "refer"
DISTANCE_NAME = "ood_distance"
SET_NAME = "prediction_set"
MALIGNANT_NAME = "malignant"
DISTANCE_UNKNOWN = -1.0  # ood_distance of an image the check could not measure

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
models = APIRouter(prefix="/v2/models", tags=["open inference protocol"],
                   dependencies=[Depends(require_api_key)])


class V2Error(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def v2_error_response(_: Request, exc: V2Error) -> JSONResponse:
    return error_response(exc.status, exc.message)


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "leukofed-inference", "version": leukofed.__version__,
            "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready")
async def ready(state: ServiceState = Depends(get_state)) -> JSONResponse:
    ok = state.source.ready
    return JSONResponse({"ready": ok, **({} if ok else {"reason": state.source.status})},
                        status_code=200 if ok else 503)


def _served(state: ServiceState, name: str, version: str | None) -> ServedModel:
    model = state.source.current
    if name != state.settings.model_name:
        raise V2Error(404, f"unknown model {name!r}; this server serves "
                           f"{state.settings.model_name!r}")
    if model is None:
        raise V2Error(503, f"model {name!r} not ready: {state.source.status}")
    if version is not None and version != model.version:
        raise V2Error(404, f"version {version} of {name!r} is not loaded "
                           f"(serving version {model.version})")
    return model


def _output_specs(model: ServedModel) -> list[dict]:
    specs = [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(model.classes)]}]
    if _refers(model):
        specs.append({"name": REFER_NAME, "datatype": "BOOL", "shape": [-1]})
    if model.profile is not None:
        specs.append({"name": DISTANCE_NAME, "datatype": "FP32", "shape": [-1]})
    if model.calibration is not None:
        specs += [{"name": SET_NAME, "datatype": "BOOL", "shape": [-1, len(model.classes)]},
                  {"name": MALIGNANT_NAME, "datatype": "BYTES", "shape": [-1]}]
    return specs


def _refers(model: ServedModel) -> bool:
    return model.profile is not None or model.calibration is not None


def _ood_check(model: ServedModel) -> str:
    return "available" if model.profile is not None else f"unavailable: {model.profile_note}"


def _calibration_parameters(model: ServedModel) -> dict[str, Any]:
    cal = model.calibration
    if cal is None:
        return {"calibration": f"unavailable: {model.calibration_note}"}
    return {"calibration": "available", "temperature": cal.temperature,
            "coverage": cal.coverage}


def _metadata(model: ServedModel, alias: str | None) -> dict:
    size = model.image_size
    return {
        "name": model.name, "versions": [model.version], "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, size, size, 3]}],
        "outputs": _output_specs(model),
        "parameters": {"classes": model.classes, "alias": alias,
                       "preprocessing": model.metadata.get("preprocessing", {}),
                       "ood_check": _ood_check(model), **_calibration_parameters(model)},
    }


@models.get("/{name}", summary="Model metadata")
@models.get("/{name}/versions/{version}", summary="Model metadata")
async def model_metadata(name: str, version: str | None = None,
                         state: ServiceState = Depends(get_state)) -> dict:
    model = _served(state, name, version)
    return _metadata(model, state.source.alias_of(model))


@models.get("/{name}/ready")
@models.get("/{name}/versions/{version}/ready")
async def model_ready(name: str, version: str | None = None,
                      state: ServiceState = Depends(get_state)) -> dict:
    model = _served(state, name, version)
    return {"name": model.name, "version": model.version, "ready": True}


def _parse_request(body: bytes, header_len: str | None) -> tuple[dict, bytes]:
    try:
        if header_len is not None:
            n = int(header_len)
            return json.loads(body[:n]), body[n:]
        return json.loads(body), b""
    except (ValueError, UnicodeDecodeError) as exc:
        raise V2Error(400, f"request is not valid JSON: {exc}") from exc


def _input_tensor(request: dict, binary: bytes, size: int) -> np.ndarray:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise V2Error(400, f"expected exactly one input tensor named {INPUT_NAME!r}")
    spec = inputs[0]
    if spec.get("name") != INPUT_NAME:
        raise V2Error(400, f"unknown input {spec.get('name')!r}; expected {INPUT_NAME!r}")
    dtype = DTYPES.get(spec.get("datatype", ""))
    if dtype is None:
        raise V2Error(400, f"datatype {spec.get('datatype')!r} not supported; use FP32")
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) != 4 or list(shape[1:]) != [size, size, 3]
            or not isinstance(shape[0], int) or shape[0] <= 0):
        raise V2Error(400, f"input shape {shape} does not match [-1, {size}, {size}, 3]")
    count = int(np.prod(shape))
    params = spec.get("parameters") or {}
    try:
        if "binary_data_size" in params:
            nbytes = int(params["binary_data_size"])
            if nbytes != count * np.dtype(dtype).itemsize or len(binary) < nbytes:
                raise V2Error(400, f"binary_data_size {nbytes} does not match shape {shape}")
            array = np.frombuffer(binary[:nbytes], dtype=dtype)
        else:
            array = np.asarray(spec.get("data"), dtype=dtype).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise V2Error(400, f"input data does not parse as {spec['datatype']}: {exc}") from exc
    if array.size != count:
        raise V2Error(400, f"input has {array.size} values; shape {shape} needs {count}")
    array = array.reshape(shape).astype(np.float32)
    if not np.isfinite(array).all():
        raise V2Error(400, "input contains NaN or infinity")
    return array


def _requested_outputs(request: dict, model: ServedModel,
                       strict: bool = True) -> dict[str, bool]:
    """Output name -> whether it goes as binary data, in response order. No ``outputs``
    in the request: every output the model has, binary when ``binary_data_output``.
    ``strict=False`` drops names the model lacks (a swap to a version without a profile)."""
    binary = bool((request.get("parameters") or {}).get("binary_data_output"))
    names = [spec["name"] for spec in _output_specs(model)]
    requested = request.get("outputs")
    if not requested:
        return dict.fromkeys(names, binary)
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise V2Error(400, "outputs must be a list of objects")
    wanted: dict[str, bool] = {}
    for out in requested:
        name = out.get("name")
        if name not in names and strict:
            raise V2Error(400, f"unknown output {name!r}; this model has "
                               f"{', '.join(repr(n) for n in names)}")
        wanted[name] = binary or bool((out.get("parameters") or {}).get("binary_data"))
    return {name: wanted[name] for name in names if name in wanted}


def _output_arrays(answers: list[Answer], n_classes: int) -> dict[str, tuple]:
    """Name -> (datatype, array) of every output the answers can carry."""
    arrays = {
        OUTPUT_NAME: ("FP32", np.array([a.probabilities for a in answers], np.float32)
                      .reshape(len(answers), n_classes)),
        REFER_NAME: ("BOOL", np.array([bool(a.refer) for a in answers], np.bool_)),
        DISTANCE_NAME: ("FP32", np.array(
            [DISTANCE_UNKNOWN if a.ood_distance is None else a.ood_distance for a in answers],
            np.float32)),
        MALIGNANT_NAME: ("BYTES", np.array([a.malignant for a in answers], np.object_)),
    }
    if all(a.set_mask is not None for a in answers):
        arrays[SET_NAME] = ("BOOL", np.array([a.set_mask for a in answers], np.bool_)
                            .reshape(len(answers), n_classes))
    return arrays


def _tensor_bytes(datatype: str, array: np.ndarray) -> bytes:
    """The binary tensor data of an output: raw little-endian values, or for BYTES each
    element as a 4-byte little-endian length and its UTF-8 bytes (as Triton does)."""
    if datatype != "BYTES":
        return np.ascontiguousarray(array).tobytes()
    out = bytearray()
    for item in array.reshape(-1):
        data = str(item).encode()
        out += len(data).to_bytes(4, "little") + data
    return bytes(out)


@models.post("/{name}/infer", summary="Run inference (JSON or binary tensors)")
@models.post("/{name}/versions/{version}/infer", summary="Run inference")
async def infer(name: str, request: Request, version: str | None = None,
                state: ServiceState = Depends(get_state)) -> Response:
    model = _served(state, name, version)
    payload, binary = _parse_request(await request.body(), request.headers.get(HEADER_LEN))
    images = _input_tensor(payload, binary, model.image_size)
    _requested_outputs(payload, model)  # an unknown output fails before any work
    # The out-of-distribution check reads the very tensor the model gets, beside the model.
    check = asyncio.ensure_future(run_in_threadpool(model.judge, images))
    try:
        probs, used = await state.batcher.submit(images)
    except NotReadyError as exc:
        raise V2Error(503, f"model {name!r} not ready: {state.source.status}") from exc
    except ShapeError as exc:
        raise V2Error(400, str(exc)) from exc
    finally:
        referrals = await check
    if used is not model:  # a swap in between: judge against the version that answered
        referrals = await run_in_threadpool(used.judge, images)
    answers = used.answers(probs, referrals)
    arrays = _output_arrays(answers, len(used.classes))
    outputs: list[dict[str, Any]] = []
    raws: list[bytes] = []
    for out_name, as_binary in _requested_outputs(payload, used, strict=False).items():
        datatype, array = arrays[out_name]
        out: dict[str, Any] = {"name": out_name, "datatype": datatype,
                               "shape": list(array.shape)}
        if as_binary:
            raws.append(_tensor_bytes(datatype, array))
            out["parameters"] = {"binary_data_size": len(raws[-1])}
        else:
            out["data"] = array.reshape(-1).tolist()
        outputs.append(out)
    result: dict[str, Any] = {"model_name": used.name, "model_version": used.version,
                              "outputs": outputs,
                              "parameters": {"ood_check": _ood_check(used),
                                             **_calibration_parameters(used)}}
    if _refers(used):
        result["parameters"]["refer_reasons"] = json.dumps([list(a.reasons)
                                                            for a in answers])
    if "id" in payload:
        result["id"] = payload["id"]
    if not raws:
        return JSONResponse(result)
    header = json.dumps(result).encode()
    return Response(header + b"".join(raws), media_type="application/octet-stream",
                    headers={HEADER_LEN: str(len(header))})
