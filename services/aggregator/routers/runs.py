"""/v1/runs: start, list, follow and cancel federated runs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from services.aggregator.config import RunConfig

router = APIRouter(prefix="/v1/runs", tags=["runs"])


def _brief(record: dict[str, Any]) -> dict[str, Any]:
    last = record["rounds"][-1]["global"] if record["rounds"] else {}
    return {"id": record["id"], "name": record["config"].get("name", ""),
            "status": record["status"], "reason": record["reason"],
            "current_round": record["current_round"],
            "completed_round": record["completed_round"],
            "rounds": record["config"]["rounds"], "created": record["created"],
            "updated": record["updated"], "latest": last,
            "mlflow_run_id": record.get("mlflow_run_id")}


@router.post("", status_code=201, summary="Start a federated run")
def start_run(config: RunConfig, request: Request) -> dict[str, Any]:
    record = request.app.state.manager.submit(config)
    return _brief(record)


@router.get("", summary="List runs, newest first")
def list_runs(request: Request) -> list[dict[str, Any]]:
    records = request.app.state.store.list()
    return [_brief(r) for r in sorted(records, key=lambda r: r["created"], reverse=True)]


@router.get("/{run_id}", summary="A run: status, config, per-round global and per-hospital "
                                 "metrics, events")
def get_run(run_id: str, request: Request) -> dict[str, Any]:
    record = request.app.state.store.load(run_id)
    if record is None:
        raise HTTPException(404, f"no run {run_id!r}")
    return {**_brief(record), "config": record["config"], "versions": record["versions"],
            "history": record["rounds"], "aborted_rounds": record.get("aborted_rounds", []),
            "events": record["events"][-100:],
            # Whose laboratory the run's versions answer; a hospital that joined later and
            # is not listed is on probation (its images referred; the events say why).
            "established_hospitals": record.get("established_hospitals"),
            # While a round runs: its step, selected / answered / failed, deadline.
            "progress": request.app.state.manager.progress(run_id),
            "mlflow_url": request.app.state.mlflow_url(record)}


@router.post("/{run_id}/cancel", summary="Cancel a queued or running run")
def cancel_run(run_id: str, request: Request) -> dict[str, Any]:
    record = request.app.state.manager.cancel(run_id)
    if record is None:
        raise HTTPException(404, f"no run {run_id!r}")
    return _brief(record) | {"cancel_requested": True}
