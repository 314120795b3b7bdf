"""The public BiGLA op: one function, several implementations.

``bigla(q, k, v, log_gate_fwd, log_gate_bwd)`` computes, per batch element and head,

    o_t = scale/2 * q_t (S^f_t + S^b_t),
    S^f_t = diag(exp gf_t) S^f_{t-1} + k_t^T v_t,   S^b_t = diag(exp gb_t) S^b_{t+1} + k_t^T v_t,

i.e. the mean of a forward and a backward gated-linear-attention scan that both include the
current token (vig-reference.md section 2.4).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.bigla import reference

IMPLEMENTATIONS = ("reference", "associative_scan", "xla", "triton", "mosaic")


def _load(name: str) -> Callable | None:
    """Returns the implementation ``name`` or None when its module is not present."""
    if name == "reference":
        return reference.bigla_quadratic
    if name == "associative_scan":
        return reference.bigla_associative_scan
    try:
        if name == "xla":
            from pallas_kernels.bigla import xla

            return xla.bigla_xla
        if name == "triton":
            from pallas_kernels.bigla import triton

            return triton.bigla_triton
        if name == "mosaic":
            from pallas_kernels.bigla import mosaic

            return mosaic.bigla_mosaic
    except ImportError:
        return None
    raise ValueError(f"implementation={name!r}; expected one of {IMPLEMENTATIONS}")


_GPU_ONLY = ("triton", "mosaic")


def available_implementations(backend: str | None = None) -> tuple[str, ...]:
    """Names of the implementations that can run on ``backend`` (default: JAX's default)."""
    backend = backend or jax.default_backend()
    names = []
    for name in IMPLEMENTATIONS:
        if _load(name) is None:
            continue
        if name in _GPU_ONLY and backend != "gpu":
            continue
        names.append(name)
    return tuple(names)


def default_implementation(backend: str | None = None) -> str:
    """The fastest implementation that runs on ``backend``."""
    available = available_implementations(backend)
    for name in ("triton", "xla", "associative_scan"):
        if name in available:
            return name
    return "reference"


def _check_floating(arrays: dict[str, jax.Array]) -> None:
    for name, x in arrays.items():
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} has dtype {x.dtype}; expected a floating dtype")


def _check_inputs(q, k, v, gf, gb) -> None:
    arrays = {"q": q, "k": k, "v": v, "log_gate_fwd": gf, "log_gate_bwd": gb}
    for name, x in arrays.items():
        if x.ndim != 4:
            raise ValueError(
                f"{name} has shape {x.shape}; expected 4 dims [B, N, H, D] (token-major)"
            )
    _check_floating(arrays)
    for name in ("k", "log_gate_fwd", "log_gate_bwd"):
        if arrays[name].shape != q.shape:
            raise ValueError(
                f"{name} has shape {arrays[name].shape}; expected q's shape {q.shape} [B, N, H, Dk]"
            )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v has shape {v.shape}; expected [B, N, H, Dv] with [B, N, H] = {q.shape[:3]} as q"
        )


def bigla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_gate_fwd: jax.Array,
    log_gate_bwd: jax.Array,
    *,
    scale: float | None = None,
    implementation: str | None = None,
    **options,
) -> jax.Array:
    """Bidirectional gated linear attention.

    Args:
      q, k: [B, N, H, Dk] queries and keys.
      v: [B, N, H, Dv] values.
      log_gate_fwd, log_gate_bwd: [B, N, H, Dk] per-step log forget gates (values <= 0; ViG
        passes ``logsigmoid(x) / 16``) of the raster-order and the reversed-order scan.
      scale: query scale; ``Dk ** -0.5`` if None.
      implementation: one of :data:`IMPLEMENTATIONS`, or None for the fastest that runs on the
        current backend.
      **options: passed to the implementation (e.g. ``interpret=True`` for the Pallas ones).

    Returns:
      [B, N, H, Dv] in v's dtype: ``(o_fwd + o_bwd) / 2``.
    """
    _check_inputs(q, k, v, log_gate_fwd, log_gate_bwd)
    implementation = _runnable(implementation, options)
    fn = functools.partial(_load(implementation), scale=scale, **options)
    return _per_batch_shard(fn, q, 5)(q, k, v, log_gate_fwd, log_gate_bwd)


def _runnable(implementation: str | None, options: dict) -> str:
    """``implementation`` (None: the backend's default), checked to be known and to run here
    (on the GPU backend's terms with ``interpret=True``)."""
    if implementation is None:
        implementation = default_implementation()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r}; expected one of {IMPLEMENTATIONS} or None"
        )
    available = available_implementations("gpu" if options.get("interpret", False) else None)
    if implementation not in available:
        raise ValueError(
            f"implementation={implementation!r} cannot run on backend "
            f"{jax.default_backend()!r}; available here: {available}"
        )
    return implementation


