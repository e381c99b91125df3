"""``--web.config.file``: TLS, basic auth, response headers and a rate limit for the HTTP side.

The file has the format of Prometheus exporter-toolkit's web config, so one file serves every
exporter on a host. What this implementation does differently, and why:

- Validation is complete and happens at start (and in ``--config.check``): every problem is
  reported with its key path, files are read, the certificate is loaded against its key, every
  bcrypt hash is checked for shape and salt. Unknown keys are errors. The file is declared as
  frozen pydantic dataclasses and its problems worded as the config's are
  (``configvalues.py``, ``problems.py``).
- Settings that Python's TLS stack cannot honour faithfully are errors, never ignored:
  ``RequestClientCert`` and ``RequireAnyClientCert`` (a client certificate accepted without
  verification), ``cipher_suites`` and ``curve_preferences`` (Go names), and inline ``cert``,
  ``key`` and ``client_ca``. ``http_server_config.http2`` is accepted and ignored (aiohttp
  speaks HTTP/1.1).
- The file is re-read on SIGHUP and ``POST /-/reload`` rather than on every request: users,
  headers, rate limit and allowed SANs change at once, the certificate and key files are
  re-loaded (rotation); any other change to ``tls_server_config`` needs a restart.
- Basic auth protects every route, ``/-/healthy`` included, as in exporter-toolkit. Its
  checks (``basicauth.py``) are bounded in number: beyond the bound a request is answered
  503 with ``Retry-After`` at once rather than queued.

Nothing here logs a password, a hash, or the Authorization header.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, ClassVar, Literal

import bcrypt
from aiohttp import web
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from exporter.basicauth import BasicAuth, Verdict
from exporter.configvalues import Flag, Section, checked, choice, duration, integer, model
from exporter.problems import (
    ConfigError,
    IfMissing,
    Problems,
    invalid,
    problem_lines,
    shown,
    spelling,
)
from exporter.tokenbucket import TokenBucket
from exporter.yamlload import load_document, read_file

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


# --- values of this file ------------------------------------------------------------------


def _file_path(value: object, info: ValidationInfo) -> str:
    """A file name; a relative one joins the web config file's directory."""
    if not isinstance(value, str) or not value.strip():
        raise invalid("must be a non-empty string")
    base_dir = (info.context or {}).get("base_dir")
    return value.strip() if base_dir is None else os.path.join(base_dir, value.strip())


def _client_auth(value: object) -> str:
    if value in UNVERIFIED_CLIENT_AUTH:
        raise invalid(
            f"{value} accepts unverified client certificates, which this exporter does not "
            "support; use RequireAndVerifyClientCert"
        )
    return _CLIENT_AUTH.func(value)


def _sans(value: object) -> tuple[str, ...]:
    if value is None or isinstance(value, tuple):
        return value or ()
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s for s in value):
        raise invalid("must be a non-empty list of strings")
    return tuple(value)


def _users(value: object) -> tuple[tuple[str, bytes], ...]:
    if isinstance(value, tuple):  # from code
        return value
    if not isinstance(value, dict) or not value:
        # An empty map would mean "no auth" in exporter-toolkit: too easy to get by accident.
        raise invalid(
            "must map at least one user to a bcrypt hash (remove the key to serve without "
            "basic auth)"
        )
    problems = Problems()
    users: list[tuple[str, bytes]] = []
    for key, hashed in value.items():
        user = spelling(key)
        # A problem never carries the hash: it is not shown, nor kept in the error.
        problem = (
            "a user name must be non-empty and contain no ':'" if not user or ":" in user
            else _hash_problem(hashed)
        )  # fmt: skip
        if problem:
            problems.add((user,), problem)
        else:
            users.append((user, hashed.encode()))
    problems.raise_any()
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




def _header(name: str, value: object) -> str | None:
    """The canonical name of a header the file may set; raises on a value it may not take."""
    known = HEADERS.get(name.lower())
    if known is None:
        allowed = ", ".join(canonical for canonical, _ in HEADERS.values())
        raise invalid(f"cannot be configured (allowed: {allowed})")
    if value in (None, ""):
        return None  # blank = unset, as in exporter-toolkit
    canonical, allowed_values = known
    if not isinstance(value, str) or "\n" in value or "\r" in value:
        raise invalid("must be a one-line string")
    if allowed_values is not None and value.lower() not in allowed_values:
        raise invalid(f"must be one of {', '.join(allowed_values)}")
    return canonical


