"""Redis over TLS with certificates from infra/security/make_certs.py, on a real
``redis-server --tls-port`` (plain port off, client certificates required): a hospital's
Celery worker and the aggregator's dispatcher complete a describe round-trip over
``rediss://``, while a plain ``redis://`` connection, a client without a certificate, a
client certificate from another CA and a client that does not trust our CA all fail."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from conftest import ROOT, free_port, infra_security, wait_for_port
from fedstack import Worker, wait_live

from leukofed.transport import make_celery, tls_options
from services.aggregator.dispatch import CeleryDispatcher

pytestmark = pytest.mark.integration


@dataclass
class TlsRedis:
    port: int
    certs: Path

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def tls(self, name: str) -> dict[str, object]:
        c = self.certs
        options = tls_options(str(c / "ca.crt"), str(c / f"{name}.crt"), str(c / f"{name}.key"))
        assert options is not None
        return options


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make setup`")
    certs = tmp_path / "certs"
    infra_security("make_certs").generate(["a"], certs)
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--dir", str(tmp_path), "--tls-cert-file", str(certs / "server.crt"),
         "--tls-key-file", str(certs / "server.key"), "--tls-ca-cert-file",
         str(certs / "ca.crt"), "--tls-auth-clients", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 20, proc)
        yield TlsRedis(port, certs)
    finally:
        proc.terminate()
        proc.wait(10)


def test_certificates_are_what_the_script_promises(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    certs = tmp_path / "certs"
    written = infra_security("make_certs").generate(["a", "b"], certs, server_names=["redis"])
    assert set(written) == {"ca", "server", "a", "b", "aggregator"}
    for key in certs.glob("*.key"):
        assert key.stat().st_mode & 0o777 == 0o600, key
    server = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"redis", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    client = x509.load_pem_x509_certificate((certs / "a.crt").read_bytes())
    assert ExtendedKeyUsageOID.CLIENT_AUTH in \
        client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    for name in ("server", "a", "b", "aggregator"):  # openssl agrees they chain to the CA
        subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"),
                        str(certs / f"{name}.crt")], check=True, capture_output=True)
    ca_before = (certs / "ca.crt").read_bytes()
    infra_security("make_certs").generate(["a", "b", "c"], certs)  # adding a hospital keeps the CA
    assert (certs / "ca.crt").read_bytes() == ca_before and (certs / "c.crt").exists()


def test_only_tls_clients_with_our_certificates_get_in(tls_redis: TlsRedis,
                                                       tmp_path: Path) -> None:
    ok = redis.Redis.from_url(tls_redis.url, **tls_redis.tls("a"))
    assert ok.ping()
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(f"redis://127.0.0.1:{tls_redis.port}/0",
                             socket_timeout=5).ping()  # plain text to the TLS port
    no_cert = tls_options(str(tls_redis.certs / "ca.crt"))
    with pytest.raises(redis.exceptions.ConnectionError):  # alert or EOF, by timing
        redis.Redis.from_url(tls_redis.url, socket_timeout=5, **no_cert).ping()
    other = tmp_path / "other-ca"  # a certificate for "a", but minted by someone else's CA
    infra_security("make_certs").generate(["a"], other)
    foreign = tls_options(str(tls_redis.certs / "ca.crt"), str(other / "a.crt"),
                          str(other / "a.key"))
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(tls_redis.url, socket_timeout=5, **foreign).ping()
    # The client side verifies too: a server not signed by the CA we trust is refused.
    distrust = tls_options(str(other / "ca.crt"), str(tls_redis.certs / "a.crt"),
                           str(tls_redis.certs / "a.key"))
    with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(tls_redis.url, socket_timeout=5, **distrust).ping()


def test_settings_refuse_half_configured_tls(tmp_path: Path) -> None:
    from services.aggregator.settings import AggregatorSettings
    from services.client.settings import ClientSettings

    with pytest.raises(ValueError, match="tls_ca_file"):
        AggregatorSettings(broker_url="rediss://h:6379/0")
    with pytest.raises(ValueError, match="not rediss"):
        ClientSettings(hospital_id="a", data_dir=tmp_path, tls_ca_file=tmp_path / "ca.crt")
    with pytest.raises(ValueError, match="go together"):
        ClientSettings(hospital_id="a", data_dir=tmp_path, broker_url="rediss://h/0",
                       tls_ca_file=tmp_path / "ca.crt", tls_cert_file=tmp_path / "a.crt")


def test_celery_round_trip_over_tls(tls_redis: TlsRedis, tmp_path: Path) -> None:
    c = tls_redis.certs
    worker = Worker.in_tmp(tmp_path, "a", tls_redis.url,
                           {"LEUKOFED_CLIENT_TLS_CA_FILE": str(c / "ca.crt"),
                            "LEUKOFED_CLIENT_TLS_CERT_FILE": str(c / "a.crt"),
                            "LEUKOFED_CLIENT_TLS_KEY_FILE": str(c / "a.key")},
                           per_class=3).start()
    try:
        worker.wait_ready()
        # The aggregator's side, built the way services/aggregator/app.py builds it.
        app = make_celery("aggregator-tls", tls_redis.url, tls=tls_redis.tls("aggregator"))
        dispatcher = CeleryDispatcher(app, ping_timeout_s=2.0)
        assert wait_live(dispatcher, {"a"}) == {"a"}  # remote control over TLS
        described = dispatcher.describe(["a"], timeout_s=60)
    finally:
        worker.stop()
    assert described["a"]["status"] == "ok"
    assert sum(described["a"]["class_counts"].values()) > 0


def test_inference_service_serves_https_with_our_certificate(tmp_path: Path) -> None:
    import os
    import ssl
    import sys
    import time
    import urllib.request

    certs = tmp_path / "certs"
    infra_security("make_certs").generate(["a"], certs)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LEUKOFED_")},
           "LEUKOFED_DEV_MODE": "1",  # no API key or model key: HTTPS is what is tested
           "LEUKOFED_INFERENCE_PORT": str(port), "LEUKOFED_INFERENCE_HOST": "127.0.0.1",
           "LEUKOFED_INFERENCE_TRACKING_URI": "http://127.0.0.1:9",  # no model needed here
           "LEUKOFED_INFERENCE_ONNX_CACHE_DIR": str(tmp_path / "cache"),
           "LEUKOFED_INFERENCE_HTTPS_CERT_FILE": str(certs / "server.crt"),
           "LEUKOFED_INFERENCE_HTTPS_KEY_FILE": str(certs / "server.key")}
    log = (tmp_path / "inference.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.inference"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    trusted = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    try:
        wait_for_port(port, 90, proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"https://localhost:{port}/healthz",
                                            context=trusted, timeout=5) as r:
                    assert r.status == 200 and r.headers["x-frame-options"] == "DENY"
                break
            except (ConnectionError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"https://localhost:{port}/healthz",  # system CAs only
                                   context=ssl.create_default_context(), timeout=5)
        with pytest.raises((ConnectionError, urllib.error.URLError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_aggregator_serves_https_and_the_cli_trusts_only_our_ca(tmp_path: Path,
                                                                 redis_server) -> None:
    """`leukofed aggregator serve` with a certificate; the `leukofed run` CLI reaches it with
    SSL_CERT_FILE=ca.crt and the admin token, and fails clearly without our CA or token."""
    import os
    import sys

    certs = tmp_path / "certs"
    infra_security("make_certs").generate(["a"], certs)
    port = free_port()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("LEUKOFED_") and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    token = "https-test-admin-token-0123456789"
    env = {**base, "LEUKOFED_DEV_MODE": "1",  # no signing keys: HTTPS is what is tested
           "LEUKOFED_AGGREGATOR_BROKER_URL": redis_server.url,
           "LEUKOFED_AGGREGATOR_STATE_DIR": str(tmp_path / "state"),
           "LEUKOFED_AGGREGATOR_CACHE_DIR": str(tmp_path / "cache"),
           "LEUKOFED_AGGREGATOR_TRACKING": "false",
           "LEUKOFED_AGGREGATOR_ADMIN_TOKEN": token,
           "LEUKOFED_AGGREGATOR_HTTPS_CERT_FILE": str(certs / "server.crt"),
           "LEUKOFED_AGGREGATOR_HTTPS_KEY_FILE": str(certs / "server.key")}
    log = (tmp_path / "aggregator.log").open("wb")
    cli = [str(Path(sys.executable).parent / "leukofed")]
    proc = subprocess.Popen([*cli, "aggregator", "serve", "--host", "127.0.0.1", "--port",
                             str(port)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"https://localhost:{port}"

    def run_list(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, "run", "list", "--url", url], cwd=ROOT, text=True,
                              capture_output=True, timeout=60, env={**base, **extra})

    try:
        wait_for_port(port, 90, proc)
        ok = run_list(SSL_CERT_FILE=str(certs / "ca.crt"), LEUKOFED_AGGREGATOR_ADMIN_TOKEN=token)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == ""  # no runs yet; the handshake and the token passed
        direct = httpx.get(f"{url}/v1/runs", verify=str(certs / "ca.crt"), timeout=10,
                           headers={"Authorization": f"Bearer {token}"})
        assert direct.status_code == 200 and direct.json() == []

        untrusted = run_list(LEUKOFED_AGGREGATOR_ADMIN_TOKEN=token)  # system CAs only
        assert untrusted.returncode != 0
        assert "cannot reach the aggregator" in untrusted.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr

        wrong = run_list(SSL_CERT_FILE=str(certs / "ca.crt"),
                         LEUKOFED_AGGREGATOR_ADMIN_TOKEN="not-the-token")
        assert wrong.returncode == 1 and "error 403" in wrong.stderr

        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
            httpx.get(f"http://127.0.0.1:{port}/v1/runs", timeout=5)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)
        log.close()
