"""Basic auth for the HTTP side: bcrypt checks bounded in number, and timing that does not
tell which user names exist.

A bcrypt check costs 2**cost rounds (tens to hundreds of ms) by design, so a flood of wrong
guesses must neither queue without bound in front of a legitimate first request nor take
every core: at most ``CHECK_SLOTS`` checks run at once and ``WAITING_PER_SLOT`` per slot
wait; beyond that the answer is BUSY at once (the middleware: 503 with Retry-After). A
scraper sending the same credentials every 15 s pays one check, then hits the cache.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import statistics
from collections import OrderedDict
from collections.abc import Mapping
from enum import Enum

import bcrypt

AUTH_CACHE_SIZE = 1024
# Half the cores, at most four: the other half serves probes and scrapes meanwhile.
CHECK_SLOTS = max(1, min(4, (os.cpu_count() or 2) // 2))
WAITING_PER_SLOT = 2  # a few concurrent first scrapes wait; a flood does not
DEFAULT_COST = 10


class Verdict(Enum):
    ALLOWED = "allowed"
    DENIED = "denied"
    BUSY = "busy"  # every check slot taken: try again in a second


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


def hash_cost(hashed: bytes) -> int:
    """The cost of a checked hash (``$2b$10$...`` -> 10)."""
    return int(hashed[4:6])


def median_cost(hashes: Mapping[str, bytes]) -> int:
    """What an unknown user's check costs: the users' median cost, so that it takes what a
    typical wrong password takes. Of an even number, the lower one: a guess under an
    unknown name never costs more than one under half the users' names."""
    costs = [hash_cost(h) for h in hashes.values()]
    return statistics.median_low(costs) if costs else DEFAULT_COST


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # a password over bcrypt's 72 bytes
        return False


class BasicAuth:
    """bcrypt-checked credentials with a bounded cache of successful verifications.

    The cache holds HMACs under a per-process random key, never passwords. Unknown users
    are checked against a dummy hash made at load, of the users' median cost.
    """

    def __init__(
        self,
        users: Mapping[str, bytes],
        *,
        cache_size: int = AUTH_CACHE_SIZE,
        slots: int = CHECK_SLOTS,
        waiting_per_slot: int = WAITING_PER_SLOT,
    ) -> None:
        self._users = dict(users)
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._cache_size = cache_size
        self._key = os.urandom(32)
        salt = bcrypt.gensalt(median_cost(self._users))
        self._dummy = bcrypt.hashpw(os.urandom(16).hex().encode(), salt)  # one run, at load
        self._slots = asyncio.Semaphore(slots)
        self._admitted = 0  # checks running or waiting for a slot
        self._max_admitted = slots * (1 + waiting_per_slot)
        self.verifications = 0  # bcrypt runs, for tests and debugging

    def _cache_key(self, user: str, password: str) -> bytes:
        # A user name has no ':', so the pair is unambiguous.
        message = f"{user}:{password}".encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    async def check(self, header: str | None) -> bool:
        return await self.verdict(header) is Verdict.ALLOWED

    async def verdict(self, header: str | None) -> Verdict:
        credentials = parse_basic(header)
        if credentials is None:
            return Verdict.DENIED
        user, password = credentials
        key = self._cache_key(user, password)
        if key in self._cache:
            self._cache.move_to_end(key)
            return Verdict.ALLOWED
        if self._admitted >= self._max_admitted:
            return Verdict.BUSY
        hashed = self._users.get(user)
        if not await self._bcrypt(password.encode(), hashed or self._dummy) or hashed is None:
            return Verdict.DENIED
        self._cache[key] = None
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return Verdict.ALLOWED

    async def _bcrypt(self, password: bytes, hashed: bytes) -> bool:
        self._admitted += 1
        try:
            async with self._slots:
                self.verifications += 1
                return await asyncio.get_running_loop().run_in_executor(
                    None, _checkpw, password, hashed
                )
        finally:
            self._admitted -= 1
