"""A plain cumulative histogram; families.histogram_lines renders its sample lines."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field


@dataclass(slots=True)
class Histogram:
    """Counts per upper bound (``le``), plus ``+Inf`` as the last slot."""

    buckets: tuple[float, ...]
    counts: list[int] = field(init=False)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        # bisect_left puts a value equal to a bound into that bound's bucket (le is inclusive).
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[int]:
        """Counts per bound in Prometheus's cumulative form, ``+Inf`` last."""
        total = 0
        out = []
        for n in self.counts:
            total += n
            out.append(total)
        return out
