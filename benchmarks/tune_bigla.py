"""Tuning sweep of the Triton BiGLA kernels' Config knobs; prints a table, writes JSON.

For every shape and every Config of the sweep it times the jitted forward + backward
(``jax.vjp``: output and all five input gradients) with CUPTI and keeps the per-kernel
split (median over ``--iters`` calls of each kernel's time), so that the best knobs of each
kernel can be read off one sweep: the forward chunk kernel depends only on ``chunk``,
``num_warps`` and ``num_stages``; the backward kernels on the ``bwd_*`` fields (None: the
forward's values).

The sweep is the cartesian product of ``--grid`` (``field=v1,v2`` items) plus any explicit
``--configs``. Without CUPTI (a CPU) it falls back to wall time and no per-kernel split.

Usage::

    python -m benchmarks.tune_bigla --grid chunk=16,32,64 num_warps=2,4,8 \\
        --out benchmarks/results/tune_bigla_h100.json
    python -m benchmarks.tune_bigla --configs "" "bwd_warps=8" "chunk=16,bwd_chunk=32"
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics
import time

import jax

from benchmarks.bench_bigla import DEFAULT_SHAPES, DTYPES, make_inputs, parse_config
from pallas_kernels.bigla import triton


def grid_configs(items: list[str]) -> list[dict]:
    """``["chunk=16,32", "num_warps=4"]`` -> the cartesian product as a list of dicts."""
    axes = []
    for item in items:
        key, values = item.split("=")
        axes.append([(key.strip(), None if v == "None" else int(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else []


def _vjp_fn(config: triton.Config, interpret: bool):
    op = lambda *a: triton.bigla_triton(*a, config=config, interpret=interpret)

    def fwd_bwd(q, k, v, gf, gb, do):
        out, vjp = jax.vjp(op, q, k, v, gf, gb)
        return out, vjp(do)

    return jax.jit(fwd_bwd)


def _per_kernel_median(runs) -> dict[str, float]:
    """[[(name, ms), ...] per call] -> {name: median ms} (repeated names get a #n suffix)."""
    times = collections.defaultdict(list)
    for run in runs:
        seen = collections.Counter()
        for name, ms in run:
            seen[name] += 1
            times[name if seen[name] == 1 else f"{name}#{seen[name]}"].append(ms)
    return {name: statistics.median(ms) for name, ms in times.items()}


def time_config(shape, dtype, fields: dict, iters: int, once: bool = False) -> dict:
    """One row: total and per-kernel device ms of the fwd+bwd with Config(**fields).

    With ``once`` it only compiles and runs the function once (for an outside profiler such
    as Nsight Compute, which cannot share CUPTI: one launch of each kernel per config).
    """
    config = triton.Config(**fields)
    on_gpu = jax.default_backend() == "gpu"
    fn = _vjp_fn(config, interpret=not on_gpu)
    args = make_inputs(shape, dtype)
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    row = {"shape": list(shape), "config": fields, "compile_s": compile_s}
    if once:
        row.update(timer="wall", ms=compile_s * 1e3, kernels={})
    elif on_gpu:
        from jax.experimental.mosaic.gpu import profiler

        _, runs = profiler.measure(fn, aggregate=False, iterations=iters)(*args)
        kernels = _per_kernel_median(runs)
        row.update(timer="cupti", ms=sum(kernels.values()), kernels=kernels)
    else:
        walls = []
        for _ in range(iters):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            walls.append((time.perf_counter() - start) * 1e3)
        row.update(timer="wall", ms=statistics.median(walls), kernels={})
    return row


def _short(name: str) -> str:
    return name.removeprefix("bigla_")


def print_table(rows):
    """Per shape: one line per config, sorted by total ms, with the per-kernel split."""
    by_shape = collections.defaultdict(list)
    for r in rows:
        by_shape[tuple(r["shape"])].append(r)
    for shape, group in by_shape.items():
        names = sorted({k for r in group for k in r["kernels"]})
        print(f"\n{shape}  (ms, {group[0]['timer']})")
        print(f"{'config':44} {'total':>7} " + " ".join(f"{_short(n)[:12]:>12}" for n in names))
        for r in sorted(group, key=lambda r: r["ms"]):
            text = ",".join(f"{k}={v}" for k, v in r["config"].items()) or "(defaults)"
            cells = " ".join(f"{r['kernels'].get(n, float('nan')):12.4f}" for n in names)
            print(f"{text[:44]:44} {r['ms']:7.4f} {cells}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", help="B,H,N,Dk,Dv (default: the ViG shapes)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--grid", nargs="*", default=[], help='e.g. "chunk=16,32" "num_warps=4,8"')
    parser.add_argument("--configs", nargs="*", default=[], help='e.g. "" "bwd_warps=8,chunk=16"')
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--once", action="store_true", help="one call per config (for ncu)")
    args = parser.parse_args(argv)

    shapes = (
        [tuple(int(x) for x in s.split(",")) for s in args.shapes]
        if args.shapes
        else list(DEFAULT_SHAPES)
    )
    configs = [parse_config(c) for c in args.configs] + grid_configs(args.grid)
    configs = configs or [{}]
    device = jax.devices()[0].device_kind
    rows = []
    for shape in shapes:
        for fields in configs:
            try:
                row = time_config(shape, DTYPES[args.dtype], fields, args.iters, args.once)
            except Exception as err:  # noqa: BLE001  (a config that fails to compile: keep going)
                print(f"{shape} {fields}: {type(err).__name__}: {str(err)[:200]}", flush=True)
                continue
            row["dtype"] = args.dtype
            rows.append(row)
            print(f"  {shape} {fields} {row['ms']:.4f} ms", flush=True)
            if args.out:  # partial results survive a timeout
                _write(args.out, rows, device)
    print_table(rows)
    if args.out:
        _write(args.out, rows, device)
        print(f"wrote {args.out}")
    return rows


def _write(path, rows, device):
    with open(path, "w") as f:
        json.dump({"device": device, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
