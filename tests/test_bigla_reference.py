"""The two reference forms of BiGLA against a float64 NumPy token loop."""

import numpy as np
import pytest

from pallas_kernels import bigla


def numpy_recurrence(q, k, v, gf, gb, scale):
    """Token-by-token float64 recurrence of vig-reference.md section 2.4."""
    b_, n, h_, dk = q.shape
    dv = v.shape[-1]
    out = np.zeros((b_, n, h_, dv))
    for b in range(b_):
        for h in range(h_):
            state = np.zeros((dk, dv))
            for t in range(n):
                state = np.exp(gf[b, t, h])[:, None] * state + np.outer(k[b, t, h], v[b, t, h])
                out[b, t, h] += q[b, t, h] @ state
            state = np.zeros((dk, dv))
            for t in reversed(range(n)):
                state = np.exp(gb[b, t, h])[:, None] * state + np.outer(k[b, t, h], v[b, t, h])
                out[b, t, h] += q[b, t, h] @ state
    return out * scale / 2


def random_inputs(rng, b, n, h, dk, dv, gate_logit_scale=3.0):
    q, k = rng.normal(size=(2, b, n, h, dk))
    v = rng.normal(size=(b, n, h, dv))
    logits = rng.normal(size=(2, b, n, h, dk)) * gate_logit_scale
    gf, gb = -np.logaddexp(0.0, -logits) / 16  # logsigmoid / 16
    return q, k, v, gf, gb


@pytest.mark.parametrize("implementation", ["reference", "associative_scan"])
@pytest.mark.parametrize("shape", [(2, 61, 3, 16, 32), (1, 1, 1, 8, 8), (3, 17, 1, 32, 64)])
def test_reference_forms_match_recurrence(x64, implementation, shape):
    rng = np.random.default_rng(sum(shape))
    q, k, v, gf, gb = random_inputs(rng, *shape)
    want = numpy_recurrence(q, k, v, gf, gb, scale=0.7)
    got = np.asarray(bigla(q, k, v, gf, gb, scale=0.7, implementation=implementation))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_default_scale_is_inverse_sqrt_dk(x64):
    rng = np.random.default_rng(1)
    q, k, v, gf, gb = random_inputs(rng, 1, 9, 2, 16, 8)
    want = numpy_recurrence(q, k, v, gf, gb, scale=16**-0.5)
    np.testing.assert_allclose(bigla(q, k, v, gf, gb, implementation="reference"), want, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    q = np.zeros((1, 4, 2, 8), np.float32)
    v = np.zeros((1, 4, 2, 16), np.float32)
    with pytest.raises(ValueError, match=r"k has shape \(1, 4, 2, 4\)"):
        bigla(q, q[..., :4], v, q, q)
    with pytest.raises(ValueError, match="v has shape"):
        bigla(q, q, v[:, :3], q, q)
    with pytest.raises(ValueError, match="4 dims"):
        bigla(q[0], q[0], v[0], q[0], q[0])
    with pytest.raises(TypeError, match="floating"):
        bigla(q.astype(np.int32), q, v, q, q)
    with pytest.raises(ValueError, match="implementation='nope'"):
        bigla(q, q, v, q, q, implementation="nope")


def test_associative_scan_takes_bf16_inputs_with_fp32_gates():
    """bf16 q, k, v with fp32 gates (how the models call it): scanned in fp32, bf16 out."""
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    q, k, v, gf, gb = random_inputs(rng, 2, 33, 2, 16, 32)
    low = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    gates = [jnp.asarray(x, jnp.float32) for x in (gf, gb)]
    got = bigla(*low, *gates, implementation="associative_scan")
    assert got.dtype == jnp.bfloat16
    exact = [np.asarray(x, np.float64) for x in low] + [np.asarray(x, np.float64) for x in gates]
    want = numpy_recurrence(*exact, scale=16**-0.5)
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, rtol=0, atol=1e-2 * np.abs(want).max()
    )
