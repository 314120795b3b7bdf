"""Where one training step's GPU time goes: CUPTI kernel times, grouped, for each model.

Runs the trainer's jitted step (``benchmarks/bench_train.py``'s configuration, ``--bare`` by
default: forward, loss, backward, clip + AdamW) on batches already on the device, then records
every kernel of one step with CUPTI (``jax.experimental.mosaic.gpu.profiler.measure``). Prints
the groups (BiGLA Pallas kernels, convolutions, matrix products, other XLA fusions, copies) and
the slowest kernels, and the median wall time of ``--steps`` steps of the same executable
(compiles differ: XLA picks gemm and convolution algorithms by timing them), and writes JSON.

    python -m benchmarks.profile_step --models vig_t,deit_t --batch 128 --img 224 \\
        --out benchmarks/results/profile_step_h100.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import jax

from benchmarks.bench_train import add_vig_implementation_args, bench_config, fake_device_batch
from train import sharding, trainer

GROUPS = (
    ("bigla (Pallas)", ("bigla",)),
    ("convolution", ("convolution", "conv2d", "convolve", "wgrad", "dgrad", "cudnn")),
    ("matmul", ("gemm", "xmma", "cutlass", "cublas", "nvjet", "matmul")),
    ("copy / transpose", ("memcpy", "transpose", "copy")),
    ("reduction", ("reduce",)),
)


def group_of(name: str) -> str:
    """The group of a kernel name (first matching rule of GROUPS, else 'other fusion')."""
    low = name.lower()
    for group, keys in GROUPS:
        if any(key in low for key in keys):
            return group
    return "other fusion"


def _kernels_of_one_call(fn) -> list[tuple[str, float]]:
    """(kernel name, ms) of every kernel that one call of ``fn`` launches, through CUPTI.

    ``profiler.measure`` wraps its function in ``jax.jit``; the trainer's step must be called
    outside of a trace (it enters its mesh), so this uses the same CUPTI hooks directly.
    """
    from jax._src.lib import mosaic_gpu

    ext = mosaic_gpu._mosaic_gpu_ext
    ext._cupti_init()
    try:
        jax.block_until_ready(fn())
    finally:
        timings = ext._cupti_get_timings(True)
    return [(name, float(ms)) for name, ms in timings]


def profile_model(model: str, args) -> dict:
    config = bench_config(
        model,
        not args.full,
        args.batch,
        args.img,
        args.dtype,
        None,
        None,
        "replicated",
        args.conv_implementation,
        args.output_implementation,
        args.gate_implementation,
        args.norm_implementation,
    )
    mesh = sharding.make_mesh()
    comps = trainer.build_components(config, mesh, 1000, config.total_steps, config.warmup_steps)
    state, rngs = comps.init()
    batch = fake_device_batch(args.batch, args.img, mesh)
    for _ in range(3):
        state, metrics = comps.train_step(state, rngs, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):  # Wall time of the same executable, synchronised every step.
        t0 = time.perf_counter()
        state, metrics = comps.train_step(state, rngs, batch)
        jax.block_until_ready((state.step, metrics))
        times.append(time.perf_counter() - t0)
    wall_ms = 1e3 * statistics.median(times)
    kernels = _kernels_of_one_call(lambda: comps.train_step(state, rngs, batch))
    total = sum(ms for _, ms in kernels)
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    groups = collections.Counter()
    counts = collections.Counter()
    by_name = collections.Counter()
    for name, ms in kernels:
        groups[group_of(name)] += ms
        counts[group_of(name)] += 1
        by_name[name] += ms
    return {
        "model": model,
        "batch": args.batch,
        "img": args.img,
        "dtype": args.dtype,
        "bare": not args.full,
        "conv_implementation": config.model.conv_implementation,
        "output_implementation": config.model.output_implementation,
        "gate_implementation": config.model.get("gate_implementation"),
        "norm_implementation": config.model.get("norm_implementation"),
        "kernel_ms": total,
        "wall_step_ms": wall_ms,
        "img_per_s_wall": args.batch / (wall_ms * 1e-3),
        "peak_mem_mib_process": None if peak is None else peak / 2**20,
        "img_per_s_kernels_only": args.batch / (total * 1e-3),
        "groups": {g: {"ms": ms, "kernels": counts[g]} for g, ms in groups.most_common()},
        "top": by_name.most_common(args.top),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vig_t,deit_t")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--full", action="store_true", help="with device augmentation and EMA")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median wall time)")
    parser.add_argument("--out", default=None)
    add_vig_implementation_args(parser)
    args = parser.parse_args()
    rows = [profile_model(m, args) for m in args.models.split(",")]
    print(
        f"\ndevice: {jax.devices()[0].device_kind}, jax {jax.__version__}; batch {args.batch} "
        f"at {args.img} px, {args.dtype}, {'full' if args.full else 'bare'} step"
    )
    for r in rows:
        print(
            f"\n{r['model']}: {r['kernel_ms']:.2f} ms of kernels per step "
            f"({r['img_per_s_kernels_only']:.0f} img/s if nothing else); wall "
            f"{r['wall_step_ms']:.2f} ms per step ({r['img_per_s_wall']:.0f} img/s, same compile); "
            f"process peak {r['peak_mem_mib_process']} MiB"
        )
        for g, v in r["groups"].items():
            print(
                f"  {g:<18} {v['ms']:8.3f} ms  {100 * v['ms'] / r['kernel_ms']:5.1f} %  "
                f"{v['kernels']:5d} kernels"
            )
        for name, ms in r["top"]:
            print(f"    {ms:8.3f} ms  {name[:90]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
