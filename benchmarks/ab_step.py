"""A/B of training-step variants in one process: the resolution study's step, compiled together,
timed interleaved.

A variant is a model plus code switches set while its step is traced::

    NAME=MODEL[,MODULE.ATTR=VALUE,...]

for example ``gates=vig_t,vig_jax.bigla.PALLAS_GATES_BY_DEFAULT=True``. A part ``xla_NAME=VALUE`` is
an XLA debug option of that variant's executable alone (``Lowered.compile(compiler_options=)``),
e.g. ``nocb=vig_t,xla_gpu_enable_command_buffer=`` (no CUDA graphs). Each switch is a
module-level constant that is read when the model is built or traced (the ``*_BY_DEFAULT``
constants, policy limits); it is set while the variant is built and lowered on the main thread
(JAX's trace caches cleared first), then restored, so variants that differ only in switches share
nothing. The lowered steps compile
together on a thread pool. Timing rotates over the variants for ``--rounds`` rounds (a drifting
clock hits all alike); each round times ``--steps`` steps after ``--warmup``, synchronising every
step as ``benchmarks/bench_resolution.py`` does. On a GPU each variant's kernels of one step are
also recorded with CUPTI (total ms and count).

The step is :class:`benchmarks.bench_resolution._Model`'s (forward, softmax cross-entropy,
backward, AdamW), the one behind the resolution study's bars. Prints a table (the first variant is
the baseline of the ratios) and writes JSON.

    python -m benchmarks.ab_step --img 224 --batch 128 \\
        deit=deit_t vig=vig_t gates=vig_t,vig_jax.bigla.PALLAS_GATES_BY_DEFAULT=True \\
        --out /tmp/ab.json
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import importlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.bench_resolution import (
    ChildConfig,
    _Child,
    _custom_calls,
    _device_rest,
    _Model,
    parse_switch,
    reuse_params,
)

DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One step to time: ``model`` with ``switches`` ((module, attribute, value), ...)."""

    name: str
    model: str
    switches: tuple[tuple[str, str, Any], ...] = ()
    compiler_options: tuple[tuple[str, str], ...] = ()  # XLA debug options of this executable


