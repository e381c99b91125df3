"""A deterministic simulator of the Applivery MDM Windows command API (tests, demos, benchmarks)."""

from exporter.simulator.core import Simulator

__all__ = ["Simulator"]
