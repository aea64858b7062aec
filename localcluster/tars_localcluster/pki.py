"""The cluster's certificates and keys: one CA, the serving certificates of the
API server and the kubelet, a client certificate per component, and the service-account
signing key; for the aggregation layer, a separate front-proxy CA and the client certificate
the API server presents to aggregated API servers. Made once per cluster folder and reused."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate: CN is the user name, O the groups."""

    file_stem: str
    common_name: str
    organizations: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServingIdentity:
    """A serving certificate: the addresses and names clients verify."""

    file_stem: str
    common_name: str
    ips: tuple[str, ...]
    names: tuple[str, ...] = ()


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


class Pki:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def front_proxy_ca_cert(self) -> Path:
        return self.dir / "front-proxy-ca.crt"

    @property
    def front_proxy_ca_key(self) -> Path:
        return self.dir / "front-proxy-ca.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    def cert(self, stem: str) -> Path:
        return self.dir / f"{stem}.crt"

    def key(self, stem: str) -> Path:
        return self.dir / f"{stem}.key"

    def ensure(
        self,
        servers: list[ServingIdentity],
        clients: list[ClientIdentity],
        front_proxy_clients: Sequence[ClientIdentity] = (),
    ) -> None:
        """Issue what is missing. FRONT_PROXY_CLIENTS are signed by the front-proxy CA: an
        aggregated API server trusts the user headers of a request only from them, so that CA must
        not be the one every other client certificate comes from."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        if not self.ca_cert.exists():
            self._make_ca(self.ca_cert, self.ca_key, "tars-localcluster-ca")
        if front_proxy_clients and not self.front_proxy_ca_cert.exists():
            self._make_ca(
                self.front_proxy_ca_cert, self.front_proxy_ca_key, "tars-localcluster-front-proxy-ca"
            )
        if not self.sa_key.exists():
            sa = ec.generate_private_key(ec.SECP256R1())
            _write_key(self.sa_key, sa)
            self.sa_pub.write_bytes(
                sa.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        for server in servers:
            if not self.cert(server.file_stem).exists():
                self._issue(
                    server.file_stem,
                    _name(server.common_name),
                    server=True,
                    ips=list(server.ips),
                    dns=list(server.names),
                )
        for client in clients:
            if not self.cert(client.file_stem).exists():
                self._issue(client.file_stem, _name(client.common_name, client.organizations), server=False)
        for client in front_proxy_clients:
            if not self.cert(client.file_stem).exists():
                self._issue(
                    client.file_stem,
                    _name(client.common_name, client.organizations),
                    server=False,
                    ca=(self.front_proxy_ca_cert, self.front_proxy_ca_key),
                )

    def _make_ca(self, cert_path: Path, key_path: Path, common_name: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = _name(common_name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _issue(
        self,
        stem: str,
        subject: x509.Name,
        *,
        server: bool,
        ips: list[str] | None = None,
        dns: list[str] | None = None,
        ca: tuple[Path, Path] | None = None,
    ) -> None:
        ca_cert_path, ca_key_path = ca or (self.ca_cert, self.ca_key)
        ca_key = _load_key(ca_key_path)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns or []]
            alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips or []]
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write_key(self.key(stem), key)
        self.cert(stem).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