def parse_variant(spec: str) -> Variant:
    """``NAME=MODEL[,MODULE.ATTR=VALUE | xla_NAME=VALUE,...]`` -> :class:`Variant` (a switch's
    VALUE a Python literal, an XLA option's VALUE passed to XLA as written).

    Raises ValueError naming the spec when it is malformed or a switch's attribute does not
    exist (a misspelt switch would otherwise time the baseline twice)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"variant {spec!r}; expected NAME=MODEL[,MODULE.ATTR=VALUE,...]")
    model, *parts = rest.split(",")
    switches, options = [], []
    for part in parts:
        if part.startswith("xla_"):  # an XLA option of this variant's executable alone
            option, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"variant {name!r}: XLA option {part!r}; expected xla_NAME=VALUE")
            options.append((option, value))
            continue
        try:
            switches.append(parse_switch(part))
        except ValueError as err:
            raise ValueError(f"variant {name!r}: {err}") from err
    return Variant(name, model, tuple(switches), tuple(options))


@contextlib.contextmanager
def switched(switches):
    """Sets each (module, attribute, value) for the duration, then restores the old values."""
    old = []
    try:
        for module, attr, value in switches:
            mod = importlib.import_module(module)
            old.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, value)
        yield
    finally:
        for mod, attr, value in reversed(old):
            setattr(mod, attr, value)


@dataclasses.dataclass
class _Lowered:
    variant: Variant
    model: _Model
    lowered: Any
    params: Any  # abstract
    compiled: Any = None
    compile_s: float = 0.0


def lower(variant: Variant, img: int, batch: int, dtype: str, device=None) -> _Lowered:
    """Builds ``variant``'s model and lowers its train step (abstract shapes) under its
    switches; the switches are restored on return.

    JAX's trace caches are cleared first: a traced function that reads a switch (under
    ``jax.checkpoint`` or a custom VJP) would otherwise be reused from an earlier variant.
    ``device``: lower for this device (e.g. a compile-only one, ``benchmarks/static_step.py``)
    instead of the default."""
    jax.clear_caches()
    placed = contextlib.nullcontext() if device is None else jax.default_device(device)
    sharding = None if device is None else jax.sharding.SingleDeviceSharding(device)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    with switched(variant.switches), placed:
        m = _Model(variant.model, img, dtype)
        graphdef_train, _, params, rest = m.graphdefs()
        state = (params, jax.eval_shape(m.tx.init, params), rest)
        if device is not None:
            state = jax.tree.map(lambda a: spec(a.shape, a.dtype), state)
        images = spec((batch, img, img, 3), jnp.float32)
        labels = spec((batch,), jnp.int32)
        step = jax.jit(m.train_step_fn(graphdef_train), donate_argnums=0)
        lowered = step.lower(state, images, labels)
    return _Lowered(variant, m, lowered, params)


def _compile(item: _Lowered) -> _Lowered:
    t = time.perf_counter()
    options = dict(item.variant.compiler_options) or None
    item.compiled = item.lowered.compile(compiler_options=options)
    item.compile_s = time.perf_counter() - t
    print(f"  compiled {item.variant.name} ({item.compile_s:.0f} s)", flush=True)
    return item


def _stepper(item: _Lowered, child: _Child, preps: dict[str, Any], batch: int):
    """A function that runs one training step of ``item`` (its state donated and replaced) and
    returns the loss. The state starts from ``child``'s host-side initialisation of the model
    (one init compile per model, as in the resolution study); the AdamW state and the fixed
    images and labels come from the model's preparation, jitted once per model."""
    host_params, host_rest = child.host_init(item.model)
    params = jax.device_put(reuse_params(item.params, host_params))
    prep = preps.setdefault(item.variant.model, jax.jit(item.model.prep_fn(batch)))
    opt_state, images, labels = prep(params)
    holder = [(params, opt_state, _device_rest(host_rest))]

    def step():
        holder[0], loss = item.compiled(holder[0], images, labels)
        return loss

    return step


def _kernels(call) -> list[tuple[str, float]] | None:
    """CUPTI (kernel name, ms) of one ``call()``; None off the GPU."""
    if jax.default_backend() != "gpu":
        return None
    from benchmarks.profile_step import _kernels_of_one_call

    return _kernels_of_one_call(call)


