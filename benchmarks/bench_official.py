"""Times the official ViG training path's BiGLA on this GPU (PyTorch + the official FLA copy).

What ViG's official training runs per mixer (vig-reference.md section 6.1): q, k, v
([B, H, N, D], head-first) and flipped copies stacked on the batch axis, the gates likewise
(forward gates, then the flipped backward gates), one ``fused_chunk_gla`` launch over the
doubled batch, then ``o = (o_f + flip(o_b)) / 2``. Two timings per shape and dtype, both with
CUDA events (median of ``--iters`` after warm-up) and the backward through autograd:

* ``path``: the whole official sequence from unstacked inputs (stack, flip, kernel, un-flip,
  average, and the matching autograd work), what a training step pays;
* ``kernel``: ``fused_chunk_gla`` alone on inputs stacked beforehand (what vig-reference.md
  section 13 tabulates for the H100).

The official code is not part of this project and is not downloaded: point ``--fla-path`` at
the ``flash-linear-attention`` folder of a checkout of hustvl/ViG (the one holding ``fla/``).
Only ``fla/ops/gla/chunk_fuse.py`` and what it imports are loaded (the package ``__init__``
files pull in model code and transformers, which the kernel does not need). Needs torch,
triton, einops and packaging, as on the GPU machine.

    python benchmarks/bench_official.py --fla-path /path/to/ViG/flash-linear-attention \
        --out benchmarks/results/official_bigla.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import types

DEFAULT_SHAPES = ((128, 3, 196, 32, 64), (8, 3, 4096, 32, 64), (128, 12, 196, 32, 64))


def load_fused_chunk_gla(fla_path: str):
    """``fla.ops.gla.chunk_fuse`` from the official checkout, without the package ``__init__``s."""
    root = os.path.join(fla_path, "fla")
    if not os.path.isfile(os.path.join(root, "ops", "gla", "chunk_fuse.py")):
        raise FileNotFoundError(
            f"--fla-path={fla_path!r} has no fla/ops/gla/chunk_fuse.py; expected the "
            "flash-linear-attention folder of a hustvl/ViG checkout"
        )
    for name, sub in (("fla", ""), ("fla.ops", "ops"), ("fla.ops.gla", os.path.join("ops", "gla"))):
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(root, sub)]
        sys.modules[name] = package
    from fla.ops.gla import chunk_fuse  # noqa: PLC0415  (needs the stub packages above)

    return chunk_fuse


def _median_ms(fn, iters: int, warmup: int = 5) -> float:
    import torch  # noqa: PLC0415

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_shape(chunk_fuse, shape, dtype_name: str, iters: int) -> list[dict]:
    """Forward and forward + backward times of the official path and of the bare kernel."""
    import torch  # noqa: PLC0415

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    b, h, n, dk, dv = shape
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*s, dt=dtype):
        return torch.randn(*s, device="cuda", dtype=torch.float32, generator=gen).to(dt)

    q, k = rand(b, h, n, dk), rand(b, h, n, dk)
    v = rand(b, h, n, dv)
    gates = torch.nn.functional.logsigmoid(rand(2 * b, h, n, dk, dt=torch.float32)) / 16
    gf, gb = gates[:b].contiguous(), gates[b:].contiguous()
    do = rand(b, h, n, dv)
    leaves = [t.requires_grad_() for t in (q, k, v, gf, gb)]

    def path_forward():
        qs, ks, vs = (torch.cat([x, x.flip(dims=[2])], dim=0) for x in leaves[:3])
        g = torch.cat([leaves[3], leaves[4].flip(dims=[2])], dim=0)
        o, _ = chunk_fuse.fused_chunk_gla(qs, ks, vs, g)
        o_f, o_b = o.chunk(2)
        return (o_f + o_b.flip(dims=[2])) / 2

    stacked = [
        torch.cat([x, x.flip(dims=[2])], dim=0).detach().requires_grad_() for x in leaves[:3]
    ]
    g_stacked = torch.cat([gf, gb.flip(dims=[2])], dim=0).detach().requires_grad_()
    do_stacked = torch.cat([do, do], dim=0)

    def kernel_forward():
        return chunk_fuse.fused_chunk_gla(*stacked, g_stacked)[0]

    rows = []
    for what, forward, cotangent, inputs in (
        ("path", path_forward, do, leaves),
        ("kernel", kernel_forward, do_stacked, [*stacked, g_stacked]),
    ):

        def fwd(forward=forward):
            with torch.no_grad():
                forward()

        def fwd_bwd(forward=forward, cotangent=cotangent, inputs=inputs):
            torch.autograd.grad(forward(), inputs, cotangent)

        for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            ms = _median_ms(fn, iters)
            rows.append(
                dict(
                    impl=f"fla_official_{what}",
                    shape=list(shape),
                    dtype=dtype_name,
                    mode=mode,
                    ms=ms,
                    timer="cuda_events",
                    iters=iters,
                )
            )
            print(f"{what:>6} {str(shape):>24} {dtype_name} {mode:>8} {ms:8.3f} ms", flush=True)
    return rows


def parse_shape(text: str) -> tuple[int, ...]:
    shape = tuple(int(x) for x in text.split(","))
    if len(shape) != 5:
        raise argparse.ArgumentTypeError(f"shape {text!r}; expected B,H,N,Dk,Dv")
    return shape


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fla-path", required=True)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(DEFAULT_SHAPES))
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/official_bigla.json")
    args = parser.parse_args(argv)

    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        raise SystemExit("bench_official needs a CUDA GPU (the official kernels are Triton)")
    chunk_fuse = load_fused_chunk_gla(args.fla_path)
    rows = []
    for shape in args.shapes:
        for dtype_name in args.dtypes.split(","):
            rows.extend(time_shape(chunk_fuse, shape, dtype_name, args.iters))
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        command=" ".join(sys.argv),
        rows=rows,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'impl':<22} {'shape':<24} {'dtype':<5} {'mode':<8} {'ms':>8}")
    for r in rows:
        print(
            f"{r['impl']:<22} {str(tuple(r['shape'])):<24} {r['dtype']:<5} {r['mode']:<8} "
            f"{r['ms']:8.3f}"
        )


if __name__ == "__main__":
    main()
