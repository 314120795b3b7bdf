"""Tests of benchmarks/bench_resolution.py: the plan, the batch choice from compiled memory plans,
the parent's restarts and blame against a fake child, the FLOP counts against hand formulas, and
one end-to-end CPU smoke run (child process, JSON, figure)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from benchmarks import bench_resolution as br

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
LIMIT = 64 * GIB
FIXED = 200 * 2**20  # parameters + optimizer state of the fake models
# Fake memory per image: a * tokens + q * tokens^2 bytes (q > 0: a quadratic attention that a
# prediction linear in tokens underestimates).
MEMORY = {
    "vig_t": (300e3, 0.0),
    "deit_t": (200e3, 2e3),
    "vig_s": (600e3, 0.0),
    "deit_s": (400e3, 3e3),
}


def fake_plan(model: str, img: int, batch: int) -> float:
    tokens = (img // 16) ** 2
    a, q = MEMORY[model]
    return FIXED + batch * (a * tokens + q * tokens**2)


def true_best(model: str, img: int, budget: float, cap: int = 128) -> int | None:
    fits = [b for b in br.BATCH_CANDIDATES if b <= cap and fake_plan(model, img, b) <= budget]
    return max(fits, default=None)


# ---- plan ------------------------------------------------------------------------------------


def make_args(tmp_path, *extra: str):
    out = ["--out", str(tmp_path / "r.json"), "--max-seconds", "1e6", "--no-flops"]
    return br.parse_args(out + list(extra))


def test_plan_bars_first_then_bf16_tiny_small_then_fp32(tmp_path):
    chunks = br.plan_units(make_args(tmp_path, "--chunk-size", "5"))
    units = [u for c in chunks for u in c]
    assert [(u.model, u.img, u.batch) for u in chunks[0]] == list(br.BARS)
    assert all(len(c) <= 5 for c in chunks[1:])
    keys = [(u.model, u.img, u.dtype, u.batch) for u in units]
    assert len(set(keys)) == len(keys)
    # bf16: 4 models x 7 sizes, the 224 px automatic units are the b128 bars; fp32: 4 x 7.
    assert len(units) == len(br.BARS) + (4 * 7 - 2) + 4 * 7
    dtypes = [u.dtype for u in units]
    assert dtypes == sorted(dtypes, key=br.DTYPES.index)  # every bf16 unit before fp32
    bf16 = [u for u in units[len(br.BARS) :] if u.dtype == "bfloat16"]
    first_small = min(i for i, u in enumerate(bf16) if u.model.endswith("_s"))
    assert all(u.model.endswith("_t") for u in bf16[:first_small])
    assert all(u.batch is None for u in units[len(br.BARS) :])


# ---- batch choice from plans -------------------------------------------------------------------


@pytest.mark.parametrize("model", list(MEMORY))
@pytest.mark.parametrize("img", [224, 512, 1024, 1536, 2048])
@pytest.mark.parametrize("start", [128, 8, 1])
def test_choose_batch_finds_the_largest_fitting_batch(model, img, start):
    budget = 0.9 * LIMIT
    calls = []

    def plan_of(b):
        calls.append(b)
        return int(fake_plan(model, img, b))

    got, tried = br.choose_batch(plan_of, start, list(br.BATCH_CANDIDATES), FIXED, budget)
    assert got == true_best(model, img, budget), (got, tried)
    assert len(calls) == len(set(calls)) == len(tried)  # never compiles a batch twice
    # Linear memory: the plan of the first try predicts the answer; quadratic: a few more.
    assert len(calls) <= (2 if MEMORY[model][1] == 0 else 4), calls


def test_choose_batch_honours_the_candidates_and_reports_no_fit():
    got, tried = br.choose_batch(lambda b: 100 + 10 * b, 4, [4, 2, 1], 100, 95)
    # Nothing fits: after batch 4 the smallest candidate is tried, the ones between are not.
    assert got is None and sorted(tried) == [1, 4]
    got, _ = br.choose_batch(lambda b: 100 + 10 * b, 1, [16, 8, 4, 2, 1], 100, 190)
    assert got == 8


def test_predict_fit_is_linear_in_the_batch():
    # 1 GiB fixed, 2 GiB per image measured at batch 4 (9 GiB), budget 20 GiB:
    # 1 + 8 * 2 = 17 fits, 1 + 16 * 2 = 33 does not.
    assert br.predict_fit([8, 16, 32], 4, 9 * GIB, 1 * GIB, 20 * GIB) == 8
    assert br.predict_fit([16, 32], 4, 9 * GIB, 1 * GIB, 20 * GIB) is None


# ---- the parent against a fake child -----------------------------------------------------------


class FakeRunner(br.Runner):
    """A Runner whose child is a fake device with :data:`LIMIT` bytes.

    ``crash``: {unit name: "timing" | "compile" | "runtime_oom"} makes the child die there;
    "compile,compile" dies in two children.
    """

    def __init__(self, args, rows, crash=None):
        self.children: list[br.ChildConfig] = []
        self.crash = {k: v.split(",") for k, v in (crash or {}).items()}
        super().__init__(args, rows)

    def event(self, unit, what):
        """True (once per listed event) if ``unit`` is to die with ``what``."""
        events = self.crash.get(unit.name, [])
        if events and events[0] == what:
            events.pop(0)
            return True
        return False

    def launch(self, cfg, timeout, on_line):
        """Emulates child_main: CHUNK/START/RESULT lines, exit codes of crashes and OOM."""
        self.children.append(cfg)
        index = 0
        budget = cfg.fit_fraction * LIMIT
        for c, chunk in enumerate(cfg.chunks):
            on_line(f"CHUNK {c}")
            units = [(index + i, br.Unit(**u)) for i, u in enumerate(chunk)]
            index += len(chunk)
            for _, u in units:
                if self.event(u, "compile"):
                    return "Segmentation fault", -11
            for i, u in units:
                base = {"unit": i, "model": u.model, "img_size": u.img, "dtype": u.dtype}
                base["auto"] = u.batch is None
                if u.batch is None:
                    b, _ = br.choose_batch(
                        lambda b, u=u: int(fake_plan(u.model, u.img, b)),
                        u.cap,
                        [b for b in br.BATCH_CANDIDATES if b <= u.cap],
                        FIXED,
                        budget,
                    )
                else:
                    b = u.batch if fake_plan(u.model, u.img, u.batch) <= LIMIT else None
                if b is None:
                    row = {**base, "batch": u.batch or 0, "status": "oom", "error": "plan"}
                    on_line("RESULT " + json.dumps(row))
                    continue
                on_line(f"START {i}")
                if self.event(u, "timing"):
                    return "CUDA_ERROR_ILLEGAL_ADDRESS", -6
                if self.event(u, "runtime_oom"):
                    row = {**base, "batch": b, "status": "oom", "error": "RESOURCE_EXHAUSTED"}
                    on_line("RESULT " + json.dumps(row))
                    return "", br.EXIT_RUNTIME_OOM
                row = {
                    **base,
                    "batch": b,
                    "status": "ok",
                    "implementation": "fake",
                    "train_img_s": 1e6 / u.img,
                    "infer_img_s": 3e6 / u.img,
                    "xla_train_bytes": int(fake_plan(u.model, u.img, b)),
                    "peak_train_bytes": int(fake_plan(u.model, u.img, b)),
                }
                on_line("RESULT " + json.dumps(row))
        return "", 0


def test_sweep_measures_every_unit_at_the_largest_batch(tmp_path):
    args = make_args(tmp_path, "--dtypes", "bfloat16")
    runner = FakeRunner(args, [])
    runner.run_all()
    assert len(runner.children) == 1  # one child for the whole sweep
    budget = args.fit_fraction * LIMIT
    for model in br.MODELS:
        for img in br.RESOLUTIONS:
            auto = [r for r in runner.rows if (r["model"], r["img_size"]) == (model, img)]
            auto = [r for r in auto if r["auto"]] or [r for r in auto if r["batch"] == 128]
            best = true_best(model, img, budget)
            assert len(auto) == 1, (model, img)
            assert auto[0]["status"] == ("ok" if best else "oom")
            if best:
                assert auto[0]["batch"] == best
    checks = {c["img_size"]: c for c in br.bar_checks(runner.rows)}
    assert checks[224]["train_speed_ratio_vig_over_deit"] == pytest.approx(1.0)
    assert checks[1024]["vig_t"] == "ok"
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["rows"]) == len(runner.rows)


def test_resume_reruns_nothing_already_measured(tmp_path):
    args = make_args(tmp_path, "--models", "vig_t,deit_t", "--resolutions", "224,1024")
    first = FakeRunner(args, [])
    first.run_all()
    kept = json.loads((tmp_path / "r.json").read_text())["rows"]
    second = FakeRunner(args, [r for r in kept if r["status"] in ("ok", "oom")])
    second.run_all()
    assert first.children and not second.children


def test_crash_while_timing_is_blamed_on_that_unit_and_the_rest_goes_on(tmp_path):
    args = make_args(tmp_path, "--models", "vig_t,deit_t", "--resolutions", "224,512,1024")
    runner = FakeRunner(args, [], crash={"deit_t/512/bfloat16/auto": "timing"})
    runner.run_all()
    assert len(runner.children) == 2
    bad = [r for r in runner.rows if r["status"] == "error"]
    assert [(r["model"], r["img_size"]) for r in bad] == [("deit_t", 512)]
    ok = {(r["model"], r["img_size"], r["dtype"]) for r in runner.rows if r["status"] == "ok"}
    assert len(ok) == 2 * 3 * 2 - 1  # everything else, bf16 and fp32
    # The second child got only what the first did not report.
    second = [f"{u['model']}{u['img']}{u['dtype']}" for c in runner.children[1].chunks for u in c]
    assert "deit_t512bfloat16" not in second and len(second) < sum(
        map(len, runner.children[0].chunks)
    )


def test_crash_while_compiling_falls_back_to_one_thread_then_blames_the_chunk(tmp_path):
    args = make_args(tmp_path, "--models", "vig_t", "--resolutions", "224,512,768,1024")
    args.chunk_size = 2
    # Once: the next child compiles on one thread and measures everything.
    runner = FakeRunner(args, [], crash={"vig_t/512/bfloat16/auto": "compile"})
    runner.run_all()
    assert [c.compile_workers for c in runner.children] == [12, 1]
    assert all(r["status"] == "ok" for r in runner.rows)
    assert len(runner.rows) == len([u for c in br.plan_units(args) for u in c])
    # Twice: the chunk being compiled (512 and 768 px bf16) is blamed, the rest measured.
    runner = FakeRunner(args, [], crash={"vig_t/512/bfloat16/auto": "compile,compile"})
    runner.run_all()
    bad = sorted((r["img_size"], r["dtype"]) for r in runner.rows if r["status"] == "error")
    assert bad == [(512, "bfloat16"), (768, "bfloat16")]
    assert all("Segmentation fault" in r["error"] for r in runner.rows if r["status"] == "error")
    assert sum(r["status"] == "ok" for r in runner.rows) == len(runner.rows) - 2


def test_runtime_oom_retries_with_a_smaller_cap(tmp_path):
    args = make_args(tmp_path, "--models", "vig_t", "--resolutions", "512", "--dtypes", "float32")
    runner = FakeRunner(args, [], crash={"vig_t/512/float32/auto": "runtime_oom"})
    runner.run_all()
    rows = [(r["batch"], r["status"]) for r in runner.rows]
    first = true_best("vig_t", 512, args.fit_fraction * LIMIT)
    assert rows[0] == (first, "oom")
    assert runner.children[1].chunks[0][0]["cap"] == first // 2
    assert rows[1] == (first // 2, "ok")
    # --resume: a runtime out-of-memory alone does not count as measured.
    unit = br.Unit("vig_t", 512, "float32")
    assert runner.rows[0]["runtime_oom"] and not br._unit_done(runner.rows[:1], unit)
    assert br._unit_done(runner.rows, unit)


def test_time_budget_reaches_the_child_as_a_deadline(tmp_path):
    args = make_args(tmp_path, "--max-seconds", "100")
    runner = FakeRunner(args, [])
    runner.run_all()
    deadline = runner.children[0].deadline
    assert time.time() + 80 < deadline < time.time() + 100


# ---- FLOPs -----------------------------------------------------------------------------------


def test_matmul_flops_counts_dots_grouped_convs_and_scans():
    def f(x, w, k, ws):
        y = x @ w  # [8, 16] @ [16, 4]: 8 * 4 * 16 multiply-adds
        img = jnp.ones((2, 6, 6, 4))
        # Depthwise 3x3 conv, 4 channels: every output element has 9 multiply-adds.
        z = jax.lax.conv_general_dilated(
            img,
            k,
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=4,
        )

        def body(c, w_i):
            return c @ w_i, None  # [8, 4] @ [4, 4], 5 times

        c, _ = jax.lax.scan(body, y, ws)
        return c.sum() + z.sum()

    args = (jnp.ones((8, 16)), jnp.ones((16, 4)), jnp.ones((3, 3, 1, 4)), jnp.ones((5, 4, 4)))
    jaxpr = jax.make_jaxpr(f)(*args)
    expected = 2 * (8 * 4 * 16 + 2 * 6 * 6 * 4 * 9 + 5 * 8 * 4 * 4)
    assert br.matmul_flops(jaxpr) == expected


def deit_macs(d: int, depth: int, img: int, patch: int = 16, classes: int = 1000) -> float:
    """Multiply-adds of a DeiT forward pass per image, by hand: per block and token the qkv
    (3d^2), projection (d^2) and MLP (8d^2) matmuls, per block q.k^T and attn.v (2 n^2 d);
    the patch embedding and the head."""
    n = (img // patch) ** 2 + 1
    blocks = depth * (n * 12 * d * d + 2 * n * n * d)
    return blocks + (n - 1) * patch * patch * 3 * d + d * classes


def test_deit_t_flops_at_224_match_the_hand_count():
    got = br.count_flops("deit_t", 224)
    hand = 2 * deit_macs(192, 12, 224)
    # 1.254 GMACs: the DeiT paper's "1.3 GFLOPs" (multiply-adds, fvcore's convention).
    assert hand / 2 == pytest.approx(1.2536e9, rel=1e-3)
    assert got["fwd_matmul_flops_per_image"] == pytest.approx(hand, rel=1e-6)
    # XLA also counts the elementwise work (norms, GELU, softmax, residuals): a few % more.
    ratio = got["fwd_flops_per_image_xla_form"] / hand
    assert 1.0 < ratio < 1.1, ratio


# ---- end to end on the CPU ---------------------------------------------------------------------


def test_switches_reach_the_child_and_a_misspelt_one_is_an_error(tmp_path):
    args = make_args(tmp_path, "--set", "vig_jax.layers.STEM_AS_PRODUCT=False", "--no-bars")
    runner = FakeRunner(args, [])
    runner.run_all()
    assert [c.switches for c in runner.children] == [[["vig_jax.layers", "STEM_AS_PRODUCT", False]]]
    with pytest.raises(ValueError, match="vig_jax.layers has no attribute 'STEM_AS_PRODUKT'"):
        br.parse_args(["--set", "vig_jax.layers.STEM_AS_PRODUKT=False"])


def test_smoke_run_end_to_end(tmp_path):
    """The real script on CPU: one child compiles ViG-T and DeiT-T (32 px, batch 2, fp32) on two
    threads, times them; a CPU subprocess counts FLOPs; JSON, table and figure."""
    out, png = tmp_path / "smoke.json", tmp_path / "smoke.png"
    cmd = [sys.executable, "-m", "benchmarks.bench_resolution", "--smoke", "--cache-dir", ""]
    cmd += ["--out", str(out), "--png", str(png), "--set", "vig_jax.layers.STEM_AS_PRODUCT=False"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["model"]: r for r in data["rows"]}
    assert set(rows) == {"vig_t", "deit_t"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert (r["img_size"], r["batch"], r["dtype"], r["auto"]) == (32, 2, "float32", True)
        assert r["train_img_s"] > 0 and r["infer_img_s"] > 0
        # Loss at init is about ln(1000); a few AdamW steps on one fixed batch lower it.
        assert 0.0 < r["loss"] < math.log(1000), r["loss"]
        assert r["implementation"] == "xla"
        assert r["xla_train_bytes"] > r["state_bytes"] > 0
        assert r["infer_first_call_s"] > 0 and r["train_first_call_s"] > 0
        assert r["switches"] == {"vig_jax.layers.STEM_AS_PRODUCT": False}
    assert rows["vig_t"]["bigla_default_implementation"] == "xla"  # CPU
    # DeiT-T at 32 px (2x2 patches + class token), from the FLOPs subprocess.
    hand = 2 * deit_macs(192, 12, 32)
    assert rows["deit_t"]["fwd_matmul_flops_per_image"] == pytest.approx(hand, rel=1e-6)
    assert 1.0 < rows["deit_t"]["fwd_flops_per_image_xla_form"] / hand < 1.15
    assert rows["vig_t"]["fwd_matmul_flops_per_image"] > 0
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vig_t" in proc.stdout and "deit_t" in proc.stdout
    # Heartbeats: every compilation of the child is echoed with its unit.
    for name in ("vig_t/32/float32/auto", "deit_t/32/float32/auto"):
        assert f"compiled {name} train b2" in proc.stdout
        assert f"compiled {name} infer b2" in proc.stdout
        assert f"ready {name}" in proc.stdout
    assert "compiled init vig_t" in proc.stdout


def test_parameters_are_reused_across_resolutions_with_new_position_embeddings():
    """ViG-T parameters made at 32 px, reused at 64 px: every leaf kept but the position
    embedding, redrawn at the new grid with the init's spread."""
    import numpy as np

    _, _, small, _ = br._Model("vig_t", 32, "float32", bigla_impl="xla").graphdefs()
    host = jax.tree.map(lambda a: np.full(a.shape, 0.5, a.dtype), small)
    _, _, abstract, _ = br._Model("vig_t", 64, "float32", bigla_impl="xla").graphdefs()
    got = br.reuse_params(abstract, host)
    assert jax.tree.structure(got) == jax.tree.structure(abstract)
    changed = []
    for (path, a), g, h in zip(
        jax.tree.leaves_with_path(abstract),
        jax.tree.leaves(got),
        jax.tree.leaves(host),
        strict=True,
    ):
        assert g.shape == a.shape and g.dtype == a.dtype
        if g is not h:
            changed.append(jax.tree_util.keystr(path))
            assert 0.015 < np.std(g) < 0.025 and np.abs(g).max() <= 0.04
    assert changed == ["['pos_embed'].value"]


