"""`leukofed aggregator serve`, `leukofed run start|status|list|cancel|watch`,
`leukofed promote VERSION`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from leukofed.audit import DEFAULT_MAX_FOLLOW_COLOUR
from leukofed.protocol import DEFAULT_IMAGE_SIZE

aggregator_app = typer.Typer(help="The aggregator service.", no_args_is_help=True)
run_app = typer.Typer(help="Federated runs, through the aggregator's REST API.",
                      no_args_is_help=True)

UrlOpt = Annotated[str, typer.Option("--url", envvar="LEUKOFED_AGGREGATOR_URL",
                                     help="aggregator base URL")]
DEFAULT_URL = "http://127.0.0.1:8001"


def _request(method: str, url: str, **kwargs: Any) -> Any:
    import httpx

    from services.aggregator.auth import read_secret

    # The same token the server reads (env or secret file), sent as a bearer token.
    token = read_secret(os.environ.get("LEUKOFED_AGGREGATOR_ADMIN_TOKEN"),
                        os.environ.get("LEUKOFED_AGGREGATOR_ADMIN_TOKEN_FILE"))
    if token:
        kwargs.setdefault("headers", {})["Authorization"] = f"Bearer {token}"
    try:
        response = httpx.request(method, url, timeout=30, **kwargs)
    except httpx.HTTPError as exc:
        raise typer.BadParameter(f"cannot reach the aggregator at {url}: {exc}") from exc
    if response.status_code >= 400:
        typer.echo(f"error {response.status_code}: {response.text}", err=True)
        raise typer.Exit(1)
    return response.json()


@aggregator_app.command()
def serve(host: Annotated[str | None, typer.Option()] = None,
          port: Annotated[int | None, typer.Option()] = None) -> None:
    """Run the aggregator (REST API + round loop) with uvicorn."""
    import uvicorn

    from leukofed.startup import StartupRefused
    from services.aggregator.app import create_app
    from services.aggregator.settings import AggregatorSettings

    settings = AggregatorSettings()
    try:
        app = create_app(settings)
    except StartupRefused as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    uvicorn.run(app, host=host or settings.host, port=port or settings.port,
                ssl_certfile=settings.https_cert_file, ssl_keyfile=settings.https_key_file)


def _progress_line(run: dict[str, Any]) -> str:
    latest = run.get("latest") or {}
    scores = "  ".join(f"{k}={latest[k]:.3f}" for k in (
        "val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1",
        "server_test_accuracy", "server_test_macro_f1") if k in latest)
    return (f"[{run['status']}] round {run['completed_round']}/{run['rounds']} done"
            + (f"  {scores}" if scores else "") + (f"  reason: {run['reason']}"
                                                    if run.get("reason") else ""))


@run_app.command()
def start(
    config: Annotated[Path | None, typer.Option(help="JSON file with a run config")] = None,
    model: str = "compact_cnn", image_size: int = DEFAULT_IMAGE_SIZE, rounds: int = 10,
    local_epochs: int = 1,
    batch_size: int = 32, learning_rate: float = 1e-3, strategy: str = "fedavg",
    strategy_param: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable")] = None,
    hospitals: Annotated[str | None, typer.Option(help="comma-separated ids")] = None,
    min_fit_clients: int = 1, round_deadline_s: float = 600.0, seed: int = 0,
    fp16: bool = False, name: str = "", url: UrlOpt = DEFAULT_URL,
    watch: Annotated[bool, typer.Option(help="follow until the run ends")] = False,
) -> None:
    """Start a federated run; prints its id (or follows it with --watch)."""
    body: dict[str, Any] = json.loads(config.read_text()) if config else {}
    params = {}
    for item in strategy_param or []:
        key, _, value = item.partition("=")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    if not config:
        body = {"name": name, "model": model, "image_size": image_size, "rounds": rounds,
                "local_epochs": local_epochs, "batch_size": batch_size,
                "learning_rate": learning_rate, "strategy": strategy,
                "strategy_params": params, "min_fit_clients": min_fit_clients,
                "round_deadline_s": round_deadline_s, "seed": seed, "fp16": fp16}
        if hospitals:
            body["hospitals"] = [h.strip() for h in hospitals.split(",") if h.strip()]
    run = _request("POST", f"{url}/v1/runs", json=body)
    typer.echo(run["id"])
    if watch:
        _watch(run["id"], url)


def _watch(run_id: str, url: str, interval: float = 2.0) -> dict[str, Any]:
    shown = -1
    while True:
        run = _request("GET", f"{url}/v1/runs/{run_id}")
        if run["completed_round"] != shown or run["status"] not in ("queued", "running"):
            shown = run["completed_round"]
            typer.echo(_progress_line(run))
        if run["status"] not in ("queued", "running"):
            return run
        time.sleep(interval)


@run_app.command()
def watch(run_id: str, url: UrlOpt = DEFAULT_URL) -> None:
    """Print progress per round until the run ends; exit 1 unless it completed."""
    run = _watch(run_id, url)
    if run["status"] != "completed":
        raise typer.Exit(1)


@run_app.command()
def status(run_id: str, url: UrlOpt = DEFAULT_URL,
           as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One run: status, rounds, latest metrics (full JSON with --json)."""
    run = _request("GET", f"{url}/v1/runs/{run_id}")
    if as_json:
        typer.echo(json.dumps(run, indent=1))
        return
    typer.echo(_progress_line(run))
    for r in run["history"]:
        g = r["global"]
        typer.echo(f"  round {r['round']}: participants {r['participants']}  "
                   + "  ".join(f"{k}={v:.3f}" for k, v in g.items()
                               if k.endswith(("accuracy", "macro_f1"))))
    if run.get("mlflow_url"):
        typer.echo(f"  MLflow: {run['mlflow_url']}")


