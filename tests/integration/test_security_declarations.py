"""Issue 26, finding 1, through real redis-server, real Celery hospital workers and the
aggregator's real signing: a hospital without a verified declaration for the run counts for
nothing. Hospital c (a drill worker, tests/integration/drills.py) signs with its own key a fit
answer claiming 10**9 examples and an evaluation claiming 10**6 perfectly classified images,
every round, while its declaration never holds: round 1 it replays the declaration it made
for the hospital list (another run, another task), round 2 it sends it unsigned, round 3
after the describe deadline. Before, an undeclared hospital's counts had no bound, and a
describe signature was bound to no run, task or nonce."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedstack import Worker, run_to_end, signing_env
from test_security_signing import ANY_ONE, signed_aggregator

from leukofed import signing

pytestmark = pytest.mark.integration


def test_attack_undeclared_hospital_inflates_counts_through_real_workers(
        tmp_path: Path, redis_server) -> None:
    keys = tmp_path / "keys"
    signing.main(["generate", "--out", str(keys), "aggregator", "a", "b", "c"])
    attacker = {"LEUKOFED_DRILL_FAULT": "inflate", "LEUKOFED_DRILL_EVALUATION": "perfect",
                "LEUKOFED_DRILL_DESCRIBE": "honest,replay,unsigned,late",
                "LEUKOFED_DRILL_DESCRIBE_DELAY_S": "15"}
    workers = [Worker.in_tmp(tmp_path, h, redis_server.url, {**signing_env(keys, h), **env},
                             per_class=4).start()
               for h, env in (("a", {}), ("c", attacker))]
    try:
        for w in workers:
            w.wait_ready(120)
        with signed_aggregator(tmp_path, redis_server.url, keys,
                               describe_deadline_s=8.0) as client:
            # The hospital list asks for a declaration bound to no run: c keeps it.
            listed = {h["hospital"]: h for h in client.get("/v1/hospitals").json()}
            assert listed["c"]["splits"]["train"] > 0, listed
            run = run_to_end(client, {**ANY_ONE, "rounds": 3, "hospitals": ["a", "c"]}, 420)
    finally:
        for w in workers:
            w.stop()
    assert run["status"] == "completed", run["reason"]
    messages = [e["message"] for e in run["events"]]
    refusals = {1: "describe answer of c refused (replay: signed for run ''",
                2: "describe answer of c refused (unsigned: no signature)",
                3: "round 3 describe: c no answer by the deadline"}
    for server_round, refusal in refusals.items():
        assert any(m.startswith(f"round {server_round}") and refusal in m
                   for m in messages), (server_round, messages)
    for summary in run["history"]:
        # c's signed 10**9-example update is not counted: a's update is the global model.
        assert set(summary["participants"]) == {"a"}, summary["participants"]
        assert summary["rejected"]["c"].startswith("undeclared:"), summary["rejected"]
        # c's signed perfect evaluation on 10**6 images is in no pooled number: the pooled
        # test counts are a's own test images, and the accuracy is theirs. (Not "below
        # 0.99": a's honest model can get its few test images all right.)
        confusion = np.array(summary["confusion"]["test"])
        assert confusion.sum() == listed["a"]["splits"]["test"], (confusion, listed["a"])
        assert summary["global"]["test_accuracy"] == pytest.approx(
            np.trace(confusion) / confusion.sum())
    codes = {(e.get("round"), e.get("hospital"), e.get("rejected")) for e in run["events"]}
    assert {(r, "c", "undeclared") for r in (1, 2, 3)} <= codes
    assert any("evaluation from c rejected (undeclared" in m for m in messages)
    # a declared once, for this run, and was counted every round.
    assert not any("describe answer of a" in m for m in messages)
