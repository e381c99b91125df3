"""basicauth.py: bcrypt checks bounded in number (a flood of guesses is answered 503 at once,
not queued in front of a legitimate client) and timing that does not tell which users exist.

The timed tests run an exporter process on 127.0.0.1 whose web config has two users, of
bcrypt cost 4 and 10 (low costs keep the tests short).
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from processes import free_port, process, valid_config, wait_for

from exporter.basicauth import BasicAuth, Verdict, median_cost

PASSWORDS = {"cheap": "cheap-secret", "dear": "dear-secret"}
COSTS = {"cheap": 4, "dear": 10}
GUESSES = 100


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def hashed(password: str, cost: int) -> bytes:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost))


@pytest.fixture(scope="module")
def exporter_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("basicauth")
    web = tmp / "web.yml"
    users = "".join(
        f"  {user}: {hashed(PASSWORDS[user], cost).decode()}\n" for user, cost in COSTS.items()
    )
    web.write_text(f"basic_auth_users:\n{users}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process("-m", "exporter", "--config.file", str(valid_config(Path(tmp))),
                 "--web.listen-address", f"127.0.0.1:{port}", "--web.config.file", str(web),
                 env={"APPLIVERY_API_TOKEN": "auth-test-token"}):
        wait_for(lambda: _status(url, basic("cheap", PASSWORDS["cheap"])) == 200,
                 what="the exporter")
        yield url


def _status(url: str, headers: dict[str, str]) -> int:
    try:
        request = urllib.request.Request(f"{url}/-/healthy", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def timed(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    began = time.perf_counter()
    async with session.get(f"{url}/-/healthy", headers=headers) as response:
        assert response.status == 401
    return time.perf_counter() - began


async def test_unknown_users_and_wrong_passwords_take_the_same_time_within_3x(exporter_url):
    """Against the wrong passwords of the user of median cost (of two, the lower: the one
    of cost 4; before, an unknown user took the dearest user's cost, ~90x as long)."""
    kinds = {"cheap": basic("cheap", "wrong"), "dear": basic("dear", "wrong"),
             "unknown": basic("nobody", "wrong")}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    async with aiohttp.ClientSession() as session:
        for _ in range(7):
            for kind, headers in kinds.items():
                times[kind].append(await timed(session, exporter_url, headers))
    median_user = statistics.median_low(
        [statistics.median(times["cheap"]), statistics.median(times["dear"])]
    )
    unknown = statistics.median(times["unknown"])
    assert 1 / 3 < unknown / median_user < 3, times


async def test_valid_credentials_get_in_within_5s_while_100_wrong_guesses_run(exporter_url):
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def guess(n: int) -> int:
            async with session.get(f"{exporter_url}/metrics",
                                   headers=basic("dear", f"guess-{n}")) as response:
                return response.status

        guesses = [asyncio.create_task(guess(n)) for n in range(GUESSES)]
        await asyncio.sleep(0.05)  # the guesses are in
        began = time.monotonic()
        status = await legitimate_scrape(session, exporter_url, deadline=began + 10)
        waited = time.monotonic() - began
        answers = await asyncio.gather(*guesses)
    assert status == 200 and waited < 5.0, waited
    assert set(answers) <= {401, 503} and 503 in answers


async def legitimate_scrape(session: aiohttp.ClientSession, url: str, deadline: float) -> int:
    """A client with valid credentials (on their first use), doing what Retry-After says."""
    while True:
        async with session.get(f"{url}/metrics",
                               headers=basic("dear", PASSWORDS["dear"])) as response:
            if response.status != 503 or time.monotonic() > deadline:
                return response.status
            await asyncio.sleep(float(response.headers["Retry-After"]))


async def test_beyond_the_bound_the_answer_is_busy_at_once():
    auth = BasicAuth({"dear": hashed("secret", 10)}, slots=1, waiting_per_slot=1)
    checks = [asyncio.create_task(auth.verdict(basic("dear", f"guess-{n}")["Authorization"]))
              for n in range(2)]
    await asyncio.sleep(0)  # both admitted: one runs, one waits
    began = time.perf_counter()
    assert await auth.verdict(basic("dear", "one more")["Authorization"]) is Verdict.BUSY
    assert time.perf_counter() - began < 0.01
    assert await asyncio.gather(*checks) == [Verdict.DENIED, Verdict.DENIED]
    # The bound is on checks: cached credentials never wait for a slot.
    assert await auth.verdict(basic("dear", "secret")["Authorization"]) is Verdict.ALLOWED


def test_the_dummy_check_costs_the_users_median_cost():
    def costs(*values: int) -> dict[str, bytes]:
        return {f"u{n}": b"$2b$%02d$" % cost + b"." * 53 for n, cost in enumerate(values)}

    assert median_cost(costs(4, 10, 12)) == 10
    assert median_cost(costs(12, 4, 10, 4)) == 4  # of two in the middle, the lower
    assert median_cost(costs(12)) == 12
    assert median_cost({}) == 10
