"""A faithful, seeded simulator of the Applivery MDM Windows command API.

Only tests, benchmarks and ``exporter.cli`` (``--demo``) may import it.
"""

from exporter.simulator.core import Simulator
from exporter.simulator.model import Event

__all__ = ["Event", "Simulator"]