def test_a_silent_child_is_killed_and_compiling_falls_back_to_one_thread(tmp_path):
    """A child that hangs while compiling (prints CHUNK, then nothing) is killed after
    --stall-seconds; the next one compiles on one thread."""

    class Hanging(br.Runner):
        def child_command(self, cfg):
            self.configs.append(cfg)
            if len(self.configs) == 1:
                code = "import time; print('CHUNK 0', flush=True); time.sleep(60)"
            else:
                code = "print('CHUNK 0', flush=True)"
            return [sys.executable, "-c", code]

    args = make_args(tmp_path, "--models", "vig_t", "--resolutions", "224", "--no-bars")
    args.dtypes, args.stall_seconds = "float32", 1.0
    runner = Hanging(args, [])
    runner.configs = []
    t0 = time.monotonic()
    runner.run_all()
    assert time.monotonic() - t0 < 30
    assert [c.compile_workers for c in runner.configs] == [12, 1]
    assert runner.rows == []  # nothing blamed on the first hang; the second child said nothing


# ---- heartbeats, stall clock, chunk trimming, --resume of the committed H100 sweep -------------


def _feed(lines, every: float, count: int) -> None:
    """Puts ``count`` heartbeat lines into ``lines``, one per ``every`` seconds, then None."""
    for i in range(count):
        time.sleep(every)
        lines.put(f"COMPILED {i} train b8 1\n")
    lines.put(None)


