"""`leukofed serve` and `leukofed predict`: added to the main CLI by register()."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_URL = "http://127.0.0.1:8000"


def _set_env(**values: object) -> None:
    # Options override the environment; the service reads only its settings class.
    for key, value in values.items():
        if value is not None:
            os.environ[f"LEUKOFED_INFERENCE_{key.upper()}"] = str(value)


def serve(
    host: Annotated[str | None, typer.Option(help="default: $LEUKOFED_INFERENCE_HOST or "
                                                  "127.0.0.1 (0.0.0.0 in a container)")] = None,
    port: Annotated[int | None, typer.Option(help="default: 8000")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    model_name: Annotated[str | None, typer.Option(help="registered model name")] = None,
    alias: Annotated[str | None, typer.Option(help="alias to follow (default champion)")] = None,
    version: Annotated[str | None, typer.Option(help="serve this fixed version instead")] = None,
    provider: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Start the inference service (REST, Open Inference Protocol, web page at /)."""
    _set_env(host=host, port=port, tracking_uri=tracking_uri, model_name=model_name,
             model_alias=alias, model_version=version, provider=provider)
    from services.inference.server import serve as run_server

    run_server(log_level=log_level)


def predict(
    images: Annotated[list[Path], typer.Argument(help="image files (JPEG, PNG, BMP, TIFF)")],
    url: Annotated[str, typer.Option(envvar="LEUKOFED_INFERENCE_URL",
                                     help="service address")] = DEFAULT_URL,
    api_key: Annotated[str | None, typer.Option(envvar="LEUKOFED_INFERENCE_API_KEY",
                                                help="sent as X-API-Key")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
    timeout: Annotated[float, typer.Option(help="seconds")] = 60.0,
) -> None:
    """Classify images through a running service and print a table."""
    import httpx

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise typer.BadParameter(f"not a file: {', '.join(missing)}")
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in images]
    headers = {"X-API-Key": api_key} if api_key else {}
    try:
        response = httpx.post(f"{url.rstrip('/')}/v1/predict", files=files, headers=headers,
                              timeout=timeout)
    except httpx.HTTPError as exc:
        typer.echo(f"cannot reach {url}: {exc}", err=True)
        raise typer.Exit(2) from exc
    if response.status_code != 200:
        try:
            detail = response.json().get("error", response.text)
        except ValueError:
            detail = response.text
        typer.echo(f"error {response.status_code}: {detail}", err=True)
        raise typer.Exit(1)
    body = response.json()
    if as_json:
        typer.echo(json.dumps(body, indent=1))
        return
    typer.echo(format_table(body))


def format_table(body: dict) -> str:
    """The predictions as an aligned text table, with the answering model underneath."""
    preds = body["predictions"]
    classes = list(preds[0]["probabilities"]) if preds else []
    width = max([len("file"), *(len(p["filename"]) for p in preds)])
    sets = [_set_text(p) for p in preds]
    set_width = max([len("set"), *(len(t) for t in sets)])
    lines = [f"{'file':<{width}}  {'label':<7} {'malignant':<9} {'set':<{set_width}} "
             + " ".join(f"{c:>7}" for c in classes) + "  answer"]
    notes = []
    for p, set_text in zip(preds, sets):
        probs = " ".join(f"{p['probabilities'][c]:>7.3f}" for c in classes)
        # A referred image's label is only the model's guess: say "refer" first.
        answer = {True: "REFER to a hematologist", False: "in distribution"}.get(
            p.get("refer"), "out-of-distribution check unavailable")
        lines.append(f"{p['filename']:<{width}}  {p['label']:<7} "
                     f"{p.get('malignant') or '-':<9} {set_text:<{set_width}} {probs}  "
                     f"{answer}")
        if p.get("refer"):
            notes += [f"  {p['filename']}: {r}" for r in p.get("refer_reasons", [])]
    m = body["model"]
    alias = f" ({m['alias']})" if m.get("alias") else ""
    if notes:
        lines += ["why referred:", *notes]
    lines.append(f"model: {m['name']} version {m['version']}{alias}")
    calibrated = [p for p in preds if p.get("calibrated")]
    if calibrated:
        p = calibrated[0]
        lines.append(f"probabilities calibrated (temperature {p['temperature']:.2f}); set: "
                     f"the {100 * p['coverage']:.4g}% prediction set")
    elif preds:
        lines.append("probabilities not calibrated: no prediction sets")
    lines.append("Decision support for a qualified professional, not a diagnosis.")
    return "\n".join(lines)


def _set_text(prediction: dict) -> str:
    """'Pre,Pro'; '{}' for an empty set; '-' when there is none (not calibrated)."""
    pset = prediction.get("prediction_set")
    if pset is None:
        return "-"
    return ",".join(pset) if pset else "{}"


def register(app: typer.Typer) -> None:
    """Add `serve` and `predict` to the leukofed CLI."""
    app.command("serve")(serve)
    app.command("predict")(predict)
