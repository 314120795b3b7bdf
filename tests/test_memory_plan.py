"""benchmarks/memory_plan.py on the CPU: a compiled plan that grows with the batch."""

from benchmarks.memory_plan import planned_mib


def test_plan_grows_with_the_batch():
    small, large = (planned_mib("deit_t", None, None, 32, b) for b in (2, 8))
    assert small["planned_mib"] > 0 and small["conv_implementation"] is None
    assert large["planned_mib"] > small["planned_mib"]