def test_every_line_resets_the_stall_clock():
    import queue
    import threading

    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_feed, args=(lines, 0.1, 12), daemon=True).start()
    got: list[str] = []
    t0 = time.monotonic()
    # 1.2 s of output, never 0.5 s without a line: not stalled.
    assert br.pump_lines(lines, got.append, timeout=30.0, stall_seconds=0.5) is None
    assert time.monotonic() - t0 > 1.0
    assert got == [f"COMPILED {i} train b8 1" for i in range(12)]


def test_silence_is_a_stall_and_endless_output_a_timeout():
    import queue
    import threading

    silent: queue.Queue = queue.Queue()
    silent.put("CHUNK 0\n")
    t0 = time.monotonic()
    assert br.pump_lines(silent, lambda _: None, timeout=30.0, stall_seconds=0.3) == "stalled"
    assert 0.25 < time.monotonic() - t0 < 5.0
    busy: queue.Queue = queue.Queue()
    threading.Thread(target=_feed, args=(busy, 0.05, 10**6), daemon=True).start()
    t0 = time.monotonic()
    assert br.pump_lines(busy, lambda _: None, timeout=0.6, stall_seconds=0.3) == "timeout"
    assert 0.55 < time.monotonic() - t0 < 5.0


def test_a_child_printing_heartbeats_outlives_the_stall_seconds(tmp_path, capsys):
    """A child compiling for 2 s (6x --stall-seconds) that prints a line per compilation is not
    killed: one child, all threads kept, heartbeats echoed with the unit's name."""

    class Busy(br.Runner):
        def child_command(self, cfg):
            self.configs.append(cfg)
            code = (
                "import time\nprint('CHUNK 0', flush=True)\n"
                "for i in range(10):\n"
                "    time.sleep(0.2)\n"
                "    print(f'COMPILED 0 train b{2 ** i} 1', flush=True)\n"
                "print('READY 0 2', flush=True)\n"
            )
            return [sys.executable, "-c", code]

    args = make_args(tmp_path, "--models", "vig_t", "--resolutions", "224", "--no-bars")
    args.dtypes, args.stall_seconds = "float32", 0.6
    runner = Busy(args, [])
    runner.configs = []
    runner.run_all()
    assert [c.compile_workers for c in runner.configs] == [12]
    out = capsys.readouterr().out
    assert "child exit 0" in out and "stalled" not in out
    assert "compiled vig_t/224/float32/auto train b512 (1 s)" in out
    assert "ready vig_t/224/float32/auto ready (2 s)" not in out
    assert "ready vig_t/224/float32/auto (2 s)" in out


