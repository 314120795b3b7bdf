"""Shared pytest set-up: float64 is enabled per test where a float64 reference needs it.

On a GPU each pytest-xdist worker is its own process: without this, every one of them would
reserve 75 % of the GPU's memory at its first JAX call (8 workers on an H100: out of memory).
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest


@pytest.fixture
def x64():
    """Enables float64 in JAX for the duration of one test."""
    with jax.enable_x64(True):
        yield
