"""BiGLA on packed projections (``bigla_packed``): the Triton kernels read q, k and v in place
from ``qkv = [q | k | v]``; values and gradients against the float64 reference on the split
arrays, the fallbacks, and the CUDA lowering (no copies of the operands before the kernels)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import TRITON_CALL, h100_lowering

from pallas_kernels import bigla_packed
from pallas_kernels.bigla import triton
from pallas_kernels.bigla.testing import cast_inputs, random_inputs, reference_vjp, relative_error

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


def _flat(x):
    return x.reshape(*x.shape[:2], -1)


def _pack(q, k, v, gf, gb):
    """[B, N, H, D] arrays -> qkv [B, N, 2K + V] and the gates as [B, N, K] (head-major)."""
    return np.concatenate([_flat(q), _flat(k), _flat(v)], axis=-1), _flat(gf), _flat(gb)


def _unpack_grads(dqkv, dgf, dgb, shape):
    b, n, h, dk, dv = shape
    key = h * dk
    heads = lambda x: np.asarray(x, np.float64).reshape(b, n, h, -1)
    dq, dk_, dv_ = np.split(np.asarray(dqkv, np.float64), [key, 2 * key], axis=-1)
    return [heads(x) for x in (dq, dk_, dv_, dgf, dgb)]


def _packed_vjp(arrays, shape, dtype, **kwargs):
    q, k, v, gf, gb, do = cast_inputs(arrays, dtype)
    packed = [jnp.asarray(x) for x in _pack(q, k, v, gf, gb)]
    fn = jax.jit(
        lambda *a: bigla_packed(
            *a, num_heads=shape[2], implementation="triton", interpret=INTERPRET, **kwargs
        )
    )
    out, vjp = jax.vjp(fn, *packed)
    return out, *vjp(jnp.asarray(do, out.dtype))


@pytest.mark.parametrize(
    ("shape", "config"),
    [
        ((2, 61, 3, 32, 64), {}),  # ViG's layout: Dv = 2 Dk, values start on a Dv boundary
        ((1, 197, 2, 16, 16), {"segments": 2}),  # Dv = Dk
        ((1, 150, 2, 32, 64), {"save_states": False, "bwd_chunk": 32}),  # recomputed states
        ((2, 61, 3, 32, 64), {"merge_backward": True}),  # one backward chunk kernel
    ],
    ids=str,
)
def test_packed_fp32_matches_float64_reference(shape, config):
    arrays = random_inputs(sum(shape), *shape, gates="random")
    want, want_grads = reference_vjp(*cast_inputs(arrays, np.float32))
    out, dqkv, dgf, dgb = _packed_vjp(arrays, shape, np.float32, config=triton.Config(**config))
    assert out.shape == want.shape and out.dtype == jnp.float32
    assert dqkv.shape == (shape[0], shape[1], shape[2] * (2 * shape[3] + shape[4]))
    assert relative_error(out, want) < 1e-5
    grads = _unpack_grads(dqkv, dgf, dgb, shape)
    for name, got, ref in zip(("dq", "dk", "dv", "dgf", "dgb"), grads, want_grads, strict=True):
        assert relative_error(got, ref) < 1e-5, name


def test_packed_bf16_gradients_keep_dtypes_and_match():
    shape = (2, 70, 3, 32, 64)
    arrays = random_inputs(5, *shape, gates="random")
    want, want_grads = reference_vjp(*cast_inputs(arrays, jnp.bfloat16))
    out, dqkv, dgf, dgb = _packed_vjp(arrays, shape, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and dqkv.dtype == jnp.bfloat16
    assert dgf.dtype == dgb.dtype == jnp.float32
    assert relative_error(out, want) < 1e-2
    for got, ref in zip(_unpack_grads(dqkv, dgf, dgb, shape), want_grads, strict=True):
        assert relative_error(got, ref) < 1e-2


@pytest.mark.parametrize("implementation", ["triton", "xla"])
def test_unpackable_sizes_and_other_implementations_split(implementation):
    """Dk = 24 (not a power of two) through the split path of the Triton wrapper, and the XLA
    implementation (always split), against the reference."""
    if implementation == "triton":
        assert not triton.packs(2 * 24, 2 * 40, 2)
    shape = (1, 40, 2, 24, 40)
    arrays = random_inputs(11, *shape, gates="random")
    want, want_grads = reference_vjp(*cast_inputs(arrays, np.float32))
    q, k, v, gf, gb, do = cast_inputs(arrays, np.float32)
    packed = [jnp.asarray(x) for x in _pack(q, k, v, gf, gb)]
    options = {"interpret": INTERPRET} if implementation == "triton" else {}
    fn = lambda *a: bigla_packed(*a, num_heads=2, implementation=implementation, **options)
    out, vjp = jax.vjp(fn, *packed)
    assert relative_error(out, want) < 1e-5
    grads = _unpack_grads(*vjp(jnp.asarray(do)), shape)
    for got, ref in zip(grads, want_grads, strict=True):
        assert relative_error(got, ref) < 1e-5


def test_packs_rule():
    assert triton.packs(96, 192, 3)  # ViG-T: Dk 32, Dv 64
    assert triton.packs(384, 768, 12)  # ViG-B
    assert not triton.packs(96, 192, 4)  # Dk 24
    assert triton.packs(16 * 3, 32 * 3, 3)  # Dk 16, Dv 32
    assert not triton.packs(8, 8, 1)  # below the Triton minimum of 16


def test_bad_shapes_name_the_sizes():
    qkv, g = jnp.zeros((1, 4, 64 + 64 + 128)), jnp.zeros((1, 4, 64))
    with pytest.raises(ValueError, match="same \\[B, N\\]"):
        bigla_packed(qkv, jnp.zeros((1, 5, 64)), jnp.zeros((1, 5, 64)), num_heads=2)
    with pytest.raises(ValueError, match="two \\[B, N, K\\]"):
        bigla_packed(qkv, g, jnp.zeros((1, 4, 32)), num_heads=2)
    with pytest.raises(ValueError, match="num_heads=3"):
        bigla_packed(qkv, g, g, num_heads=3, implementation="xla")
    with pytest.raises(ValueError, match="wider than 2K"):
        bigla_packed(qkv, jnp.zeros((1, 4, 128)), jnp.zeros((1, 4, 128)), num_heads=2)


@pytest.mark.parametrize(("merge", "calls", "joins"), [(False, 9, 1), (True, 8, 0)])
def test_packed_lowering_reads_operands_in_place(merge, calls, joins):
    """The CUDA lowering of forward + backward feeds qkv and the gates to the Triton calls
    without slicing them (the split path's copies are what packing removes), and has as many
    Triton calls as the split op; the merged backward kernel writes the packed gradient itself
    (no concatenation of dq, dk, dv)."""
    b, n, h, dk, dv = 2, 197, 3, 32, 64
    qkv = jnp.ones((b, n, h * (2 * dk + dv)), jnp.bfloat16)
    gate = jnp.zeros((b, n, h * dk), jnp.float32)
    config = triton.Config(merge_backward=merge)

    def loss(x, gf, gb):
        out = triton.bigla_triton_packed(x, gf, gb, num_heads=h, config=config)
        return jnp.sum(out.astype(jnp.float32))

    text = h100_lowering(jax.value_and_grad(loss, argnums=(0, 1, 2)), qkv, gate, gate)
    assert text.count(TRITON_CALL) == calls
    assert "stablehlo.slice" not in text
    assert text.count("stablehlo.concatenate") == joins
