"""Pallas GPU kernels for ViG, with pure-JAX references beside each kernel.

The one op so far is :func:`bigla`, bidirectional gated linear attention.
"""

from pallas_kernels.bigla import IMPLEMENTATIONS, available_implementations, bigla, bigla_packed

__all__ = ["IMPLEMENTATIONS", "available_implementations", "bigla", "bigla_packed"]
