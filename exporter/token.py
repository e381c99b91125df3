"""The API token: read from a file on every request (a rotated file takes effect without a
restart) and only ever placed in the ``Authorization`` header. Error messages, log events,
reprs and metrics never carry it."""

from __future__ import annotations

import contextlib
import os

from exporter.apierrors import TokenUnavailable


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
            return token
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
            with open(self._path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            # The exception text could quote the file's bytes: name the class only.
            raise TokenUnavailable(
                "token", f"token file unreadable ({type(exc).__name__})"
            ) from None
        if not token:
            raise TokenUnavailable("token", "token file is empty")
        return token


class Bearer:
    """The ``Authorization`` header of a token source, built again only when the token
    changes (most requests share one dict)."""

    __slots__ = ("_headers", "_token", "source")

    def __init__(self, source: TokenSource) -> None:
        self.source = source
        self._headers: dict[str, str] = {}
        self._token = ""

    def __repr__(self) -> str:
        return f"Bearer({self.source!r})"

    def headers(self, endpoint: str) -> tuple[dict[str, str], str]:
        """The headers for a request to ``endpoint`` and the token they carry."""
        try:
            token = self.source.get()
        except TokenUnavailable as exc:
            raise TokenUnavailable(endpoint, exc.reason) from None
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
