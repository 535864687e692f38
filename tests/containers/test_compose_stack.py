"""The federation in containers, end to end, with the real Docker engine and compose tool:
the images built from infra/Dockerfile, `scripts/compose_demo.sh` (2 hospitals x 2 rounds of
the compact model on synthetic images, promotion, a prediction from the inference container),
then what operators do: restart a hospital mid-round, restart the aggregator mid-run, start a
new inference container, and `down -v`. Also: a hospital's network reaches the broker and
nothing else. Skipped, with the reason, where no Docker engine answers.

The tests of this module share one stack and run in file order (each says what it needs).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT

# The first test builds the images and runs the demo (minutes, cold): beyond the default 600 s.
pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(2700)]

PROJECT = "leukofed-ctest"
WORK = Path(os.environ.get("LEUKOFED_CONTAINER_TEST_WORK", "/var/tmp/leukofed-ctest"))
PORTS = {"DEMO_AGGREGATOR_PORT": "28001", "DEMO_INFERENCE_PORT": "28000",
         "DEMO_MLFLOW_PORT": "25000", "DEMO_REDIS_PORT": "26379"}
ENV = {**os.environ, **PORTS, "COMPOSE_PROJECT": PROJECT, "COMPOSE_WORK": str(WORK),
       "VENV": str(ROOT / ".venv/bin")}
AGGREGATOR = f"http://127.0.0.1:{PORTS['DEMO_AGGREGATOR_PORT']}"
INFERENCE = f"http://127.0.0.1:{PORTS['DEMO_INFERENCE_PORT']}"
MLFLOW = f"http://127.0.0.1:{PORTS['DEMO_MLFLOW_PORT']}"


def engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if not engine_answers():
    pytest.skip("no Docker engine answers `docker info` (apt-get install docker.io "
                "docker-compose debootstrap; start dockerd; .ci/run does both)",
                allow_module_level=True)


def sh(script: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run bash with scripts/compose_lib.sh loaded (the demo's compose project and helpers)."""
    proc = subprocess.run(["bash", "-c", f"source scripts/compose_lib.sh\n{script}"], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def env_value(name: str) -> str:
    """The last value of NAME in the demo's settings file (as compose reads it)."""
    values = [line.split("=", 1)[1] for line in (WORK / "compose.env").read_text().splitlines()
              if line.startswith(f"{name}=")]
    assert values, f"{name} is not in {WORK / 'compose.env'}"
    return values[-1]


def aggregator(method: str, path: str, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {env_value('AGGREGATOR_ADMIN_TOKEN')}"}
    response = httpx.request(method, AGGREGATOR + path, headers=headers, timeout=30, **kwargs)
    response.raise_for_status()
    return response.json()


def start_run(rounds: int, deadline_s: float = 120) -> str:
    return sh(f"ROUND_DEADLINE_S={deadline_s} start_run {rounds} 1 32 compact_cnn a b"
              ).stdout.strip().splitlines()[-1]


def wait_run(run_id: str, until: Any, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            run = aggregator("GET", f"/v1/runs/{run_id}")
        except httpx.HTTPError:  # the aggregator restarting
            time.sleep(1)
            continue
        if until(run):
            return run
        if run["status"] in ("failed", "cancelled"):
            raise AssertionError(f"run {run_id} {run['status']}: {run.get('reason')}")
        time.sleep(1)
    raise AssertionError(f"run {run_id} not there after {timeout} s: {run}")


def versions_of(run_id: str) -> list[dict[str, Any]]:
    """Every registered version of the federated run (MLflow's REST API, as the admin)."""
    response = httpx.get(f"{MLFLOW}/api/2.0/mlflow/model-versions/search",
                         params={"filter": "name='leukofed-all'", "max_results": 1000},
                         auth=("admin", env_value("MLFLOW_ADMIN_PASSWORD")), timeout=30)
    response.raise_for_status()
    out = []
    for mv in response.json().get("model_versions", []):
        tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
        if tags.get("run_id") == run_id:
            out.append({"version": mv["version"], "round": int(tags["round"])})
    return out


def exec_in(service: str, code: str) -> subprocess.CompletedProcess:
    return sh(f"compose exec -T {service} python -c {shlex.quote(code)}", timeout=120,
              check=False)


@pytest.fixture(scope="module")
def demo() -> Iterator[dict[str, Any]]:
    """Images built, then the container demo, as `make compose-demo` runs it. For working on
    these tests: LEUKOFED_KEEP_CONTAINERS=1 leaves the stack up, and
    LEUKOFED_REUSE_CONTAINERS=1 then uses it instead of building and running the demo again
    (the first test is skipped then: there is no demo output to check)."""
    if os.environ.get("LEUKOFED_REUSE_CONTAINERS") == "1" and (WORK / "promote.txt").exists():
        yield {"reused": True}
        return
    started = time.monotonic()
    build = subprocess.run(["bash", "scripts/images.sh", "client", "aggregator", "inference",
                            "mlflow"], cwd=ROOT, env={**ENV, "IMAGES_RESULTS": str(
                                ROOT / "tests/output/images.json")},
                           capture_output=True, text=True, timeout=2400)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    built = time.monotonic()
    proc = subprocess.run(["bash", "scripts/compose_demo.sh"], cwd=ROOT,
                          env={**ENV, "SKIP_IMAGES": "1", "SYNTHETIC": "1", "HOSPITALS": "2",
                               "ROUNDS": "2"},
                          capture_output=True, text=True, timeout=1500)
    print(f"container demo: images {built - started:.0f} s, demo {time.monotonic() - built:.0f} s")
    try:
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
        yield {"stdout": proc.stdout, "stderr": proc.stderr, "build": build.stdout,
               "reused": False}
    finally:
        if os.environ.get("LEUKOFED_KEEP_CONTAINERS") != "1":
            sh("scripts/compose.sh down", check=False)


def test_demo_federates_promotes_and_the_inference_container_predicts(
        demo: dict[str, Any]) -> None:
    if demo["reused"]:
        pytest.skip("LEUKOFED_REUSE_CONTAINERS=1: the demo ran earlier")
    out = demo["stdout"]
    assert "[completed] round 2/2" in out
    promoted = demo["stderr"]
    assert "is now @champion" in promoted
    champion = sh("sed -n 's/.* version \\([0-9]*\\) is now @champion.*/\\1/p' "
                  "$COMPOSE_WORK/promote.txt").stdout.strip()
    image = next((WORK / "data/server/test/Pro").iterdir())
    with image.open("rb") as f:
        response = httpx.post(f"{INFERENCE}/v1/predict", files={"file": (image.name, f)},
                              headers={"X-API-Key": env_value("INFERENCE_API_KEY")}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "leukofed-all", "version": champion, "alias": "champion"}
    assert body["predictions"][0]["label"] in ("Benign", "Early", "Pre", "Pro")
    # The inference container verified the aggregator's signature on what it serves.
    model = httpx.get(f"{INFERENCE}/v1/model", timeout=10,
                      headers={"X-API-Key": env_value("INFERENCE_API_KEY")}).json()
    assert model["signature"].startswith("verified"), model["signature"]
    assert model["provider"] == "CPUExecutionProvider"  # no GPU here, and it says so


def test_images_carry_only_what_their_service_runs(demo: dict[str, Any]) -> None:
    for image, absent in [("client", ["services.aggregator", "services.inference", "registry",
                                      "mlflow", "fastapi", "tf2onnx"]),
                          ("inference", ["tensorflow", "keras", "services.client",
                                         "services.aggregator"])]:
        probe = ("import importlib.util as u, sys\n"
                 f"found = [m for m in {absent!r} if u.find_spec(m)]\n"
                 "sys.exit(f'present: {found}' if found else 0)")
        proc = subprocess.run(["docker", "run", "--rm", f"leukofed/{image}:latest", "python",
                               "-c", probe], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (image, proc.stderr[-2000:])
    for image in ("client", "aggregator", "inference", "mlflow"):
        info = json.loads(subprocess.run(["docker", "image", "inspect", f"leukofed/{image}:latest"],
                                         capture_output=True, text=True).stdout)[0]["Config"]
        assert info["User"] == "10001:10001", (image, info["User"])
        assert info["Healthcheck"]["Test"][0] == "CMD", image
    # No compiler, uv or pip cache in a final image.
    proc = subprocess.run(["docker", "run", "--rm", "leukofed/client:latest", "sh", "-c",
                           "command -v gcc uv; ls /root/.cache /home/leukofed/.cache 2>/dev/null"],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "", proc.stdout


def test_a_hospital_reaches_the_broker_and_nothing_else(demo: dict[str, Any]) -> None:
    ips = {}
    for service in ("mlflow", "aggregator", "client-b", "postgres"):
        cid = sh(f"container_of {service}").stdout.strip()
        networks = json.loads(subprocess.run(
            ["docker", "inspect", "-f", "{{json .NetworkSettings.Networks}}", cid],
            capture_output=True, text=True).stdout)
        ips[service] = [n["IPAddress"] for n in networks.values()]
    code = f"""
import socket
def reach(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "open"
    except OSError as exc:
        return type(exc).__name__
print("redis", reach("redis", 6379))
for name, port in [("mlflow", 5000), ("aggregator", 8001), ("client-b", 1), ("postgres", 5432),
                   ("pypi.org", 443)]:
    print(name, reach(name, port))
for name, addrs in {ips!r}.items():
    port = {{"mlflow": 5000, "aggregator": 8001, "postgres": 5432}}.get(name, 22)
    for ip in addrs:
        print(name + "@" + ip, reach(ip, port))
"""
    proc = exec_in("client-a", code)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines.pop("redis") == "open", proc.stdout
    assert lines, "nothing else was tried"
    assert all(v != "open" for v in lines.values()), proc.stdout
    # And no port of a hospital is published on the host.
    ports = sh("docker port $(container_of client-a) || true").stdout.strip()
    assert ports == ""


def test_restarts_mid_run_a_hospital_then_the_aggregator(demo: dict[str, Any]) -> None:
    """One 3-round run, two operator actions: client-b restarted while round 2 is under way
    (the round completes with the others), then the aggregator restarted after round 2 (the
    run resumes from its checkpoint and registers each round once)."""
    run_id = start_run(rounds=3, deadline_s=90)
    wait_run(run_id, lambda r: r["current_round"] >= 2 and r["status"] == "running")
    sh("compose restart -t 5 client-b")
    wait_run(run_id, lambda r: r["completed_round"] >= 2)
    sh("compose restart -t 10 aggregator && wait_http $AGGREGATOR_URL/healthz 180 aggregator")
    run = wait_run(run_id, lambda r: r["status"] == "completed")
    assert run["completed_round"] == 3
    rounds = [v["round"] for v in versions_of(run_id)]
    assert sorted(rounds) == [1, 2, 3], f"one version per round, got rounds {rounds}"
    sh("wait_healthy client-b 240")


def test_a_new_inference_container_serves_the_current_champion(demo: dict[str, Any]) -> None:
    champion = sh("serving_version").stdout.strip()
    assert champion
    sh("compose rm -sf inference && compose up -d --no-deps inference")
    sh(f"wait_serving {champion} 180")
    model = httpx.get(f"{INFERENCE}/v1/model", timeout=10,
                      headers={"X-API-Key": env_value("INFERENCE_API_KEY")}).json()
    assert (model["version"], model["alias"]) == (champion, "champion")


def test_down_removes_everything(demo: dict[str, Any]) -> None:
    sh("scripts/compose.sh down")
    label = f"label=com.docker.compose.project={PROJECT}"
    for kind in (["ps", "-a"], ["volume", "ls"], ["network", "ls"]):
        left = subprocess.run(["docker", *kind, "-q", "--filter", label], capture_output=True,
                              text=True).stdout.strip()
        assert left == "", f"docker {' '.join(kind)} after down: {left}"
    assert not WORK.exists()
