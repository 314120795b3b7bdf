"""The Mosaic GPU BiGLA kernels against the float64 reference.

On a CPU the kernels run in Mosaic GPU interpret mode (``plgpu.InterpretGPUParams``: the same
kernel code); on an sm90 GPU they run for real. A CPU-side CUDA lowering check (through Mosaic
GPU's layout inference) catches what the GPU lowering rejects.

The wgmma operands are 16-bit. bf16 inputs are the operands (bar 1e-2 for the output and all
five gradients); fp32 inputs are split into three bf16 parts with six wgmmas per product, and
meet the fp32 bar (1e-5) like the Triton kernels, steep, flat and random gates and odd N
(measured: at most 3e-6, ``dg`` with steep gates, on the CPU and on the H100 alike).
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


@functools.cache
def _forward_and_vjp(scale, backward):
    """One jitted forward + VJP per scale, shared by the tests: on the GPU, compiling the two
    Mosaic kernels and the XLA backward is most of a test's time, and jit reuses the executable
    for every test with the same shapes and dtypes."""

    def fn(q, k, v, gf, gb, do):
        op = lambda *a: mosaic.bigla_mosaic(
            *a, scale=scale, interpret=not ON_GPU, backward=backward
        )
        out, vjp = jax.vjp(op, q, k, v, gf, gb)
        return out, vjp(do)

    return jax.jit(fn)


def _run(arrays, scale=None, backward="mosaic"):
    return _forward_and_vjp(scale, backward)(*arrays)


def _check(arrays, *, fp32, scale=None, backward="mosaic"):
    bar = 1e-5 if fp32 else 1e-2
    want, want_grads = reference_vjp(*arrays, scale=scale)
    out, grads = _run(arrays, scale, backward)
    assert out.shape == want.shape and out.dtype == arrays[2].dtype
    assert relative_error(out, want) < bar
    for name, got, ref in zip(GRAD_NAMES, grads, want_grads, strict=True):
        assert got.shape == ref.shape, name
        assert np.isfinite(np.asarray(got)).all(), name
        assert relative_error(got, ref) < bar, name


@pytest.mark.parametrize(
    ("shape", "gates"),
    [((1, 61, 3, 32, 64), "steep"), ((2, 197, 1, 32, 64), "flat")],
    ids=str,
)
def test_bf16_forward_and_gradients_match_float64_reference(shape, gates):
    arrays = cast_inputs(random_inputs(sum(shape), *shape, gates=gates), jnp.bfloat16)
    _check(arrays, fp32=False)


@pytest.mark.parametrize(
    ("shape", "gates", "backward"),
    [
        ((1, 197, 1, 32, 64), "random", "mosaic"),
        ((1, 61, 1, 16, 128), "steep", "mosaic"),
        ((2, 131, 1, 32, 64), "flat", "mosaic"),
        ((1, 197, 1, 32, 64), "random", "xla"),
    ],
    ids=str,
)
def test_fp32_forward_and_gradients_match_float64_reference(shape, gates, backward):
    arrays = cast_inputs(random_inputs(sum(shape), *shape, gates=gates), np.float32)
    _check(arrays, fp32=True, backward=backward)


def test_explicit_scale():
    arrays = cast_inputs(random_inputs(2, 1, 20, 1, 32, 64), jnp.bfloat16)
    _check(arrays, fp32=False, scale=0.3)


@pytest.mark.parametrize("variant", [{"split": False}, {"sub": 8}], ids=str)
def test_kernel_variants_match_the_default(variant):
    """One program per (batch, head) instead of per direction, or 8-row sub-blocks: the same
    results as the default configuration, for both kernels (interpreted on the CPU)."""
    q, k, v, gf, gb, do = cast_inputs(random_inputs(7, 1, 70, 1, 32, 64, "steep"), jnp.bfloat16)
    interpret = not ON_GPU and mosaic.plgpu.InterpretGPUParams()
    o_kw = dict(out_scale=0.2, out_dtype=jnp.float32, interpret=interpret)
    g_kw = dict(out_scale=0.2, interpret=interpret)
    want_o = mosaic.bidirectional_chunked(q, k, v, gf, gb, **o_kw)
    want_g = mosaic.bidirectional_gated_output(do, v, k, gf, gb, **g_kw)
    got_o = mosaic.bidirectional_chunked(q, k, v, gf, gb, **o_kw, **variant)
    got_g = mosaic.bidirectional_gated_output(do, v, k, gf, gb, **g_kw, **variant)
    assert relative_error(got_o, want_o) < 1e-2
    for got, want in zip(got_g, want_g, strict=True):
        assert relative_error(got, want) < 1e-2


def test_fp32_split_into_three_bf16_parts_is_exact_under_jit():
    """hi + mid + lo is exactly the fp32 value (checked in float64), also jitted: XLA on GPU
    folds ``astype(bf16).astype(f32)`` away, which would zero the lower parts."""
    x = np.random.default_rng(0).normal(size=4096).astype(np.float32) * np.float32(1e3)
    op_dtype, parts = mosaic._operand_format(jnp.float32)
    split = jax.jit(mosaic._split, static_argnums=(1, 2))
    got = sum(np.asarray(p, np.float64) for p in split(jnp.asarray(x), op_dtype, parts))
    assert (op_dtype, parts) == (jnp.bfloat16, 3)
    np.testing.assert_array_equal(got, x.astype(np.float64))


def test_fp32_operand_parts_follow_the_smem_budget():
    """Three parts where the forward kernel's SMEM fits (Dk 32, Dv 64), fewer where not."""
    small = lambda op, parts: [mosaic.plgpu.SMEM((parts, 64, 64), op)]
    huge = lambda op, parts: [mosaic.plgpu.SMEM((parts, 1024, 64), op)]
    assert mosaic._fitting_scratch(small, jnp.float32)[:2] == (jnp.bfloat16, 3)
    assert mosaic._fitting_scratch(huge, jnp.float32)[:2] == (jnp.bfloat16, 1)
    assert mosaic._fitting_scratch(huge, jnp.bfloat16)[:2] == (jnp.bfloat16, 1)


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
    assert exported.mlir_module().count("mosaic_gpu_v2") == 4  # forward, dv, dq and dk kernels


def test_input_validation():
    q = jnp.zeros((1, 8, 1, 16), jnp.float32)
    v = jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
    with pytest.raises(TypeError, match="one dtype"):
        mosaic.bigla_mosaic(q, q, v, q, q)
    qi = q.astype(jnp.int32)
    with pytest.raises(TypeError, match="dtype int32"):
        mosaic.bigla_mosaic(qi, qi, qi, q, q)
    with pytest.raises(ValueError, match="Dk=8"):
        mosaic.bigla_mosaic(q[..., :8], q[..., :8], v.astype(q.dtype), q[..., :8], q[..., :8])
    with pytest.raises(ValueError, match="Dv=32"):
        mosaic.bigla_mosaic(q, q, v[..., :32].astype(q.dtype), q, q)
    with pytest.raises(ValueError, match="backward='triton'"):
        mosaic.bigla_mosaic(q, q, v.astype(q.dtype), q, q, backward="triton")
