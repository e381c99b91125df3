"""--web.config.file: TLS with real handshakes, basic auth with real bcrypt, invalid files.

Certificates are made here (cryptography, EC P-256) for each test module; hashes use bcrypt's
lowest cost so that a verification takes about a millisecond.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp import web
from processes import free_port, process, valid_config, wait_for

from exporter.basicauth import BasicAuth, parse_basic
from exporter.config import ConfigError
from exporter.exposition import Exposition
from exporter.selfmetrics import SelfMetrics
from exporter.server import Hooks, make_app
from exporter.state import FleetState
from exporter.webconfig import (
    RateLimit,
    WebSecurity,
    load_web_config,
    rate_limiter,
)

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

PASSWORD = "correct horse"
TOKEN = "webconfig-test-token"


# --- processes and ports ------------------------------------------------------------------


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


# --- a small PKI --------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _issue(
    directory: Path,
    name: str,
    *,
    sans: list[x509.GeneralName],
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ca: bool = False,
) -> tuple[Issued, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    issued = Issued(directory / f"{name}.crt", directory / f"{name}.key")
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, issued.key)
    return issued, cert, key


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Path
    server: Issued
    other_server: Issued  # another key pair from the same CA, for rotation and mismatch
    client: Issued  # signed by the CA, SAN DNS:scraper.example
    stranger: Issued  # a client certificate from an unrelated CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = _issue(directory, "ca", sans=[], ca=True)
    server_sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    signer = (ca_cert, ca_key)
    server, _, _ = _issue(directory, "server", sans=server_sans, issuer=signer)
    other, _, _ = _issue(directory, "server2", sans=server_sans, issuer=signer)
    client, _, _ = _issue(
        directory, "client", sans=[x509.DNSName("scraper.example")], issuer=signer
    )
    _, rogue_cert, rogue_key = _issue(directory, "rogue-ca", sans=[], ca=True)
    stranger, _, _ = _issue(
        directory, "stranger", sans=[x509.DNSName("scraper.example")],
        issuer=(rogue_cert, rogue_key),
    )  # fmt: skip
    return Pki(directory, ca.cert, server, other, client, stranger)


@pytest.fixture(scope="module")
def password_hash() -> str:
    return bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def tls_block(pki: Pki, **extra: str) -> str:
    lines = [f"  cert_file: {pki.server.cert}", f"  key_file: {pki.server.key}"]
    lines += [f"  {key}: {value}" for key, value in extra.items()]
    return "tls_server_config:\n" + "\n".join(lines) + "\n"


def users_block(password_hash: str, user: str = "prometheus") -> str:
    return f"basic_auth_users:\n  {user}: {password_hash}\n"


def client_context(
    pki: Pki, *, cert: Issued | None = None, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    if max_version is not None:
        context.maximum_version = max_version
    return context


# --- the exporter's real app behind a web config ------------------------------------------


def security_from(tmp_path: Path, text: str) -> WebSecurity:
    path = tmp_path / "web.yml"
    path.write_text(text)
    return WebSecurity.load(str(path))


@asynccontextmanager
async def serving(security: WebSecurity, *, lifecycle: bool = True) -> AsyncIterator[str]:
    """make_app behind the web config on a real port; yields the base URL."""
    metrics = SelfMetrics()
    state = FleetState(organization="acme", latency_buckets=(1.0, 10.0), metrics=metrics)
    exposition = Exposition(state, metrics, version="test")
    exposition.refresh()

    async def reload() -> str | None:
        return security.reload()

    hooks = Hooks(
        exposition=exposition,
        state=state,
        ready=lambda: True,
        reload=reload,
        version="test",
        organization=lambda: "acme",
    )
    # By default the lifecycle API is on (--web.enable-lifecycle): POST /-/reload is a route.
    runner = web.AppRunner(make_app(hooks, security, lifecycle=lifecycle), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=security.ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"{security.scheme}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def get(
    url: str,
    *,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> tuple[int, Any, bytes]:
    connector = aiohttp.TCPConnector(ssl=context if context is not None else False)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, url, headers=headers) as response,
    ):
        return response.status, response.headers, await response.read()


async def tls_get(url: str, path: str, context: ssl.SSLContext) -> tuple[bytes, ssl.SSLObject]:
    """A raw HTTP/1.0 GET over TLS: the response's first line and the session's TLS object."""
    port = int(url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        status_line = await reader.readline()
        return status_line, writer.get_extra_info("ssl_object")
    finally:
        writer.close()


async def handshake_fails(url: str, context: ssl.SSLContext) -> bool:
    """True when no HTTP response comes back (TLS 1.3 reports a refused client late)."""
    try:
        await get(url, context=context)
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError):
        return True
    return False


# --- TLS ----------------------------------------------------------------------------------


async def test_tls_serves_metrics_over_a_verified_handshake(tmp_path, pki):
    security = security_from(tmp_path, tls_block(pki))
    async with serving(security) as url:
        assert url.startswith("https://")
        status, _, body = await get(f"{url}/metrics", context=client_context(pki))
        assert status == 200 and b"applivery_exporter_build_info" in body
        status_line, ssl_object = await tls_get(url, "/metrics", client_context(pki))
        assert status_line.startswith(b"HTTP/1.0 200")
        assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")


async def test_a_client_that_does_not_trust_the_certificate_is_refused(tmp_path, pki):
    security = security_from(tmp_path, tls_block(pki))
    async with serving(security) as url:
        assert await handshake_fails(f"{url}/metrics", ssl.create_default_context())


async def test_plain_http_on_the_tls_port_gets_no_http_response(tmp_path, pki):
    security = security_from(tmp_path, tls_block(pki))
    async with serving(security) as url:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(), timeout=5)
        except ConnectionError:
            answer = b""
        writer.close()
        assert not answer.startswith(b"HTTP/")
        assert b"applivery_exporter" not in answer
        plain = url.replace("https://", "http://")
        with pytest.raises(aiohttp.ClientError):
            await get(f"{plain}/metrics")


async def test_min_version_refuses_older_clients(tmp_path, pki):
    security = security_from(tmp_path, tls_block(pki, min_version="TLS13"))
    async with serving(security) as url:
        old = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2)
        assert await handshake_fails(f"{url}/metrics", old)
        status, _, _ = await get(f"{url}/metrics", context=client_context(pki))
        assert status == 200


async def test_client_certificates_when_required(tmp_path, pki):
    security = security_from(
        tmp_path,
        tls_block(pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file=pki.ca),
    )
    async with serving(security) as url:
        assert await handshake_fails(f"{url}/metrics", client_context(pki))
        assert await handshake_fails(f"{url}/metrics", client_context(pki, cert=pki.stranger))
        status, _, _ = await get(f"{url}/metrics", context=client_context(pki, cert=pki.client))
        assert status == 200


async def test_client_allowed_sans_restrict_verified_clients(tmp_path, pki):
    base = tls_block(pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file=pki.ca)
    allowed = security_from(tmp_path, base + "  client_allowed_sans: [scraper.example]\n")
    async with serving(allowed) as url:
        status, _, _ = await get(f"{url}/metrics", context=client_context(pki, cert=pki.client))
        assert status == 200
    other = security_from(tmp_path, base + "  client_allowed_sans: [other.example]\n")
    async with serving(other) as url:
        status, _, _ = await get(f"{url}/metrics", context=client_context(pki, cert=pki.client))
        assert status == 403


# --- basic auth ---------------------------------------------------------------------------

ROUTES = [("GET", "/metrics"), ("GET", "/"), ("GET", "/-/healthy"), ("GET", "/-/ready"),
          ("POST", "/-/reload")]  # fmt: skip


async def test_every_route_needs_credentials(tmp_path, password_hash):
    security = security_from(tmp_path, users_block(password_hash))
    async with serving(security) as url:
        for method, route in ROUTES:
            status, headers, body = await get(f"{url}{route}", method=method)
            assert status == 401, route
            assert headers["WWW-Authenticate"].startswith("Basic"), route
            assert b"applivery" not in body.lower(), route
        for method, route in ROUTES:
            status, _, _ = await get(
                f"{url}{route}", method=method, headers=basic("prometheus", PASSWORD)
            )
            assert status == 200, route


@pytest.mark.parametrize(
    "headers",
    [
        basic("prometheus", "wrong"),
        basic("prometheus", PASSWORD.upper()),
        basic("nobody", PASSWORD),
        basic("prometheus", ""),
        {"Authorization": "Bearer " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()},
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Basic " + base64.b64encode(b"prometheus").decode()},  # no colon
    ],
    ids=["wrong", "case", "unknown-user", "empty", "bearer", "garbage", "no-colon"],
)
async def test_wrong_credentials_get_401(tmp_path, password_hash, headers):
    security = security_from(tmp_path, users_block(password_hash))
    async with serving(security) as url:
        status, response_headers, _ = await get(f"{url}/metrics", headers=headers)
        assert status == 401
        assert response_headers["WWW-Authenticate"].startswith("Basic")


async def test_tls_and_basic_auth_together(tmp_path, pki, password_hash):
    security = security_from(tmp_path, tls_block(pki) + users_block(password_hash))
    async with serving(security) as url:
        context = client_context(pki)
        status, _, _ = await get(f"{url}/metrics", context=context)
        assert status == 401
        status, _, body = await get(
            f"{url}/metrics", context=context, headers=basic("prometheus", PASSWORD)
        )
        assert status == 200 and b"applivery_exporter_build_info" in body


async def test_successful_verifications_are_cached_and_failures_are_not(password_hash):
    auth = BasicAuth({"prometheus": password_hash.encode()})
    good = basic("prometheus", PASSWORD)["Authorization"]
    bad = basic("prometheus", "guess")["Authorization"]
    for _ in range(5):
        assert await auth.check(good)
    assert auth.verifications == 1
    for _ in range(3):
        assert not await auth.check(bad)
    assert auth.verifications == 4


async def test_the_cache_is_bounded(password_hash):
    hashed = password_hash.encode()
    auth = BasicAuth({"a": hashed, "b": hashed, "c": hashed}, cache_size=2)
    for user in ("a", "b", "c"):
        assert await auth.check(basic(user, PASSWORD)["Authorization"])
    assert auth.verifications == 3
    assert await auth.check(basic("c", PASSWORD)["Authorization"])  # still cached
    assert auth.verifications == 3
    assert await auth.check(basic("a", PASSWORD)["Authorization"])  # evicted: verified again
    assert auth.verifications == 4


async def test_unknown_users_pay_a_bcrypt_verification_too(password_hash):
    auth = BasicAuth({"prometheus": password_hash.encode()})
    assert not await auth.check(basic("nobody", PASSWORD)["Authorization"])
    assert auth.verifications == 1


async def test_overlong_passwords_are_refused_not_crashed(password_hash):
    auth = BasicAuth({"prometheus": password_hash.encode()})
    assert not await auth.check(basic("prometheus", "x" * 100)["Authorization"])


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Basic " + base64.b64encode(b"u:p:w").decode(), ("u", "p:w")),
        ("basic " + base64.b64encode(b"u:").decode(), ("u", "")),
        ("Basic " + base64.b64encode("ü:ß".encode()).decode(), ("ü", "ß")),
        (None, None),
        ("", None),
        ("Basic", None),
        ("Basic " + base64.b64encode(b"\xff:x").decode(), None),
    ],
)
def test_parse_basic(header, expected):
    assert parse_basic(header) == expected


# --- headers and rate limit ---------------------------------------------------------------


async def test_configured_headers_are_on_every_response(tmp_path, password_hash):
    text = users_block(password_hash) + (
        "http_server_config:\n  http2: false\n  headers:\n"
        "    X-Frame-Options: deny\n    Content-Security-Policy: \"default-src 'self'\"\n"
    )
    async with serving(security_from(tmp_path, text)) as url:
        for headers in ({}, basic("prometheus", PASSWORD)):
            _, response_headers, _ = await get(f"{url}/", headers=headers)
            assert response_headers["X-Frame-Options"] == "deny"
            assert response_headers["Content-Security-Policy"] == "default-src 'self'"


async def test_rate_limit_answers_429_beyond_the_burst(tmp_path):
    security = security_from(tmp_path, "rate_limit:\n  interval: 1h\n  burst: 2\n")
    async with serving(security) as url:
        statuses = [(await get(f"{url}/-/healthy"))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]


def test_token_bucket_refills_one_request_per_interval():
    now = [0.0]
    bucket = rate_limiter(RateLimit(interval_seconds=10.0, burst=2), clock=lambda: now[0])
    assert [bucket.try_acquire() for _ in range(3)] == [True, True, False]
    now[0] = 9.0
    assert not bucket.try_acquire()
    now[0] = 10.5
    assert bucket.try_acquire()
    assert not bucket.try_acquire()
    now[0] = 1000.0
    assert [bucket.try_acquire() for _ in range(3)] == [True, True, False]  # never above the burst


# --- reload -------------------------------------------------------------------------------


async def test_http_reload_without_the_lifecycle_flag_is_forbidden_after_auth(
    tmp_path, password_hash
):
    security = security_from(tmp_path, users_block(password_hash))
    async with serving(security, lifecycle=False) as url:
        status, _, _ = await get(f"{url}/-/reload", method="POST")
        assert status == 401, "credentials are asked for first, as on every route"
        status, _, body = await get(
            f"{url}/-/reload", method="POST", headers=basic("prometheus", PASSWORD)
        )
        assert status == 403 and b"Lifecycle API is not enabled" in body


async def test_reload_swaps_users_and_keeps_the_old_config_when_invalid(tmp_path, password_hash):
    security = security_from(tmp_path, users_block(password_hash))
    path = tmp_path / "web.yml"
    async with serving(security) as url:
        new_hash = bcrypt.hashpw(b"rotated", bcrypt.gensalt(rounds=4)).decode()
        path.write_text(users_block(new_hash))
        assert security.reload() is None
        assert (await get(f"{url}/metrics", headers=basic("prometheus", PASSWORD)))[0] == 401
        assert (await get(f"{url}/metrics", headers=basic("prometheus", "rotated")))[0] == 200

        path.write_text("basic_auth_users:\n  prometheus: plain-text\n")
        problem = security.reload()
        assert problem is not None and "basic_auth_users.prometheus" in problem
        assert (await get(f"{url}/metrics", headers=basic("prometheus", "rotated")))[0] == 200


async def test_a_reload_that_leaves_the_users_keeps_their_checked_credentials(
    tmp_path, password_hash
):
    security = security_from(tmp_path, users_block(password_hash))
    path = tmp_path / "web.yml"
    async with serving(security) as url:
        assert (await get(f"{url}/metrics", headers=basic("prometheus", PASSWORD)))[0] == 200
        auth = security.auth
        assert auth is not None and auth.verifications == 1
        path.write_text(users_block(password_hash) + "rate_limit:\n  interval: 1s\n  burst: 50\n")
        assert security.reload() is None
        assert security.auth is auth  # no new bcrypt, the cache kept
        assert (await get(f"{url}/metrics", headers=basic("prometheus", PASSWORD)))[0] == 200
        assert auth.verifications == 1
        path.write_text(users_block(bcrypt.hashpw(b"rotated", bcrypt.gensalt(4)).decode()))
        assert security.reload() is None
        assert security.auth is not auth


async def test_reload_picks_up_a_rotated_certificate(tmp_path, pki):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    text = f"tls_server_config:\n  cert_file: {cert.name}\n  key_file: {key.name}\n"
    security = security_from(tmp_path, text)

    async def served_certificate(url: str) -> bytes:
        _, ssl_object = await tls_get(url, "/-/healthy", client_context(pki))
        return ssl_object.getpeercert(binary_form=True)

    def der(path: Path) -> bytes:
        return ssl.PEM_cert_to_DER_cert(path.read_text())

    async with serving(security) as url:
        assert await served_certificate(url) == der(pki.server.cert)
        cert.write_bytes(pki.other_server.cert.read_bytes())
        key.write_bytes(pki.other_server.key.read_bytes())
        assert security.reload() is None
        assert await served_certificate(url) == der(pki.other_server.cert)

        (tmp_path / "web.yml").write_text(text + "  min_version: TLS13\n")
        assert "restart" in (security.reload() or "")
        (tmp_path / "web.yml").write_text("")
        assert "restart" in (security.reload() or "")
        assert await served_certificate(url) == der(pki.other_server.cert)


def test_web_config_files_resolve_relative_to_the_file(tmp_path, pki):
    (tmp_path / "certs").mkdir()
    for name in ("server.crt", "server.key"):
        (tmp_path / "certs" / name).write_bytes((pki.directory / name).read_bytes())
    path = tmp_path / "web.yml"
    path.write_text("tls_server_config:\n  cert_file: certs/server.crt\n"
                    "  key_file: certs/server.key\n")  # fmt: skip
    config, context = load_web_config(str(path))
    assert config.tls is not None and config.tls.cert_file == str(tmp_path / "certs/server.crt")
    assert context is not None


def test_an_empty_file_means_no_tls_and_no_auth(tmp_path):
    security = security_from(tmp_path, "")
    assert security.ssl_context is None and security.auth is None


def test_problems_never_echo_a_hash(tmp_path):
    secret_looking = "$2y$10$" + "x" * 52  # one character short
    with pytest.raises(ConfigError) as caught:
        security_from(tmp_path, f"basic_auth_users:\n  alice: '{secret_looking}'\n")
    assert "basic_auth_users.alice" in str(caught.value)
    assert "xxxxxxxx" not in str(caught.value)


# --- invalid web configs through the real CLI ---------------------------------------------

INVALID: dict[str, tuple[Callable[[Pki, Path, str], str], str]] = {
    "unknown top-level key": (
        lambda pki, d, h: f"basic_auth_user:\n  alice: {h}\n",
        "basic_auth_user: unknown key",
    ),
    "unknown tls key": (
        lambda pki, d, h: tls_block(pki, certfile="x.pem"),
        "tls_server_config.certfile: unknown key",
    ),
    "missing cert file": (
        lambda pki, d, h: f"tls_server_config:\n  cert_file: {d}/nope.crt\n"
        f"  key_file: {pki.server.key}\n",
        "tls_server_config.cert_file: cannot read",
    ),
    "key_file not given": (
        lambda pki, d, h: f"tls_server_config:\n  cert_file: {pki.server.cert}\n",
        "tls_server_config.key_file: missing",
    ),
    "unreadable key": (
        lambda pki, d, h: f"tls_server_config:\n  cert_file: {pki.server.cert}\n"
        f"  key_file: {d}\n",
        "tls_server_config.key_file: cannot read",
    ),
    "cert and key do not match": (
        lambda pki, d, h: f"tls_server_config:\n  cert_file: {pki.server.cert}\n"
        f"  key_file: {pki.other_server.key}\n",
        "tls_server_config.key_file: the private key does not match cert_file",
    ),
    "key given as cert": (
        lambda pki, d, h: f"tls_server_config:\n  cert_file: {pki.server.key}\n"
        f"  key_file: {pki.server.key}\n",
        "tls_server_config.cert_file:",
    ),
    "bad min_version": (
        lambda pki, d, h: tls_block(pki, min_version="TLS14"),
        "tls_server_config.min_version: must be one of TLS10, TLS11, TLS12, TLS13",
    ),
    "min above max": (
        lambda pki, d, h: tls_block(pki, min_version="TLS13", max_version="TLS12"),
        "tls_server_config.min_version: TLS13 is above max_version TLS12",
    ),
    "unverified client certs": (
        lambda pki, d, h: tls_block(pki, client_auth_type="RequireAnyClientCert"),
        "tls_server_config.client_auth_type: RequireAnyClientCert",
    ),
    "client certs without a CA": (
        lambda pki, d, h: tls_block(pki, client_auth_type="RequireAndVerifyClientCert"),
        "tls_server_config.client_ca_file: missing",
    ),
    "cipher suites": (
        lambda pki, d, h: tls_block(pki, cipher_suites="[TLS_AES_128_GCM_SHA256]"),
        "tls_server_config.cipher_suites: not supported",
    ),
    "bad hash": (
        lambda pki, d, h: "basic_auth_users:\n  alice: secret\n",
        "basic_auth_users.alice: not a bcrypt hash",
    ),
    "hash with a bad salt": (
        lambda pki, d, h: f"basic_auth_users:\n  alice: {h[:7]}{'z' * 53}\n",
        "basic_auth_users.alice: not a bcrypt hash (its salt does not decode)",
    ),
    "empty users map": (
        lambda pki, d, h: "basic_auth_users: {}\n",
        "basic_auth_users: must map at least one user",
    ),
    "header that cannot be set": (
        lambda pki, d, h: "http_server_config:\n  headers:\n    Server: hidden\n",
        "http_server_config.headers.Server: cannot be configured",
    ),
    "not YAML": (lambda pki, d, h: "basic_auth_users: [\n", "web.yml:2:1:"),
}


@pytest.fixture(scope="module")
def invalid_runs(
    pki: Pki, password_hash: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[Path, subprocess.CompletedProcess[str]]]]:
    """Every invalid file through ``python -m exporter`` at start, run side by side."""
    root = tmp_path_factory.mktemp("invalid")
    config = valid_config(root)
    env = {**os.environ, "APPLIVERY_API_TOKEN": TOKEN}
    started = {}
    for index, (case, (make, _)) in enumerate(INVALID.items()):
        directory = root / f"case{index}"
        directory.mkdir()
        web_file = directory / "web.yml"
        web_file.write_text(make(pki, directory, password_hash))
        command = [sys.executable, "-m", "exporter", "--config.file", str(config),
                   "--web.config.file", str(web_file)]  # fmt: skip
        started[case] = (web_file, subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ))  # fmt: skip
    results = {}
    for case, (web_file, proc) in started.items():
        stdout, stderr = proc.communicate(timeout=60)
        results[case] = (web_file, subprocess.CompletedProcess(proc.args, proc.returncode,
                                                               stdout, stderr))  # fmt: skip
    yield results


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_web_config_exits_2_naming_the_key(case, invalid_runs):
    web_file, result = invalid_runs[case]
    assert result.returncode == 2, result.stderr
    assert INVALID[case][1] in result.stderr
    assert str(web_file) in result.stderr
    assert "Traceback" not in result.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "APPLIVERY_API_TOKEN": TOKEN},
    )  # fmt: skip


def test_config_check_validates_the_web_config_too(tmp_path, pki, password_hash):
    config = valid_config(tmp_path)
    web_file = tmp_path / "web.yml"
    web_file.write_text(tls_block(pki) + users_block(password_hash))
    ok = run_cli("--config.file", str(config), "--web.config.file", str(web_file),
                 "--config.check")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "web config is valid" in ok.stdout

    web_file.write_text(tls_block(pki, min_version="SSL3") + "basic_auth_users: {}\n")
    config.write_text(config.read_text() + "bogus: 1\n")
    bad = run_cli("--config.file", str(config), "--web.config.file", str(web_file),
                  "--config.check")  # fmt: skip
    assert bad.returncode == 2
    lines = bad.stderr.splitlines()
    assert any(line.startswith("bogus") for line in lines)  # the main config's problems too
    assert any("tls_server_config.min_version" in line for line in lines)
    assert any("basic_auth_users:" in line for line in lines)
    assert "Traceback" not in bad.stderr


# --- end to end: the real CLI with TLS and basic auth against the simulator ---------------


def https_fetch(
    url: str, pki: Pki, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5, context=client_context(pki)) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_cli_serves_https_with_basic_auth_against_the_simulator(tmp_path, pki, password_hash):
    sim_port, port = free_port(), free_port()
    with process("-m", "exporter.simulator", "--port", str(sim_port), "--token", TOKEN,
                 "--devices", "3", "--speed", "60") as simulator:  # fmt: skip
        base_url = f"http://127.0.0.1:{sim_port}/v1"
        wait_for(
            lambda: http_status(f"{base_url}/organizations/demo/mdm/windows/enterprise/devices")
            == 401,
            what="simulator",
        )
        config = valid_config(tmp_path, base_url)
        web_file = tmp_path / "web.yml"
        web_file.write_text(tls_block(pki) + users_block(password_hash))
        with process("-m", "exporter", "--config.file", str(config), "--web.config.file",
                     str(web_file), "--web.listen-address", f"127.0.0.1:{port}",
                     "--log.format", "json",
                     env={"APPLIVERY_API_TOKEN": TOKEN}) as exporter:  # fmt: skip
            url = f"https://127.0.0.1:{port}"
            auth = basic("prometheus", PASSWORD)
            wait_for(lambda: https_fetch(f"{url}/-/ready", pki, auth)[0] == 200, what="ready")

            status, body = https_fetch(f"{url}/metrics", pki, auth)
            assert status == 200
            assert b"applivery_windows_command_actions{" in body
            assert b'applivery_exporter_target_up{organization="' in body
            assert https_fetch(f"{url}/metrics", pki)[0] == 401
            assert https_fetch(f"{url}/metrics", pki, basic("prometheus", "nope"))[0] == 401
            with pytest.raises((urllib.error.URLError, ConnectionError)):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)

            # SIGHUP re-reads the web config: a new password works, the old one stops.
            new_hash = bcrypt.hashpw(b"rotated", bcrypt.gensalt(rounds=4)).decode()
            web_file.write_text(tls_block(pki) + users_block(new_hash))
            os.kill(exporter.pid, signal.SIGHUP)
            rotated = basic("prometheus", "rotated")
            wait_for(lambda: https_fetch(f"{url}/-/healthy", pki, rotated)[0] == 200,
                     what="new password accepted")  # fmt: skip
            assert https_fetch(f"{url}/-/healthy", pki, auth)[0] == 401

            exporter.send_signal(signal.SIGTERM)
            assert exporter.wait(timeout=10) == 0
            logs = exporter.stderr.read()
            assert TOKEN not in logs and PASSWORD not in logs
            assert password_hash not in logs and new_hash not in logs
        simulator.send_signal(signal.SIGTERM)
        simulator.wait(timeout=10)

