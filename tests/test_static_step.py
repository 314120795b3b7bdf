"""benchmarks/static_step.py: reading kernels and bytes out of optimised HLO."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from benchmarks import static_step
from benchmarks.static_step import Kernel, kernels, summarize, type_bytes


def test_type_bytes_sums_arrays_and_tuples():
    assert type_bytes("bf16[2,3]{1,0}") == 12
    assert type_bytes("(bf16[2,3]{1,0}, f32[4]{0}, s32[])") == 12 + 16 + 4
    assert type_bytes("pred[7]") == 7


def _loop_hlo() -> str:
    """A CPU compile of a 7-step loop around an elementwise body, then a sum."""

    def f(x):
        return jax.lax.fori_loop(0, 7, lambda i, c: jnp.sin(c) * 2 + i, x).sum()

    return jax.jit(f).lower(jnp.ones((64, 64))).compile().as_text()


def test_kernels_of_a_compiled_loop():
    ks = kernels(_loop_hlo())
    opcodes = {k.opcode for k in ks}
    assert not opcodes & {"parameter", "tuple", "get-tuple-element", "while", "constant"}
    array = 64 * 64 * 4
    # The loop body's elementwise fusion reads the carry (and the counter), writes the carry,
    # and runs once per trip.
    body = [k for k in ks if k.times == 7 and k.bytes >= 2 * array]
    assert len(body) == 1
    assert body[0].bytes == 2 * array + 4
    # The reduction after the loop runs once, reading the array and writing a scalar.
    assert any(k.times == 1 and k.bytes == array + 4 for k in ks)


def test_kernels_needs_one_entry():
    with pytest.raises(ValueError, match="ENTRY"):
        kernels("%f (a: f32[]) -> f32[] {\n  ROOT %a = f32[] parameter(0)\n}\n")


HLO = """\
%fused_add.3 (p0: bf16[8,4], p1: bf16[8,4]) -> bf16[8,4] {
  %p0 = bf16[8,4]{1,0} parameter(0)
  %p1 = bf16[8,4]{1,0} parameter(1)
  ROOT %add.1 = bf16[8,4]{1,0} add(%p0, %p1)
}

ENTRY %main (x: bf16[8,4], y: f32[16]) -> (bf16[8,4], f32[16]) {
  %x = bf16[8,4]{1,0} parameter(0)
  %y = f32[16]{0} parameter(1)
  %loop_add_fusion.2 = bf16[8,4]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_add.3
  %pallas_call.7 = (f32[16]{0}, bf16[8,4]{1,0}) custom-call(%y, %loop_add_fusion.2), \
custom_call_target="__gpu$xla.gpu.triton", \
metadata={op_name="jit(step)/jvp(bigla_forward)/pallas_call"}
  %gte = f32[16]{0} get-tuple-element(%pallas_call.7), index=0
  %cudnn.1 = (bf16[8,4]{1,0}, u8[0]{0}) custom-call(%x), custom_call_target="__cudnn$fmhaSoftmax"
  %gte2 = bf16[8,4]{1,0} get-tuple-element(%cudnn.1), index=0
  ROOT %t = (bf16[8,4]{1,0}, f32[16]{0}) tuple(%gte2, %gte)
}
"""


def test_kernels_labels_and_bytes():
    ks = kernels(HLO)
    assert [(k.label, k.bytes) for k in ks] == [
        ("fused_add", 64 + 64),  # one distinct operand (x twice) and the result
        ("bigla_forward", 64 + 64 + 64 + 64),  # y and the fusion in, a tuple of both out
        ("__cudnn$fmhaSoftmax", 64 + 64),
    ]


def test_summarize_ranks_labels_by_bytes():
    ks = [Kernel("a", "fusion", "small", 10), Kernel("b", "fusion", "big", 100, times=3)]
    s = summarize(ks)
    assert s["kernels"] == 4
    assert s["gb"] == pytest.approx(310 / 1e9)
    assert s["floor_ms"] == pytest.approx(310 / static_step.H100_BANDWIDTH * 1e3)
    assert list(s["labels"]) == ["big", "small"]
    assert s["labels"]["big"] == {"kernels": 3, "gb": pytest.approx(300 / 1e9)}


def _has_cuda_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


@pytest.mark.skipif(
    not _has_cuda_plugin(),
    reason="needs JAX's CUDA plugin (not a GPU): pip install jax[cuda12]",
)
def test_vig_step_compiles_for_an_h100_without_a_gpu(monkeypatch):
    from benchmarks.ab_step import parse_variant

    device = static_step.h100_device()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    row = static_step.analyse(parse_variant("v=vig_t"), 64, 2, "bfloat16", device)
    labels = row["labels"]
    assert "bigla_forward" in labels and "bigla_backward_dkv" in labels
    assert row["kernels"] > 100 and row["gb"] > 0
