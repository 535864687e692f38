"""`leukofed client ...`: run a hospital's worker, and let hospital IT audit and pause it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from services.client.audit import ParticipationLog, PauseSwitch

client_app = typer.Typer(help="Hospital client: worker, participation log, pause switch.",
                         no_args_is_help=True)

HospitalOpt = Annotated[str | None, typer.Option("--hospital-id", "-h",
                                                 help="default: $LEUKOFED_CLIENT_HOSPITAL_ID")]
StateOpt = Annotated[Path | None, typer.Option(help="default: $LEUKOFED_CLIENT_STATE_DIR or "
                                                    ".run/client-<id>")]


def _state_dir(hospital_id: str | None, state_dir: Path | None) -> Path:
    if state_dir:
        return state_dir
    if os.environ.get("LEUKOFED_CLIENT_STATE_DIR"):
        return Path(os.environ["LEUKOFED_CLIENT_STATE_DIR"])
    hid = hospital_id or os.environ.get("LEUKOFED_CLIENT_HOSPITAL_ID")
    if not hid:
        raise typer.BadParameter("give --hospital-id or --state-dir (or set the LEUKOFED_CLIENT_"
                                 "HOSPITAL_ID / LEUKOFED_CLIENT_STATE_DIR environment)")
    return Path(".run") / f"client-{hid}"


def _set_env(**values: object) -> None:
    for key, value in values.items():
        if value is not None:
            os.environ[f"LEUKOFED_CLIENT_{key.upper()}"] = str(value)


@client_app.command()
def worker(
    hospital_id: HospitalOpt = None,
    data_dir: Annotated[Path | None, typer.Option(help="$LEUKOFED_CLIENT_DATA_DIR")] = None,
    broker_url: Annotated[str | None, typer.Option(help="$LEUKOFED_CLIENT_BROKER_URL")] = None,
    state_dir: StateOpt = None,
    loglevel: str = "INFO",
) -> None:
    """Run this hospital's Celery worker (consumes only queue hospital.<id>)."""
    _set_env(hospital_id=hospital_id, data_dir=data_dir, broker_url=broker_url,
             state_dir=state_dir)
    from services.client.settings import ClientSettings
    from services.client.worker import create_app, worker_argv

    settings = ClientSettings()  # type: ignore[call-arg]
    if not settings.data_dir.is_dir():
        raise typer.BadParameter(f"data dir not found: {settings.data_dir}")
    from leukofed.startup import StartupRefused

    try:
        app = create_app(settings)
    except StartupRefused as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    app.worker_main(worker_argv(settings, loglevel))


@client_app.command()
def virtual(
    hospitals_dir: Annotated[Path | None, typer.Option(
        help="one sub-folder per hospital; $LEUKOFED_VIRTUAL_HOSPITALS_DIR")] = None,
    ids: Annotated[str | None, typer.Option(
        help="comma-separated hospital ids (default: every sub-folder); "
             "$LEUKOFED_VIRTUAL_HOSPITALS")] = None,
    broker_url: Annotated[str | None, typer.Option(help="$LEUKOFED_VIRTUAL_BROKER_URL")] = None,
    keys_dir: Annotated[Path | None, typer.Option(
        help="<id>.key per hospital and aggregator.pub; $LEUKOFED_VIRTUAL_KEYS_DIR")] = None,
    loglevel: str = "INFO",
) -> None:
    """Simulation: ONE worker process serving many virtual hospitals (their queues, data,
    keys), one training at a time, through the same task code as a real hospital."""
    for key, value in {"hospitals_dir": hospitals_dir, "hospitals": ids,
                       "broker_url": broker_url, "keys_dir": keys_dir}.items():
        if value is not None:
            os.environ[f"LEUKOFED_VIRTUAL_{key.upper()}"] = str(value)
    from leukofed.startup import StartupRefused
    from services.client.virtual import VirtualSettings, create_virtual_app, virtual_worker_argv

    try:
        settings = VirtualSettings()  # type: ignore[call-arg]
        app = create_virtual_app(settings)
    except StartupRefused as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from None
    app.worker_main(virtual_worker_argv(settings, loglevel))


