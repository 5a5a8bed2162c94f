"""The SDK's transport options against a real Triton that serves gRPC over mutual TLS (certificates made
for the test) and accepts inference only with an API-key header (``--grpc-restricted-protocol``)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from posetriton.client import AccessDeniedError, AsyncPoseClient, PoseClient, ServerUnavailableError
from posetriton.server.launcher import ServerOptions, TritonServer
from tests.conftest import UL_MODEL, free_port

# Triton checks the header named by --grpc-restricted-protocol with its own prefix.
API_KEY_SETTING, API_KEY = "posetriton-api-key", "test-key-3f9a"
API_KEY_HEADER = f"triton-grpc-protocol-{API_KEY_SETTING}"


def _tls(certificates: Path) -> dict[str, Any]:
    c = certificates
    return {
        "ssl": True, "root_certificates": c / "ca.crt", "private_key": c / "client.key",
        "certificate_chain": c / "client.crt",
    }  # fmt: skip


def _certificate(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    usage: ExtendedKeyUsageOID | None,
) -> x509.Certificate:  # fmt: skip
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA; and a
    second, unrelated CA whose client certificate the server must refuse."""
    directory = tmp_path_factory.mktemp("tls")
    for prefix in ("", "other_"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate(f"{prefix}posetriton test CA", ca_key, None, None)
        _write(directory, f"{prefix}ca", ca_key, ca)
        for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
            key = ec.generate_private_key(ec.SECP256R1())
            _write(directory, f"{prefix}{role}", key, _certificate(role, key, (ca.subject, ca_key), usage))
    return directory


@pytest.fixture(scope="module")
def tls_url(model_repository: Path, certificates: Path) -> Iterator[str]:
    c = certificates
    options = ServerOptions(
        repository=model_repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        models=[UL_MODEL],
        extra_args=[
            "--grpc-use-ssl=true", "--grpc-use-ssl-mutual=true", f"--grpc-server-cert={c / 'server.crt'}",
            f"--grpc-server-key={c / 'server.key'}", f"--grpc-root-cert={c / 'ca.crt'}",
            f"--grpc-restricted-protocol=inference:{API_KEY_SETTING}={API_KEY}",
        ],
    )  # fmt: skip
    with TritonServer(options).start(timeout=180) as server:
        yield server.grpc_url


def test_mutual_tls_with_the_right_certificates_serves(
    tls_url: str, certificates: Path, photo_paths: list[Path]
) -> None:
    tls = {**_tls(certificates), "headers": {API_KEY_HEADER: API_KEY}}
    zidane = next(p for p in photo_paths if p.name == "zidane.jpg")
    with PoseClient(tls_url, UL_MODEL, **tls) as client:
        assert client.is_server_ready()
        assert len(client.predict(zidane).poses) == 2

    async def predict() -> int:
        async with AsyncPoseClient(tls_url, UL_MODEL, **tls) as aclient:
            return len((await aclient.predict(zidane)).poses)

    assert asyncio.run(predict()) == 2


@pytest.mark.parametrize(
    ("root", "key", "chain", "why"),
    [
        (None, None, None, "plaintext gRPC to a TLS port"),
        ("ca.crt", None, None, "no client certificate"),
        ("ca.crt", "other_client.key", "other_client.crt", "a client certificate from another CA"),
        ("other_ca.crt", "client.key", "client.crt", "a server certificate the client does not trust"),
    ],
)
def test_tls_refusals_are_clear_errors(
    tls_url: str, certificates: Path, photo_paths: list[Path], root: str | None, key: str | None, chain: str | None,
    why: str,
) -> None:  # fmt: skip
    c = certificates
    with (
        PoseClient(
            tls_url, UL_MODEL, ssl=root is not None, root_certificates=c / root if root else None,
            private_key=c / key if key else None, certificate_chain=c / chain if chain else None,
            retry=1, timeout_s=10,
        ) as client,
        pytest.raises(ServerUnavailableError) as error,
    ):  # fmt: skip
        client.predict(photo_paths[0])
    assert tls_url in str(error.value), why
    if root == "other_ca.crt":
        assert "TLS handshake failed" in str(error.value) and "root_certificates" in str(error.value)
    else:  # the server closes the connection: the client cannot tell why, so the hint lists TLS too
        assert "TLS" in str(error.value)


@pytest.mark.parametrize("headers", [None, {API_KEY_HEADER: "wrong"}, {API_KEY_SETTING: API_KEY}])
def test_a_missing_or_wrong_api_key_header_is_refused_clearly(
    tls_url: str, certificates: Path, photo_paths: list[Path], headers: dict[str, str] | None
) -> None:
    retries: list[int] = []
    with PoseClient(
        tls_url, UL_MODEL, headers=headers, retry=3, on_retry=lambda n, e, d: retries.append(n), **_tls(certificates)
    ) as client:
        assert client.is_server_ready(), "health is not restricted: only inference needs the header"
        with pytest.raises(AccessDeniedError) as error:
            client.predict(photo_paths[0])
    assert not retries and not error.value.transient, "not retried: the same headers would be refused again"
    assert f"headers={{'{API_KEY_HEADER}': ...}}" in str(error.value)
