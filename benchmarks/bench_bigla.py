"""Times every BiGLA implementation available on the current device; prints a table, writes JSON.

For each shape (B, H, N, Dk, Dv), dtype (bf16 / fp32 for q, k, v; gates always fp32) and
implementation it measures the forward and the forward + backward (``jax.vjp``: output and all
five input gradients):

* device time: CUPTI (``jax.experimental.mosaic.gpu.profiler.measure``), the sum of the kernel
  times of one call, median over ``--iters`` calls after a warm-up; on platforms without CUPTI
  the wall time is used instead;
* wall time: median of ``block_until_ready`` wall times (includes launch gaps);
* GB/s and the memory floor: bytes that must move (inputs read once, outputs written once; for
  forward + backward also the cotangent and the five gradients) over the device time, and over
  the copy bandwidth measured on the same device with a large array copy.

Usage::

    python benchmarks/bench_bigla.py --out benchmarks/results/bigla_h100.json
    python benchmarks/bench_bigla.py --shapes 8,3,4096,32,64 --dtypes bf16 --impls triton,xla
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.bigla import api

DEFAULT_SHAPES = ((128, 3, 196, 32, 64), (8, 3, 4096, 32, 64), (128, 12, 196, 32, 64))
DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}
# FLA official path (ViG's direction-stacked fused_chunk_gla) on an H100, vig-reference.md s13:
# (forward ms, forward + backward ms). On another GPU, time the official kernel there with
# benchmarks/bench_official.py and pass its JSON as --official.
FLA_OFFICIAL_MS = {
    ((128, 3, 196, 32, 64), "fp32"): (0.632, 2.245),
    ((128, 3, 196, 32, 64), "bf16"): (0.427, 1.982),
    ((8, 3, 4096, 32, 64), "fp32"): (0.868, 3.016),
    ((8, 3, 4096, 32, 64), "bf16"): (0.559, 1.838),
    ((128, 12, 196, 32, 64), "fp32"): (1.745, 5.524),
    ((128, 12, 196, 32, 64), "bf16"): (1.211, 3.548),
}


def _cupti():
    """The CUPTI ``measure`` function, or None where it cannot run."""
    if jax.default_backend() != "gpu":
        return None
    try:
        from jax.experimental.mosaic.gpu import profiler

        return profiler.measure
    except Exception:  # noqa: BLE001  (any import/initialisation failure: fall back to wall)
        return None


def _wall_ms(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _device_ms(fn, args, iters: int, measure) -> tuple[float | None, list | None]:
    """Median CUPTI time of one call (ms) and the per-kernel split (name, ms) of one call."""
    if measure is None:
        return None, None
    try:
        _, per_iter = measure(fn, iterations=iters)(*args)
        _, kernels = measure(fn, aggregate=False)(*args)
    except Exception as err:  # noqa: BLE001
        print(f"  CUPTI failed ({type(err).__name__}: {err}); wall time only")
        return None, None
    if per_iter is None:
        return None, None
    per_iter = per_iter if isinstance(per_iter, list) else [per_iter]
    return statistics.median(per_iter), kernels


def copy_bandwidth_gbs(iters: int = 20) -> float:
    """Device copy bandwidth (bytes read + written per second, GB/s) with a 1 GiB array."""
    x = jnp.zeros((256, 1024, 1024), jnp.float32)
    fn = jax.jit(lambda a: a + 1.0)
    ms, _ = _device_ms(fn, (x,), iters, _cupti())
    if ms is None:
        ms = _wall_ms(fn, (x,), iters)
    return 2 * x.nbytes / (ms * 1e-3) / 1e9


def make_inputs(shape, dtype, seed=0):
    """Random q, k, v, gates (logsigmoid(3 N(0,1)) / 16, fp32) and cotangent for ``shape``."""
    b, h, n, dk, dv = shape
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (b, n, h, dk), dtype)
    k = jax.random.normal(keys[1], (b, n, h, dk), dtype)
    v = jax.random.normal(keys[2], (b, n, h, dv), dtype)
    gf = jax.nn.log_sigmoid(3 * jax.random.normal(keys[3], (b, n, h, dk), jnp.float32)) / 16
    gb = jax.nn.log_sigmoid(3 * jax.random.normal(keys[4], (b, n, h, dk), jnp.float32)) / 16
    do = jax.random.normal(keys[5], (b, n, h, dv), dtype)
    return q, k, v, gf, gb, do


def _bytes(shape, dtype, backward: bool) -> int:
    """Bytes that any implementation must move: inputs read once, outputs written once."""
    b, h, n, dk, dv = shape
    item = jnp.dtype(dtype).itemsize
    qkv = b * n * h * (2 * dk + dv) * item
    gates = 2 * b * n * h * dk * 4
    o = b * n * h * dv * item
    fwd = qkv + gates + o
    if not backward:
        return fwd
    # Forward + backward: also read do and write dq, dk, dv, dgf, dgb.
    return fwd + o + (qkv + gates)


def parse_config(text: str) -> dict:
    """``"num_warps=8,diag=split"`` -> {"num_warps": 8, "diag": "split"}; "" -> {}.

    Values are Config fields: integers, None, or strings (anything that is not an integer).
    """
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, value = (x.strip() for x in item.split("="))
        out[key] = None if value == "None" else int(value) if value.lstrip("-").isdigit() else value
    return out


def bench_one(impl, shape, dtype_name, iters, measure, bandwidth, config=None):
    """Forward and forward + backward rows of one implementation, shape and dtype."""
    dtype = DTYPES[dtype_name]
    q, k, v, gf, gb, do = make_inputs(shape, dtype)
    options = {}
    if config:
        from pallas_kernels.bigla.triton import Config

        options["config"] = Config(**parse_config(config))
    op = lambda *a: api.bigla(*a, implementation=impl, **options)

    def fwd_bwd(q, k, v, gf, gb, do):
        out, vjp = jax.vjp(op, q, k, v, gf, gb)
        return out, vjp(do)

    rows = []
    for mode, fn, args in (
        ("fwd", jax.jit(op), (q, k, v, gf, gb)),
        ("fwd+bwd", jax.jit(fwd_bwd), (q, k, v, gf, gb, do)),
    ):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))  # compile + warm-up
        first = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        once = time.perf_counter() - start
        n_iter = iters if once < 0.05 else max(3, min(iters, int(1.0 / once)))
        wall = _wall_ms(fn, args, n_iter)
        dev, kernels = _device_ms(fn, args, n_iter, measure)
        ms = dev if dev is not None else wall
        nbytes = _bytes(shape, dtype, mode != "fwd")
        floor_ms = nbytes / (bandwidth * 1e9) * 1e3
        rows.append(
            {
                "impl": impl if not config else f"{impl}[{config}]",
                "shape": list(shape),
                "dtype": dtype_name,
                "mode": mode,
                "ms": ms,
                "timer": "cupti" if dev is not None else "wall",
                "wall_ms": wall,
                "iters": n_iter,
                "compile_s": first,
                "bytes": nbytes,
                "gbs": nbytes / (ms * 1e-3) / 1e9,
                "floor_ms": floor_ms,
                "x_floor": ms / floor_ms,
                "kernels": kernels,
            }
        )
    return rows


def official_ms(path: str | None) -> tuple[str, dict]:
    """(column title, {(shape, dtype): (fwd ms, fwd+bwd ms)}) of the official FLA kernel:
    measured on this GPU by bench_official.py (its JSON at ``path``), else the H100 figures."""
    if path is None:
        return "FLA H100", FLA_OFFICIAL_MS
    with open(path) as f:
        rows = [r for r in json.load(f)["rows"] if r["impl"] == "fla_official_kernel"]
    table = {}
    for r in rows:
        key = (tuple(r["shape"]), r["dtype"])
        fwd, both = table.get(key, (None, None))
        table[key] = (r["ms"], both) if r["mode"] == "fwd" else (fwd, r["ms"])
    return "FLA ms", table


def print_table(rows, device, bandwidth, official=("FLA H100", FLA_OFFICIAL_MS)):
    title, fla_table = official
    print(f"\nBiGLA on {device}; copy bandwidth {bandwidth:.0f} GB/s (read + write)")
    head = (
        f"{'shape (B,H,N,Dk,Dv)':24} {'dtype':5} {'mode':8} {'impl':30} {'ms':>8} "
        f"{'wall ms':>8} {'GB/s':>7} {'x floor':>8} {title:>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        fla = fla_table.get((tuple(r["shape"]), r["dtype"]))
        fla = None if fla is None else fla[r["mode"] == "fwd+bwd"]
        fla_ms = "" if fla is None else f"{fla:.3f}"
        print(
            f"{str(tuple(r['shape'])):24} {r['dtype']:5} {r['mode']:8} {r['impl']:30} "
            f"{r['ms']:8.3f} {r['wall_ms']:8.3f} {r['gbs']:7.0f} {r['x_floor']:8.1f} {fla_ms:>8}"
        )


def write_json(path, rows, device, bandwidth):
    with open(path, "w") as f:
        json.dump(
            {
                "device": device,
                "jax": jax.__version__,
                "copy_bandwidth_gbs": bandwidth,
                "fla_official_ms": {f"{s}/{d}": v for (s, d), v in FLA_OFFICIAL_MS.items()},
                "rows": rows,
            },
            f,
            indent=1,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", help="B,H,N,Dk,Dv (default: the ViG shapes)")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--impls", default=None, help="comma list (default: all available)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument(
        "--triton-configs",
        nargs="*",
        default=[],
        help='extra Triton Config variants to time, e.g. "num_warps=8" "chunk=32,num_stages=2"',
    )
    parser.add_argument(
        "--official",
        default=None,
        help="bench_official.py JSON from this GPU for the FLA column (default: H100 figures)",
    )
    args = parser.parse_args(argv)

    shapes = (
        [tuple(int(x) for x in s.split(",")) for s in args.shapes]
        if args.shapes
        else list(DEFAULT_SHAPES)
    )
    impls = args.impls.split(",") if args.impls else list(api.available_implementations())
    device = jax.devices()[0].device_kind
    measure = _cupti()
    bandwidth = copy_bandwidth_gbs()
    runs = [(impl, None) for impl in impls] + [("triton", c) for c in args.triton_configs]
    rows = []
    for shape in shapes:
        for dtype_name in args.dtypes.split(","):
            for impl, config in runs:
                try:
                    new = bench_one(impl, shape, dtype_name, args.iters, measure, bandwidth, config)
                except Exception as err:  # noqa: BLE001  (e.g. out of memory: keep going)
                    print(f"{impl} {shape} {dtype_name}: {type(err).__name__}: {str(err)[:300]}")
                    continue
                rows += new
                for r in new:
                    print(
                        f"  {r['impl']:17} {shape} {dtype_name} {r['mode']:8} {r['ms']:.3f} ms "
                        f"(compile {r['compile_s']:.1f} s)",
                        flush=True,
                    )
                if args.out:  # partial results survive a timeout
                    write_json(args.out, rows, device, bandwidth)
    print_table(rows, device, bandwidth, official_ms(args.official))
    if args.out:
        write_json(args.out, rows, device, bandwidth)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