@client_app.command("log")
def show_log(hospital_id: HospitalOpt = None, state_dir: StateOpt = None,
             as_json: Annotated[bool, typer.Option("--json")] = False,
             tail: Annotated[int, typer.Option(help="last N entries, 0 = all")] = 0) -> None:
    """Every task this hospital answered: run, round, bytes sent, SHA-256, time."""
    entries = list(ParticipationLog(_state_dir(hospital_id, state_dir)).entries())
    if tail:
        entries = entries[-tail:]
    if as_json:
        for e in entries:
            typer.echo(json.dumps(e, sort_keys=True))
        return
    if not entries:
        typer.echo("no participation yet")
        return
    typer.echo(f"{'time':20} {'run':14} {'round':>5} {'task':9} {'status':9} {'bytes':>10}  sha256")
    for e in entries:
        typer.echo(f"{e.get('time', ''):20} {str(e.get('run', ''))[:14]:14} "
                   f"{e.get('round', ''):>5} {e.get('task', ''):9} {e.get('status', ''):9} "
                   f"{e.get('bytes', 0):>10}  {e.get('sha256') or e.get('reason', '')}")


@client_app.command()
def pause(hospital_id: HospitalOpt = None, state_dir: StateOpt = None,
          reason: str = "") -> None:
    """Stop taking part: the worker declines every task until `resume`."""
    PauseSwitch(_state_dir(hospital_id, state_dir)).pause(reason)
    typer.echo("paused: the worker declines tasks (status 'declined: paused')")


@client_app.command()
def resume(hospital_id: HospitalOpt = None, state_dir: StateOpt = None) -> None:
    """Take part again from the next task."""
    PauseSwitch(_state_dir(hospital_id, state_dir)).resume()
    typer.echo("resumed: the worker accepts tasks")


@client_app.command()
def status(hospital_id: HospitalOpt = None, state_dir: StateOpt = None) -> None:
    """Paused or not, and how many updates were sent."""
    d = _state_dir(hospital_id, state_dir)
    switch = PauseSwitch(d)
    sent = [e for e in ParticipationLog(d).entries() if e.get("task") == "fit"
            and e.get("status") == "ok"]
    typer.echo(json.dumps({"state_dir": str(d), "paused": switch.paused,
                           "pause_reason": switch.reason(), "updates_sent": len(sent),
                           "bytes_sent": sum(int(e.get("bytes", 0)) for e in sent)}, indent=1))


@client_app.command()
def privacy(hospital_id: HospitalOpt = None, state_dir: StateOpt = None,
            delta: Annotated[float, typer.Option(help="delta of the epsilons shown")] = 1e-5
            ) -> None:
    """What this hospital's training images have spent under example-level differential
    privacy (DP-SGD): epsilon per run and over every run (the total its
    LEUKOFED_CLIENT_MAX_EPSILON limits), from its ledger."""
    from leukofed.dp_sgd import HospitalLedger

    ledger = HospitalLedger(_state_dir(hospital_id, state_dir))
    entries = ledger.entries()
    runs = sorted({e.run for e in entries})
    typer.echo(json.dumps({
        "ledger": str(ledger.path), "delta": delta,
        "unit": "one training image (a patient with k images: leukofed.dp_sgd.group_privacy)",
        "total_epsilon": ledger.epsilon(delta),
        "runs": {r: {"epsilon": ledger.epsilon(delta, run=r),
                     "rounds": sum(e.run == r for e in entries)} for r in runs}}, indent=1))


@client_app.command()
def describe(hospital_id: HospitalOpt = None,
             data_dir: Annotated[Path | None, typer.Option()] = None) -> None:
    """What the aggregator would learn from describe(): class counts and a fingerprint."""
    _set_env(hospital_id=hospital_id, data_dir=data_dir)
    from services.client.hospital import HospitalClient
    from services.client.settings import ClientSettings

    typer.echo(json.dumps(HospitalClient(ClientSettings()).describe(),  # type: ignore[call-arg]
                          indent=1))


def register(app: typer.Typer) -> None:
    app.add_typer(client_app, name="client")
