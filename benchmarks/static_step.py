"""What XLA makes of a training step for an H100, compiled on a machine without a GPU.

The resolution study's step (:class:`benchmarks.bench_resolution._Model`: forward, softmax
cross-entropy, backward, AdamW) is lowered for a compile-only H100 (JAX's deviceless
ahead-of-time compilation: ``jax.experimental.topologies`` with an H100 target description) and
compiled by XLA's GPU compiler, Pallas kernels included (their Triton lowering for sm_90). The
optimised HLO is then read: every top-level instruction that launches work (fusions, custom calls,
copies, ...) counts as one kernel, labelled by what it runs, with the bytes of its distinct
operands and its result. Their sum is a static estimate of a step's HBM traffic; divided by the
H100's bandwidth it is a floor on the step's kernel time, not a time. It needs no GPU, so
switches and model changes can be compared between GPU sessions::

    python -m benchmarks.static_step --img 224 --batch 128 \\
        deit=deit_t vig=vig_t gates=vig_t,vig_jax.bigla.PALLAS_GATES_BY_DEFAULT=True \\
        --out /tmp/static.json

Variants are ``benchmarks/ab_step.py``'s (``NAME=MODEL[,MODULE.ATTR=VALUE | xla_NAME=VALUE]``;
an XLA boolean option is written True / False). The model's implementation defaults are its GPU
defaults (``jax.default_backend`` reads "gpu" in this process).

Caveats: without a device XLA does not autotune, so its GEMM configurations (not its fusions)
may differ from a GPU compile; a kernel that reads part of an operand (BiGLA's packed q | k | v)
is counted with the whole operand; bytes say nothing of how well a kernel runs (at ea769b4 the
measured H100 kernel times were ~1.5x these floors for both ViG-T and DeiT-T).

Requires the CUDA plugin of the installed JAX (``pip install "jax[cuda12]==<jax version>"``),
not a GPU.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import jax

# The H100 SXM (80 GB HBM3) as XLA's GPU compiler describes it (a GpuTargetConfigProto).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
H100_BANDWIDTH = 3.35e12  # bytes/s, the memory_bandwidth above

# Instructions that launch nothing (or only control flow, whose bodies are read instead).
_FREE = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "conditional",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
}
_ITEMSIZE = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f16": 2,
    "bf16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{$")
# Pallas kernels are named by their function; these prefixes are ours.
_KERNEL_NAME = re.compile(r"\b((?:bigla|dwconv|gated_norm|log_gates|rms_norm|swiglu)_\w*)")


def type_bytes(hlo_type: str) -> int:
    """Bytes of every array in an HLO type (a tuple type sums its elements), e.g.
    ``(bf16[2,3]{1,0}, f32[4]{0})`` -> 28."""
    total = 0
    for dtype, dims in _ARRAY.findall(hlo_type):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _ITEMSIZE[dtype]
    return total


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One launch of a compiled step: instruction name, opcode, label and bytes moved."""

    name: str
    opcode: str
    label: str
    bytes: int
    times: int = 1  # launches per step (inside a while loop: its trip count)


def _label(opcode: str, rest: str) -> str:
    """What a kernel runs: a Pallas kernel's name, a custom call's target, or the fused
    computation's name without its number (``loop_add_fusion.3`` -> ``fused_add``)."""
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    if target:
        name = _KERNEL_NAME.search(rest) if "triton" in target.group(1) else None
        return name.group(1) if name else target.group(1)
    called = re.search(r"calls=%([\w.\-]+)", rest)
    return re.sub(r"[._]\d+$", "", (called.group(1) if called else opcode).split(".")[0])


def _computations(text: str) -> dict[str, tuple[bool, list[str]]]:
    """HLO module text -> {computation name: (is entry, instruction lines)}."""
    comps: dict[str, tuple[bool, list[str]]] = {}
    current = None
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(2)
            comps[current] = (bool(head.group(1)), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current][1].append(line)
    return comps


def kernels(hlo_text: str) -> list[Kernel]:
    """The kernels of an optimised, scheduled HLO module (``Compiled.as_text()``): the launching
    instructions of its entry computation and, times their trip counts, of the while loops'
    bodies it runs (a loop without a known trip count counts once)."""
    comps = _computations(hlo_text)
    entry = [name for name, (is_entry, _) in comps.items() if is_entry]
    if len(entry) != 1:
        raise ValueError(f"expected one ENTRY computation in the HLO text, found {len(entry)}")
    found: list[Kernel] = []

    def walk(name: str, times: int) -> None:
        shapes: dict[str, str] = {}
        for line in comps[name][1]:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            inst, hlo_type, opcode, rest = m.groups()
            shapes[inst] = hlo_type
            if opcode == "while":
                body = re.search(r"body=%([\w.\-]+)", rest)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                walk(body.group(1), times * (int(trips.group(1)) if trips else 1))
            if opcode in _FREE:
                continue
            operands = set(re.findall(r"%([\w.\-]+)", rest.split(")")[0]))
            moved = sum(type_bytes(shapes.get(o, "")) for o in operands) + type_bytes(hlo_type)
            found.append(Kernel(inst, opcode, _label(opcode, rest), moved, times))

    walk(entry[0], 1)
    return found


