"""Signed tasks: how long they stay valid, and what a replay gets after a worker restart
(issue 26, finding 11). The tasks go through the hospital worker's real Celery task functions
(services/client/worker.py, run in-process with ``apply``) with real Ed25519 signatures; a
"restart" is a new worker app, so a new HospitalClient, on the same state folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from leukofed import signing
from leukofed.transport import TASK_DESCRIBE
from services.client.audit import ParticipationLog
from services.client.completed import CLOCK_SKEW_S, CompletedTasks
from services.client.hospital import HospitalClient
from services.client.settings import ClientSettings
from services.client.worker import create_app


@pytest.fixture
def signed(tmp_path: Path, synthetic_dataset) -> tuple[ClientSettings, Any]:
    keys = tmp_path / "keys"
    for name in ("aggregator", "a"):
        signing.generate_keypair(keys, name)
    settings = ClientSettings(
        hospital_id="a", data_dir=synthetic_dataset(per_class=2), state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache", block_size=2, signing_key_file=keys / "a.key",
        aggregator_public_key_file=keys / "aggregator.pub", _env_file=None)
    return settings, signing.load_private_key(keys / "aggregator.key")


def describe_task(aggregator: Any, nonce: str) -> list[Any]:
    """The arguments of a describe task as the aggregator sends it (dispatch.py), signed."""
    config = {"run_id": "r1", "round": 0, "nonce": nonce}
    return [b"", config, signing.sign_task(aggregator, TASK_DESCRIBE, "a", [b"", config])]


def run(worker: Any, args: list[Any]) -> dict[str, Any]:
    result = worker.tasks[TASK_DESCRIBE].apply(args=args)
    return result.get(propagate=True)


def test_attack_completed_task_replayed_after_worker_restart(signed, monkeypatch) -> None:
    """Whoever can write to the hospital's queue copies a signed task and sends it again
    after the worker restarted: the nonce cache was in memory only, so the new process ran
    it a second time. Now a completed task's nonce is on disk; a task the worker never
    finished (it died mid-task) still runs when Celery delivers it again (acks_late)."""
    settings, aggregator = signed
    task = describe_task(aggregator, "challenge-1")
    first = create_app(settings)
    assert run(first, task)["status"] == "ok"
    assert run(first, task)["reason"] == "task_replay"  # same process: refused, as before

    restarted = create_app(settings)
    replayed = run(restarted, task)
    assert replayed["status"] == "declined" and replayed["reason"] == "task_replay", replayed
    assert "completed here before" in replayed["message"]

    # A worker killed mid-task: the task raised before its answer, nothing was recorded.
    unfinished = describe_task(aggregator, "challenge-2")
    crashing = create_app(settings)

    def killed(self: HospitalClient) -> Any:
        raise SystemExit("worker killed mid-task")

    with monkeypatch.context() as patch:
        patch.setattr(HospitalClient, "dataset", killed)
        with pytest.raises(SystemExit):
            run(crashing, unfinished)
    redelivered = run(create_app(settings), unfinished)  # Celery's redelivery, new process
    assert redelivered["status"] == "ok", redelivered
    assert run(create_app(settings), unfinished)["reason"] == "task_replay"
    refused = [e for e in ParticipationLog(settings.state_path).entries()
               if e["status"] == "refused"]
    assert [e["reason"] for e in refused] == ["task_replay"] * 3


def test_attack_signed_task_replayed_hours_later(signed, monkeypatch) -> None:
    """A signed task stayed valid for 7 days. Now 6 hours by default (the broker's
    visibility timeout; configurable): one signed 7 hours ago is refused as expired, one
    signed 5 hours ago still runs."""
    settings, aggregator = signed
    assert settings.task_max_age_s == 6 * 3600
    real_time = signing.time.time

    def signed_ago(hours: float, nonce: str) -> list[Any]:
        with monkeypatch.context() as patch:
            patch.setattr(signing.time, "time", lambda: real_time() - hours * 3600)
            return describe_task(aggregator, nonce)

    worker = create_app(settings)
    stale = run(worker, signed_ago(7, "old"))
    assert stale["status"] == "declined" and stale["reason"] == "task_expired", stale
    assert run(worker, signed_ago(5, "recent"))["status"] == "ok"


def test_completed_tasks_are_kept_as_long_as_a_task_is_valid(tmp_path: Path) -> None:
    store = CompletedTasks(tmp_path, valid_s=3600)
    now = 1_000_000.0
    store.record("old", signed_at=now - 3600 - CLOCK_SKEW_S - 1, now=now - 10)
    store.record("kept", signed_at=now - 3600, now=now - 5)
    assert store.completed("old") and store.completed("kept")
    store.record("new", signed_at=now, now=now)  # pruning happens as records are added
    assert not store.completed("old")  # it would be refused as expired anyway
    assert store.completed("kept") and store.completed("new") and len(store) == 2
    assert CompletedTasks(tmp_path, valid_s=3600).completed("kept")  # on disk
