"""Static resource report of the Triton BiGLA kernels, on any machine; prints a table, writes JSON.

It lowers the jitted forward + backward (``jax.vjp``: output and all five gradients) for CUDA
under an abstract Hopper device (no GPU needed, as the lowering tests do), keeps the Triton IR
of every Pallas kernel, compiles it with the ``triton`` package for sm_90 (H100 / H200) with the
kernel's own ``num_warps`` / ``num_stages``, and reports per kernel: registers and spill bytes
(``ptxas -v``), shared memory, the static SASS counts of instructions, tensor-core (``HMMA``)
and special-function (``MUFU``: exp) instructions, the instructions inside loops, and the
theoretical occupancy (resident warps per SM) that registers and shared memory allow.

These are static counts, not times: a loop body counts once however often it runs, and the
``triton`` package is not the Triton that XLA bundles (close versions parse the same IR). Use it
to reject a variant before spending GPU time (a compile failure, spills, an occupancy drop) and
to compare instruction counts; GPU times come only from ``benchmarks/tune_bigla.py`` /
``bench_bigla.py`` on the device. Shared memory is a lower bound: with fp32 64-token chunks this
counts 147,456 B per state kernel, and XLA's Triton asked for 294,912 B on the H200 (the
``FP32_MAX_CHUNK`` failure).

Usage::

    pip install triton==3.6.0   # the compiler only; no GPU or CUDA driver needed
    python -m benchmarks.kernel_stats --shapes 8,3,4096,32,64 --configs "" "diag=loop"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from benchmarks.bench_bigla import DEFAULT_SHAPES, DTYPES, parse_config
from pallas_kernels.bigla import triton as bigla_triton

SM_REGISTERS = 65536  # per SM, Hopper
SM_SHARED = 232448  # bytes of shared memory a block may use on sm_90 (227 KiB)
SM_MAX_WARPS = 64
SM_MAX_BLOCKS = 32


@dataclasses.dataclass
class KernelStats:
    """Static resources of one compiled kernel (sizes in bytes)."""

    name: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    instructions: int
    in_loops: int
    mma: int
    mufu: int

    @property
    def warps_per_sm(self) -> int:
        """Resident warps per SM that registers, shared memory and block limits allow."""
        regs = -(-self.registers // 8) * 8 * 32 * self.num_warps  # allocated per warp in 8s
        blocks = min(SM_MAX_BLOCKS, SM_MAX_WARPS // self.num_warps, SM_REGISTERS // regs)
        if self.shared:
            blocks = min(blocks, SM_SHARED // self.shared)
        return blocks * self.num_warps


@contextlib.contextmanager
def _captured_triton_ir():
    """Collects the Triton IR text of every Pallas kernel lowered inside the block."""
    from jax._src.pallas.triton import lowering  # private: the only hook on the module

    original = lowering.lower_jaxpr_to_triton_module
    modules: list[str] = []

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        modules.append(result.module.operation.get_asm())
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield modules
    finally:
        lowering.lower_jaxpr_to_triton_module = original


_CALL = re.compile(
    r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32, ir = \"[^\"]*\", "
    r"name = \"(\w+)\", num_stages = (\d+) : i32, num_warps = (\d+) : i32"
)


def lower_kernels(shape, dtype, fields: dict) -> list[tuple[str, dict]]:
    """[(Triton IR text, launch {name, grid, num_warps, num_stages})] of the fwd+bwd kernels."""
    b, h, n, dk, dv = shape
    config = bigla_triton.Config(**fields)
    q = jnp.zeros((b, n, h, dk), dtype)
    v = jnp.zeros((b, n, h, dv), dtype)
    g = jnp.zeros((b, n, h, dk), jnp.float32)
    loss = lambda *a: jnp.sum(bigla_triton.bigla_triton(*a, config=config).astype(jnp.float32))
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))
    device = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"
    )
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with _captured_triton_ir() as modules, jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(grad).trace(q, q, v, g, g).lower(lowering_platforms=("cuda",)).as_text()
    launches = {}
    for m in _CALL.finditer(text):
        gx, gy, gz, name, stages, warps = m.groups()
        grid = (int(gx), int(gy), int(gz))
        launches[name] = dict(name=name, grid=grid, num_warps=int(warps), num_stages=int(stages))
    out = []
    for ir in modules:
        name = re.search(r"tt\.func public @(\w+)", ir).group(1)
        if name not in launches:
            raise RuntimeError(f"kernel {name!r} has no custom call in the lowered module")
        out.append((ir, launches[name]))
    return out


def _triton_tools():
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as err:
        raise SystemExit(
            "benchmarks.kernel_stats needs the triton compiler: pip install triton==3.6.0"
        ) from err
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return triton, GPUTarget("cuda", 90, 32), bin_dir


def compile_stats(ir: str, launch: dict) -> KernelStats:
    """Compiles one kernel's Triton IR for sm_90 and reads its static resources."""
    triton, target, bin_dir = _triton_tools()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, f"{launch['name']}.ttir")
        with open(src, "w") as f:
            f.write(ir)
        options = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]}
        kernel = triton.compile(src, target=target, options=options)
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        ptxas = subprocess.run(
            [os.path.join(bin_dir, "ptxas"), "-v", "-arch=sm_90a", ptx, "-o", cubin],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        sass = subprocess.run(
            [os.path.join(bin_dir, "cuobjdump"), "-sass", cubin],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, ptxas)) else 0
    instructions = _sass_instructions(sass)
    return KernelStats(
        name=launch["name"],
        grid=tuple(launch["grid"]),
        num_warps=launch["num_warps"],
        num_stages=launch["num_stages"],
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        shared=int(kernel.metadata.shared),
        instructions=len(instructions),
        in_loops=_loop_instructions(instructions),
        mma=sum("HMMA" in op or "HGMMA" in op for _, op in instructions),
        mufu=sum(op.startswith("MUFU") for _, op in instructions),
    )


