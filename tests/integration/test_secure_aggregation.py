"""Secure aggregation with real redis-server and real Celery hospital workers (five of
them, TINY model): the secure sum equals the plain weighted mean, hospitals that die before
or after sending their masked vector are survived, too few survivors abort a round and the
run goes on, a survivor refuses to unmask a hospital that sent its vector, and nothing the
hospitals put on the broker is an update in the clear.

What each hospital hides is recorded by a test-only wrapper (secagg_spy/sitecustomize.py)
loaded into the workers; the aggregator runs in-process so the test can record every
message it sends and receives through the broker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from conftest import ROOT
from fastapi.testclient import TestClient
from fedstack import TINY, Worker, finished, wait_run

from leukofed.transport import TASK_SECAGG_REVEAL, make_celery, queue_name
from services.aggregator.secure import update_ranges

pytestmark = pytest.mark.integration
SPY = Path(__file__).parent / "secagg_spy"
HOSPITALS = ("a", "b", "c", "d", "e")
EXITS = {"b": "fail:3", "c": "before:2", "d": "after:2", "e": "fail:3"}


def load_spy(spy: Path, hospital: str, server_round: int
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    data = np.load(spy / f"{hospital}-{server_round}.npz")
    glob = {k[len("global/"):]: data[k] for k in data.files if k.startswith("global/")}
    delta = {k[len("delta/"):]: data[k] for k in data.files if k.startswith("delta/")}
    return glob, delta, float(data["__weight"])


def test_secure_rounds_with_dropouts_aborts_and_refusals(tmp_path: Path, redis_server,
                                                         monkeypatch) -> None:
    from services.aggregator.app import create_app
    from services.aggregator.dispatch import CeleryDispatcher
    from services.aggregator.settings import AggregatorSettings

    seen: list[bytes] = []  # every task the aggregator sent and every answer it read
    submit, poll = CeleryDispatcher.submit, CeleryDispatcher.poll

    def spy_submit(self, hospital: str, task: str, args: list[Any], expires: float) -> Any:
        seen.append(msgpack.packb([task, args], use_bin_type=True))
        return submit(self, hospital, task, args, expires)

    def spy_poll(self, handle: Any) -> Any:
        done, result, error = poll(self, handle)
        if done and result is not None:
            seen.append(msgpack.packb(result, use_bin_type=True))
        return done, result, error

    monkeypatch.setattr(CeleryDispatcher, "submit", spy_submit)
    monkeypatch.setattr(CeleryDispatcher, "poll", spy_poll)

    spy = tmp_path / "spy"
    spy.mkdir()
    workers = {h: Worker.in_tmp(tmp_path, h, redis_server.url, {
        "PYTHONPATH": f"{SPY}:{ROOT}", "LEUKOFED_TEST_SPY_DIR": str(spy),
        "LEUKOFED_TEST_EXIT": EXITS.get(h, "")}).start() for h in HOSPITALS}
    try:
        for w in workers.values():
            w.wait_ready()
        settings = AggregatorSettings(broker_url=redis_server.url, state_dir=tmp_path / "agg",
                                      cache_dir=tmp_path / "cache", tracking=False,
                                      poll_interval_s=0.1, ping_timeout_s=0.5)
        with TestClient(create_app(settings)) as client:
            # Warm-up (issue 10): a hospital's first fit builds and traces its model, 40-42 s
            # for five workers on two cores, against the 45 s round deadline below that
            # keeps the drop-out waits short. A vector that missed it was dropped after
            # sharing, left out of round 1's sum (or the round aborted), and the plain mean
            # of all five spy files was off by up to one Adam step (lr 1e-3) per weight. A
            # plain run with a generous deadline pays the warm-up once; its answers carry
            # weights in the clear, so the broker spy starts after it.
            response = client.post("/v1/runs", json={
                **TINY, "rounds": 1, "hospitals": list(HOSPITALS), "min_fit_clients": 2,
                "round_deadline_s": 300, "max_round_retries": 0})
            assert response.status_code == 201, response.text
            warm_id = response.json()["id"]
            warm = wait_run(lambda: client.get(f"/v1/runs/{warm_id}").json(), finished, 420)
            assert warm["status"] == "completed", warm["reason"]
            seen.clear()
            response = client.post("/v1/runs", json={
                **TINY, "rounds": 4, "hospitals": list(HOSPITALS), "min_fit_clients": 2,
                "round_deadline_s": 45, "max_round_retries": 0,
                "secure_aggregation": {"stage_deadline_s": 15}})
            assert response.status_code == 201, response.text
            run_id = response.json()["id"]
            run = wait_run(lambda: client.get(f"/v1/runs/{run_id}").json(), finished, 420)
        assert run["status"] == "completed", run["reason"]

        # Round 1, everyone: the secure sum is the plain weighted mean, within the stated
        # quantisation error (a's round-2 global is round 1's result). Who was summed is
        # checked first: a hospital whose vector missed the deadline still left its spy file.
        history = {r["round"]: r for r in run["history"]}
        assert 1 in history, run["aborted_rounds"]
        first = history[1]["secure_aggregation"]
        assert first["answered"]["masked"] == list(HOSPITALS), first
        assert first["answered"]["reveal"] == list(HOSPITALS) and first["bits"] == 24
        glob, _, _ = load_spy(spy, "a", 1)
        parts = [load_spy(spy, h, 1) for h in first["answered"]["masked"]]
        total = sum(w for _, _, w in parts)
        result, _, _ = load_spy(spy, "a", 2)
        bn = frozenset(n for n in glob if n.endswith(("moving_mean", "moving_variance")))
        ranges = update_ranges(glob, bn, 1.0)
        # Each summed vector is off by less than one step W * r / (2**23 - 1) (W: the caps of
        # those that shared), the mean by len(parts) steps / the summed weight.
        steps = len(parts) * first["total_weight_bound"] / ((2**23 - 1) * total)
        for name, g in glob.items():
            expected = g + sum(w * d[name] for _, d, w in parts) / total
            bound = steps * ranges[name] + 1e-5 * np.abs(expected).max()
            np.testing.assert_allclose(result[name], expected, rtol=0, atol=bound, err_msg=name)

        # Round 2: c died before masking, d after sending its vector: completed from shares.
        second = history[2]["secure_aggregation"]
        assert second["answered"]["masked"] == ["a", "b", "d", "e"]
        assert second["dropped_after_shares"] == ["c"]
        assert second["answered"]["reveal"] == ["a", "b", "e"]
        assert history[2]["participants"].keys() == {"a", "b", "d", "e"}

        # Round 3: b and e fail, one vector is no sum: aborted with its reason, nothing
        # registered, and round 4 goes on with a, b and e.
        assert [a["round"] for a in run["aborted_rounds"]] == [3]
        assert "1 hospitals sent a masked vector, 2 needed" in run["aborted_rounds"][0]["reason"]
        assert 3 not in history and history[4]["secure_aggregation"]["answered"]["reveal"] == [
            "a", "b", "e"]

        # An aggregator that claims b dropped out of round 4 after a revealed b's self-mask
        # share: a refuses, it never hands out both shares of one hospital.
        app = make_celery("test-aggregator", redis_server.url)
        refused = app.send_task(TASK_SECAGG_REVEAL, args=[b"", {
            "run_id": run_id, "round": 4, "deadline": time.time() + 30,
            "secure": {"purpose": "fit", "bits": 24, "neighbours": 2,
                       "threshold_fraction": 0.6, "survivors": ["a", "e"],
                       "dropped": ["b"]}}], queue=queue_name("a")).get(timeout=30)
        assert refused["status"] == "error" and refused["reason"].startswith("refused")

        # Nothing on the broker was an update in the clear: no fit answer carries weights,
        # and the bytes of no hospital's trained weights appear in any message.
        messages = [msgpack.unpackb(m, raw=False) for m in seen]
        assert not any(isinstance(m, dict) and "weights" in m for m in messages)
        assert sum(isinstance(m, dict) and m.get("stage") == "masked" for m in messages) >= 12
        blob = b"".join(seen)
        for h in HOSPITALS:
            g, d, _ = load_spy(spy, h, 1)
            kernel = max((n for n in g if n.endswith("kernel")), key=lambda n: g[n].size)
            local = (g[kernel] + d[kernel]).astype(np.float32).tobytes()
            assert local[:64] not in blob, f"{h}'s trained weights crossed the broker"
    finally:
        for w in workers.values():
            w.stop()
