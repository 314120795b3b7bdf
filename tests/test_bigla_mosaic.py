"""The Mosaic GPU BiGLA kernel against the float64 reference.

On a CPU the kernel runs in Mosaic GPU interpret mode (``plgpu.InterpretGPUParams``: the same
kernel code, forward and the ``dv`` of the backward); on an sm90 GPU it runs for real. A CPU-side
CUDA lowering check (through Mosaic GPU's layout inference) catches what the GPU lowering rejects.

The wgmma operands are bf16 even for fp32 inputs (see ``bigla_mosaic``), so the kernel's outputs
(``o`` and ``dv``) meet a bf16 bar (1e-2) for both dtypes; the fp32 ``dq, dk, dgf, dgb`` come from
the XLA backward and meet the fp32 bar (1e-5).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.bigla import mosaic
from pallas_kernels.bigla.testing import cast_inputs, random_inputs, reference_vjp, relative_error

ON_GPU = jax.default_backend() == "gpu"
GRAD_NAMES = ("dq", "dk", "dv", "dgf", "dgb")
KERNEL_OUTPUTS = ("o", "dv")  # computed by the Mosaic kernel (bf16 wgmma operands)


@functools.cache
def _forward_and_vjp(scale):
    """One jitted forward + VJP per scale, shared by the tests: on the GPU, compiling the two
    Mosaic kernels and the XLA backward is most of a test's time, and jit reuses the executable
    for every test with the same shapes and dtypes."""

    def fn(q, k, v, gf, gb, do):
        op = lambda *a: mosaic.bigla_mosaic(*a, scale=scale, interpret=not ON_GPU)
        out, vjp = jax.vjp(op, q, k, v, gf, gb)
        return out, vjp(do)

    return jax.jit(fn)


def _run(arrays, scale=None):
    return _forward_and_vjp(scale)(*arrays)


def _check(arrays, *, fp32_bar, **kwargs):
    want, want_grads = reference_vjp(*arrays, **kwargs)
    out, grads = _run(arrays, **kwargs)
    assert out.shape == want.shape and out.dtype == arrays[2].dtype
    assert relative_error(out, want) < 1e-2
    for name, got, ref in zip(GRAD_NAMES, grads, want_grads, strict=True):
        assert got.shape == ref.shape, name
        assert np.isfinite(np.asarray(got)).all(), name
        bar = 1e-2 if (name in KERNEL_OUTPUTS or not fp32_bar) else 1e-5
        assert relative_error(got, ref) < bar, name


@pytest.mark.parametrize(
    ("shape", "gates"),
    [((1, 61, 3, 32, 64), "steep"), ((2, 197, 1, 32, 64), "flat")],
    ids=str,
)
def test_bf16_forward_and_gradients_match_float64_reference(shape, gates):
    arrays = cast_inputs(random_inputs(sum(shape), *shape, gates=gates), jnp.bfloat16)
    _check(arrays, fp32_bar=False)


@pytest.mark.parametrize(
    ("shape", "gates"),
    [((1, 197, 1, 32, 64), "random"), ((1, 61, 1, 16, 128), "steep")],
    ids=str,
)
def test_fp32_forward_and_gradients_match_float64_reference(shape, gates):
    arrays = cast_inputs(random_inputs(sum(shape), *shape, gates=gates), np.float32)
    _check(arrays, fp32_bar=True)


def test_explicit_scale():
    arrays = cast_inputs(random_inputs(2, 1, 20, 1, 32, 64), jnp.bfloat16)
    _check(arrays, fp32_bar=False, scale=0.3)


def test_shifted_gates_give_dv_pair_weights():
    """The dv trick's token shift: row t of the shifted array is row t - step of the input."""
    g = jnp.arange(2 * 5 * 1 * 1, dtype=jnp.float32).reshape(2, 5, 1, 1) + 1
    later = mosaic._shift_tokens(g, 1)
    earlier = mosaic._shift_tokens(g, -1)
    np.testing.assert_array_equal(later[:, 1:], g[:, :-1])
    np.testing.assert_array_equal(later[:, 0], 0)
    np.testing.assert_array_equal(earlier[:, :-1], g[:, 1:])
    np.testing.assert_array_equal(earlier[:, -1], 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
def test_forward_and_backward_lower_to_mosaic_gpu_for_cuda(dtype):
    """Forward + backward go through Mosaic GPU's lowering (layout inference included)."""
    q = jnp.ones((2, 197, 3, 32), dtype)
    v = jnp.ones((2, 197, 3, 64), dtype)
    g = jnp.zeros((2, 197, 3, 32), jnp.float32)

    def loss(*args):
        return jnp.sum(mosaic.bigla_mosaic(*args).astype(jnp.float32))

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))
    device = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"
    )
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(
            jax.jit(grad),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")],
        )(q, q, v, g, g)
    assert exported.mlir_module().count("mosaic_gpu_v2") == 2  # forward + dv kernels


def test_input_validation():
    q = jnp.zeros((1, 8, 1, 16), jnp.float32)
    v = jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
    with pytest.raises(TypeError, match="one dtype"):
        mosaic.bigla_mosaic(q, q, v, q, q)
    with pytest.raises(ValueError, match="Dk=8"):
        mosaic.bigla_mosaic(q[..., :8], q[..., :8], v.astype(q.dtype), q[..., :8], q[..., :8])
    with pytest.raises(ValueError, match="Dv=32"):
        mosaic.bigla_mosaic(q, q, v[..., :32].astype(q.dtype), q, q)
