"""XLA's planned memory of the training step, compile only: ViG variants against DeiT.

The resolution study's peak memory is XLA's buffer plan of the compiled training step
(``benchmarks/bench_resolution.py``: arguments + outputs - donated + temporaries). This compiles
the same step (forward, softmax CE, backward, AdamW, donated state) for ViG-T with each pair of
depthwise-conv and gated-output implementations, and DeiT-T, at one size, on parallel threads,
and prints the plans: which kernel choice costs memory, without timing anything.

    python3 -m benchmarks.memory_plan --img 1024 --batch 8 --out /tmp/memory_plan.json

On a CPU the Pallas kernels lower in interpret mode, so only GPU plans compare.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.bench_resolution import _Model, _planned_bytes

VARIANTS = (
    ("vig_t", "pallas", "pallas"),
    ("vig_t", "shifted", "pallas"),
    ("vig_t", "pallas", "xla"),
    ("vig_t", "shifted", "xla"),
    ("deit_t", None, None),
)


def planned_mib(model: str, conv: str | None, output: str | None, img: int, batch: int) -> dict:
    """Compiles the bf16 training step and returns its row (planned MiB, compile seconds)."""
    t0 = time.perf_counter()
    m = _Model(model, img, "bfloat16", conv_impl=conv, output_impl=output)
    graphdef, _, params, rest = m.graphdefs()
    opt_state = jax.eval_shape(m.tx.init, params)
    images = jax.ShapeDtypeStruct((batch, img, img, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    step = jax.jit(m.train_step_fn(graphdef), donate_argnums=0)
    compiled = step.lower((params, opt_state, rest), images, labels).compile()
    planned = _planned_bytes(compiled)
    return {
        "model": model,
        "conv_implementation": m.conv_impl,
        "output_implementation": m.output_impl,
        "img": img,
        "batch": batch,
        "planned_mib": None if planned is None else planned / 2**20,
        "compile_s": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--img", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    with concurrent.futures.ThreadPoolExecutor(len(VARIANTS)) as pool:
        rows = list(pool.map(lambda v: planned_mib(*v, args.img, args.batch), VARIANTS))
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{'model':8} {'conv':8} {'output':7} {'px':>5} {'batch':>5} {'planned MiB':>12}")
    for r in rows:
        print(
            f"{r['model']:8} {r['conv_implementation'] or '-':8} "
            f"{r['output_implementation'] or '-':7} {r['img']:5d} {r['batch']:5d} "
            f"{r['planned_mib']:12.1f}"
        )
    if args.out:
        out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
