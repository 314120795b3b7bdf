"""Times ViG's 3x3 depthwise convolution per implementation (``vig_jax.dwconv``); table + JSON.

For each shape [B, H, W, C] (the mixer's conv at ViG-T 224/b128, 1024/b8, 2048/b8 and ViG-S
224/b128) and implementation, the forward + backward (``jax.vjp``: dx and dw) is compiled
``--compiles`` times from scratch (XLA picks cuDNN's algorithm anew at each compilation) and
each executable timed by CUPTI (sum of kernel times of one call, median of ``--iters``); the
slowest kernel of each is recorded.

    python benchmarks/bench_dwconv.py --out benchmarks/results/dwconv_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp

from benchmarks.bench_bigla import _cupti
from vig_jax.dwconv import IMPLEMENTATIONS, depthwise_conv3x3

DEFAULT_SHAPES = ((128, 14, 14, 192), (8, 64, 64, 192), (8, 128, 128, 192), (128, 14, 14, 384))


def time_once(impl: str, shape, dtype, iters: int, measure, seed: int) -> dict:
    """One fresh compilation of fwd+bwd of ``impl`` at ``shape``, timed."""
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], shape, dtype)
    kernel = jax.random.normal(keys[1], (3, 3, 1, shape[-1]), jnp.float32) * 0.1
    dy = jax.random.normal(keys[2], shape, dtype)

    def fwd_bwd(x, kernel, dy):
        y, vjp = jax.vjp(
            lambda a, w: depthwise_conv3x3(a, w, implementation=impl, dtype=dtype), x, kernel
        )
        return y, *vjp(dy)

    compiled = jax.jit(fwd_bwd).lower(x, kernel, dy).compile()
    _, per_iter = measure(compiled, iterations=iters)(x, kernel, dy)
    _, kernels = measure(compiled, aggregate=False)(x, kernel, dy)
    per_iter = per_iter if isinstance(per_iter, list) else [per_iter]
    top = max(kernels, key=lambda item: item[1])
    return dict(ms=statistics.median(per_iter), kernels=len(kernels), slowest=list(top))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", help="B,H,W,C (default: the ViG shapes)")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compiles", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    measure = _cupti()
    if measure is None:
        raise SystemExit("bench_dwconv needs a GPU with CUPTI")
    shapes = (
        [tuple(int(v) for v in s.split(",")) for s in args.shapes]
        if args.shapes
        else DEFAULT_SHAPES
    )
    dtype = jnp.dtype(args.dtype)
    rows = []
    for shape in shapes:
        for impl in args.impls.split(","):
            for i in range(args.compiles if impl == "cudnn" else 1):
                row = dict(shape=list(shape), impl=impl, dtype=args.dtype, compile=i)
                row.update(time_once(impl, shape, dtype, args.iters, measure, seed=i))
                rows.append(row)
                print(
                    f"{str(shape):20} {impl:8} #{i} {row['ms']:.4f} ms, {row['kernels']} "
                    f"kernels, slowest {row['slowest'][0][:60]} {row['slowest'][1]:.4f}",
                    flush=True,
                )
    device = jax.devices()[0].device_kind
    print(f"\ndepthwise 3x3 fwd+bwd on {device}, {args.dtype}, CUPTI ms (min / max over compiles)")
    print(f"{'shape':22} " + " ".join(f"{impl:>16}" for impl in args.impls.split(",")))
    for shape in shapes:
        cells = []
        for impl in args.impls.split(","):
            ms = [r["ms"] for r in rows if r["impl"] == impl and tuple(r["shape"]) == shape]
            cells.append(f"{min(ms):7.4f} / {max(ms):6.4f}")
        print(f"{str(shape):22} " + " ".join(f"{c:>16}" for c in cells))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device, jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
