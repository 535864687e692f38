"""`leukofed aggregator serve`, `leukofed run start|status|list|cancel|watch`,
`leukofed promote VERSION`."""

from __future__ import annotations

import getpass
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


def _request(method: str, url: str, tolerate: tuple[int, ...] = (), **kwargs: Any) -> Any:
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
    if response.status_code in tolerate:
        return None
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


# (key, words) of a round's timings as `run status` shows them, in the round's order.
_TIMING_PARTS = (("fit_wall_s", "fit"), ("eval_s", "evaluate"),
                 ("server_test_s", "server test"), ("audit_s", "colour audit"),
                 ("log_s", "MLflow log"), ("register_s", "register"))
_REGISTER_PARTS = (("card_s", "card"), ("register_keras_s", "Keras"), ("onnx_s", "ONNX"))


def timing_line(timings: dict[str, float], skipped: dict[str, str]) -> str:
    """Where a round's seconds went: ``time: round 52.1 s = fit 30.1, evaluate 6.0, ...``
    (empty without timings); the audits a version skipped are named, not explained (the
    reasons are in ``run status --json`` and on the version's tags)."""
    if "round_s" not in timings:
        return ""
    round_s = timings["round_s"] + timings.get("track_s", 0.0)
    parts = [f"{words} {timings[k]:.1f}" for k, words in _TIMING_PARTS if k in timings]
    inner = [f"{words} {timings[k]:.1f}" for k, words in _REGISTER_PARTS if k in timings]
    line = f"time: round {round_s:.1f} s = " + ", ".join(parts)
    if inner:
        line += f" ({', '.join(inner)})"
    if skipped:
        line += f"; audits skipped (cannot be promoted): {', '.join(sorted(skipped))}"
    return line


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
        line = timing_line(r.get("timings") or {}, r.get("audit_skipped") or {})
        if line:
            typer.echo(f"    {line}")
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


GATE_HELP = "release gate floor (default {default:g}; env {env})"


def _gate_option(name: str, words: str) -> Any:
    from leukofed.gate import GateFloors

    default = GateFloors.model_fields[name].default
    return typer.Option(help=f"{words}: " + GATE_HELP.format(
        default=default, env=f"LEUKOFED_GATE_{name.upper()}"))


