"""Bidirectional gated linear attention (BiGLA): one op, several implementations."""

from pallas_kernels.bigla.api import IMPLEMENTATIONS, available_implementations, bigla

__all__ = ["IMPLEMENTATIONS", "available_implementations", "bigla"]
