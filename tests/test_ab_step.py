"""benchmarks/ab_step.py: variant parsing, switches applied only while a variant is lowered."""

import argparse

import pytest

from benchmarks import ab_step
from vig_jax import bigla


def test_parse_variant_reads_model_and_literal_switches():
    v = ab_step.parse_variant(
        "g=vig_t,vig_jax.bigla.GATE_NORMALIZER=8.0,vig_jax.layers.PALLAS_NORM_BY_DEFAULT=True"
    )
    assert (v.name, v.model) == ("g", "vig_t")
    assert v.switches == (
        ("vig_jax.bigla", "GATE_NORMALIZER", 8.0),
        ("vig_jax.layers", "PALLAS_NORM_BY_DEFAULT", True),
    )


def test_xla_options_are_per_variant_and_reach_the_compiler():
    v = ab_step.parse_variant(
        "c=vig_t,xla_gpu_graph_min_graph_size=1,vig_jax.bigla.GATE_NORMALIZER=8.0"
    )
    assert v.compiler_options == (("xla_gpu_graph_min_graph_size", "1"),)
    assert v.switches == (("vig_jax.bigla", "GATE_NORMALIZER", 8.0),)
    bad = ab_step.parse_variant("d=deit_t,xla_gpu_enable_command_buffer=NOT_A_COMMAND")
    item = ab_step.lower(bad, 32, 2, "float32")
    with pytest.raises(Exception, match="NOT_A_COMMAND"):  # XLA parsed it: the option arrived
        ab_step._compile(item)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("vig_t", "expected NAME=MODEL"),
        ("a=vig_t,GATE_NORMALIZER=8", "expected MODULE.ATTR=VALUE"),
        ("a=vig_t,vig_jax.bigla.GATE_NORMALIZER", "expected MODULE.ATTR=VALUE"),
        ("a=vig_t,vig_jax.bigla.GATE_NORMALIZER=eight", "not a Python literal"),
    ],
)
def test_parse_variant_rejects_malformed_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        ab_step.parse_variant(spec)


def test_unknown_switch_is_an_error_not_a_silent_baseline():
    with pytest.raises(ValueError, match="vig_jax.bigla has no attribute 'GATE_NORMALISER'"):
        ab_step.parse_variant("a=vig_t,vig_jax.bigla.GATE_NORMALISER=8.0")


def test_switched_restores_after_an_exception():
    before = bigla.GATE_NORMALIZER
    with pytest.raises(RuntimeError):
        with ab_step.switched([("vig_jax.bigla", "GATE_NORMALIZER", 3.0)]):
            assert bigla.GATE_NORMALIZER == 3.0
            raise RuntimeError
    assert bigla.GATE_NORMALIZER == before


def test_a_switch_changes_only_its_own_variants_step():
    """The gate normaliser is a constant of the traced step: the switched variant's lowered
    module differs from the baseline's, and a baseline lowered afterwards is the baseline."""
    base = ab_step.lower(ab_step.parse_variant("a=vig_t"), 32, 1, "float32")
    other = ab_step.lower(
        ab_step.parse_variant("b=vig_t,vig_jax.bigla.GATE_NORMALIZER=8.0"), 32, 1, "float32"
    )
    again = ab_step.lower(ab_step.parse_variant("c=vig_t"), 32, 1, "float32")
    text = [x.lowered.as_text() for x in (base, other, again)]
    assert text[0] != text[1]
    assert text[0] == text[2]


def test_run_times_every_variant_from_one_initial_state():
    """Two variants of one model (the patch embedding as a product or a conv: the same values)
    start from the same parameters, so they train to the same loss."""
    args = argparse.Namespace(
        img=32, batch=2, dtype="float32", rounds=2, warmup=1, steps=2, compile_workers=2
    )
    variants = [
        ab_step.parse_variant("conv=deit_t"),
        ab_step.parse_variant("product=deit_t,vig_jax.deit.PATCH_EMBED_AS_PRODUCT=True"),
    ]
    rows = ab_step.run(variants, args)
    assert [r["name"] for r in rows] == ["conv", "product"]
    for row in rows:
        assert row["steps_timed"] == 4
        assert row["train_ms"] > 0 and row["train_img_s"] == pytest.approx(2e3 / row["train_ms"])
        assert row["kernel_ms"] is None  # no CUPTI off the GPU
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-3)


def _row(name, model, ms, loss=6.0, switches=(), options=None):
    return {
        "name": name,
        "model": model,
        "train_ms": ms,
        "loss": loss,
        "switches": list(switches),
        "compiler_options": options or {},
    }


def test_winning_switches_need_speed_and_the_same_loss():
    rows = [
        _row("deit", "deit_t", 12.0),
        _row("deit_prod", "deit_t", 11.9, switches=["vig_jax.deit.PATCH_EMBED_AS_PRODUCT=True"]),
        _row("vig", "vig_t", 17.0),
        _row("fast_but_wrong", "vig_t", 15.0, loss=7.0, switches=["m.WRONG=True"]),
        _row("noise", "vig_t", 16.98, switches=["m.NOISE=True"]),  # 0.1 %: below the margin
        _row("gates", "vig_t", 16.0, switches=["m.GATES=True"]),
        _row("all", "vig_t", 15.5, switches=["m.GATES=True", "m.NORM=True"]),
        _row("nocb", "vig_t", 14.0, options={"xla_gpu_enable_command_buffer": ""}),
    ]
    assert ab_step.winning_switches(rows) == [
        "vig_jax.deit.PATCH_EMBED_AS_PRODUCT=True",
        "m.GATES=True",
        "m.NORM=True",
    ]
    assert ab_step.winning_switches(rows[:3]) == ["vig_jax.deit.PATCH_EMBED_AS_PRODUCT=True"]
    slower = [_row("vig", "vig_t", 17.0), _row("slope", "vig_t", 17.2, switches=["m.S=1"])]
    assert ab_step.winning_switches(slower) == []
