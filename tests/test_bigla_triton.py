"""The Pallas (Triton) kernels against the float64 reference.

On a CPU the kernels run in Pallas interpret mode (the same kernel code, forward and backward);
on a GPU they run for real. A CPU-side CUDA lowering check catches primitives the Triton
lowering does not support without needing a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import TRITON_CALL, h100_lowering

from pallas_kernels.bigla import triton, xla
from pallas_kernels.bigla.testing import cast_inputs, random_inputs, reference_vjp, relative_error

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
GRAD_NAMES = ("dq", "dk", "dv", "dgf", "dgb")

CASES = [  # (B, N, H, Dk, Dv), gates, Config kwargs
    ((1, 61, 3, 32, 64), "random", {}),  # B*H odd, N < chunk
    ((3, 197, 1, 16, 32), "steep", {}),  # N not a multiple of the chunk
    ((1, 197, 1, 64, 128), "flat", {"chunk": 32, "num_warps": 4}),  # 2 sub-chunks per chunk
    ((1, 300, 1, 32, 64), "steep", {"segments": 3}),  # sequence split into segments
    ((1, 150, 3, 16, 32), "random", {"chunk": 32, "segments": 2}),
    ((1, 33, 1, 128, 32), "random", {}),
    ((1, 40, 1, 24, 40), "random", {}),  # head dims that are not powers of two
    ((1, 1000, 1, 32, 64), "steep", {"chunk": 64, "save_states": False}),
    ((2, 70, 1, 32, 64), "steep", {"chunk": 16, "save_scores": False}),  # one sub-chunk
    ((1, 197, 2, 32, 64), "random", {"chunk": 16, "bwd_chunk": 64, "bwd_warps": 2}),
    ((1, 300, 1, 32, 64), "steep", {"segments": 3, "save_states": False}),  # recomputed states
    ((2, 61, 3, 32, 64), "random", {"chunk": 32, "save_states": True}),
    ((1, 197, 2, 32, 64), "steep", {"save_scores": True}),  # forward's scores for dv
    ((1, 150, 3, 16, 32), "random", {"chunk": 32, "segments": 2, "save_scores": True}),
    ((1, 197, 2, 32, 64), "steep", {"unroll_rows": True}),  # static row loops
    ((1, 150, 1, 16, 32), "random", {"chunk": 32, "unroll_rows": True, "save_scores": True}),
    ((1, 300, 1, 32, 64), "steep", {"segments": 3, "state_passes": 1}),  # local carries
    ((1, 300, 2, 32, 64), "random", {"segments": 2}),  # two state passes (the default)
    ((2, 150, 3, 16, 32), "random", {"segments": 4, "state_passes": 1, "save_states": False}),
    ((3, 197, 1, 16, 32), "steep", {"diag": "split"}),  # intra-chunk terms as products
    ((1, 300, 2, 32, 64), "random", {"diag": "split", "segments": 3}),
    ((1, 128, 2, 32, 64), "edge", {"diag": "split"}),  # factors up to ~e^61
    ((1, 40, 1, 128, 128), "random", {"diag": "split"}),  # the largest head dims
    ((1, 197, 2, 32, 64), "cliff", {"diag": "split"}),  # every chunk past SPLIT_LIMIT: the loop
    ((2, 200, 1, 32, 64), "mixed", {"diag": "split", "chunk": 32}),  # split and loop chunks
    ((1, 150, 2, 16, 32), "mixed", {"diag": "split", "chunk": 32, "save_scores": False}),
    ((1, 197, 1, 64, 128), "flat", {"diag": "split", "chunk": 64, "save_states": False}),
    # one backward kernel (merge_backward): split and loop chunks, with and without the
    # forward's scores and carries, segments
    ((2, 200, 1, 32, 64), "mixed", {"chunk": 32, "merge_backward": True}),
    ((1, 197, 2, 32, 64), "cliff", {"merge_backward": True}),
    ((1, 150, 2, 16, 32), "mixed", {"chunk": 32, "save_scores": False, "merge_backward": True}),
    ((1, 300, 1, 32, 64), "steep", {"segments": 3, "save_states": False, "merge_backward": True}),
]


def _run(arrays, config, **kwargs):
    fn = lambda *a: triton.bigla_triton(*a, interpret=INTERPRET, config=config, **kwargs)
    out, vjp = jax.vjp(jax.jit(fn), *arrays[:5])
    return out, vjp(jnp.asarray(arrays[5], out.dtype))


@pytest.mark.parametrize(("shape", "gates", "config"), CASES, ids=lambda x: str(x))
def test_fp32_forward_and_gradients_match_float64_reference(shape, gates, config):
    arrays = cast_inputs(random_inputs(sum(shape), *shape, gates=gates), np.float32)
    want, want_grads = reference_vjp(*arrays)
    out, grads = _run(arrays, triton.Config(**config))
    assert out.dtype == jnp.float32 and out.shape == want.shape
    assert relative_error(out, want) < 1e-5
    for name, got, ref in zip(GRAD_NAMES, grads, want_grads, strict=True):
        assert got.shape == ref.shape, name
        assert np.isfinite(np.asarray(got)).all(), name
        assert relative_error(got, ref) < _fp32_tolerance(gates), name


def _fp32_tolerance(gates: str) -> float:
    """1e-5; "cliff" gates (-6.25 per step, 2.5x steeper than the issue's steepest) on the GPU:
    2e-5, for the exact loop path's TF32x3 products (H100: dgb 1.15e-5 at (1, 197, 2, 32, 64))."""
    return 2e-5 if gates == "cliff" and ON_GPU else 1e-5


@pytest.mark.parametrize(
    ("shape", "config"),
    [
        ((2, 197, 1, 32, 64), {}),
        ((1, 300, 3, 32, 64), {"segments": 2}),
        ((2, 100, 1, 32, 64), {"save_scores": True}),
        ((1, 300, 3, 32, 64), {"segments": 3, "state_passes": 1}),
        ((2, 197, 1, 32, 64), {"diag": "split"}),
        ((1, 128, 2, 32, 64), {"diag": "split", "gates": "edge"}),
        ((1, 300, 3, 32, 64), {"diag": "split", "chunk": 32, "segments": 2}),
        ((2, 197, 3, 32, 64), {"merge_backward": True}),
    ],
)
def test_bf16_forward_and_gradients_match_float64_reference(shape, config):
    config = dict(config)
    gates = config.pop("gates", "random")
    arrays = cast_inputs(random_inputs(11, *shape, gates=gates), jnp.bfloat16)
    want, want_grads = reference_vjp(*arrays)
    out, grads = _run(arrays, triton.Config(**config))
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, want) < 1e-2
    for name, got, ref in zip(GRAD_NAMES, grads, want_grads, strict=True):
        assert got.dtype == (jnp.float32 if name.startswith("dg") else jnp.bfloat16), name
        assert relative_error(got, ref) < 1e-2, name