def test_units_that_fit_compiles_only_a_chunk_that_can_be_timed_before_the_deadline():
    units = [br.Unit(m, r, "bfloat16") for r in (224, 384) for m in ("vig_s", "deit_s")]
    est = {"vig": 18.0, "deit": 4.0}
    # Whole chunk: max(120, 4 x 28) + 2 x 18 + 2 x 4 = 164 s.
    assert br.units_that_fit(units, 164.0, 28.0, 120.0, est) == 4
    # 3 units: 120 + 18 + 4 + 18 = 160 s; 2: 120 + 22 = 142 s; 1: 138 s.
    assert br.units_that_fit(units, 163.0, 28.0, 120.0, est) == 3
    assert br.units_that_fit(units, 159.0, 28.0, 120.0, est) == 2
    assert br.units_that_fit(units, 140.0, 28.0, 120.0, est) == 1
    assert br.units_that_fit(units, 137.0, 28.0, 120.0, est) == 0
    assert br.units_that_fit(units, math.inf, 28.0, 120.0, est) == 4


def test_compile_order_starts_the_longest_compilations_first():
    units = list(enumerate(br.Unit(m, r, "bfloat16") for r in (384, 2048) for m in br.MODELS))
    order = [(u.model[:3], u.img) for _, u in br.compile_order(units)]
    assert order == [("vig", 2048), ("vig", 2048), ("vig", 384), ("vig", 384)] + [
        ("dei", 2048),
        ("dei", 2048),
        ("dei", 384),
        ("dei", 384),
    ]
    assert sorted(br.compile_order(units)) == units  # a permutation, indices kept


