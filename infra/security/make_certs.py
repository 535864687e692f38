"""Create a local certificate authority and the certificates for TLS between the parties:

    python infra/security/make_certs.py --out infra/security/certs --server-name redis \
        --server-name broker.example.org a b c

writes ``ca.crt`` (give it to everyone), ``ca.key`` (keep it offline: it can mint any
identity), ``server.crt``/``server.key`` (redis-server and the HTTP services; SANs:
localhost, 127.0.0.1, ::1 and every ``--server-name``) and ``<name>.crt``/``<name>.key`` per
hospital plus ``aggregator`` (client certificates, for ``tls-auth-clients yes``). Private keys
are written 0600. ECDSA P-256: small, fast, and accepted by OpenSSL/redis and Python's ssl.

A private CA rather than public certificates: the broker usually sits on a hospital network
with no public DNS name, and a private CA means only certificates we issued are trusted,
which is what client authentication needs. Rotation: re-run with the same ``--out`` (the CA
is reused when present, so hospitals need not re-import it); ``--new-ca`` replaces it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from leukofed.signing import write_private  # noqa: E402
from leukofed.transport import check_hospital_id  # noqa: E402

DEFAULT_DAYS = 365
CA_DAYS = 5 * 365
LOCAL_NAMES = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    write_private(path, data)  # 0600 from the moment it exists, even over a wider file


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "leukofed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(out: Path, days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name("leukofed local CA")).issuer_name(_name("leukofed local CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(out / "ca.key", key)
    _write_cert(out / "ca.crt", cert)
    return key, cert


def load_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, cert


def issue(out: Path, stem: str, common_name: str, ca_key: ec.EllipticCurvePrivateKey,
          ca_cert: x509.Certificate, server_names: list[str] | None = None,
          days: int = DEFAULT_DAYS) -> Path:
    """A leaf certificate signed by the CA: a server one when ``server_names`` is given
    (serverAuth, SANs), else a client one (clientAuth, the party's name as CN and SAN)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    server = server_names is not None
    names = list(dict.fromkeys([*(server_names or []), *(LOCAL_NAMES if server else ())]))
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names or [common_name]]
    if server:
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LOCAL_IPS]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_key(out / f"{stem}.key", key)
    _write_cert(out / f"{stem}.crt", cert)
    return out / f"{stem}.crt"


def generate(parties: list[str], out: Path, server_names: list[str] | None = None,
             new_ca: bool = False, days: int = DEFAULT_DAYS) -> dict[str, Path]:
    """CA (reused unless ``new_ca``), server certificate and one client certificate per
    hospital and for the aggregator; returns {name: certificate path}."""
    hospitals = [check_hospital_id(p) for p in parties if p != "aggregator"]
    out.mkdir(parents=True, exist_ok=True)
    if new_ca or not (out / "ca.key").exists():
        ca_key, ca_cert = make_ca(out)
    else:
        ca_key, ca_cert = load_ca(out)
    written = {"ca": out / "ca.crt",
               "server": issue(out, "server", (server_names or ["localhost"])[0], ca_key,
                               ca_cert, server_names=list(server_names or []), days=days)}
    for name in [*hospitals, "aggregator"]:
        written[name] = issue(out, name, name, ca_key, ca_cert, days=days)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hospitals", nargs="+", help="hospital ids (a client cert each)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "certs")
    parser.add_argument("--server-name", action="append", default=[],
                        help="DNS name of the broker/services (repeatable)")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS)
    parser.add_argument("--new-ca", action="store_true", help="replace an existing CA")
    args = parser.parse_args(argv)
    written = generate(args.hospitals, args.out, args.server_name, args.new_ca, args.days)
    print(f"wrote {', '.join(p.name for p in written.values())} in {args.out}; "
          "keep ca.key offline, give each party ca.crt and only its own .crt/.key")


if __name__ == "__main__":
    main()