def test_explicit_scale():
    arrays = cast_inputs(random_inputs(2, 1, 20, 2, 16, 32), np.float32)
    want, want_grads = reference_vjp(*arrays, scale=0.3)
    out, grads = _run(arrays, triton.Config(), scale=0.3)
    assert relative_error(out, want) < 1e-5
    for got, ref in zip(grads, want_grads, strict=True):
        assert relative_error(got, ref) < 1e-5


def _cuda_lowering_text(shape, dtype, config):
    b, n, h, dk, dv = shape
    q = jnp.ones((b, n, h, dk), dtype)
    v = jnp.ones((b, n, h, dv), dtype)
    g = jnp.zeros((b, n, h, dk), jnp.float32)

    def loss(*args):
        out = triton.bigla_triton(*args, config=config)
        return jnp.sum(out.astype(jnp.float32))

    return h100_lowering(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), q, q, v, g, g)


@pytest.mark.parametrize(
    ("dtype", "config", "calls"),
    [
        (jnp.float32, triton.Config(segments=1), 5),
        (jnp.bfloat16, triton.Config(segments=3), 9),
        (jnp.bfloat16, triton.Config(chunk=16, bwd_chunk=64, bwd_warps=2), 9),
        (jnp.bfloat16, triton.Config(segments=3, save_states=False), 9),
        (jnp.bfloat16, triton.Config(save_scores=False), 9),
        (jnp.bfloat16, triton.Config(segments=3, state_passes=1), 7),
        (jnp.bfloat16, triton.Config(diag="split"), 9),
        (jnp.float32, triton.Config(diag="split", chunk=32, save_scores=False), 9),
        (jnp.bfloat16, triton.Config(merge_backward=True), 8),
        (jnp.float32, triton.Config(merge_backward=True, save_scores=False, segments=1), 4),
    ],
    ids=[
        "fp32",
        "bf16-segments",
        "bf16-chunk16-bwd64",
        "bf16-recomputed-states",
        "bf16-no-scores",
        "bf16-one-pass-states",
        "bf16-split",
        "fp32-split-no-scores",
        "bf16-merged-backward",
        "fp32-merged-backward",
    ],
)
def test_forward_and_backward_lower_to_triton_for_cuda(dtype, config, calls):
    """States, chunk (one forward, two backward) and, with segments, fold kernels lower
    (two state kernels per direction by default: summaries, then complete carries)."""
    text = _cuda_lowering_text((2, 197, 3, 32, 64), dtype, config)
    assert text.count(TRITON_CALL) == calls