def run(variants: list[Variant], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Lowers, compiles and times ``variants``; returns one row per variant."""
    t0 = time.perf_counter()
    items = [lower(v, args.img, args.batch, args.dtype) for v in variants]
    print(f"lowered {len(items)} variants ({time.perf_counter() - t0:.0f} s)", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.compile_workers) as pool:
        items = list(pool.map(_compile, items))
    print(f"compiled ({time.perf_counter() - t0:.0f} s)", flush=True)

    child, preps = _Child(ChildConfig(chunks=[])), {}
    steps = [_stepper(item, child, preps, args.batch) for item in items]
    times: dict[str, list[float]] = collections.defaultdict(list)
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for item, step in zip(items, steps, strict=True):
            for i in range(args.warmup + args.steps):
                t = time.perf_counter()
                loss = jax.block_until_ready(step())
                if i >= args.warmup:
                    times[item.variant.name].append(time.perf_counter() - t)
            losses[item.variant.name] = float(loss)

    rows = []
    for item, step in zip(items, steps, strict=True):
        name = item.variant.name
        kernels = _kernels(step)
        median = statistics.median(times[name])
        rows.append(
            {
                "name": name,
                "model": item.variant.model,
                "switches": [f"{m}.{a}={v!r}" for m, a, v in item.variant.switches],
                "compiler_options": dict(item.variant.compiler_options),
                "img": args.img,
                "batch": args.batch,
                "dtype": args.dtype,
                "implementation": item.model.impl,
                "conv_implementation": item.model.conv_impl,
                "output_implementation": item.model.output_impl,
                "gate_implementation": item.model.gate_impl,
                "train_ms": 1e3 * median,
                "train_ms_min": 1e3 * min(times[name]),
                "train_img_s": args.batch / median,
                "steps_timed": len(times[name]),
                "loss": losses[name],
                "compile_s": item.compile_s,
                "kernel_ms": None if kernels is None else sum(ms for _, ms in kernels),
                "kernels": None if kernels is None else len(kernels),
                "custom_calls": sorted(set(_custom_calls(item.compiled))),
            }
        )
    return rows


def winning_switches(
    rows: list[dict[str, Any]], margin: float = 0.003, loss_tol: float = 0.02
) -> list[str]:
    """The switches (``MODULE.ATTR=VALUE``) of every variant that beat its model's baseline.

    A model's baseline is its first variant with neither switches nor XLA options. A variant wins
    when its median step is more than ``margin`` (a fraction) faster than the baseline's and its
    final loss is the baseline's within ``loss_tol`` (relative; a kernel that computes something
    else does not win on speed). The winners' switches are joined, the faster variant's value
    kept where two set one attribute; XLA options are not switches and are left out.
    """
    base = {}
    for r in rows:
        if not r["switches"] and not r.get("compiler_options") and r["model"] not in base:
            base[r["model"]] = r
    chosen: dict[str, tuple[float, str]] = {}
    for r in rows:
        b = base.get(r["model"])
        if b is None or r is b or not r["switches"]:
            continue
        same_loss = abs(r["loss"] - b["loss"]) <= loss_tol * max(abs(b["loss"]), 1.0)
        if not same_loss or r["train_ms"] >= (1 - margin) * b["train_ms"]:
            continue
        for switch in r["switches"]:
            target = switch.partition("=")[0]
            if target not in chosen or r["train_ms"] < chosen[target][0]:
                chosen[target] = (r["train_ms"], switch)
    return [switch for _, switch in chosen.values()]


def print_table(rows: list[dict[str, Any]]) -> None:
    base = rows[0]
    print(
        f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}: training step at "
        f"{base['img']} px, batch {base['batch']}, {base['dtype']} (medians; x: img/s over "
        f"{base['name']}'s)"
    )
    print(f"{'variant':<16} {'model':<8} {'ms':>8} {'img/s':>9} {'x':>6} {'kern ms':>8} {'#':>5}")
    for r in rows:
        kern = "-" if r["kernel_ms"] is None else f"{r['kernel_ms']:.2f}"
        count = "-" if r["kernels"] is None else str(r["kernels"])
        ratio = r["train_img_s"] / base["train_img_s"]
        print(
            f"{r['name']:<16} {r['model']:<8} {r['train_ms']:8.2f} {r['train_img_s']:9.1f} "
            f"{ratio:6.3f} {kern:>8} {count:>5}"
        )


def add_step_args(parser: argparse.ArgumentParser) -> None:
    """The variants and the step's size (also ``benchmarks/static_step.py``'s arguments)."""
    parser.add_argument("variants", nargs="+", help="NAME=MODEL[,MODULE.ATTR=VALUE,...]")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)


def parse_variants(specs: list[str]) -> list[Variant]:
    """:func:`parse_variant` of each spec; exits naming them if two variants share a name."""
    variants = [parse_variant(s) for s in specs]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"variant names repeat: {names}")
    return variants


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--compile-workers", type=int, default=8)
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument(
        "--sets-out",
        default=None,
        help="file to write the winners' switches to, as bench_resolution's --set flags",
    )
    parser.add_argument("--margin", type=float, default=0.003, help="speed-up a winner needs")
    args = parser.parse_args(argv)
    rows = run(parse_variants(args.variants), args)
    print_table(rows)
    if args.out:
        out = {
            "benchmark": "ab_step",
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "args": {k: v for k, v in vars(args).items()},
            "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")
    if args.sets_out:
        winners = winning_switches(rows, args.margin)
        Path(args.sets_out).write_text("".join(f"--set {w}\n" for w in winners))
        print(f"winning switches ({args.sets_out}): {winners or 'none'}")


if __name__ == "__main__":
    main()
