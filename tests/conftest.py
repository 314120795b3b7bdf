"""Shared pytest set-up: float64 is enabled per test where a float64 reference needs it."""

import jax
import pytest


@pytest.fixture
def x64():
    """Enables float64 in JAX for the duration of one test."""
    with jax.enable_x64(True):
        yield