def test_config_and_input_validation():
    with pytest.raises(ValueError, match="chunk=24"):
        triton.Config(chunk=24)
    with pytest.raises(ValueError, match="bwd_chunk=48"):
        triton.Config(bwd_chunk=48)
    with pytest.raises(ValueError, match="bwd_warps=3"):
        triton.Config(bwd_warps=3)
    backward = triton.Config(chunk=16, bwd_chunk=64, bwd_warps=8, bwd_stages=3).backward()
    assert (backward.chunk, backward.num_warps, backward.num_stages) == (64, 8, 3)
    assert backward.bwd_chunk is None and backward.backward() == backward
    with pytest.raises(ValueError, match="state_passes=3"):
        triton.Config(state_passes=3)
    with pytest.raises(ValueError, match="segments=0"):
        triton.Config(segments=0)
    q = jnp.zeros((1, 8, 1, 16), jnp.float32)
    v = jnp.zeros((1, 8, 1, 32), jnp.bfloat16)
    with pytest.raises(TypeError, match="one dtype"):
        triton.bigla_triton(q, q, v, q, q, interpret=True)
    with pytest.raises(ValueError, match="Dk=8"):
        triton.bigla_triton(q[..., :8], q[..., :8], v.astype(q.dtype), q[..., :8], q[..., :8])


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (16384 tokens are too slow interpreted)")
@pytest.mark.parametrize("diag", ["loop", "split"])
@pytest.mark.parametrize("gates", ["steep", "random"])
def test_long_sequence_matches_xla_form(gates, diag):
    """A 2048-pixel image's 16384 tokens: finite and equal to the chunked xla form."""
    arrays = cast_inputs(random_inputs(3, 2, 16384, 3, 32, 64, gates=gates), np.float32)
    out, grads = _run(arrays, triton.Config(diag=diag))
    fn = jax.jit(xla.bigla_xla)
    want, vjp = jax.vjp(fn, *arrays[:5])
    want_grads = vjp(jnp.asarray(arrays[5]))
    assert relative_error(out, want) < 1e-5
    for name, got, ref in zip(GRAD_NAMES, grads, want_grads, strict=True):
        assert np.isfinite(np.asarray(got)).all(), name
        assert relative_error(got, ref) < 1e-5, name


