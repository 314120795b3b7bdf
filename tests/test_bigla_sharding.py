"""Under a sharded jit, ``bigla`` runs through ``jax.shard_map`` over the batch axis.

Runs in a subprocess with 8 fake CPU devices (the device count must be set before JAX starts).
"""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from pallas_kernels import bigla
    from pallas_kernels.bigla.testing import cast_inputs, random_inputs, relative_error

    assert jax.device_count() == 8
    arrays = cast_inputs(random_inputs(0, 8, 20, 1, 16, 32), np.float32)[:5]
    runs = [
        (AxisType.Explicit, "xla", {}),
        (AxisType.Auto, "xla", {}),
        (AxisType.Explicit, "triton", {"interpret": True}),
    ]
    for axis_type, impl, opts in runs:
        mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
        fn = lambda *a: bigla(*a, implementation=impl, **opts)
        want = jax.jit(fn)(*arrays)
        with jax.set_mesh(mesh):
            shard = NamedSharding(mesh, P("data"))
            xs = [jax.device_put(x, shard) for x in arrays]
            assert "shard_map" in str(jax.make_jaxpr(fn)(*xs)), (axis_type, impl)
            got = jax.jit(fn, in_shardings=(shard,) * 5, out_shardings=shard)(*xs)
            grad = jax.jit(jax.grad(lambda *a: (fn(*a) ** 2).sum()))(*xs)
        assert got.sharding.spec == P("data"), got.sharding
        assert relative_error(got, want) < 1e-6, (axis_type, impl)
        want_grad = jax.grad(lambda *a: (fn(*a) ** 2).sum())(*arrays)
        assert relative_error(grad, want_grad) < 1e-6, (axis_type, impl)
    # Without a mesh there is no shard_map.
    assert "shard_map" not in str(jax.make_jaxpr(fn)(*arrays))
    print("OK")
    """
)


def test_sharded_jit_runs_the_op_through_shard_map_on_8_devices():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("OK")