def test_resume_of_the_committed_h100_sweep_keeps_the_bars_and_retries_the_skipped(tmp_path):
    committed = ROOT / "benchmarks" / "results" / "resolution_h100.json"
    data, rows = br.read_rows(str(committed))
    assert any(r["status"] == "skipped" for r in data["rows"])
    assert all(r["status"] in ("ok", "oom") for r in rows)
    args = br.parse_args(["--resume", "--out", str(committed), "--no-flops"])
    pending = br.Runner(args, rows).pending()
    units = [u for c in pending for u in c]
    assert not any(u.batch is not None for u in units)  # no bar is measured again
    measured_bars = {(r["model"], r["img_size"], r["batch"]) for r in rows if r.get("bar")}
    assert measured_bars == set(br.BARS)
    # First the deadline-skipped bf16 ViG-T/DeiT-T sizes, then ViG-S/DeiT-S, then fp32.
    assert [len(c) for c in pending[:2]] == [args.chunk_size] * 2 == [6, 6]
    first = [(u.model, u.img, u.dtype) for u in pending[0] + pending[1]]
    assert first == [(m, r, "bfloat16") for r in br.RESOLUTIONS[1:] for m in ("vig_t", "deit_t")]
    skipped = {(r["model"], r["img_size"], r["dtype"]) for r in data["rows"]}
    skipped -= {(r["model"], r["img_size"], r["dtype"]) for r in rows}
    assert skipped <= {(u.model, u.img, u.dtype) for u in units}
    small = [u for u in units if u.dtype == "bfloat16" and u.model.endswith("_s")]
    assert len(small) == 2 * len(br.RESOLUTIONS)
    assert len(units) == 12 + 14 + 28
