"""The landing page as a browser renders it (Debian chromium, headless)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections import Counter
from html.parser import HTMLParser

import aiohttp
import pytest
from processes import free_port
from test_exporter_e2e import make_exporter

from exporter.cli import serve
from exporter.statuses import classify

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="Debian chromium not installed"
)


class _Tables(HTMLParser):
    """The body rows of each table of the page, as lists of cell texts, and each table's
    column headers."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[list[str]] = []
        self.tables: list[list[list[str]]] = []
        self._in_body = False
        self._cell: list[str] | None = None

    @property
    def rows(self) -> list[list[str]]:
        return self.tables[-1]

    def columns(self, table: int) -> dict[str, int]:
        return {header: index for index, header in enumerate(self.headers[table])}

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag == "thead":
            self.headers.append([])
        elif tag == "tbody":
            self._in_body = True
            self.tables.append([])
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._in_body:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "th" and self._cell is not None:
            self.headers[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


async def _device_documents(url: str, sim) -> list[dict]:
    """The simulator's device list, as the upstream serves it."""
    devices = f"{url}/organizations/{sim.organization}/mdm/windows/enterprise/devices"
    headers = {"Authorization": f"Bearer {sim.token}"}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(devices, params={"limit": "1000"}) as response,
    ):
        return (await response.json())["data"]["items"]


async def rendered_dom(url: str, profile: str) -> str:
    assert CHROMIUM, "chromium is required in CI"
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    return out.decode()


async def test_device_table_shows_each_watched_device_with_its_counts(
    make_simulator_server, tmp_path
):
    sim, url = await make_simulator_server(seed=5, devices=6)
    exporter = make_exporter(sim, url)
    await exporter.scheduler.run_round()
    stop = asyncio.Event()
    port = free_port()
    server = asyncio.create_task(serve(exporter, f"127.0.0.1:{port}", stop=stop, signals=False))
    try:
        await asyncio.sleep(0.3)
        dom = await rendered_dom(f"http://127.0.0.1:{port}/", str(tmp_path / "profile"))
        # What the page's form asks for: one device, found by its name in another case.
        wanted = sim.fleet.device(sim.fleet.device_ids()[-1]).name
        assert wanted
        found = await rendered_dom(
            f"http://127.0.0.1:{port}/?device={wanted.lower()}", str(tmp_path / "profile")
        )
    finally:
        stop.set()
        await server
    # Where check-ins come from and what upstream did with the parameters relied on.
    assert "Check-ins from the device list sorted by check-in." in dom
    assert "commands sort: honoured" in dom
    tables = _Tables()
    tables.feed(dom)
    devices, rollouts = tables.tables
    column = tables.columns(0)
    classes = ("pending", "success", "canceled", "error", "unknown")
    shown = {row[column["device"]]: row for row in devices}
    listed = {d["id"]: d for d in await _device_documents(url, sim)}
    assert set(shown) == set(sim.fleet.device_ids())
    verdicts: Counter[str] = Counter()
    for device, row in shown.items():
        truth: Counter[str] = Counter()
        for batch in sim.fleet.batch_ids(device):
            for status, count in sim.fleet.grouped_counts(device, batch).items():
                truth[classify(status).value] += count
        name = sim.fleet.device(device).name
        assert row[column["name"]] == (name or "")
        assert row[column["result"]] == "up"
        assert [int(row[column[c]]) for c in classes] == [truth[c] for c in classes]
        # The check-in age, the state, the compliance and the build, as the device list
        # shows them.
        document = listed[device]
        check_in = row[column["last check-in"]]
        assert check_in != "never" if document.get("lastStatusReportTime") else check_in == "never"
        assert row[column["state"]] == document.get("state", "UNKNOWN")
        compliant = sim.fleet.compliance(device).compliant
        verdict = "unknown" if compliant is None else "compliant" if compliant else "non_compliant"
        assert row[column["compliance"]] == verdict
        assert row[column["OS version"]] == document["summary"]["osVersion"]
        verdicts[verdict] += 1
    # What a laptop's screen shows first: the device, its compliance and its build.
    assert list(column)[:4] == ["device", "name", "compliance", "OS version"]
    summary = ", ".join(f"{verdicts[v]} {v}" for v in ("compliant", "non_compliant", "unknown"))
    assert f"Compliance: {summary}." in dom
    assert 'name="device"' in dom  # the search form
    searched = _Tables()
    searched.feed(found)
    rows = searched.tables[0]
    assert [row[searched.columns(0)["name"]] for row in rows] == [wanted]
    assert f"1 of {len(shown)} watched devices match" in found
    # Rollouts: per batch name, the devices per state of their latest batch of that name,
    # most failed devices first.
    expected = _rollout_truth(sim.fleet)
    assert len(rollouts) == len(expected) > 0
    assert {row[0]: [int(cell) for cell in row[1:]] for row in rollouts} == expected
    failed = [int(row[1]) for row in rollouts]
    assert failed == sorted(failed, reverse=True)


def _rollout_truth(fleet) -> dict[str, list[int]]:
    """Rollout rows from the simulator's own batches: failed, pending, unknown, canceled,
    succeeded, devices."""
    order = ("error", "pending", "unknown", "canceled")
    rows: dict[str, list[int]] = {}
    for device in fleet.device_ids():
        latest: dict[str, tuple[float, str]] = {}
        for batch_id in fleet.batch_ids(device):
            batch = fleet.batch(fleet.device(device), batch_id)
            if batch.name and (batch.name not in latest or batch.created > latest[batch.name][0]):
                latest[batch.name] = (batch.created, batch_id)
        for name, (_, batch_id) in latest.items():
            classes = Counter()
            for status, count in fleet.grouped_counts(device, batch_id).items():
                classes[classify(status).value] += count
            state = next((i for i, c in enumerate(order) if classes[c]), 4)
            row = rows.setdefault(name, [0] * 6)
            row[state] += 1
            row[5] += 1
    return rows
