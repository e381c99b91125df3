"""``--web.config.file``: TLS, basic auth, response headers and a rate limit for the HTTP side.

The file has the format of Prometheus exporter-toolkit's web config, so one file serves every
exporter on a host. What this implementation does differently, and why:

- Validation is complete and happens at start (and in ``--config.check``): every problem is
  reported with its key path, files are read, the certificate is loaded against its key, every
  bcrypt hash is checked for shape and salt. Unknown keys are errors.
- Settings that Python's TLS stack cannot honour faithfully are errors, never ignored:
  ``RequestClientCert`` and ``RequireAnyClientCert`` (a client certificate accepted without
  verification), ``cipher_suites`` and ``curve_preferences`` (Go names), and inline ``cert``,
  ``key`` and ``client_ca``. ``http_server_config.http2`` is accepted and ignored (aiohttp
  speaks HTTP/1.1).
- The file is re-read on SIGHUP and ``POST /-/reload`` rather than on every request: users,
  headers, rate limit and allowed SANs change at once, the certificate and key files are
  re-loaded (rotation); any other change to ``tls_server_config`` needs a restart.
- Basic auth protects every route, ``/-/healthy`` included, as in exporter-toolkit.

Nothing here logs a password, a hash, or the Authorization header.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import bcrypt
from aiohttp import web

from exporter.config import ConfigError, load_document, parse_duration

TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
CLIENT_AUTH: Mapping[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go accepts these; Python's ssl cannot take a client certificate without verifying it.
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
# exporter-toolkit's allowed response headers; None = any value.
HEADERS: Mapping[str, tuple[str, tuple[str, ...] | None]] = {
    "content-security-policy": ("Content-Security-Policy", None),
    "x-frame-options": ("X-Frame-Options", ("deny", "sameorigin")),
    "x-content-type-options": ("X-Content-Type-Options", ("nosniff",)),
    "x-xss-protection": ("X-XSS-Protection", None),
    "strict-transport-security": ("Strict-Transport-Security", None),
}
UNSUPPORTED_TLS_KEYS: Mapping[str, str] = {
    "cert": "inline certificates are not supported: use cert_file",
    "key": "inline keys are not supported: use key_file",
    "client_ca": "inline CA certificates are not supported: use client_ca_file",
    "cipher_suites": "not supported (Go cipher suite names); the defaults of Python's TLS apply",
    "curve_preferences": "not supported (Go curve names); the defaults of Python's TLS apply",
}
BCRYPT_HASH = re.compile(r"\$2[abxy]\$(\d\d)\$([./A-Za-z0-9]{22})([./A-Za-z0-9]{31})")
MAX_FILE_BYTES = 1 << 20
AUTH_CACHE_SIZE = 1024
BCRYPT_PARALLEL = 2  # verifications of uncached credentials running at once


# --- the configuration --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    client_allowed_sans: tuple[str, ...] = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    prefer_server_cipher_suites: bool = True


@dataclass(frozen=True, slots=True)
class RateLimit:
    interval_seconds: float  # one request per interval on average
    burst: int


@dataclass(frozen=True, slots=True)
class WebConfig:
    tls: TlsConfig | None = None
    users: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)  # user -> bcrypt hash
    headers: tuple[tuple[str, str], ...] = ()
    rate_limit: RateLimit | None = None


def load_web_config(path: str) -> tuple[WebConfig, ssl.SSLContext | None]:
    """Read, validate and load a web config: the config and its server TLS context.

    Raises :class:`ConfigError` with one ``PATH: key.path: problem`` line per problem.
    """
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    config = parse_web_config(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))
    context = None
    if config.tls is not None:
        try:
            context = server_context(config.tls)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {problem}" for problem in exc.problems) from None
    return config, context


def parse_web_config(
    text: str | bytes, *, source: str = "<web config>", base_dir: str | None = None
) -> WebConfig:
    """Validate the document's structure (files are not read here)."""
    document = load_document(text, source)
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: top level must be a mapping of keys")
    problems: list[str] = []
    config = _web_config(document, problems, base_dir)
    if problems:
        raise ConfigError(f"{source}: {problem}" for problem in problems)
    return config


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server TLS context; reads the files. Raises :class:`ConfigError` on any problem."""
    problems = [
        problem
        for key, path, marker in (
            ("cert_file", tls.cert_file, "-----BEGIN CERTIFICATE-----"),
            ("key_file", tls.key_file, "PRIVATE KEY-----"),
            ("client_ca_file", tls.client_ca_file, "-----BEGIN CERTIFICATE-----"),
        )
        if path is not None
        for problem in _pem_problems(f"tls_server_config.{key}", path, marker)
    ]
    if problems:
        raise ConfigError(problems)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.maximum_version = TLS_VERSIONS[tls.max_version]
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    _load_chain(context, tls)
    context.verify_mode = CLIENT_AUTH[tls.client_auth_type]
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"tls_server_config.client_ca_file: cannot load CA certificates: {_reason(exc)}"
            ) from None
    return context


def _load_chain(context: ssl.SSLContext, tls: TlsConfig) -> None:
    def no_password() -> bytes:
        # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
        raise ConfigError("tls_server_config.key_file: encrypted keys are not supported")

    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                "tls_server_config.key_file: the private key does not match cert_file"
            ) from None
        raise ConfigError(
            f"tls_server_config: cannot load cert_file and key_file: {_reason(exc)}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"tls_server_config: cannot read: {exc.strerror or exc}") from None


def _reason(exc: ssl.SSLError) -> str:
    return (exc.reason or str(exc)).lower().replace("_", " ")


def _pem_problems(key: str, path: str, marker: str) -> list[str]:
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES)
    except OSError as exc:
        return [f"{key}: cannot read {path}: {exc.strerror or exc}"]
    if marker.encode() not in data:
        return [f"{key}: {path} holds no PEM {marker.strip('-').removeprefix('BEGIN ').lower()}"]
    if b"ENCRYPTED" in data and "KEY" in marker:
        return [f"{key}: {path}: encrypted keys are not supported"]
    return []


# --- validation ---------------------------------------------------------------------------


def _web_config(document: dict[Any, Any], problems: list[str], base_dir: str | None) -> WebConfig:
    _unknown(document, ("tls_server_config", "http_server_config", "basic_auth_users",
                        "rate_limit"), "", problems)  # fmt: skip
    tls = _tls(document.get("tls_server_config"), problems, base_dir)
    users = _users(document, problems)
    headers = _http(document.get("http_server_config"), problems)
    rate_limit = _rate_limit(document.get("rate_limit"), problems)
    return WebConfig(tls=tls, users=users, headers=headers, rate_limit=rate_limit)


def _unknown(section: dict[Any, Any], known: tuple[str, ...], path: str, out: list[str]) -> None:
    for key in section:
        if key not in known:
            out.append(f"{path}{key}: unknown key (known: {', '.join(known)})")


def _mapping(value: object, path: str, problems: list[str]) -> dict[Any, Any] | None:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{path}: must be a mapping")
        return None
    return value


def _text(section: dict[Any, Any], key: str, path: str, problems: list[str]) -> str | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{path}.{key}: must be a non-empty string")
        return None
    return value.strip()


def _file(
    section: dict[Any, Any], key: str, path: str, problems: list[str], base_dir: str | None
) -> str | None:
    name = _text(section, key, path, problems)
    if name is None or base_dir is None:
        return name
    return os.path.join(base_dir, name)


def _choice(
    section: dict[Any, Any],
    key: str,
    path: str,
    problems: list[str],
    choices: Mapping[str, Any],
    default: str,
) -> str:
    value = section.get(key, default)
    if value not in choices:
        problems.append(f"{path}.{key}: must be one of {', '.join(choices)}, got {value!r}")
        return default
    return value


def _tls(value: object, problems: list[str], base_dir: str | None) -> TlsConfig | None:
    path = "tls_server_config"
    section = _mapping(value, path, problems)
    if not section:  # absent, null or {}: plain HTTP, as in exporter-toolkit
        return None
    for key, why in UNSUPPORTED_TLS_KEYS.items():
        if key in section:
            problems.append(f"{path}.{key}: {why}")
    known = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "client_allowed_sans",
             "min_version", "max_version", "prefer_server_cipher_suites")  # fmt: skip
    _unknown({k: v for k, v in section.items() if k not in UNSUPPORTED_TLS_KEYS}, known,
             f"{path}.", problems)  # fmt: skip
    cert_file = _file(section, "cert_file", path, problems, base_dir)
    key_file = _file(section, "key_file", path, problems, base_dir)
    for key, given in (("cert_file", cert_file), ("key_file", key_file)):
        if given is None and key not in section:
            problems.append(f"{path}.{key}: missing (TLS needs both cert_file and key_file)")
    client_auth = _client_auth(section, path, problems)
    client_ca = _file(section, "client_ca_file", path, problems, base_dir)
    if client_ca is not None and client_auth == "NoClientCert":
        problems.append(f"{path}.client_ca_file: set, but client_auth_type is NoClientCert")
    if client_ca is None and client_auth != "NoClientCert":
        problems.append(f"{path}.client_ca_file: missing (client_auth_type {client_auth} "
                        "verifies client certificates against it)")  # fmt: skip
    sans = _sans(section, path, problems, client_auth)
    low = _choice(section, "min_version", path, problems, TLS_VERSIONS, "TLS12")
    high = _choice(section, "max_version", path, problems, TLS_VERSIONS, "TLS13")
    if TLS_VERSIONS[low] > TLS_VERSIONS[high]:
        problems.append(f"{path}.min_version: {low} is above max_version {high}")
    prefer = section.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        problems.append(f"{path}.prefer_server_cipher_suites: must be true or false")
    if cert_file is None or key_file is None:
        return None
    return TlsConfig(cert_file, key_file, client_auth, client_ca, sans, low, high, prefer is True)


def _client_auth(section: dict[Any, Any], path: str, problems: list[str]) -> str:
    value = section.get("client_auth_type", "NoClientCert")
    if value in UNVERIFIED_CLIENT_AUTH:
        problems.append(
            f"{path}.client_auth_type: {value} accepts unverified client certificates, which "
            "this exporter does not support; use RequireAndVerifyClientCert"
        )
        return "NoClientCert"
    return _choice(section, "client_auth_type", path, problems, CLIENT_AUTH, "NoClientCert")


def _sans(
    section: dict[Any, Any], path: str, problems: list[str], client_auth: str
) -> tuple[str, ...]:
    value = section.get("client_allowed_sans")
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(san, str) and san for san in value)
    ):
        problems.append(f"{path}.client_allowed_sans: must be a non-empty list of strings")
        return ()
    if client_auth != "RequireAndVerifyClientCert":
        problems.append(f"{path}.client_allowed_sans: needs client_auth_type "
                        "RequireAndVerifyClientCert")  # fmt: skip
    return tuple(value)


def _users(document: dict[Any, Any], problems: list[str]) -> tuple[tuple[str, bytes], ...]:
    path = "basic_auth_users"
    if path not in document:
        return ()
    section = document[path]
    if not isinstance(section, dict) or not section:
        # An empty map would mean "no auth" in exporter-toolkit: too easy to get by accident.
        problems.append(f"{path}: must map at least one user to a bcrypt hash "
                        "(remove the key to serve without basic auth)")  # fmt: skip
        return ()
    users = []
    for key, hashed in section.items():
        user = getattr(key, "text", str(key))
        where = f"{path}[{user!r}]" if not re.fullmatch(r"[\w.\-@]+", user) else f"{path}.{user}"
        if not user or ":" in user:
            problems.append(f"{where}: a user name must be non-empty and contain no ':'")
            continue
        problem = _hash_problem(hashed)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        users.append((user, hashed.encode()))
    return tuple(users)


def _hash_problem(hashed: object) -> str | None:
    """Why a value is not a usable bcrypt hash (never echoing it), or None."""
    shape = BCRYPT_HASH.fullmatch(hashed) if isinstance(hashed, str) else None
    if shape is None:
        return "not a bcrypt hash (expected $2y$, $2b$ or $2a$, a cost, and 53 characters)"
    cost = int(shape.group(1))
    if not 4 <= cost <= 31:
        return f"bcrypt cost must be between 04 and 31, got {shape.group(1)}"
    try:
        # Cost 4 on the same salt checks it for a few microseconds, not 2**cost rounds.
        bcrypt.hashpw(b"", b"$2b$04$" + shape.group(2).encode())
    except ValueError:
        return "not a bcrypt hash (its salt does not decode)"
    return None


def _http(value: object, problems: list[str]) -> tuple[tuple[str, str], ...]:
    path = "http_server_config"
    section = _mapping(value, path, problems)
    if not section:
        return ()
    _unknown(section, ("http2", "headers"), f"{path}.", problems)
    if not isinstance(section.get("http2", True), bool):
        problems.append(f"{path}.http2: must be true or false")
    headers = _mapping(section.get("headers"), f"{path}.headers", problems) or {}
    result = []
    for name, header_value in headers.items():
        where = f"{path}.headers.{name}"
        known = HEADERS.get(str(name).lower())
        if known is None:
            problems.append(f"{where}: cannot be configured (allowed: "
                            f"{', '.join(h for h, _ in HEADERS.values())})")  # fmt: skip
            continue
        if header_value in (None, ""):
            continue  # blank = unset, as in exporter-toolkit
        canonical, allowed = known
        if not isinstance(header_value, str) or "\n" in header_value or "\r" in header_value:
            problems.append(f"{where}: must be a one-line string")
        elif allowed is not None and header_value.lower() not in allowed:
            problems.append(f"{where}: must be one of {', '.join(allowed)}")
        else:
            result.append((canonical, header_value))
    return tuple(result)


def _rate_limit(value: object, problems: list[str]) -> RateLimit | None:
    path = "rate_limit"
    section = _mapping(value, path, problems)
    if not section:
        return None
    _unknown(section, ("interval", "burst"), f"{path}.", problems)
    try:
        interval = parse_duration(section.get("interval", 0))
    except ValueError as exc:
        problems.append(f"{path}.interval: {exc}")
        return None
    burst = section.get("burst", 1)
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
        problems.append(f"{path}.burst: must be a whole number of at least 1")
        return None
    if interval < 0:
        problems.append(f"{path}.interval: must not be negative")
        return None
    return RateLimit(interval, burst) if interval > 0 else None  # 0 disables, as in the toolkit


# --- basic auth ---------------------------------------------------------------------------


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an ``Authorization: Basic`` header, or None."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # a password over bcrypt's 72 bytes
        return False


class BasicAuth:
    """bcrypt-checked credentials with a bounded cache of successful verifications.

    A verification costs 2**cost rounds (tens to hundreds of ms) by design; a scraper that
    sends the same credentials every 15 s pays that once. The cache holds HMACs under a
    per-process random key, never passwords. Unknown users are checked against a dummy hash
    of the same cost, so timing does not tell which user names exist.
    """

    def __init__(self, users: Mapping[str, bytes], *, cache_size: int = AUTH_CACHE_SIZE) -> None:
        self._users = dict(users)
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._cache_size = cache_size
        self._key = os.urandom(32)
        cost = max((int(h[4:6]) for h in self._users.values()), default=10)
        self._dummy = b"$2b$%02d$" % cost + b"." * 53
        self._slots = asyncio.Semaphore(BCRYPT_PARALLEL)
        self.verifications = 0  # bcrypt runs, for tests and debugging

    def _cache_key(self, user: str, password: str) -> bytes:
        # A user name has no ':', so the pair is unambiguous.
        message = f"{user}:{password}".encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    async def check(self, header: str | None) -> bool:
        credentials = parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        key = self._cache_key(user, password)
        if key in self._cache:
            self._cache.move_to_end(key)
            return True
        hashed = self._users.get(user)
        async with self._slots:  # a flood of wrong guesses cannot take every core
            self.verifications += 1
            ok = await asyncio.get_running_loop().run_in_executor(
                None, _checkpw, password.encode(), hashed or self._dummy
            )
        if not (ok and hashed is not None):
            return False
        self._cache[key] = None
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return True


class TokenBucket:
    """exporter-toolkit's ``rate_limit``: one request per interval, bursts up to ``burst``."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = limit.interval_seconds
        self._burst = float(limit.burst)
        self._tokens = float(limit.burst)
        self._clock = clock
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) / self._interval)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


