"""CUDA lowering on the CPU: what the Pallas (Triton) calls become for an H100, no GPU needed."""

from __future__ import annotations

import jax

TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call of each Triton kernel in the lowering


def h100_lowering(fn, *args) -> str:
    """StableHLO text of ``jax.jit(fn)(*args)`` lowered for CUDA under an abstract H100 mesh.

    Differentiate with ``jax.value_and_grad``: JAX >= 0.12 drops a forward whose value
    ``jax.grad`` leaves unused."""
    device = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"
    )
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
