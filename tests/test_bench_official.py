"""The official-baseline plumbing of the kernel benchmarks (no GPU, no official code needed)."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_bigla, bench_official


def test_missing_official_checkout_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fla/ops/gla/chunk_fuse.py"):
        bench_official.load_fused_chunk_gla(str(tmp_path))


def test_bench_bigla_reads_the_kernel_rows_of_bench_official(tmp_path):
    shape = [8, 3, 4096, 32, 64]
    rows = [
        dict(impl="fla_official_path", shape=shape, dtype="bf16", mode="fwd", ms=9.0),
        dict(impl="fla_official_kernel", shape=shape, dtype="bf16", mode="fwd", ms=0.6),
        dict(impl="fla_official_kernel", shape=shape, dtype="bf16", mode="fwd+bwd", ms=2.1),
    ]
    path = tmp_path / "official.json"
    path.write_text(json.dumps(dict(device="GPU", rows=rows)))
    title, table = bench_bigla.official_ms(str(path))
    assert title == "FLA ms"
    assert table == {(tuple(shape), "bf16"): (0.6, 2.1)}
    title, table = bench_bigla.official_ms(None)
    assert title == "FLA H100" and table[(tuple(shape), "bf16")] == (0.559, 1.838)


def test_shape_parser_names_the_bad_shape():
    assert bench_official.parse_shape("1,2,3,4,5") == (1, 2, 3, 4, 5)
    with pytest.raises(Exception, match="expected B,H,N,Dk,Dv"):
        bench_official.parse_shape("1,2,3")