def _sass_instructions(sass: str) -> list[tuple[int, str]]:
    """[(address, instruction)] of a cuobjdump -sass listing."""
    found = re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([^;]*);", sass, re.M)
    return [(int(addr, 16), op.strip()) for addr, op in found]


def _loop_instructions(instructions) -> int:
    """Instructions between a backward branch and its target (loop bodies; upper bound: the
    blocks of an if/else laid out after the join also branch backwards)."""
    index = {addr: i for i, (addr, _) in enumerate(instructions)}
    inside = set()
    for i, (addr, op) in enumerate(instructions):
        m = re.match(r"BRA\b.*?(0x[0-9a-f]+)", op)
        if m and (target := int(m.group(1), 16)) < addr and target in index:
            inside.update(range(index[target], i + 1))
    return len(inside)


def kernel_stats(shape, dtype_name: str, fields: dict) -> list[KernelStats]:
    """Static resources of every kernel of the fwd+bwd at ``shape`` with Config(**fields)."""
    kernels = lower_kernels(shape, DTYPES[dtype_name], fields)
    return [compile_stats(ir, launch) for ir, launch in kernels]


def print_table(rows):
    header = (
        f"{'kernel':26} {'warps':>5} {'regs':>4} {'spill':>5} {'smem':>7} {'warps/SM':>8} "
        f"{'sass':>5} {'in loops':>8} {'mma':>4} {'mufu':>4}"
    )
    for row in rows:
        config = ",".join(f"{k}={v}" for k, v in row["config"].items()) or "(defaults)"
        print(f"\n{tuple(row['shape'])} {row['dtype']} {config}")
        print(header)
        for k in row["kernels"]:
            print(
                f"{k['name'][:26]:26} {k['num_warps']:5d} {k['registers']:4d} "
                f"{k['spill_stores']:5d} {k['shared']:7d} {k['warps_per_sm']:8d} "
                f"{k['instructions']:5d} {k['in_loops']:8d} {k['mma']:4d} {k['mufu']:4d}"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", help="B,H,N,Dk,Dv (default: the ViG shapes)")
    parser.add_argument("--dtypes", default="bf16", help="comma-separated: bf16,fp32")
    parser.add_argument("--configs", nargs="*", default=[""], help='e.g. "" "diag=loop"')
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes or []] or DEFAULT_SHAPES
    rows = []
    for shape in shapes:
        for dtype_name in args.dtypes.split(","):
            for text in args.configs:
                fields = parse_config(text)
                stats = kernel_stats(shape, dtype_name, fields)
                kernels = [dataclasses.asdict(s) | {"warps_per_sm": s.warps_per_sm} for s in stats]
                row = dict(shape=list(shape), dtype=dtype_name, config=fields, kernels=kernels)
                rows.append(row)
    print_table(rows)
    if args.out:
        import triton

        meta = {"target": "sm_90a", "triton": triton.__version__, "jax": jax.__version__}
        with open(args.out, "w") as f:
            json.dump(meta | {"rows": rows}, f, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