@run_app.command("list")
def list_runs(url: UrlOpt = DEFAULT_URL) -> None:
    """All runs, newest first."""
    for run in _request("GET", f"{url}/v1/runs"):
        typer.echo(f"{run['id']}  {run['name'] or '-':20}  " + _progress_line(run))


@run_app.command()
def cancel(run_id: str, url: UrlOpt = DEFAULT_URL) -> None:
    """Cancel a queued or running run (the current round stops at its next check)."""
    _request("POST", f"{url}/v1/runs/{run_id}/cancel")
    typer.echo(f"cancel requested for {run_id}")


def promote(
    version: Annotated[str, typer.Argument(help="model version, or 'best' (highest tag)")],
    alias: str = "champion",
    metric: Annotated[str, typer.Option(
        help="tag used by 'best'; the default ranks by the worse of original and recoloured "
             "macro-F1, so a colour reader cannot win")] = "audit_worst_macro_f1",
    run_id: Annotated[str | None, typer.Option(help="with 'best': only this run")] = None,
    model_name: Annotated[str | None, typer.Option()] = None,
    max_follow_colour: Annotated[float, typer.Option(
        help="refuse a version whose share of answers following a new stain is above this",
        envvar="LEUKOFED_MAX_FOLLOW_COLOUR")] = DEFAULT_MAX_FOLLOW_COLOUR,
    force: Annotated[bool, typer.Option(
        help="move the alias even when the shortcut audit fails or is missing")] = False,
) -> None:
    """Point an alias (champion by default) at a registered model version, after showing
    its shortcut audit (leukofed.audit); a version that reads colour is refused."""
    from leukofed.audit import audit_verdict, format_audit
    from registry.client import Registry, RegistryError
    from registry.model_versions import DEFAULT_MODEL_NAME
    from registry.publish import TAG_SHA, TAG_SIGNATURE, TAG_UNSIGNED

    uri = os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    name = model_name or os.environ.get("LEUKOFED_AGGREGATOR_MODEL_NAME", DEFAULT_MODEL_NAME)
    registry = Registry(uri, name)  # MLflow credentials: MLFLOW_TRACKING_USERNAME/PASSWORD
    try:
        if version == "best":
            found = registry.best_version(metric, run_id)
            if found is None:
                typer.echo(f"no version of {name} has a {metric} tag"
                           + (" (versions registered without a server test split carry no "
                              "shortcut audit; rank them with --metric val_macro_f1)"
                              if metric.startswith("audit_") else ""), err=True)
                raise typer.Exit(1)
            version = found[0]
            typer.echo(f"best by {metric}: version {version} ({found[1]:.4f})")
        tags = registry.version(version).tags
    except RegistryError as exc:
        typer.echo(f"cannot read version {version} of {name}: {exc}", err=True)
        raise typer.Exit(1) from None
    card = _model_card(registry, tags)
    if card is not None:
        from leukofed.card import card_summary

        typer.echo(card_summary(card))
    else:
        typer.echo(f"version {version} has no model card (registered before cards existed)")
    typer.echo(format_audit(tags))
    ok, reason = audit_verdict(tags, max_follow_colour)
    if not ok and not force:
        typer.echo(f"refused: version {version}: {reason}; pass --force to promote anyway",
                   err=True)
        raise typer.Exit(2)
    if not ok:
        typer.echo(f"warning: {reason}; promoted because of --force", err=True)
    signed = tags.get(TAG_SIGNATURE) not in (None, "", TAG_UNSIGNED)
    typer.echo(f"ONNX file sha256: {tags.get(TAG_SHA) or 'none (not servable)'}; aggregator "
               f"signature: {'present (the inference service checks it)' if signed else 'none'}")
    try:
        tags = registry.promote(version, alias)
    except RegistryError as exc:  # e.g. a read-only (hospital) user with MLflow auth on
        typer.echo(f"MLflow refused to move @{alias}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{name} version {version} is now @{alias} (run {tags.get('run_id', '?')}, "
               f"round {tags.get('round', '?')})")


def _model_card(registry: Any, tags: dict[str, str]) -> dict[str, Any] | None:
    """The version's model card, from the run artifact its ``model_card`` tag names."""
    where = tags.get("model_card", "")
    run_id, _, path = where.partition(":")
    if not run_id or not path:
        return None
    try:
        return json.loads(registry.run_artifact_text(run_id, path))
    except Exception as exc:  # a missing artifact must not stop a promotion; say so
        typer.echo(f"model card unreadable ({where}): {exc}", err=True)
        return None


def register(app: typer.Typer) -> None:
    app.add_typer(aggregator_app, name="aggregator")
    app.add_typer(run_app, name="run")
    app.command("promote")(promote)
    from services.aggregator.simulate import simulate

    app.command("simulate")(simulate)
