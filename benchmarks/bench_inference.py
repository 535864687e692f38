"""Inference service benchmark: /v1/predict latency and throughput at 1, 8 and 32
concurrent clients with and without dynamic batching, the cost of one explanation, and
onnxruntime vs Keras images/s on the same model and machine.

The service runs under real uvicorn (``python -m services.inference``) against an MLflow
server started here, for each model configuration and serving mode. The
load generator speaks raw HTTP/1.1 over asyncio streams with pre-built multipart bodies,
so on a 2-core machine it takes as little CPU from the server as possible.

    make bench-inference    # or: .venv/bin/python benchmarks/bench_inference.py

Writes benchmarks/results/inference.json and docs/benchmarks-inference.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import header, write_json  # noqa: E402
from inference_support import ServiceProcess, register_tiny_model  # noqa: E402

REAL_DATA = Path(os.environ.get("LEUKOFED_REAL_DATA", ROOT.parent / "shared" / "data" / "all-pbs"))
BOUNDARY = "leukofedbench"


def sample_images(count: int = 16) -> list[tuple[str, bytes]]:
    files = sorted(REAL_DATA.glob("*/*.jpg")) if REAL_DATA.is_dir() else []
    files = files[:: max(1, len(files) // count)][:count]  # spread over the classes
    if files:
        return [(f.name, f.read_bytes()) for f in files]
    from inference_support import encode, noise_image

    return [(f"synthetic-{i}.jpg", encode(noise_image(224, i), "JPEG", quality=90))
            for i in range(count)]


def multipart_request(port: int, path: str, field: str, name: str, data: bytes) -> bytes:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; "
            f"filename=\"{name}\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + data + \
        f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               request: bytes) -> tuple[int, bytes]:
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return status, await reader.readexactly(length)


async def load(port: int, requests: list[bytes], concurrency: int,
               seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = w
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                status, body = await _one(reader, writer, requests[i % len(requests)])
                latencies.append(time.perf_counter() - started)
                if status != 200 or b"predictions" not in body:
                    errors.append(f"{status} {body[:100]!r}")
                i += concurrency
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = sorted(x * 1000 for x in latencies)
    return {"concurrency": concurrency, "requests": len(ms), "errors": len(errors),
            "error_examples": errors[:3], "seconds": round(elapsed, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(statistics.fmean(ms), 2),
            "throughput_img_s": round(len(ms) / elapsed, 1)}


def batch_histogram(svc: ServiceProcess) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(svc.url + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("leukofed_batch_size_sum", "leukofed_batch_size_count")):
            name, value = line.split()
            out[name] = float(value)
    if out.get("leukofed_batch_size_count"):
        out["mean_batch"] = round(out["leukofed_batch_size_sum"]
                                  / out["leukofed_batch_size_count"], 2)
    return out


def run_mode(label: str, env: dict[str, str], images: list[tuple[str, bytes]], levels: list[int],
             seconds: float, tmp: Path, explain: bool) -> dict[str, Any]:
    from conftest import free_port

    svc = ServiceProcess(free_port(), env, tmp / f"service-{label}.log")
    try:
        svc.start(timeout=120)
        ready = svc.wait_ready(timeout=600)
        reqs = [multipart_request(svc.port, "/v1/predict", "files", n, d) for n, d in images]
        asyncio.run(load(svc.port, reqs, 4, 2.0))  # warm-up, not recorded
        rows = []
        for c in levels:
            before = batch_histogram(svc)
            row = asyncio.run(load(svc.port, reqs, c, seconds))
            after = batch_histogram(svc)
            n, s = (after.get(f"leukofed_batch_size_{k}", 0)
                    - before.get(f"leukofed_batch_size_{k}", 0) for k in ("count", "sum"))
            row["mean_batch_size"] = round(s / n, 2) if n else None
            row["mode"] = label
            print(f"{label:>12} c={c:<3} {row}", flush=True)
            rows.append(row)
        result: dict[str, Any] = {"rows": rows, "model": ready["model"]}
        if explain:
            ereqs = [multipart_request(svc.port, "/v1/explain", "file", n, d) for n, d in images]

            async def explain_latencies() -> list[float]:
                reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
                out = []
                for i in range(20):
                    t = time.perf_counter()
                    status, _ = await _one(reader, writer, ereqs[i % len(ereqs)])
                    assert status == 200
                    out.append((time.perf_counter() - t) * 1000)
                writer.close()
                return out

            lat = sorted(asyncio.run(explain_latencies()))
            result["explain_ms"] = {"p50": round(lat[len(lat) // 2], 1),
                                    "max": round(lat[-1], 1), "requests": len(lat)}
            print("explain", result["explain_ms"], flush=True)
        return result
    finally:
        svc.stop()


def runtime_comparison(cache: Path, model_name: str, tracking_uri: str,
                       size: int) -> dict[str, Any]:
    """onnxruntime vs Keras on the same registered version, batch 1 and 32, in-process."""
    import tensorflow as tf

    from leukofed.export import INPUT_NAME, OUTPUT_NAME
    from registry.model_versions import load_version
    from services.inference.explain import occlusion_map
    from services.inference.runtime import make_session

    onnx_path = next(cache.rglob("*.onnx"))
    session = make_session(onnx_path.read_bytes(), "cpu", 0)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    model = load_version("champion", model_name).model
    fn = tf.function(lambda x: model(x, training=False))

    def rate(call: Any, batch: int, seconds: float = 3.0) -> float:
        x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3)).astype(np.float32)
        call(x)
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            call(x)
            n += batch
        return round(n / (time.perf_counter() - started), 1)

    out: dict[str, Any] = {"onnxruntime_by_batch": {
        b: rate(lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x}), b, 1.5)
        for b in (1, 2, 4, 8, 16, 32)}}
    for batch in (1, 32):
        out[f"onnxruntime_b{batch}"] = rate(
            lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x}), batch)
        out[f"keras_tf_function_b{batch}"] = rate(lambda x: fn(x).numpy(), batch)
        out[f"keras_predict_b{batch}"] = rate(lambda x: model.predict(x, verbose=0), batch, 2.0)
        print("runtime", batch, out, flush=True)
    image = np.random.default_rng(1).integers(0, 256, (size, size, 3)).astype(np.uint8)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        occlusion_map(image, lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], chunk=8)
        times.append((time.perf_counter() - t) * 1000)
    out["occlusion_in_process_ms"] = round(statistics.median(times), 1)

    # Grad-CAM's floor: one Keras forward + backward pass for one image.
    x = tf.constant(image[None].astype(np.float32))

    @tf.function
    def grad(x: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=False)
            top = tf.reduce_max(y, axis=1)
        return tape.gradient(top, x)

    grad(x)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        grad(x).numpy()
        times.append((time.perf_counter() - t) * 1000)
    out["keras_forward_backward_ms"] = round(statistics.median(times), 1)
    return out


MODES = {  # label -> (max_batch_size, max_queue_delay_ms); "batching" is the default
    "batch-1": (1, 0.0),
    "batching": (8, 0.0),
    "batching-32": (32, 0.0),
    "batching+2ms": (8, 2.0),
}


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# Inference benchmark",
        "",
        f"- command: `{doc['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
        f"load average before / after the run: {doc['load_average_before']} / "
        f"{doc.get('load_average_after')}",
        f"- date: {doc['date']}",
        "- models: untrained weights (speed does not depend on them), ONNX on onnxruntime "
        "CPU provider, threads = all cores; built as the default builds them, with "
        "`CellFocus` and the rotation ensemble (4x the compute per image), unless a heading "
        "says otherwise",
        "- this service against an older commit's on the same model, runs alternated: "
        "[benchmarks-inference-ab.md](benchmarks-inference-ab.md) (`make bench-inference-ab`)",
        f"- each level runs {doc['seconds_per_level']} s of back-to-back requests, one image "
        "per request (real 224 px JPEGs from the data set when present), upload to JSON "
        "answer, measured by the client",
        "- serving modes: " + "; ".join(f"`{k}` = max batch {b}, queue delay {d:g} ms"
                                        for k, (b, d) in MODES.items()),
        "- the load generator runs on the same 2 cores as the service and other engineers' "
        "jobs share the machine: treat differences under ~20% as noise",
    ]
    for run in doc["runs"]:
        c = run["config"]
        lines += [
            "",
            f"## {c['architecture']}"
            + (f" alpha {c['alpha']}" if c["architecture"] == "mobilenetv2" else "")
            + f" at {c['image_size']} px"
            + {True: ", rotation ensemble", False: ", without the rotation ensemble",
               None: ""}[c.get("rotation_ensemble")],
            "",
            "### /v1/predict",
            "",
            "| serving | clients | requests | errors | p50 ms | p99 ms | images/s | mean batch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in run["predict"]:
            lines.append(f"| {row['mode']} | {row['concurrency']} | {row['requests']} | "
                         f"{row['errors']} | {row['p50_ms']} | {row['p99_ms']} | "
                         f"{row['throughput_img_s']} | {row['mean_batch_size']} |")
        by = {(r["mode"], r["concurrency"]): r for r in run["predict"]}
        if ("batching", 32) in by and ("batch-1", 32) in by:
            ratio = (by[("batching", 32)]["throughput_img_s"]
                     / by[("batch-1", 32)]["throughput_img_s"])
            lines += ["", f"Dynamic batching vs batch-1 serving at 32 clients: **{ratio:.2f}x** "
                          "throughput."]
        rt = run["runtime"]
        lines += [
            "",
            "### Runtimes on the same model (in-process, images/s)",
            "",
            "| runtime | batch 1 | batch 32 |",
            "|---|---|---|",
            f"| onnxruntime (CPU provider) | {rt['onnxruntime_b1']} | {rt['onnxruntime_b32']} |",
            f"| Keras, `tf.function` call | {rt['keras_tf_function_b1']} | "
            f"{rt['keras_tf_function_b32']} |",
            f"| Keras `model.predict` | {rt['keras_predict_b1']} | {rt['keras_predict_b32']} |",
            "",
            "onnxruntime images/s by batch size: " + ", ".join(
                f"{b}: {v}" for b, v in rt["onnxruntime_by_batch"].items()) + ".",
            "",
            "### Cost of one explanation",
            "",
            "| what | ms |",
            "|---|---|",
            f"| `POST /v1/explain` (occlusion: 1 + 49 images in runs of 8, PNG), "
            f"p50 of {run['explain_ms']['requests']} | {run['explain_ms']['p50']} |",
            f"| occlusion map alone, in-process | {rt['occlusion_in_process_ms']} |",
            f"| one Keras forward + backward pass (the floor under Grad-CAM) | "
            f"{rt['keras_forward_backward_ms']} |",
        ]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs",
                   default="compact_cnn:0:64,mobilenetv2:0.35:128,mobilenetv2:1.0:224",
                   help="architecture:alpha:image_size[:plain], comma-separated; plain: "
                        "without the rotation ensemble (4x less compute per image)")
    p.add_argument("--seconds", type=float, default=6.0, help="per concurrency level")
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "inference.json"))
    p.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks-inference.md"))
    args = p.parse_args()
    # A terminated benchmark still stops the servers it started (finally blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    levels = [int(x) for x in args.levels.split(",")]
    doc = header()
    doc["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    doc["seconds_per_level"] = args.seconds
    doc["modes"] = {k: {"max_batch_size": b, "max_queue_delay_ms": d}
                    for k, (b, d) in MODES.items()}
    doc["runs"] = []
    images = sample_images()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        from conftest import free_port, wait_for_port

        port = free_port()
        mlflow_proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination",
             str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port, 180, mlflow_proc)
            uri = f"http://127.0.0.1:{port}"
            for spec in args.configs.split(","):
                arch, alpha, size, *plain = spec.split(":")
                rotations = plain != ["plain"]
                name = f"bench-{arch}-{alpha}-{size}" + ("" if rotations else "-plain")
                register_bench_model(uri, name, arch, float(alpha), int(size), rotations)
                base = {"LEUKOFED_INFERENCE_TRACKING_URI": uri,
                        "LEUKOFED_INFERENCE_MODEL_NAME": name,
                        "LEUKOFED_INFERENCE_ONNX_CACHE_DIR": str(tmp / "cache" / name)}
                run: dict[str, Any] = {"config": {"architecture": arch, "alpha": float(alpha),
                                                  "image_size": int(size),
                                                  "rotation_ensemble": rotations},
                                       "predict": []}
                for mode, (batch, delay) in MODES.items():
                    env = {**base, "LEUKOFED_INFERENCE_MAX_BATCH_SIZE": str(batch),
                           "LEUKOFED_INFERENCE_MAX_QUEUE_DELAY_MS": str(delay)}
                    result = run_mode(mode, env, images, levels, args.seconds, tmp,
                                      explain=mode == "batching")
                    run["predict"] += result["rows"]
                    if result.get("explain_ms"):
                        run["explain_ms"] = result["explain_ms"]
                run["runtime"] = runtime_comparison(tmp / "cache" / name, name, uri, int(size))
                doc["runs"].append(run)
                write_json(args.json, doc)  # partial results survive a later failure
        finally:
            mlflow_proc.terminate()
            mlflow_proc.wait(30)
    doc["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.json, doc)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(markdown(doc))
    print(f"wrote {args.json} and {args.markdown}")


def register_bench_model(uri: str, name: str, architecture: str, alpha: float,
                         size: int, rotation_ensemble: bool = True) -> str:
    """Untrained weights (speed does not depend on them), registered and published as ONNX
    the way the aggregator does: the service serves only published ONNX files."""
    return register_tiny_model(uri, name, seed=0, image_size=size, champion=True,
                               rotation_ensemble=rotation_ensemble, architecture=architecture,
                               alpha=alpha)


if __name__ == "__main__":
    main()