def promote(
    version: Annotated[str | None, typer.Argument(
        help="model version, or 'best' (the highest-ranked version that passes the gate)")
    ] = None,
    alias: str = "champion",
    history: Annotated[bool, typer.Option(
        "--history", help="show the aggregator's promotion log (who, when, what the gate "
        "said, moves made in the MLflow UI and what became of them) and exit")] = False,
    url: UrlOpt = DEFAULT_URL,
    metric: Annotated[str, typer.Option(
        help="tag used by 'best'; the default ranks by the worse of original and recoloured "
             "macro-F1, so a colour reader cannot win")] = "audit_worst_macro_f1",
    run_id: Annotated[str | None, typer.Option(help="with 'best': only this run")] = None,
    model_name: Annotated[str | None, typer.Option()] = None,
    force: Annotated[bool, typer.Option(
        help="move the alias although the version fails the release gate; needs --reason, "
             "and the override is recorded with the move")] = False,
    reason: Annotated[str | None, typer.Option(
        help="why the version is promoted past the gate (with --force; recorded)")] = None,
    min_macro_f1: Annotated[float | None, _gate_option(
        "min_macro_f1", "lowest test macro-F1")] = None,
    min_sensitivity: Annotated[float | None, _gate_option(
        "min_sensitivity", "lowest malignant sensitivity")] = None,
    min_specificity: Annotated[float | None, _gate_option(
        "min_specificity", "lowest malignant specificity")] = None,
    min_class_recall: Annotated[float | None, _gate_option(
        "min_class_recall", "lowest recall of every class")] = None,
    max_coverage_shortfall: Annotated[float | None, _gate_option(
        "max_coverage_shortfall", "most the conformal coverage may fall under its target")
    ] = None,
    max_refer_share: Annotated[float | None, _gate_option(
        "max_refer_share", "highest share of test images referred")] = None,
    max_follow_colour: Annotated[float | None, typer.Option(
        help="highest share of recoloured test images whose answer follows the new colour "
             "(the shortcut audit): release gate floor (default "
             f"{DEFAULT_MAX_FOLLOW_COLOUR:g}; env LEUKOFED_GATE_MAX_FOLLOW_COLOUR or "
             "LEUKOFED_MAX_FOLLOW_COLOUR)")] = None,
    max_membership_auc: Annotated[float | None, typer.Option(
        help="highest AUC of the card's membership-inference audit (0.5: a coin): release "
             "gate floor, off unless set (suggested 0.6, docs/privacy.md; env "
             "LEUKOFED_GATE_MAX_MEMBERSHIP_AUC)")] = None,
) -> None:
    """Point an alias (champion by default) at a registered model version, after showing
    its model card, its shortcut audit and the release gate (leukofed.gate). A version below
    a floor is refused; --force --reason TEXT overrides, and the override is recorded.

    With the aggregator's admin token (LEUKOFED_AGGREGATOR_ADMIN_TOKEN or _FILE) the move is
    made by the aggregator (--url): it runs the gate again, signs the "approved for serving"
    statement the inference service requires and records the move in its promotion log
    (--history). Without it the alias is moved in MLflow only, as the MLflow UI does; the
    aggregator's watcher then approves it (gate passed) or puts it back."""
    from pydantic import ValidationError

    from leukofed.audit import format_audit
    from leukofed.gate import GateFloors, check_gate, format_gate
    from registry.client import HISTORY_TAG, OVERRIDE_TAG, Registry, RegistryError
    from registry.model_versions import DEFAULT_MODEL_NAME
    from registry.publish import TAG_SHA, TAG_SIGNATURE, TAG_UNSIGNED

    if history:
        _show_history(url)
        return
    if version is None:
        raise typer.BadParameter("give a VERSION (or 'best'), or --history")
    if force and not (reason or "").strip():
        typer.echo("refused: --force needs --reason TEXT (why this version is promoted past "
                   "the release gate; it is recorded with the move)", err=True)
        raise typer.Exit(2)
    given = {"min_macro_f1": min_macro_f1, "min_sensitivity": min_sensitivity,
             "min_specificity": min_specificity, "min_class_recall": min_class_recall,
             "max_coverage_shortfall": max_coverage_shortfall,
             "max_refer_share": max_refer_share, "max_follow_colour": max_follow_colour,
             "max_membership_auc": max_membership_auc}
    try:
        floors = GateFloors(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(f"release gate floors: {exc}") from None
    uri = os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    name = model_name or os.environ.get("LEUKOFED_AGGREGATOR_MODEL_NAME", DEFAULT_MODEL_NAME)
    registry = Registry(uri, name)  # MLflow credentials: MLFLOW_TRACKING_USERNAME/PASSWORD
    none_passes = False
    cards: dict[str, Any] = {}  # version -> card, each downloaded once
    try:
        if version == "best":
            ranked = registry.ranked_versions(metric, run_id)
            if not ranked:
                typer.echo(f"no version of {name} has a {metric} tag"
                           + (" (versions registered without a server test split carry no "
                              "shortcut audit; rank them with --metric val_macro_f1)"
                              if metric.startswith("audit_") else ""), err=True)
                raise typer.Exit(1)
            chosen = None
            for info in ranked:  # highest first: the first that passes the gate wins
                cards[info.version] = _model_card(registry, info.tags)
                verdict = check_gate(cards[info.version], info.tags, floors)
                if verdict.passed:
                    chosen = info
                    break
                typer.echo(f"version {info.version} ({metric} "
                           f"{float(info.tags[metric]):.4f}): {verdict.summary()}")
            if chosen is None:
                none_passes = True
                chosen = ranked[0]
                typer.echo(f"no version of {name}" + (f" in run {run_id}" if run_id else "")
                           + f" passes the release gate ({len(ranked)} checked); the best by "
                           f"{metric}, version {chosen.version}, is shown below")
            else:
                typer.echo(f"best by {metric} that passes the release gate: version "
                           f"{chosen.version} ({float(chosen.tags[metric]):.4f})")
            version = chosen.version
        tags = registry.version(version).tags
    except RegistryError as exc:
        typer.echo(f"cannot read version {version} of {name}: {exc}", err=True)
        raise typer.Exit(1) from None
    card = cards[version] if version in cards else _model_card(registry, tags)
    if card is not None:
        from leukofed.card import card_summary

        typer.echo(card_summary(card))
    else:
        typer.echo(f"version {version} has no model card (registered before cards existed): "
                   "the release gate finds its metrics missing")
    typer.echo(format_audit(tags))
    verdict = check_gate(card, tags, floors)
    typer.echo(format_gate(verdict))
    failed = ", ".join(verdict.failed_names())
    if not verdict.passed and not force:
        if none_passes:
            typer.echo(f"refused: nothing promoted: no version of {name} passes the release "
                       f"gate (version {version}, the best by {metric}, fails {failed}); "
                       "train further, or promote one anyway with `leukofed promote VERSION "
                       "--force --reason TEXT` (recorded with the move)", err=True)
        else:
            typer.echo(f"refused: version {version} fails the release gate ({failed}); to "
                       "promote it anyway: --force --reason TEXT (recorded with the move)",
                       err=True)
        raise typer.Exit(2)
    gate: dict[str, Any] = {"gate": "passed"}
    if not verdict.passed:
        typer.echo(f"warning: version {version} fails the release gate ({failed}); promoted "
                   f"because of --force, reason: {reason}", err=True)
        gate = {"gate": "overridden", "reason": reason,
                "failed": [c.describe() for c in verdict.failed]}
    elif reason:
        gate["reason"] = reason
    signed = tags.get(TAG_SIGNATURE) not in (None, "", TAG_UNSIGNED)
    typer.echo(f"ONNX file sha256: {tags.get(TAG_SHA) or 'none (not servable)'}; aggregator "
               f"signature: {'present (the inference service checks it)' if signed else 'none'}")
    entry = None
    if _admin_token():  # the aggregator signs the approval and keeps the log
        by = os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
        # 503: an aggregator that signs nothing (development mode): moved in MLflow below.
        entry = _request("POST", f"{url}/v1/promotions", tolerate=(503,), json={
            "version": str(version), "alias": alias, "model": name, "by": by,
            "force": force, "reason": reason, "floors": floors.model_dump()})
    if entry is not None:
        typer.echo(f"{name} version {version} is now @{alias} (run {tags.get('run_id', '?')}, "
                   f"round {tags.get('round', '?')})")
        typer.echo(f"approved for serving by the aggregator: seq {entry['seq']}, by "
                   f"{entry['by']}, expires {entry['expires_at']} (renewed by the "
                   "aggregator while it stays); recorded in its promotion log "
                   "(leukofed promote --history)")
        return
    try:
        tags = registry.promote(version, alias, gate)
    except RegistryError as exc:  # e.g. a read-only (hospital) user with MLflow auth on
        typer.echo(f"MLflow refused to move @{alias}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo("moved in MLflow only (no aggregator admin token here): where the inference "
               "service checks signatures it serves this version once the aggregator's "
               "promotion watcher has approved it; the watcher runs the same release gate "
               "with the aggregator's floors and puts back a move that fails it, overrides "
               "included. Promote through the aggregator (LEUKOFED_AGGREGATOR_ADMIN_TOKEN_FILE"
               ", --url) to have it signed at once.", err=True)
    typer.echo(f"{name} version {version} is now @{alias} (run {tags.get('run_id', '?')}, "
               f"round {tags.get('round', '?')})")
    if gate["gate"] == "overridden":
        typer.echo(f"override recorded in the alias history (tag {HISTORY_TAG} of {name}) "
                   f"and on version {version} (tag {OVERRIDE_TAG}): who, when, the reason "
                   "and the floors failed")


def _admin_token() -> str | None:
    from services.aggregator.auth import read_secret

    return read_secret(os.environ.get("LEUKOFED_AGGREGATOR_ADMIN_TOKEN"),
                       os.environ.get("LEUKOFED_AGGREGATOR_ADMIN_TOKEN_FILE"))


def _show_history(url: str) -> None:
    """The promotion log: from the aggregator's API with the admin token, else from this
    machine's aggregator state folder (LEUKOFED_AGGREGATOR_STATE_DIR)."""
    from services.aggregator.promotion import PromotionLog, format_history
    from services.aggregator.settings import AggregatorSettings

    if _admin_token():
        body = _request("GET", f"{url}/v1/promotions")
        entries, broken = body["entries"], body["broken"]
    else:
        log = PromotionLog(AggregatorSettings().state_dir)
        if not log.path.exists():
            typer.echo(f"no promotion log at {log.path}: give the aggregator's admin token "
                       "(LEUKOFED_AGGREGATOR_ADMIN_TOKEN_FILE) and --url to read it from the "
                       "aggregator, or set LEUKOFED_AGGREGATOR_STATE_DIR", err=True)
            raise typer.Exit(1)
        entries, broken = log.entries(), log.verify()
    typer.echo(format_history(entries, broken))
    if broken:
        raise typer.Exit(1)


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