def bigla_packed(
    qkv: jax.Array,
    log_gate_fwd: jax.Array,
    log_gate_bwd: jax.Array,
    *,
    num_heads: int,
    scale: float | None = None,
    implementation: str | None = None,
    **options,
) -> jax.Array:
    """:func:`bigla` with q, k and v packed as one model product ``[q | k | v]`` computes them.

    Args:
      qkv: [B, N, 2K + V] = [q | k | v], each head-major: q's head h is columns
        [h K/H, (h+1) K/H), k's and v's likewise.
      log_gate_fwd, log_gate_bwd: [B, N, K], head-major like q.
      num_heads: H (K and V multiples of it).
      scale, implementation, options: as :func:`bigla`.

    Returns:
      [B, N, H, V/H], equal to ``bigla`` on the split arrays. The "triton" implementation
      reads q, k and v in place (:func:`pallas_kernels.bigla.triton.bigla_triton_packed`)
      where its head widths allow (:func:`pallas_kernels.bigla.triton.packs`); otherwise, and
      for the other implementations, q, k and v are split
      (:func:`pallas_kernels.bigla.reference.split_packed`).
    """
    gates = (log_gate_fwd, log_gate_bwd)
    if qkv.ndim != 3 or any(g.ndim != 3 or g.shape != log_gate_fwd.shape for g in gates):
        raise ValueError(
            f"qkv {qkv.shape}, log gates {log_gate_fwd.shape} and {log_gate_bwd.shape}; "
            "expected [B, N, 2K + V] and two [B, N, K]"
        )
    b, n, width = qkv.shape
    key_dim = log_gate_fwd.shape[-1]
    value_dim = width - 2 * key_dim
    if log_gate_fwd.shape[:2] != (b, n) or value_dim <= 0:
        raise ValueError(
            f"qkv {qkv.shape} and log gates {log_gate_fwd.shape}: expected the same [B, N] and "
            "qkv wider than 2K"
        )
    if key_dim % num_heads or value_dim % num_heads:
        raise ValueError(
            f"K={key_dim} and V={value_dim} (qkv width {width} - 2K) over num_heads="
            f"{num_heads}: expected multiples of num_heads"
        )
    _check_floating({"qkv": qkv, "log_gate_fwd": log_gate_fwd, "log_gate_bwd": log_gate_bwd})
    implementation = _runnable(implementation, options)
    if implementation == "triton":
        from pallas_kernels.bigla import triton  # importable: _runnable found it available

        fn = functools.partial(
            triton.bigla_triton_packed, num_heads=num_heads, scale=scale, **options
        )
        return _per_batch_shard(fn, qkv, 3)(qkv, log_gate_fwd, log_gate_bwd)
    operands = reference.split_packed(qkv, log_gate_fwd, log_gate_bwd, num_heads)
    return bigla(*operands, scale=scale, implementation=implementation, **options)


def _per_batch_shard(fn: Callable, x: jax.Array, n_args: int) -> Callable:
    """``fn`` run per batch shard under a mesh that shards x's batch dimension, else ``fn``.

    Each device runs the op on its own batch shard: a Pallas call has no sharding rule of its
    own, and the op never mixes batch elements."""
    axes = _batch_mesh_axes(x)
    if not axes:
        return fn
    spec = jax.sharding.PartitionSpec(axes)
    return jax.shard_map(fn, in_specs=(spec,) * n_args, out_specs=spec, check_vma=False)


BATCH_AXIS_NAMES = ("data", "batch", "dp", "fsdp")


def _batch_mesh_axes(q: jax.Array) -> tuple[str, ...]:
    """Mesh axes that shard the batch dimension under the current mesh (empty: no shard_map).

    With explicit sharding, the axes of q's batch dimension; otherwise the mesh axes named in
    :data:`BATCH_AXIS_NAMES` (all non-trivial axes when none is). Empty when no mesh is set or
    when the batch size is not a multiple of the number of shards.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return ()
    spec = getattr(getattr(jax.typeof(q), "sharding", None), "spec", None)
    if spec and spec[0] is not None:
        axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    else:
        named = [a for a in mesh.axis_names if a in BATCH_AXIS_NAMES and mesh.shape[a] > 1]
        axes = named or [a for a in mesh.axis_names if mesh.shape[a] > 1]
    shards = 1
    for a in axes:
        shards *= mesh.shape[a]
    return tuple(axes) if q.shape[0] % shards == 0 else ()
