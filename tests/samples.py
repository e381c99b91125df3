"""Scraped samples as the tests compare them: (name, labels) -> value."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a text-format exposition."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


async def scrape(session: Any, url: str) -> Samples:
    """GET ``url`` (a /metrics endpoint) with an aiohttp session; it must answer 200."""
    async with session.get(url) as response:
        assert response.status == 200
        return parse(await response.text())