def _headers(value: object) -> tuple[tuple[str, str], ...]:
    if value is None or isinstance(value, tuple):
        return value or ()
    if not isinstance(value, dict):
        raise invalid(f"must be a mapping, got {shown(value)}")
    problems = Problems()
    headers: list[tuple[str, str]] = []
    for name, header_value in value.items():
        key = spelling(name)
        canonical = problems.read((key,), lambda v, key=key: _header(key, v), header_value)
        if canonical is not None:
            headers.append((canonical, header_value))
    problems.raise_any()
    return tuple(headers)


def _empty_is_none(value: object) -> object:
    """Absent, null or {}: the section is off (plain HTTP, no rate limit), as in the toolkit."""
    return None if value is None or value == {} else value


def _enabled(limit: RateLimit | None) -> RateLimit | None:
    return limit if limit is not None and limit.interval_seconds > 0 else None  # 0 disables


_CLIENT_AUTH = choice(tuple(CLIENT_AUTH))
FilePath = Annotated[str, checked(_file_path, str)]
TlsVersion = Annotated[str, choice(tuple(TLS_VERSIONS))]
_TLS_NEEDS_BOTH = IfMissing("missing (TLS needs both cert_file and key_file)")


# --- the configuration --------------------------------------------------------------------


@model(defer_build=True)
class TlsConfig:
    UNSUPPORTED_KEYS: ClassVar[Mapping[str, str]] = UNSUPPORTED_TLS_KEYS

    cert_file: Annotated[FilePath, _TLS_NEEDS_BOTH]
    key_file: Annotated[FilePath, _TLS_NEEDS_BOTH]
    client_auth_type: Annotated[str, checked(_client_auth, Literal[tuple(CLIENT_AUTH)])] = (
        "NoClientCert"
    )
    client_ca_file: FilePath | None = None
    client_allowed_sans: Annotated[tuple[str, ...], checked(_sans, list[str] | None)] = ()
    min_version: TlsVersion = "TLS12"
    max_version: TlsVersion = "TLS13"
    prefer_server_cipher_suites: Flag = True

    @model_validator(mode="after")
    def _consistent(self) -> TlsConfig:
        problems = Problems()
        auth = self.client_auth_type
        if self.client_ca_file is not None and auth == "NoClientCert":
            problems.add(("client_ca_file",), "set, but client_auth_type is NoClientCert")
        if self.client_ca_file is None and auth != "NoClientCert":
            why = f"client_auth_type {auth} verifies client certificates against it"
            problems.add(("client_ca_file",), f"missing ({why})")
        if self.client_allowed_sans and auth != "RequireAndVerifyClientCert":
            why = "needs client_auth_type RequireAndVerifyClientCert"
            problems.add(("client_allowed_sans",), why)
        if TLS_VERSIONS[self.min_version] > TLS_VERSIONS[self.max_version]:
            why = f"{self.min_version} is above max_version {self.max_version}"
            problems.add(("min_version",), why)
        problems.raise_any()
        return self


@model(defer_build=True)
class HttpConfig:
    http2: Flag = True
    """Accepted and ignored: aiohttp speaks HTTP/1.1."""
    headers: Annotated[tuple[tuple[str, str], ...], checked(_headers, dict[str, str] | None)] = ()


@model(defer_build=True)
class RateLimit:
    interval_seconds: Annotated[float, duration(zero=True)] = Field(0.0, alias="interval")
    """One request per interval on average; 0 turns the limit off."""
    burst: Annotated[int, integer(1)] = 1


@model(defer_build=True)
class WebConfig:
    tls: Annotated[TlsConfig | None, BeforeValidator(_empty_is_none)] = Field(
        None, alias="tls_server_config"
    )
    users: Annotated[tuple[tuple[str, bytes], ...], checked(_users, dict[str, str])] = Field(
        (), alias="basic_auth_users", repr=False
    )  # user -> bcrypt hash
    http: Section[HttpConfig] = Field(default_factory=HttpConfig, alias="http_server_config")
    rate_limit: Annotated[
        RateLimit | None, BeforeValidator(_empty_is_none), AfterValidator(_enabled)
    ] = None

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return self.http.headers


@functools.cache
def _web_config_file() -> TypeAdapter[WebConfig]:
    # Built on first use: most runs have no web config, and building costs ~0.1 s at start.
    return TypeAdapter(WebConfig)


