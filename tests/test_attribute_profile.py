"""benchmarks/attribute_profile.py on a small hand-written HLO dump with stack frames."""

from __future__ import annotations

from benchmarks.attribute_profile import SourceMap, attribute

# ruff: noqa: E501 (HLO lines are long)

HLO = """HloModule jit_train_step, is_scheduled=true

FileNames
1 "/repo/train/trainer.py"
2 "/repo/vig_jax/bigla.py"
3 "/repo/vig_jax/fused.py"
4 "/site-packages/jax/lax.py"
FunctionNames
1 "step"
2 "BiGLA.__call__"
3 "_rstd"
4 "dot"
FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=188 end_line=188 column=1 end_column=2}
3 {file_name_id=3 function_name_id=3 line=47 end_line=47 column=1 end_column=2}
4 {file_name_id=4 function_name_id=4 line=5 end_line=5 column=1 end_column=2}
StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}
3 {file_location_id=3 parent_frame_id=2}
4 {file_location_id=4 parent_frame_id=3}

%fused_reduce.3 (p0: f32[8,4]) -> f32[8] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %mul = f32[8,4]{1,0} multiply(%p0, %p0), metadata={op_name="mul" stack_frame_id=4}
  %sum = f32[8]{0} reduce(%mul), metadata={op_name="reduce_sum" stack_frame_id=3}
  ROOT %r = f32[8]{0} rsqrt(%sum), metadata={op_name="rsqrt" stack_frame_id=2}
}

ENTRY %main (a: f32[8,4]) -> f32[8] {
  %a = f32[8,4]{1,0} parameter(0)
  %input_reduce_fusion.3 = f32[8]{0} fusion(%a), kind=kInput, calls=%fused_reduce.3, metadata={op_name="x" stack_frame_id=1}
  ROOT %loop_add_fusion = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_reduce.3
}
"""


def test_kernels_are_charged_to_the_innermost_frame_of_the_repository():
    source = SourceMap(HLO, "/repo")
    # The fused instructions' frames: 4 (jax, below fused.py:47) and 3 -> fused.py:47 twice,
    # 2 -> bigla.py:188 once; the fusion's own frame (trainer, skipped) gives no vote.
    assert source.source_of("input_reduce_fusion_3", ("train/",)) == "vig_jax/fused.py:47 _rstd"
    assert source.frame(1, ("train/",)) is None
    assert source.frame(1, ()) == "train/trainer.py:10 step"


def test_attribute_sums_per_source_and_keeps_unknown_kernels_by_name():
    source = SourceMap(HLO, "/repo")
    rows = attribute(
        source,
        [("input_reduce_fusion_3", 1.5), ("loop_add_fusion", 0.5), ("bigla_forward", 0.25)],
    )
    assert [(r["source"], r["ms"]) for r in rows] == [
        ("vig_jax/fused.py:47 _rstd", 2.0),
        ("(bigla_forward)", 0.25),
    ]
    assert rows[0]["kernels"] == [("input_reduce_fusion_3", 1.5), ("loop_add_fusion", 0.5)]
