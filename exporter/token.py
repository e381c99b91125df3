"""The API token: read from a file on every request (a rotated file takes effect without a
restart) and only ever placed in the ``Authorization`` header. Error messages, log events,
reprs and metrics never carry it.

A token file is decoded one way, by :func:`decode_token`, at check time (``--config.check``,
start, reload) and on every re-read: UTF-8 with a BOM stripped, one word of characters an
HTTP header can carry. Anything else is a :class:`TokenInvalid` whose reason says what is
wrong, never what the file holds. Whether upstream takes the token is logged once per change
(:class:`Bearer`): a persistent 401 is one error line when it begins and one when it ends.
"""

from __future__ import annotations

import contextlib
import os

import structlog

from exporter.apierrors import AuthError, TokenInvalid, TokenUnavailable

log = structlog.get_logger()

MAX_TOKEN_BYTES = 64 * 1024  # a token file larger than this is not a token

# Visible ASCII: what an Authorization header value can carry without encoding (RFC 9110
# field-vchar less obs-text); a BOM, a second line or a control character is none of it.
_HEADER_CHARS = frozenset(map(chr, range(0x21, 0x7F)))


def decode_token(data: bytes) -> str:
    """The token a token file's bytes hold (a BOM and surrounding whitespace stripped).

    Raises :class:`TokenUnavailable` for an empty file and :class:`TokenInvalid` for one
    that cannot be sent; reasons never quote the bytes."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise TokenInvalid("token", "not a UTF-8 text file") from None
    token = text.strip()
    if not token:
        raise TokenUnavailable("token", "file is empty")
    return check_token(token)


def check_token(token: str) -> str:
    """``token`` when an HTTP header can carry it; else :class:`TokenInvalid`."""
    if any(c.isspace() for c in token):
        raise TokenInvalid("token", "the token must be one word on one line")
    if not _HEADER_CHARS.issuperset(token):
        raise TokenInvalid("token", "the token holds a character an HTTP header cannot carry")
    return token


class TokenSource:
    """The API token, from a file (re-read when it changes) or a fixed value."""

    __slots__ = ("_cached", "_path", "_stamp", "_value")

    def __init__(self, *, path: str | None = None, value: str | None = None) -> None:
        if path is None and value is None:
            raise ValueError("a token source needs a path or a value")
        self._path = path
        self._value = value
        self._stamp: tuple[int, int, int] | None = None
        self._cached = ""

    def __repr__(self) -> str:
        return f"TokenSource(path={self._path!r})" if self._path else "TokenSource(value=<hidden>)"

    def get(self) -> str:
        if self._path is None:
            token = (self._value or "").strip()
            if not token:
                raise TokenUnavailable("token", "token is empty")
            return check_token(token)
        try:
            stat = os.stat(self._path)
        except OSError as exc:
            raise TokenUnavailable("token", f"token file unreadable ({exc.strerror})") from None
        # The inode catches an atomic swap (how Kubernetes rotates mounted secrets).
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp != self._stamp:
            self._cached = self._read()
            self._stamp = stamp
        return self._cached

    def invalidate(self) -> None:
        """Re-read the file on the next ``get`` even if it looks unchanged (after a 401)."""
        self._stamp = None

    def _read(self) -> str:
        assert self._path is not None
        try:
            return read_token_file(self._path)
        except TokenUnavailable as exc:
            raise type(exc)("token", f"token file: {exc.reason}") from None


class TokenFileUnreadable(TokenUnavailable):
    """The token file cannot be opened or read; ``reason`` is the system's (no path)."""


def read_token_file(path: str) -> str:
    """The token a file holds, decoded the one way (:func:`decode_token`): the client's
    re-reads and the config check both read it here."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        # str(exc) names the path, which may be a token pasted in the wrong place.
        raise TokenFileUnreadable("token", exc.strerror or type(exc).__name__) from None
    if len(data) > MAX_TOKEN_BYTES:
        raise TokenInvalid("token", "file is too large for a token")
    return decode_token(data)


class Bearer:
    """The ``Authorization`` header of a token source, built again only when the token
    changes (most requests share one dict), and whether upstream takes it: a refusal (401,
    or a token that cannot be sent) is logged when it begins or its reason changes, its end
    once; the requests in between are counted, not logged
    (``api_requests_total{code="401"}``)."""

    __slots__ = ("_failing", "_headers", "_token", "source")

    def __init__(self, source: TokenSource) -> None:
        self.source = source
        self._headers: dict[str, str] = {}
        self._token = ""
        self._failing: str | None = None  # the reason of the refusal in force

    def __repr__(self) -> str:
        return f"Bearer({self.source!r})"

    def headers(self, endpoint: str) -> tuple[dict[str, str], str]:
        """The headers for a request to ``endpoint`` and the token they carry."""
        try:
            token = self.source.get()
        except TokenUnavailable as exc:
            raise type(exc)(endpoint, exc.reason) from None
        if token != self._token:
            self._headers = {"Authorization": f"Bearer {token}"}
            self._token = token
        return self._headers, token

    def refused(self, token_sent: str | None) -> bool:
        """A 401: the token is read afresh next time. True when the source now holds
        another token than ``token_sent`` (None: the caller will not retry, do not look)."""
        self.source.invalidate()
        if token_sent is None:
            return False
        with contextlib.suppress(TokenUnavailable):  # gone: nothing new to try
            return self.source.get() != token_sent
        return False

    def failed(self, exc: AuthError) -> None:
        """A request failed for good on its token: logged at error level when the refusal
        begins or its reason changes."""
        if exc.reason == self._failing:
            return
        self._failing = exc.reason
        event = "api_unauthorized"
        if isinstance(exc, TokenInvalid):
            event = "api_token_invalid"
        elif isinstance(exc, TokenUnavailable):
            event = "api_token_unavailable"
        log.error(event, endpoint=exc.endpoint, reason=exc.reason)

    def accepted(self) -> None:
        """Upstream answered a request (2xx): a refusal in force has ended."""
        if self._failing is not None:
            log.info("api_auth_recovered", reason=self._failing)
            self._failing = None
