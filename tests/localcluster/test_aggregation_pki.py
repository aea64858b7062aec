"""The aggregation layer's certificates and the API server flags that name them: an aggregated API
server (an APIService's backend) trusts the user headers of a proxied request only when the client
certificate chains to the front-proxy CA and has an allowed CN."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tars_localcluster.cluster import ADMIN, FRONT_PROXY_CLIENT, aggregation_flags
from tars_localcluster.pki import Pki


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, InvalidSignature):  # ValueError: the issuer name is not the CA's subject
        return False
    return True


def test_the_proxy_client_chains_to_its_own_ca_not_the_cluster_ca(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.ensure([], [ADMIN], [FRONT_PROXY_CLIENT])
    front_ca, cluster_ca = _cert(pki.front_proxy_ca_cert), _cert(pki.ca_cert)
    proxy = _cert(pki.cert(FRONT_PROXY_CLIENT.file_stem))
    assert _signed_by(proxy, front_ca) and not _signed_by(proxy, cluster_ca)
    # Any other client certificate (the admin's) must not be able to set user headers.
    assert not _signed_by(_cert(pki.cert(ADMIN.file_stem)), front_ca)
    usage = proxy.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_the_flags_name_the_issued_files_and_allow_exactly_the_proxy_client(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.ensure([], [], [FRONT_PROXY_CLIENT])
    flags = dict(flag.removeprefix("--").split("=", 1) for flag in aggregation_flags(pki))
    for name in ("requestheader-client-ca-file", "proxy-client-cert-file", "proxy-client-key-file"):
        assert Path(flags[name]).is_file(), name
    assert flags["requestheader-client-ca-file"] == str(pki.front_proxy_ca_cert)
    proxy = _cert(Path(flags["proxy-client-cert-file"]))
    cn = proxy.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert flags["requestheader-allowed-names"].split(",") == [cn]
    assert flags["requestheader-username-headers"] == "X-Remote-User"


def test_issuing_again_keeps_the_existing_front_proxy_ca(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.ensure([], [], [FRONT_PROXY_CLIENT])
    first = pki.front_proxy_ca_cert.read_bytes()
    pki.ensure([], [], [FRONT_PROXY_CLIENT])
    assert pki.front_proxy_ca_cert.read_bytes() == first
