"""docker-compose.yml: valid against the Compose specification, complete, consistent with
the code (settings classes, ports, health routes) and with no secret in the repository."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic_settings import BaseSettings

from leukofed.logging import FORMAT_ENV, LEVEL_ENV
from registry.users import PASSWORD_ENV
from services.aggregator.settings import AggregatorSettings
from services.client.settings import ClientSettings
from services.inference.settings import InferenceSettings

from .conftest import COMPOSE, ENV_EXAMPLE, ROOT, load_compose, read_env_file

SETTINGS: dict[str, type[BaseSettings]] = {
    "LEUKOFED_CLIENT_": ClientSettings,
    "LEUKOFED_AGGREGATOR_": AggregatorSettings,
    "LEUKOFED_INFERENCE_": InferenceSettings,
}
# Variables read outside the settings classes, and by whom.
OTHER_LEUKOFED_ENV = {FORMAT_ENV, LEVEL_ENV}
USERS_PASSWORD_ENV = PASSWORD_ENV  # registry.users: one password per MLflow account
SERVICES = {"redis", "postgres", "mlflow", "mlflow-users", "aggregator", "client-a",
            "client-b", "client-c", "inference", "inference-gpu", "flower", "prometheus"}
HOSPITALS = ("a", "b", "c")


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _image_env(target: str) -> dict[str, str]:
    """The ENV a target of infra/Dockerfile sets (its stage and the stages below it)."""
    text = re.sub(r"\\\n", " ", (ROOT / "infra/Dockerfile").read_text())
    stages: dict[str, tuple[str, dict[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"FROM (\S+) AS (\S+)", line):
            current = m.group(2)
            stages[current] = (m.group(1), {})
        elif line.startswith("ENV ") and current:
            stages[current][1].update(re.findall(r"(\w+)=(\S+)", line))
    env: dict[str, str] = {}
    while target in stages:
        base, values = stages[target]
        env = {**values, **env}
        target = base
    return env


def _container_env(compose: dict[str, Any], service: str, secrets_dir: Path) -> dict[str, str]:
    """A service's environment inside its container: the image's ENV, then compose's; the
    hospital's credentials folder, a bind mount, is the one `make secrets` wrote."""
    svc = compose["services"][service]
    env = {**_image_env(svc["build"]["target"]), **_env(svc)} if "build" in svc else _env(svc)
    if credentials := env.get("LEUKOFED_CLIENT_CREDENTIALS_DIR"):
        source = next(v.split(":")[0] for v in svc["volumes"]
                      if v.split(":")[1] == credentials)
        assert source.startswith("./secrets/"), source
        env["LEUKOFED_CLIENT_CREDENTIALS_DIR"] = str(secrets_dir / source.removeprefix(
            "./secrets/"))
    return env


@pytest.fixture(scope="module")
def made_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import compose_secrets

    out = tmp_path_factory.mktemp("secrets")
    compose_secrets.generate(list(HOSPITALS), out / "secrets", out / ".env")
    return out / "secrets"


