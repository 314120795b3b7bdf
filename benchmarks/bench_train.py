"""Training throughput (images/s) of full training steps on fake data already on the device.

One step = the trainer's jitted step: device-side augmentation (normalise, random erasing,
mixup/cutmix), forward, soft-target cross-entropy, backward, clip + AdamW, EMA update, with the
state donated. Batches of random uint8 images are made once on the device, so the number is
the step's speed, not the input pipeline's. ``--bare`` drops the augmentation and the EMA
(what the official measurement times). Prints a table and writes JSON.

    python -m benchmarks.bench_train --models vig_t,deit_t --batch 128 --img 224 \\
        --dtype bfloat16 --out benchmarks/results/train_h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from train import sharding, trainer


def bench_config(
    model: str,
    bare: bool,
    batch: int,
    img: int,
    dtype: str,
    implementation: str | None,
    patch_size: int | None,
    param_sharding: str,
    conv_implementation: str | None = None,
    output_implementation: str | None = None,
    gate_implementation: str | None = None,
    norm_implementation: str | None = None,
):
    """The model's official recipe at the benchmark's size on fake data.

    ``bare`` removes what the official throughput measurement does not do (device
    augmentation: random erasing, mixup/cutmix; the EMA update), leaving forward, loss,
    backward, clip and AdamW.
    """
    import importlib

    config = importlib.import_module(f"configs.{model}").get_config("fake")
    config.batch_size = batch
    config.data.img_size = img
    config.data.num_classes = 1000
    config.model.dtype = dtype
    config.model.implementation = implementation
    if model.startswith("vig"):  # ViG / ViG-H only; resolved, so that rows record it
        from vig_jax.bigla import default_gate_implementation, default_output_implementation
        from vig_jax.dwconv import default_implementation

        config.model.conv_implementation = conv_implementation or default_implementation()
        config.model.output_implementation = (
            output_implementation or default_output_implementation()
        )
        config.model.gate_implementation = gate_implementation or default_gate_implementation()
        config.model.norm_implementation = norm_implementation  # plain ViG only; None: default
    config.model.patch_size = patch_size
    config.param_sharding = param_sharding
    config.total_steps = 10_000
    config.warmup_steps = 100
    if bare:
        config.aug.random_erasing = 0.0
        config.aug.mixup = 0.0
        config.aug.cutmix = 0.0
        config.ema_decay = 0.0
    return config


def fake_device_batch(batch: int, img: int, mesh, num_classes: int = 1000) -> dict:
    """Random uint8 images [batch, img, img, 3] and int32 labels [batch], sharded on ``mesh``."""
    rng = np.random.default_rng(0)
    host = {
        "image": rng.integers(0, 256, (batch, img, img, 3), dtype=np.uint8),
        "label": rng.integers(0, num_classes, (batch,), dtype=np.int32),
    }
    return sharding.host_to_global(host, mesh)


def time_steps(comps: trainer.Components, state, rngs, batch, warmup: int, steps: int):
    """Median and all step times (s) after ``warmup`` steps, synchronising every step."""
    for _ in range(warmup):
        state, metrics = comps.train_step(state, rngs, batch)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = comps.train_step(state, rngs, batch)
        jax.block_until_ready((state.step, metrics))
        times.append(time.perf_counter() - t0)
    loss = float(metrics["train/loss"])
    return times, loss


def add_vig_implementation_args(parser: argparse.ArgumentParser) -> None:
    """``--{conv,output,gate,norm}-implementation``: the ViG mixer's and norms' options (None:
    the model's defaults), in the order :func:`bench_config` takes them."""
    parser.add_argument(
        "--conv-implementation",
        default=None,
        help="ViG depthwise conv: shifted | cudnn | hybrid | pallas (default on a GPU)",
    )
    parser.add_argument(
        "--output-implementation", default=None, help="ViG gated output: xla | pallas (GPU)"
    )
    parser.add_argument(
        "--gate-implementation", default=None, help="ViG forget gates: xla | pallas (GPU)"
    )
    parser.add_argument(
        "--norm-implementation", default=None, help="plain ViG's RMSNorms: xla | pallas (GPU)"
    )


def run_one(args, model: str) -> dict:
    config = bench_config(
        model,
        args.bare,
        args.batch,
        args.img,
        args.dtype,
        args.implementation,
        args.patch_size,
        args.param_sharding,
        args.conv_implementation,
        args.output_implementation,
        args.gate_implementation,
        args.norm_implementation,
    )
    mesh = sharding.make_mesh()
    t0 = time.perf_counter()
    comps = trainer.build_components(config, mesh, 1000, config.total_steps, config.warmup_steps)
    state, rngs = comps.init()
    batch = fake_device_batch(args.batch, args.img, mesh)
    state, metrics = comps.train_step(state, rngs, batch)  # Compile.
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times, loss = time_steps(comps, state, rngs, batch, args.warmup, args.steps)
    median = statistics.median(times)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    mem = None
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        mem = stats["peak_bytes_in_use"] / 2**20
    return {
        "model": model,
        "params": n_params,
        "img_size": args.img,
        "patch_size": args.patch_size,
        "batch": args.batch,
        "dtype": args.dtype,
        "implementation": args.implementation,
        "conv_implementation": config.model.conv_implementation,
        "output_implementation": config.model.output_implementation,
        "gate_implementation": config.model.get("gate_implementation"),
        "norm_implementation": config.model.get("norm_implementation"),
        "param_sharding": args.param_sharding,
        "bare": args.bare,
        "median_step_ms": 1e3 * median,
        "img_per_s": args.batch / median,
        "min_step_ms": 1e3 * min(times),
        "compile_plus_first_step_s": compile_s,
        "loss_after": loss,
        "peak_mem_mib": mem,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", default="vig_t,deit_t", help='comma-separated, "name@implementation" allowed'
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--implementation", default=None)
    add_vig_implementation_args(parser)
    parser.add_argument("--param-sharding", default="replicated")
    parser.add_argument(
        "--bare",
        action="store_true",
        help="no device augmentation and no EMA (what the official measurement times)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()

    device = jax.devices()[0]
    rows = []
    for spec in args.models.split(","):
        model, _, impl = spec.partition("@")  # "deit_t@xla": per-model implementation.
        run_args = argparse.Namespace(**vars(args))
        run_args.implementation = impl or args.implementation
        try:
            rows.append(run_one(run_args, model))
        except Exception as err:  # noqa: BLE001 - report and go on with the next model.
            rows.append({"model": model, "error": f"{type(err).__name__}: {err}"[:500]})
        print(json.dumps(rows[-1]), flush=True)

    print(
        f"\ndevice: {device.device_kind} x {jax.device_count()} ({jax.default_backend()}), "
        f"jax {jax.__version__}; batch {args.batch} at {args.img} px, {args.dtype}, fake data"
    )
    print(
        f"{'model':<14} {'params':>10} {'step ms':>9} {'img/s':>9} {'compile s':>9} {'peak MiB':>9}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<14} ERROR {r['error'][:80]}")
            continue
        mem = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] else "-"
        name = r["model"] + (f"@{r['implementation']}" if r["implementation"] else "")
        print(
            f"{name:<14} {r['params']:>10,} {r['median_step_ms']:>9.2f} "
            f"{r['img_per_s']:>9.1f} {r['compile_plus_first_step_s']:>9.1f} {mem:>9}"
        )
    if args.out:
        out = {
            "benchmark": "train_step_throughput",
            "device": device.device_kind,
            "backend": jax.default_backend(),
            "num_devices": jax.device_count(),
            "jax": jax.__version__,
            "host": platform.node(),
            "args": vars(args),
            "results": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    jnp.zeros(())  # Initialise the backend before timing anything.
    main()