# --- entry points -------------------------------------------------------------------------


def load_web_config(path: str) -> tuple[WebConfig, ssl.SSLContext | None]:
    """Read, validate and load a web config: the config and its server TLS context.

    Raises :class:`ConfigError` with one ``PATH: key.path: problem`` line per problem.
    """
    data = read_file(path, MAX_FILE_BYTES)
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
    try:
        return _web_config_file().validate_python(document, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(problem_lines(exc, WebConfig, prefix=f"{source}: ")) from None


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



def rate_limiter(limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> TokenBucket:
    """exporter-toolkit's ``rate_limit`` as the project's bucket: one request per interval on
    average, bursts up to ``burst``; ``try_acquire()`` answers each request at once."""
    return TokenBucket.per_interval(limit.interval_seconds, burst=limit.burst, monotonic=clock)


# --- the guard the server installs --------------------------------------------------------


def _allowed_san(peercert: object, allowed: tuple[str, ...]) -> bool:
    if not isinstance(peercert, dict):
        return False
    return any(value in allowed for _, value in peercert.get("subjectAltName", ()))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _basic_auth(config: WebConfig) -> BasicAuth | None:
    return BasicAuth(dict(config.users)) if config.users else None


def _limiter(config: WebConfig) -> TokenBucket | None:
    return rate_limiter(config.rate_limit) if config.rate_limit else None


class WebSecurity:
    """The web config in force; the server's middleware consults it on every request."""

    def __init__(self, path: str, config: WebConfig, context: ssl.SSLContext | None) -> None:
        self.path = path
        self.ssl_context = context
        self.config = config
        self.auth = _basic_auth(config)
        self.limiter = _limiter(config)

    @classmethod
    def load(cls, path: str) -> WebSecurity:
        config, context = load_web_config(path)
        return cls(path, config, context)

    def _apply(self, config: WebConfig) -> None:
        # Kept when a reload leaves them as they were: the users' verified credentials stay
        # cached and no bcrypt runs on the loop; the limiter keeps what it has counted.
        if config.users != self.config.users:
            self.auth = _basic_auth(config)
        if config.rate_limit != self.config.rate_limit:
            self.limiter = _limiter(config)
        self.config = config

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def reload(self) -> str | None:
        """Re-read the file; None on success, else why the running web config was kept."""
        try:
            self.apply(self.prepare())
        except ConfigError as exc:
            return str(exc)
        return None

    def prepare(self) -> WebConfig:
        """The file as it is now, validated and loaded, nothing applied yet (a reload checks
        every file before it changes anything). Raises :class:`ConfigError`."""
        config, _ = load_web_config(self.path)
        if (config.tls is None) != (self.config.tls is None):
            raise ConfigError(f"{self.path}: turning TLS on or off needs a restart")
        if config.tls != self.config.tls:
            raise ConfigError(f"{self.path}: tls_server_config changed; restart to apply it")
        return config

    def apply(self, config: WebConfig) -> None:
        """Put a prepared config in force; only a file changed since ``prepare()`` raises."""
        if config.tls is not None and self.ssl_context is not None:
            # Same settings: re-load the (possibly rotated) files into the listening context.
            _load_chain(self.ssl_context, config.tls)
            if config.tls.client_ca_file is not None:
                try:
                    self.ssl_context.load_verify_locations(cafile=config.tls.client_ca_file)
                except (ssl.SSLError, OSError) as exc:
                    raise ConfigError(f"{self.path}: client_ca_file: {exc}") from None
        self._apply(config)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.limiter is not None and not self.limiter.try_acquire():
            return web.Response(status=429, text="Too many requests.\n")
        tls = self.config.tls
        if (
            tls is not None
            and tls.client_allowed_sans
            and not _allowed_san(request.get_extra_info("peercert"), tls.client_allowed_sans)
        ):
            return web.Response(status=403, text="Client certificate not allowed.\n")
        verdict = (
            Verdict.ALLOWED if self.auth is None
            else await self.auth.verdict(request.headers.get("Authorization"))
        )  # fmt: skip
        if verdict is Verdict.BUSY:
            # Every bcrypt slot is taken (a flood of guesses, most likely): no queue to wait in.
            return web.Response(
                status=503, text="Busy checking credentials.\n", headers={"Retry-After": "1"}
            )
        if verdict is Verdict.DENIED:
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
