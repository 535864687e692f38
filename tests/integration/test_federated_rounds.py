"""2 hospitals x 2 rounds through real redis-server, Celery workers, uvicorn and MLflow:
versions with lineage tags, candidate on the last, metrics per round, an audit log at each
hospital, and no image bytes or file names in any message on the broker."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fedstack import (
    AggregatorProcess,
    Worker,
    finished,
    get_run,
    start_run,
    wait_run,
)

pytestmark = pytest.mark.integration


class Monitor:
    """Every command Redis executes, via a MONITOR connection: the wire as the broker sees it."""

    def __init__(self, url: str) -> None:
        import redis

        # No read timeout: MONITOR is quiet while the workers start (redis-py 8 gave this
        # connection a 5 s one, and the thread died before any weight crossed the wire).
        self.conn = redis.Redis.from_url(url, socket_timeout=None)
        self.lines: list[str] = []
        self.bytes = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import redis

        while not self._stop:
            try:
                with self.conn.monitor() as m:
                    for cmd in m.listen():
                        if self._stop:
                            return
                        text = cmd.get("command", "")
                        self.lines.append(text)
                        self.bytes += len(text)
            except redis.TimeoutError:
                continue  # a quiet spell: watch again

    def start(self) -> Monitor:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop = True


def test_two_hospitals_two_rounds(tmp_path: Path, redis_server, mlflow_server) -> None:
    import mlflow
    from mlflow import MlflowClient

    monitor = Monitor(redis_server.url).start()
    data = tmp_path / "hospitals"  # where Worker.in_tmp puts the archives
    workers = [Worker.in_tmp(tmp_path, h, redis_server.url).start() for h in ("a", "b")]
    agg = AggregatorProcess(redis_server.url, tmp_path / "agg", mlflow_server.url,
                            model_name="leukofed-it-rounds")
    try:
        agg.start()
        for w in workers:
            w.wait_ready()
        # Hospital a's archive doubles as the server's test split: the shortcut audit runs.
        # head_rebalance (off by default): its round trip through the real stack too.
        run_id = start_run(agg.url, {"rounds": 2, "hospitals": ["a", "b"],
                                     "min_fit_clients": 2, "round_deadline_s": 120,
                                     "server_test_dir": str(data / "a"),
                                     "head_rebalance": True})
        run = wait_run(lambda: get_run(agg.url, run_id), finished, 240)
        assert run["status"] == "completed", run["reason"]
    finally:
        monitor.stop()
        agg.stop()
        for w in workers:
            w.stop()

    # Per-round global and per-hospital metrics in the API.
    assert [r["round"] for r in run["history"]] == [1, 2]
    for r in run["history"]:
        assert set(r["participants"]) == {"a", "b"}
        assert 0.0 <= r["global"]["test_accuracy"] <= 1.0
        assert "val_macro_f1" in r["global"]
        assert set(r["hospitals"]) == {"a", "b"}

    # MLflow: one run, metrics with step = round, PNG artifacts, one version per round.
    client = MlflowClient(mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    history = client.get_metric_history(run["mlflow_run_id"], "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    assert client.get_metric_history(run["mlflow_run_id"], "hospital/a/train_loss")
    artifacts = {a.path for a in client.list_artifacts(run["mlflow_run_id"])}
    assert "curves.png" in artifacts
    assert any(a.path.endswith(".png")
               for a in client.list_artifacts(run["mlflow_run_id"], "confusion"))
    versions = client.search_model_versions("name='leukofed-it-rounds'")
    by_round = {int(v.tags["round"]): v for v in versions if v.tags.get("run_id") == run_id}
    assert sorted(by_round) == [1, 2] and len(versions) == 2
    tags = by_round[2].tags
    assert tags["hospitals"] == "a,b"
    assert set(json.loads(tags["example_counts"])) == {"a", "b"}
    assert set(json.loads(tags["dataset_fingerprints"])) == {"a", "b"}
    assert tags["strategy"] == "fedavg" and "val_macro_f1" in tags
    assert tags["bn_calibration"] == "none (averaged statistics)"  # FedAvg: the average fits
    # The head refitted on both hospitals' per-class feature sums (leukofed.head_rebalance).
    assert tags["head_rebalance"] == "a,b"
    for r in run["history"]:
        assert r["head_rebalance"]["hospitals"] == ["a", "b"], r["head_rebalance"]
        # These tiny hospitals hold fewer than five images of most classes, which they do
        # not describe (services/client/hospital.py); the counts are what they did describe.
        assert len(r["head_rebalance"]["pooled_class_images"]) == 4
    # The shortcut audit on every version, and what the training data looked like.
    for key in ("audit_original_accuracy", "audit_recoloured_accuracy", "audit_follow_colour",
                "audit_spatial_accuracy", "audit_background_only_accuracy",
                "audit_histogram_accuracy", "audit_worst_macro_f1"):
        assert 0.0 <= float(tags[key]) <= 1.0, key
    assert client.get_metric_history(run["mlflow_run_id"], "audit_follow_colour")
    # Round 1's barely trained version cannot be promoted: registered and signed, not
    # colour-audited (audits: promotable), and it says why; the last round always is.
    assert by_round[1].tags["skipped_colour_audit"].startswith("cannot be promoted")
    assert "audit_follow_colour" not in by_round[1].tags
    assert by_round[1].tags["leukofed.onnx.sha256"]
    assert run["history"][0]["audit_skipped"]["colour"] == by_round[1].tags[
        "skipped_colour_audit"]
    for r in run["history"]:  # where each round's seconds went (leukofed run status)
        assert {"server_test_s", "audit_s", "track_s", "register_s", "onnx_s",
                "register_keras_s", "card_s"} <= set(r["timings"]), r["timings"]
    n_train = sum(json.loads(tags["example_counts"]).values())
    assert tags["acquisition_profile"] == f"{n_train} training images"
    meta = mlflow.models.get_model_info(
        f"models:/leukofed-it-rounds/{by_round[2].version}").metadata
    assert meta["acquisition_profile"]["count"] == n_train
    assert len(meta["stain_targets"]) == 4
    # Calibrated from the hospitals' validation sums; the model card's numbers are the
    # logged ones (leukofed.calibration, leukofed.card).
    from leukofed.calibration import Calibration

    cal = Calibration.from_dict(meta["calibration"])
    assert tags["calibration"].startswith(f"temperature {cal.temperature:.4g}")
    assert 0.0 <= float(tags["val_ece_after"]) <= 1.0
    # The temperature minimises the pooled validation NLL over a grid that holds T = 1.
    nll = {key: {m.step: m.value for m in client.get_metric_history(run["mlflow_run_id"], key)}
           for key in ("val_nll_before", "val_nll_after")}
    assert nll["val_nll_after"][2] <= nll["val_nll_before"][2] + 1e-9
    card = meta["card"]
    history = client.get_metric_history(run["mlflow_run_id"], "server_test_accuracy")
    logged = {m.step: m.value for m in history}[2]
    assert abs(card["metrics"]["values"]["accuracy"]["value"] - logged) < 1e-9
    assert abs(card["calibration"]["temperature"] - cal.temperature) < 1e-12
    run_id_card, _, path = by_round[2].tags["model_card"].partition(":")
    card_file = json.loads(Path(client.download_artifacts(run_id_card, path)).read_text())
    assert card_file["model"]["version"] == by_round[2].version
    assert card_file["metrics"] == card["metrics"]
    trained = {h["name"]: h for h in card["training"]["hospitals"]}
    assert set(trained) == {"a", "b"}
    assert sum(sum(h["class_counts"].values()) for h in trained.values()) == n_train
    # The membership-inference audit on every version (leukofed.membership): pooled from the
    # hospitals' loss histograms, on the card, in the version's tags and the run's metrics.
    mem = card["membership"]
    assert mem["measured"] and 0.0 <= mem["auc"] <= 1.0, mem
    assert mem["attack"] in {"loss", "loss_ratio"} and mem["attack_text"]
    assert set(mem["attacks"]) == {"loss", "loss_ratio"}  # round 1's model is the reference
    assert 0.0 <= mem["tpr_at_1pct_fpr"] <= 1.0 and mem["hospitals"] == 2
    last = run["history"][-1]["hospitals"]
    assert mem["nonmembers"] == sum(last[h]["val_n"] + last[h]["test_n"] for h in "ab")
    assert 0 < mem["members"] <= n_train
    assert "where a coin is right 50%" in mem["reading"]
    assert card_file["membership"] == mem
    for v in by_round.values():
        assert 0.0 <= float(v.tags["membership_auc"]) <= 1.0
    for key in ("membership_auc", "membership_tpr_at_1pct_fpr", "membership_members"):
        steps = client.get_metric_history(run["mlflow_run_id"], key)
        assert sorted(m.step for m in steps) == [1, 2], key
    assert client.get_model_version_by_alias("leukofed-it-rounds", "candidate").version == \
        by_round[2].version
    assert run["versions"] == {"1": by_round[1].version, "2": by_round[2].version}

    # Each hospital's audit log lists both updates with their size and hash.
    for h in ("a", "b"):
        lines = [json.loads(x) for x in (tmp_path / f"state-{h}" / "participation.jsonl")
                 .read_text().splitlines()]
        fits = [e for e in lines if e["task"] == "fit" and e["status"] == "ok"]
        assert [e["round"] for e in fits] == [1, 2]
        # The default recipe reached the hospital: the round's scheduled learning rate
        # (cosine over 2 rounds: a warm-up round at half the rate, then the full rate) and
        # the logit-adjusted loss.
        from leukofed.strategies import round_learning_rate

        assert [e["learning_rate"] for e in fits] == pytest.approx(
            [round_learning_rate(1e-3, "cosine", r, 2) for r in (1, 2)])
        assert [e["learning_rate"] for e in fits] == pytest.approx([5e-4, 1e-3])
        assert all(e["logit_adjustment"] is True for e in fits)
        evals = [e for e in lines if e["task"] == "evaluate" and e["status"] == "ok"]
        assert [e.get("membership_histograms") for e in evals] == [
            ["loss"], ["loss", "loss_ratio"]]  # what left: histograms, no per-image loss
        heads = [e for e in lines if e["task"] == "head_statistics" and e["status"] == "ok"]
        assert [e["round"] for e in heads] == [1, 2]
        assert all(e["bytes"] > 1000 and len(e["sha256"]) == 64 for e in fits)
        assert fits[0]["sha256"] in {s for r in run["history"] for s in r["sha256"].values()}

    # Nothing on the wire names an image or carries one.
    assert monitor.bytes > 100_000, "the monitor saw no weight traffic"
    wire = "\n".join(monitor.lines)
    # MONITOR escapes bytes as redis' sdscatrepr does; the PNG signature plus its IHDR chunk
    # name (16 bytes) cannot occur by chance in 2 MB of weights, unlike a 3-byte magic number.
    png_header = "\\x89PNG\\r\\n\\x1a\\n\\x00\\x00\\x00\\rIHDR"
    leaked = [n for n in ("patient-", ".png", str(data), png_header) if n in wire]
    # A short message: pytest's own diff of a multi-megabyte string runs for many minutes.
    assert not leaked, f"found on the broker wire: {leaked}"
