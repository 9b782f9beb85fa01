"""TLS certificates and SuperNode keys for a federation (``lepton federation certificates``).

:func:`make_certificates` writes a certificate authority and a SuperLink certificate it
signed, valid for the SuperLink's host names and IP addresses (``ca.crt`` goes to every
site and to the pipeline, ``federation.root_certificates``; ``superlink.crt`` and
``superlink.key`` stay with the SuperLink). :func:`make_supernode_key` writes the EC key
pair a SuperNode authenticates with (OpenSSH format, as Flower reads it). Uses
``cryptography``; ``openssl`` does the same (docs/federated.md).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from pipelines.federated.flower_deploy import TLSFiles


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alternative_names(hosts: list[str]):
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def make_certificates(folder: Path, hosts: list[str], days: int = 365) -> TLSFiles:
    """A CA (``ca.crt``, ``ca.key``) and a SuperLink certificate it signed (``superlink.crt``,
    ``superlink.key``) for ``hosts`` (DNS names or IP addresses the sites connect to; the
    SuperLink also reaches itself on 127.0.0.1, which is always added)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1"]))
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Lepton federation CA"))
        .issuer_name(_name("Lepton federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_alternative_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    files = TLSFiles(folder / "ca.crt", folder / "superlink.crt", folder / "superlink.key")
    files.ca_certificate.write_bytes(ca_cert.public_bytes(pem))
    _write_private(folder / "ca.key", ca_key.private_bytes(pem, pkcs8, plain))
    files.certificate.write_bytes(cert.public_bytes(pem))
    _write_private(files.key, key.private_bytes(pem, pkcs8, plain))
    return files


def make_supernode_key(path: Path) -> tuple[Path, Path]:
    """A SuperNode's EC (P-384) key pair in OpenSSH format: ``path`` (private, stays at the
    site) and ``path.pub`` (public, registered at the SuperLink with
    ``flwr supernode register``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = path.with_name(path.name + ".pub")
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return path, public
