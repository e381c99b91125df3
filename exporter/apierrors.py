"""The typed failures of an upstream call. Reasons are short and never carry the token."""

from __future__ import annotations


class ApiError(Exception):
    """A call that failed for good. ``reason`` is short and never contains the token."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"{endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason


class AuthError(ApiError):
    """401 (upstream codes 4002 no token, 4004 invalid token); retried only once, and only
    when the token file changed since the request was sent (``token_changed``)."""

    def __init__(
        self, endpoint: str, reason: str, code: int | None = None, *, token_changed: bool = False
    ) -> None:
        super().__init__(endpoint, reason)
        self.code = code
        self.token_changed = token_changed


class TokenUnavailable(AuthError):
    """The token file vanished, cannot be read, or is empty."""


class TokenInvalid(TokenUnavailable):
    """The token cannot be sent: not UTF-8, more than one word or line, or a character an
    HTTP header cannot carry. The reason says which, never what."""


class NotFoundError(ApiError):
    """404 (upstream code 3001, unknown organization, device or batch); not retried."""

    def __init__(self, endpoint: str, reason: str, code: int | None = None) -> None:
        super().__init__(endpoint, reason)
        self.code = code


class UpstreamError(ApiError):
    """Anything else: 5xx, timeouts, resets or bad bodies after retries, 400, 403, ..."""

    def __init__(self, endpoint: str, reason: str, status: int | None = None) -> None:
        super().__init__(endpoint, reason)
        self.status = status


class ReadTooLarge(UpstreamError):
    """A paged read served more items than one read may hold (``paging.MAX_ITEMS_PER_READ``):
    failed, not retried, the cut items counted as ``schema`` problems."""


def is_bad_request(exc: ApiError) -> bool:
    """A 400: upstream refused the request as written (a query parameter, say)."""
    return isinstance(exc, UpstreamError) and exc.status == 400
