"""Bidirectional gated linear attention (BiGLA): one op, several implementations."""

from pallas_kernels.bigla.api import (
    IMPLEMENTATIONS,
    available_implementations,
    bigla,
    bigla_packed,
)

__all__ = ["IMPLEMENTATIONS", "available_implementations", "bigla", "bigla_packed"]