# --- the guard the server installs --------------------------------------------------------


def _allowed_san(peercert: object, allowed: tuple[str, ...]) -> bool:
    if not isinstance(peercert, dict):
        return False
    return any(value in allowed for _, value in peercert.get("subjectAltName", ()))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebSecurity:
    """The web config in force; the server's middleware consults it on every request."""

    def __init__(self, path: str, config: WebConfig, context: ssl.SSLContext | None) -> None:
        self.path = path
        self.ssl_context = context
        self._apply(config)

    @classmethod
    def load(cls, path: str) -> WebSecurity:
        config, context = load_web_config(path)
        return cls(path, config, context)

    def _apply(self, config: WebConfig) -> None:
        self.config = config
        self.auth = BasicAuth(dict(config.users)) if config.users else None
        self.limiter = TokenBucket(config.rate_limit) if config.rate_limit else None

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def reload(self) -> str | None:
        """Re-read the file; None on success, else why the running web config was kept."""
        try:
            config, fresh = load_web_config(self.path)
        except ConfigError as exc:
            return str(exc)
        if (config.tls is None) != (self.config.tls is None):
            return f"{self.path}: turning TLS on or off needs a restart"
        if config.tls != self.config.tls:
            return f"{self.path}: tls_server_config changed; restart to apply it"
        if config.tls is not None and self.ssl_context is not None and fresh is not None:
            # Same settings: re-load the (possibly rotated) files into the listening context.
            _load_chain(self.ssl_context, config.tls)
            if config.tls.client_ca_file is not None:
                self.ssl_context.load_verify_locations(cafile=config.tls.client_ca_file)
        self._apply(config)
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.limiter is not None and not self.limiter.take():
            return web.Response(status=429, text="Too many requests.\n")
        tls = self.config.tls
        if (
            tls is not None
            and tls.client_allowed_sans
            and not _allowed_san(request.get_extra_info("peercert"), tls.client_allowed_sans)
        ):
            return web.Response(status=403, text="Client certificate not allowed.\n")
        if self.auth is not None and not await self.auth.check(
            request.headers.get("Authorization")
        ):
            return web.Response(
                status=401,
                text="Unauthorized.\n",
                headers={"WWW-Authenticate": 'Basic realm="applivery-mdm-exporter"'},
            )
        return await handler(request)

    async def add_headers(self, _: web.Request, response: web.StreamResponse) -> None:
        for name, value in self.config.headers:
            response.headers[name] = value


def install(app: web.Application, security: WebSecurity) -> None:
    app.middlewares.append(security.middleware)
    app.on_response_prepare.append(security.add_headers)