def test_fp32_chunks_are_capped_on_the_gpu():
    """64-token fp32 chunks overflow an SM's shared memory (H200: 294,912 of 232,448 B asked),
    so the GPU kernels take at most FP32_MAX_CHUNK tokens per chunk, and FP32_SPLIT_MAX_CHUNK
    with diag="split" (H100: 311,296 B at 32 tokens, Dk = 64, Dv = 128); bf16 and interpret
    mode keep the configured chunk."""
    q = jnp.zeros((1, 300, 1, 32), jnp.float32)
    v = jnp.zeros((1, 300, 1, 64), jnp.float32)
    loop = triton.Config(chunk=64, diag="loop")
    assert triton._dims(q, v, None, loop, interpret=False).bt == triton.FP32_MAX_CHUNK == 32
    assert triton._dims(q, v, None, loop.backward(), interpret=False).bt == 32
    split = triton.Config(chunk=64, diag="split")
    assert triton._dims(q, v, None, split, interpret=False).bt == triton.FP32_SPLIT_MAX_CHUNK
    assert triton.FP32_SPLIT_MAX_CHUNK == 16
    for config in (loop, split):
        assert triton._dims(q, v, None, config, interpret=True).bt == 64
        low = triton._dims(q.astype(jnp.bfloat16), v.astype(jnp.bfloat16), None, config, False)
        assert low.bt == 64


@pytest.mark.parametrize(("gates", "fallback"), [("cliff", True), ("steep", False)])
def test_split_diag_takes_the_exact_loop_only_past_the_limit(gates, fallback):
    """diag="split" gives the loop path's results bit for bit where every chunk is steeper than
    SPLIT_LIMIT (each program's fallback body), and different roundings where it is not."""
    arrays = cast_inputs(random_inputs(5, 1, 96, 2, 32, 64, gates=gates), np.float32)
    split = _run(arrays, triton.Config(diag="split"))
    loop = _run(arrays, triton.Config(diag="loop"))
    pairs = zip(jax.tree.leaves(split), jax.tree.leaves(loop), strict=True)
    same = [np.array_equal(a, b) for a, b in pairs]
    assert all(same) if fallback else not all(same)


@pytest.mark.parametrize(("n", "kept"), [(1024, True), (1025, False)])
def test_default_keeps_state_carries_only_for_short_sequences(n, kept):
    """save_states=None: the forward's [B, H, chunks, Dk, Dv] carries are residuals up to
    SAVE_STATES_MAX_TOKENS tokens and recomputed by the backward beyond; the chunks' [BT, BT]
    scores are kept at both lengths (traced, not run)."""
    from jax._src.ad_checkpoint import saved_residuals

    assert triton.SAVE_STATES_MAX_TOKENS == 1024
    q = jnp.zeros((1, n, 1, 16), jnp.bfloat16)
    v = jnp.zeros((1, n, 1, 32), jnp.bfloat16)
    g = jnp.zeros((1, n, 1, 16), jnp.float32)

    def loss(q, k, v, gf, gb):
        return triton.bigla_triton(q, k, v, gf, gb, interpret=True).astype(jnp.float32).sum()

    shapes = [aval.shape for aval, _ in saved_residuals(loss, q, q, v, g, g)]
    carries = [s for s in shapes if len(s) == 5 and s[-2:] == (16, 32)]
    scores = [s for s in shapes if len(s) == 5 and s[-2:] == (16, 16)]
    assert len(carries) == (2 if kept else 0), shapes
    assert len(scores) == 1, shapes


def test_merged_backward_warps_come_from_config_then_module(monkeypatch):
    merged = lambda **kw: triton._merged_warps(triton.Config(**kw).backward())
    monkeypatch.setattr(triton, "MERGED_BACKWARD_WARPS", 4)
    assert merged() == 4
    assert merged(merged_warps=8) == 8
    monkeypatch.setattr(triton, "MERGED_BACKWARD_WARPS", None)
    assert merged(num_warps=2) == 2
    assert merged(num_warps=2, bwd_warps=1) == 1
    with pytest.raises(ValueError, match="merged_warps=3"):
        triton.Config(merged_warps=3)
