"""The Triton kernels compile for sm_90 on the CPU (the ``triton`` compiler, no GPU).

Needs the ``triton`` package (in the ``dev`` extra on Linux x86-64); skipped without it.
"""

import pytest

pytest.importorskip("triton")

from benchmarks import kernel_stats  # noqa: E402

KERNELS = {  # kernel -> launches per fwd+bwd with segments (two state passes per direction)
    "bigla_states_summary": 1,
    "bigla_states_complete": 1,
    "bigla_states_bwd_summary": 1,
    "bigla_states_bwd_complete": 1,
    "bigla_segment_fold": 2,
    "bigla_forward": 1,
    "bigla_backward_dq": 1,
    "bigla_backward_dkv": 1,
}


@pytest.mark.parametrize(
    ("dtype", "config"),
    [("bf16", "diag=loop"), ("bf16", "diag=split"), ("fp32", "diag=loop"), ("fp32", "diag=split")],
)
def test_benchmark_shape_kernels_compile_and_bf16_ones_do_not_spill(dtype, config):
    fields = kernel_stats.parse_config(config)
    stats = kernel_stats.kernel_stats((8, 3, 4096, 32, 64), dtype, fields)
    names = [s.name for s in stats]
    assert {n: names.count(n) for n in set(names)} == KERNELS
    for s in stats:
        if dtype == "bf16":  # fp32's three-pass TF32 products spill in dkv (~0.9 KB, Triton 3.6)
            assert s.spill_stores == 0 and s.spill_loads == 0, s
        assert 0 < s.registers <= 255 and s.instructions > 0, s
        assert s.shared <= kernel_stats.SM_SHARED, s
        assert s.warps_per_sm >= s.num_warps, s
    by_name = {s.name: s for s in stats}
    assert by_name["bigla_backward_dkv"].mma > 0 and by_name["bigla_forward"].mufu > 0


def test_split_diag_replaces_the_row_loops_by_products():
    """The intra-chunk terms: the loop path has a loop over the 16 rows of a sub-chunk; the
    split path adds the tensor-core products (and keeps the loop path only as its fallback)."""
    loop = {
        s.name: s for s in kernel_stats.kernel_stats((2, 197, 3, 32, 64), "bf16", {"diag": "loop"})
    }
    split = {
        s.name: s for s in kernel_stats.kernel_stats((2, 197, 3, 32, 64), "bf16", {"diag": "split"})
    }
    for name in ("bigla_forward", "bigla_backward_dq", "bigla_backward_dkv"):
        assert split[name].mma > loop[name].mma, name
        assert loop[name].in_loops > 0, name