def summarize(ks: list[Kernel], top: int = 30) -> dict[str, Any]:
    """Launch count, bytes, bandwidth floor, and the labels that move the most bytes."""
    by_label: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for k in ks:
        by_label[k.label][0] += k.times
        by_label[k.label][1] += k.bytes * k.times
    total = sum(b for _, b in by_label.values())
    ranked = sorted(by_label.items(), key=lambda item: -item[1][1])[:top]
    return {
        "kernels": sum(k.times for k in ks),
        "gb": total / 1e9,
        "floor_ms": total / H100_BANDWIDTH * 1e3,
        "labels": {label: {"kernels": n, "gb": b / 1e9} for label, (n, b) in ranked},
    }


def h100_device():
    """A compile-only H100 (no GPU needed; the CUDA plugin must be installed)."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=H100_TARGET, topology="1x1x1"
        )
    except Exception as err:  # the plugin missing surfaces as several error types
        raise SystemExit(
            f"no compile-only CUDA device ({type(err).__name__}: {err}); install JAX's CUDA "
            f'plugin: pip install "jax[cuda12]=={jax.__version__}"'
        ) from err
    return topology.devices[0]


def analyse(variant, img: int, batch: int, dtype: str, device) -> dict[str, Any]:
    """Compiles ``variant``'s step for ``device`` and summarises its kernels."""
    from benchmarks.ab_step import lower

    lowered = lower(variant, img, batch, dtype, device=device).lowered
    t = time.perf_counter()
    compiled = lowered.compile(dict(variant.compiler_options) or None)
    compile_s = time.perf_counter() - t
    memory = compiled.memory_analysis()
    row = {
        "name": variant.name,
        "model": variant.model,
        "switches": [list(s) for s in variant.switches],
        "compiler_options": [list(o) for o in variant.compiler_options],
        "img": img,
        "batch": batch,
        "dtype": dtype,
        "compile_s": compile_s,
        "temp_mib": memory.temp_size_in_bytes / 2**20 if memory else None,
    }
    row.update(summarize(kernels(compiled.as_text())))
    return row


def print_table(rows: list[dict[str, Any]], top: int = 8) -> None:
    base = rows[0]
    print(
        f"\nStatic (compile-only H100, jax {jax.__version__}): training step at {base['img']} px, "
        f"batch {base['batch']}, {base['dtype']}; floor = bytes / {H100_BANDWIDTH / 1e12:.2f} TB/s"
    )
    head = ("variant", "model", "kernels", "GB", "dGB", "floor ms", "temp MiB")
    print("{:<16} {:<8} {:>8} {:>8} {:>7} {:>9} {:>9}".format(*head))
    for r in rows:
        print(
            f"{r['name']:<16} {r['model']:<8} {r['kernels']:8d} {r['gb']:8.2f} "
            f"{r['gb'] - base['gb']:+7.2f} {r['floor_ms']:9.2f} {r['temp_mib']:9.0f}"
        )
    for r in rows:
        labels = list(r["labels"].items())[:top]
        shown = ", ".join(f"{k} {v['gb']:.2f} GB/{v['kernels']}" for k, v in labels)
        print(f"\n{r['name']}: {shown}")


def main(argv: list[str] | None = None) -> None:
    from benchmarks.ab_step import add_step_args, parse_variants

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(parser)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    variants = parse_variants(args.variants)
    device = h100_device()
    jax.default_backend = lambda: "gpu"  # the models' GPU defaults (kernels, not interpret mode)
    rows = []
    for v in variants:
        rows.append(analyse(v, args.img, args.batch, args.dtype, device))
        r = rows[-1]
        print(f"  {v.name}: {r['kernels']} kernels, {r['gb']:.2f} GB ({r['compile_s']:.0f} s)")
    print_table(rows)
    if args.out:
        out = {
            "benchmark": "static_step",
            "target": "compile-only NVIDIA H100 80GB HBM3 (no GPU)",
            "jax": jax.__version__,
            "args": vars(args),
            "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