def test_schema_valid_as_written_and_interpolated(compose: dict[str, Any],
                                                  tmp_path: Path) -> None:
    # check-jsonschema ships the Compose specification's own JSON schema (vendored).
    resolved = tmp_path / "compose.resolved.json"
    resolved.write_text(json.dumps(compose))
    for target in (COMPOSE, resolved):
        proc = subprocess.run(
            [sys.executable, "-m", "check_jsonschema", "--builtin-schema",
             "vendor.compose-spec", str(target)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_catches_mistakes(tmp_path: Path) -> None:
    # The validator above must be able to fail: a typo'd key is rejected.
    broken = tmp_path / "compose.yml"
    broken.write_text(yaml.safe_dump({"services": {"x": {"image": "a", "helthcheck": {}}}}))
    proc = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.compose-spec", str(broken)], capture_output=True, text=True)
    assert proc.returncode != 0


def test_every_required_variable_is_in_env_example(example_env: dict[str, str]) -> None:
    text = json.dumps(load_compose())  # values only: comments may mention ${VAR:?} freely
    required = set(re.findall(r"\$\{([A-Z0-9_]+):?\?", text))
    assert required and required <= set(example_env), required - set(example_env)
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):  # compose would refuse too
        load_compose({k: v for k, v in example_env.items() if k != "POSTGRES_PASSWORD"})


def test_services_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    declared = set(compose["volumes"])
    for name, svc in services.items():
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(("./secrets/", "./infra/", "/")):  # files and folders, read-only
                assert volume.endswith(":ro"), f"{name}: {volume} must be read-only"
                continue
            assert source in declared, f"{name}: {source} is not a named volume"
    assert services["inference-gpu"]["profiles"] == ["gpu"]
    assert "profiles" not in services["inference"]  # the CPU variant runs by default
    devices = services["inference-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["flower"]["profiles"] == ["monitoring"]
    mlflow_env = _env(services["mlflow"])
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:")
    assert urlsplit(mlflow_env["MLFLOW_BACKEND_STORE_URI"]).hostname == "postgres"
    assert any(v.endswith(":/var/lib/mlflow/artifacts") for v in services["mlflow"]["volumes"])
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    targets = {v.split(":")[1] for v in services["redis"]["volumes"]}
    assert targets >= {"/usr/local/etc/redis/users.acl", "/usr/local/etc/redis/redis.conf"}
    assert "--app-name" in services["mlflow"]["command"]  # MLflow with basic auth
    assert any(v.endswith(":/srv/leukofed/test:ro") for v in services["aggregator"]["volumes"])


def test_each_hospital_has_its_own_network_shared_with_the_broker_only(
        compose: dict[str, Any]) -> None:
    services, networks = compose["services"], compose["networks"]
    hospital_nets = {f"hospital-{h}" for h in HOSPITALS}
    assert set(networks) == {"leukofed", *hospital_nets}
    for net in hospital_nets:
        assert networks[net] == {"internal": True}, net  # no gateway out
        members = {name for name, svc in services.items() if net in svc.get("networks", [])}
        assert members == {"redis", f"client-{net.removeprefix('hospital-')}"}, (net, members)
    for h in HOSPITALS:
        client = services[f"client-{h}"]
        assert client["networks"] == [f"hospital-{h}"]
        assert "ports" not in client, "a hospital publishes no port"
        assert client["read_only"] is True
        assert f"hospital-{h}-data:/data:ro" in client["volumes"]
    for name, svc in services.items():
        if not name.startswith("client-") and name != "redis":
            assert svc["networks"] == ["leukofed"], name


def test_valid_for_compose_1_29_too(raw_compose: dict[str, Any], example_env: dict[str, str],
                                    tmp_path: Path) -> None:
    # Debian's docker-compose 1.29 rejects a top-level `name` and ignores `configs` (the
    # files would silently be missing): neither may appear.
    assert "name" not in raw_compose and "configs" not in raw_compose
    assert all("configs" not in svc for svc in raw_compose["services"].values())
    tool = shutil.which("docker-compose")
    if tool is None:
        return
    env = tmp_path / "compose.env"
    env.write_text("\n".join(f"{k}={v.replace('change-me', 'x1')}"
                             for k, v in example_env.items()) + "\n")
    proc = subprocess.run([tool, "--env-file", str(env), "-f", str(COMPOSE), "config", "-q"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "ignored" not in proc.stderr, proc.stderr


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies(
        compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        check = svc.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
        for dep, cond in (svc.get("depends_on") or {}).items():
            # A one-shot job (mlflow-users) is waited for until it has finished.
            expected = ("service_completed_successfully" if dep == "mlflow-users"
                        else "service_healthy")
            assert cond == {"condition": expected}, (name, dep)


def test_no_service_runs_as_root(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        user = str(svc.get("user", ""))
        assert user, f"{name}: set user: explicitly"
        assert user.split(":")[0] not in ("0", "root"), name


def test_build_contexts_and_dockerfiles_exist(compose: dict[str, Any]) -> None:
    built = 0
    built_images = {svc["image"] for svc in compose["services"].values() if "build" in svc}
    for name, svc in compose["services"].items():
        if "build" not in svc:
            if svc["image"] in built_images:  # reuses an image the stack builds
                continue
            assert ":" in svc["image"] and not svc["image"].endswith(":latest"), name
            continue
        context = ROOT / svc["build"]["context"]
        assert context.is_dir(), name
        dockerfile = context / svc["build"]["dockerfile"]
        assert dockerfile.is_file(), name
        # The target is a stage of the one Dockerfile.
        assert re.search(rf"^FROM \S+ AS {re.escape(svc['build']['target'])}$",
                         dockerfile.read_text(), re.M), (name, svc["build"]["target"])
        built += 1
    assert built >= 7


def test_environment_names_match_the_settings_classes(compose: dict[str, Any]) -> None:
    used: set[str] = set()
    for name, svc in compose["services"].items():
        for key in _env(svc):
            if not key.startswith("LEUKOFED_"):
                continue
            used.add(key)
            if key in OTHER_LEUKOFED_ENV or key.startswith(USERS_PASSWORD_ENV):
                continue
            prefix = next((p for p in SETTINGS if key.startswith(p)), None)
            assert prefix, f"{name}: {key} is read by no settings class"
            field = key[len(prefix):].lower()
            assert field in SETTINGS[prefix].model_fields, f"{name}: {key} is not a setting"
    assert any(k.startswith("LEUKOFED_CLIENT_") for k in used)


@pytest.mark.parametrize("service, cls", [
    ("aggregator", AggregatorSettings), ("inference", InferenceSettings),
    ("inference-gpu", InferenceSettings),
    *((f"client-{h}", ClientSettings) for h in HOSPITALS)])
def test_settings_load_from_the_compose_environment(
        compose: dict[str, Any], service: str, cls: type[BaseSettings], made_secrets: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The settings class itself parses the container's environment: names, types, validators.
    for key in list(__import__("os").environ):
        if key.startswith("LEUKOFED_") or key == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(key)
    for key, value in _container_env(compose, service, made_secrets).items():
        monkeypatch.setenv(key, value)
    settings = cls(_env_file=None)  # type: ignore[call-arg]
    svc = compose["services"][service]
    if hasattr(settings, "port"):
        published = [p.rsplit(":", 1)[1] for p in svc["ports"]]
        assert published == [str(settings.port)], service
        assert str(settings.host) == "0.0.0.0"
        assert f":{settings.port}/" in " ".join(svc["healthcheck"]["test"])
    if cls is ClientSettings:
        assert settings.hospital_id == service.split("-")[1]
        assert str(settings.data_dir) == "/data"
        mounts = {v.split(":")[1]: v for v in svc["volumes"]}
        assert mounts["/data"].endswith(":ro"), "hospital data must be mounted read-only"
        assert mounts["/data"].startswith(f"hospital-{settings.hospital_id}-data:")
    if cls is InferenceSettings:
        assert settings.tracking_uri == "http://mlflow:5000"
        assert settings.provider == ("cuda" if service.endswith("gpu") else "cpu")


@pytest.mark.parametrize("service, cls", [
    ("aggregator", AggregatorSettings), ("inference", InferenceSettings),
    *((f"client-{h}", ClientSettings) for h in HOSPITALS)])
def test_compose_starts_closed(compose: dict[str, Any], raw_compose: dict[str, Any],
                               service: str, cls: type[BaseSettings], made_secrets: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each service as compose configures it passes its own start-up check with no
    development mode (leukofed.startup): keys, token, TLS, and its secrets required."""
    from leukofed.startup import DEV_MODE_ENV

    raw = _env(raw_compose["services"][service])
    assert DEV_MODE_ENV not in raw
    for key in list(__import__("os").environ):
        if key.startswith("LEUKOFED_"):
            monkeypatch.delenv(key)
    env = _container_env(compose, service, made_secrets)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = cls(_env_file=None)  # type: ignore[call-arg]
    if cls is ClientSettings:  # everything came from the hospital's own credentials folder
        assert settings.isolate and settings.signing_key_file and settings.tls_ca_file
        assert settings.signing_key_file.parent.parent.name == f"hospital-{settings.hospital_id}"
    token = env.get("LEUKOFED_AGGREGATOR_ADMIN_TOKEN")
    problems = (settings.startup_problems(token) if cls is AggregatorSettings
                else settings.startup_problems())
    assert [p for p in problems if p] == [], service
    for key in ("LEUKOFED_AGGREGATOR_ADMIN_TOKEN", "LEUKOFED_INFERENCE_API_KEY",
                "MLFLOW_TRACKING_PASSWORD"):
        if key in raw:  # required: compose refuses to start without it
            assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", raw[key]), (service, key)
    if cls is not ClientSettings:  # the trusted-host check must admit the service's name
        assert service in settings.allowed_hosts.split(","), service


def test_each_party_has_its_own_broker_account_from_the_generated_acl(
        compose: dict[str, Any], raw_compose: dict[str, Any], tmp_path: Path) -> None:
    import compose_secrets

    assert "./secrets/redis/users.acl:/usr/local/etc/redis/users.acl:ro" in compose[
        "services"]["redis"]["volumes"]
    values = compose_secrets.generate(list(HOSPITALS), tmp_path / "secrets", tmp_path / ".env")
    acl = (tmp_path / "secrets" / "redis" / "users.acl").read_text()
    users = {line.split()[1]: line for line in acl.splitlines() if line.startswith("user ")}
    assert users["default"].split()[2] == "off"
    urls = {"aggregator": _env(compose["services"]["aggregator"])[
        "LEUKOFED_AGGREGATOR_BROKER_URL"]}
    urls |= {f"client-{h}": _env(compose["services"][f"client-{h}"])[
        "LEUKOFED_CLIENT_BROKER_URL"] for h in HOSPITALS}
    raw_passwords = set()
    for service, url in urls.items():
        parts = urlsplit(url)
        assert parts.scheme == "rediss", service  # TLS only
        assert parts.hostname == "redis" and parts.port == 6379, service
        assert parts.username in users and users[parts.username].split()[2] == "on", service
        raw = _env(raw_compose["services"][service])
        raw_url = next(v for k, v in raw.items() if k.endswith("_BROKER_URL"))
        variable = re.search(r":\$\{([A-Z0-9_]+)", raw_url).group(1)
        raw_passwords.add(variable)
        # .env holds the password whose SHA-256 the ACL line carries.
        digest = hashlib.sha256(values[variable].encode()).hexdigest()
        assert f"#{digest}" in users[parts.username], service
    assert len(raw_passwords) == len(urls)  # no two parties share a password variable
    for h in HOSPITALS:
        assert "+@all" not in users[h] and f"~{h}:*" in users[h]  # an allowlist, its prefix


def test_every_broker_client_presents_a_certificate(compose: dict[str, Any],
                                                   tmp_path: Path) -> None:
    """Issue 26, finding 9: redis.conf requires client certificates (a password alone got
    in), so every service that talks to the broker mounts its own certificate and key, and
    `make secrets` writes one for each (the health check and the monitor included)."""
    import compose_secrets

    conf = (ROOT / "infra/redis/redis.conf").read_text().splitlines()
    assert "tls-auth-clients yes" in conf and "port 0" in conf
    compose_secrets.generate(list(HOSPITALS), tmp_path / "secrets", tmp_path / ".env")
    tls = tmp_path / "secrets" / "tls"
    for user in (*HOSPITALS, "aggregator", "healthcheck", "monitor"):
        assert (tls / f"{user}.crt").is_file() and (tls / f"{user}.key").is_file(), user

    def mounted(service: str) -> dict[str, str]:
        """{path in the container: file under secrets/} of the service's bind mounts."""
        out = {}
        for volume in compose["services"][service]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./secrets/"):
                out[target] = source.removeprefix("./secrets/")
        return out

    redis = compose["services"]["redis"]
    command = redis["healthcheck"]["test"][1]
    cert = re.search(r"--cert (\S+)", command).group(1)
    key = re.search(r"--key (\S+)", command).group(1)
    assert mounted("redis")[cert] == "tls/healthcheck.crt"
    assert mounted("redis")[key] == "tls/healthcheck.key"
    flower = _env(compose["services"]["flower"])["CELERY_BROKER_URL"]
    query = dict(p.split("=", 1) for p in urlsplit(flower).query.split("&"))
    assert query["ssl_cert_reqs"] == "required"
    assert mounted("flower")[query["ssl_certfile"]] == "tls/monitor.crt"
    assert mounted("flower")[query["ssl_keyfile"]] == "tls/monitor.key"
    aggregator = _env(compose["services"]["aggregator"])
    assert mounted("aggregator")[aggregator["LEUKOFED_AGGREGATOR_TLS_CERT_FILE"]] == \
        "tls/aggregator.crt"
    for h in HOSPITALS:  # the client reads tls/<id>.crt from its credentials folder
        bundle = tmp_path / "secrets" / f"hospital-{h}" / "tls"
        assert (bundle / f"{h}.crt").is_file() and (bundle / f"{h}.key").is_file()
        assert f"hospital-{h}" in mounted(f"client-{h}").values()


def test_no_secret_in_the_repository(raw_compose: dict[str, Any]) -> None:
    secretish = re.compile(r"PASSWORD|SECRET|API_KEY|BASIC_AUTH|TOKEN")
    for name, svc in raw_compose["services"].items():
        for key, value in _env(svc).items():
            if secretish.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}", value), (name, key)
            for m in re.finditer(r"//[^:/@]+:([^@]+)@", value):  # credentials in URLs
                assert m.group(1).startswith("${"), (name, key)
    example = read_env_file(ENV_EXAMPLE)
    for key, value in example.items():
        if secretish.search(key) and key != "SECRETS_DIR":  # a folder's name, not a secret
            assert value == "change-me" or value.endswith(":change-me"), key
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, ".env must be git-ignored"


def test_interpolated_file_loads_like_the_raw_one(example_env: dict[str, str]) -> None:
    assert set(load_compose(example_env)["services"]) == set(load_compose()["services"])


def test_server_containers_drop_capabilities_and_run_read_only(
        compose: dict[str, Any]) -> None:
    """Issue 26, finding 11: the aggregator, inference (CPU and GPU), MLflow and Flower run
    with no Linux capability, no-new-privileges and a read-only root filesystem, writing only
    to their volumes and an in-memory /tmp. (Checked here statically: the containers issue
    runs the stack for real.)"""
    services = compose["services"]
    for name in ("aggregator", "inference", "inference-gpu", "mlflow", "flower"):
        svc = services[name]
        assert svc.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert svc.get("read_only") is True, name
        assert "/tmp" in svc.get("tmpfs", []), name
        assert not svc.get("cap_add") and not svc.get("privileged"), name
        # Every folder its settings write to is a volume, since the rest is read-only.
        env = {**_image_env(svc["build"]["target"]), **_env(svc)}
        mounts = {v.split(":")[1] for v in svc.get("volumes", [])}
        for variable in ("LEUKOFED_AGGREGATOR_STATE_DIR", "LEUKOFED_AGGREGATOR_CACHE_DIR",
                         "LEUKOFED_INFERENCE_ONNX_CACHE_DIR", "MLFLOW_ARTIFACTS_DESTINATION"):
            if variable in env:
                assert env[variable] in mounts, (name, variable)
    assert "/var/lib/mlflow/auth" in {v.split(":")[1] for v in services["mlflow"]["volumes"]}
