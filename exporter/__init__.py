"""Prometheus exporter for Applivery MDM Windows command batches and actions."""

__version__ = "0.1.0"
