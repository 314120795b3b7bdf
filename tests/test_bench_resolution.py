"""Tests of benchmarks/bench_resolution.py: the batch search and budget against a fake device,
and one end-to-end CPU smoke run (subprocesses, JSON, figure)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_resolution as br

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
LIMIT = 64 * GIB
FIXED = 200 * 2**20  # parameters + optimizer state of the fake models
# Fake memory per image: a * tokens + q * tokens^2 bytes (q > 0: a quadratic attention that the
# script's linear-in-tokens prediction underestimates, so it has to back off).
MEMORY = {
    "vig_t": (300e3, 0.0),
    "deit_t": (200e3, 2e3),
    "vig_s": (600e3, 0.0),
    "deit_s": (400e3, 3e3),
}


def fake_peak(model: str, img: int, batch: int) -> float:
    tokens = (img // 16) ** 2
    a, q = MEMORY[model]
    return FIXED + batch * (a * tokens + q * tokens**2)


class FakeRunner(br.Runner):
    """A Runner whose subprocess is a fake device with :data:`LIMIT` bytes and a fake clock."""

    def __init__(self, args, rows, seconds_per_launch: float = 20.0):
        self.now = 0.0
        self.launches: list[br.ChildSpec] = []
        self.seconds_per_launch = seconds_per_launch
        super().__init__(args, rows, clock=lambda: self.now)

    def launch(self, spec, timeout):
        """Emulates child_main: START/RESULT lines, stops at the first out-of-memory."""
        self.launches.append(spec)
        self.now += self.seconds_per_launch
        lines, batches = [], list(spec.batches)
        i = 0
        while i < len(batches):
            b = batches[i]
            lines.append(f"START {b}")
            peak = fake_peak(spec.model, spec.img, b)
            base = {"model": spec.model, "img_size": spec.img, "dtype": spec.dtype, "batch": b}
            if spec.count_flops:
                base["fwd_flops_per_image_xla_form"] = 1e9 * (spec.img / 224) ** 2
            if peak > LIMIT:
                row = {**base, "status": "oom", "error": "RESOURCE_EXHAUSTED: Out of memory"}
                lines.append("RESULT " + json.dumps(row))
                break
            row = {
                **base,
                "status": "ok",
                "implementation": "fake",
                "train_img_s": 1e6 / spec.img / (1 + b / 1e3),
                "infer_img_s": 3e6 / spec.img,
                "peak_train_bytes": int(peak),
                "state_bytes": FIXED,
                "bytes_limit": LIMIT,
                "compile_train_s": 1.0,
                "compile_infer_s": 1.0,
            }
            lines.append("RESULT " + json.dumps(row))
            i += 1
            if i == len(batches):
                target = br.next_auto_batch(row, spec.auto_max, spec.fit_fraction)
                if target:
                    batches.append(target)
        return "\n".join(lines) + "\n", "", 0


def make_args(tmp_path, *extra: str):
    out = ["--out", str(tmp_path / "r.json"), "--dtypes", "bfloat16", "--max-seconds", "1e6"]
    return br.parse_args(out + list(extra))


def best(rows, model, img):
    ok = [
        r["batch"]
        for r in rows
        if r["status"] == "ok"
        and (r["model"], r["img_size"])
        == (
            model,
            img,
        )
    ]
    return max(ok, default=None)


def test_plan_order_bars_first_then_tiny_then_small(tmp_path):
    args = make_args(tmp_path, "--dtypes", "bfloat16,float32")
    points = br.plan_points(args)
    keys = [(p.model, p.img, p.dtype) for p in points]
    assert keys[:6] == [(m, i, "bfloat16") for m, i, _ in br.BARS]
    assert [p.forced for p in points[:6]] == [(b,) for _, _, b in br.BARS]
    assert len(set(keys)) == len(keys) == 4 * 7 + 4 * 4  # bf16 everywhere, fp32 at 4 sizes
    bf16 = [k for k in keys if k[2] == "bfloat16"]
    assert all(k[2] == "float32" for k in keys[len(bf16) :])  # fp32 only after all bf16
    first_small = min(i for i, k in enumerate(bf16) if k[0].endswith("_s"))
    assert all(k[0].endswith("_t") for k in bf16[:first_small])
    assert {k[1] for k in keys if k[2] == "float32"} == {224, 512, 1024, 2048}


def test_batch_search_finds_the_largest_fitting_batch(tmp_path):
    args = make_args(tmp_path)
    runner = FakeRunner(args, [])
    runner.run_all()
    rows = runner.rows
    fraction = args.fit_fraction
    for model in br.MODELS:
        dead_from = None
        for img in br.RESOLUTIONS:
            b = best(rows, model, img)
            if fake_peak(model, img, 1) > LIMIT:
                assert b is None, (model, img)
                dead_from = dead_from or img
                continue
            assert b is not None, (model, img)
            assert fake_peak(model, img, b) <= LIMIT
            # Maximal: the next candidate up would not fit (or b is the cap, 128).
            assert b == 128 or fake_peak(model, img, 2 * b) > fraction * LIMIT, (model, img, b)
        if model == "deit_s":
            # Out of memory at batch 1 from 1536 px: 2048 px is skipped without a subprocess.
            assert dead_from == 1536
            assert not [s for s in runner.launches if (s.model, s.img) == ("deit_s", 2048)]
            skipped = [r for r in rows if (r["model"], r["img_size"]) == ("deit_s", 2048)]
            assert [r["status"] for r in skipped] == ["skipped"]
    # Every point got at most 4 subprocesses; each (model, img) counted FLOPs exactly once.
    per_point: dict[tuple[str, int], int] = {}
    for s in runner.launches:
        per_point[(s.model, s.img)] = per_point.get((s.model, s.img), 0) + 1
    assert max(per_point.values()) <= 4
    counted = [(s.model, s.img) for s in runner.launches if s.count_flops]
    assert sorted(counted) == sorted(set(counted)) == sorted(per_point)


def test_bars_measured_at_their_batch(tmp_path):
    runner = FakeRunner(make_args(tmp_path), [])
    runner.run_all()
    for model, img, batch in br.BARS:
        row = br._row_at(runner.rows, model, img, batch)
        expected = "ok" if fake_peak(model, img, batch) <= LIMIT else "oom"
        assert row is not None and row["status"] == expected, (model, img, batch)
        assert row["bar"] is True
    checks = {c["img_size"]: c for c in br.bar_checks(runner.rows)}
    assert checks[224]["vig_t"] == checks[224]["deit_t"] == "ok"
    v = br._row_at(runner.rows, "vig_t", 224, 128)
    d = br._row_at(runner.rows, "deit_t", 224, 128)
    assert checks[224]["train_speed_ratio_vig_over_deit"] == pytest.approx(
        v["train_img_s"] / d["train_img_s"]
    )
    assert checks[2048]["deit_t"] == "oom"


def test_time_budget_skips_the_rest(tmp_path):
    args = make_args(tmp_path, "--max-seconds", "50")
    runner = FakeRunner(args, [], seconds_per_launch=20.0)
    runner.run_all()
    # 50 s with 20 s per subprocess: two run, the third is refused (10 s < 0.7 * 20 s left).
    assert len(runner.launches) == 2
    skipped = [r for r in runner.rows if r["status"] == "skipped"]
    assert skipped and all(r["error"] == "time budget spent" for r in skipped)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["rows"]) == len(runner.rows)


def test_resume_reruns_nothing_already_measured(tmp_path):
    args = make_args(tmp_path, "--models", "vig_t", "--resolutions", "224,1024")
    first = FakeRunner(args, [])
    first.run_all()
    kept = [r for r in json.loads((tmp_path / "r.json").read_text())["rows"]]
    second = FakeRunner(args, [r for r in kept if r["status"] in ("ok", "oom")])
    second.run_all()
    assert first.launches and not second.launches


def test_dead_subprocess_is_blamed_on_its_batch(tmp_path):
    class Crashing(FakeRunner):
        def launch(self, spec, timeout):
            self.launches.append(spec)
            return f"START {spec.batches[0]}\n", "... CUDA_ERROR_OUT_OF_MEMORY: out of memory", -9

    args = make_args(tmp_path, "--models", "vig_t", "--resolutions", "224", "--no-bars")
    runner = Crashing(args, [])
    runner.run_all()
    # Batch 128 died out of memory -> back-off to 64, 32, 16: four subprocesses, all blamed.
    assert [s.batches for s in runner.launches] == [[128], [64], [32], [16]]
    assert [(r["batch"], r["status"]) for r in runner.rows] == [
        (128, "oom"),
        (64, "oom"),
        (32, "oom"),
        (16, "oom"),
    ]


def test_predict_fit_is_linear_in_the_batch():
    # 1 GiB fixed, 2 GiB per image measured at batch 4 (9 GiB): under 0.5 * 40 GiB -> batch 8?
    # 1 + 8 * 2 = 17 <= 20 yes; 1 + 16 * 2 = 33 > 20 no.
    got = br.predict_fit([8, 16, 32], 4, 9 * GIB, 1 * GIB, 40 * GIB, 0.5)
    assert got == 8
    assert br.predict_fit([16, 32], 4, 9 * GIB, 1 * GIB, 40 * GIB, 0.5) is None


def test_smoke_run_end_to_end(tmp_path):
    """The real script on CPU: two subprocesses (ViG-T, DeiT-T at 32 px, batch 2, fp32)."""
    out, png = tmp_path / "smoke.json", tmp_path / "smoke.png"
    cmd = [sys.executable, "-m", "benchmarks.bench_resolution", "--smoke"]
    cmd += ["--out", str(out), "--png", str(png)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["model"]: r for r in data["rows"]}
    assert set(rows) == {"vig_t", "deit_t"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert (r["img_size"], r["batch"], r["dtype"]) == (32, 2, "float32")
        assert r["train_img_s"] > 0 and r["infer_img_s"] > 0
        # Loss at init is about ln(1000); a few AdamW steps on one fixed batch lower it.
        assert 0.0 < r["loss"] < math.log(1000), r["loss"]
        assert r["implementation"] == "xla"
    assert rows["vig_t"]["bigla_default_implementation"] == "xla"  # CPU
    # DeiT-T forward FLOPs at 32 px (2x2 patches + class token = 5 tokens), counted by hand:
    # matmuls 2 * (d*3d + d*d + 2 * d*4d) per token and block, attention 4 * n^2 * d per
    # block, the patch embedding and the head. XLA also counts the elementwise work (norms,
    # GELU, softmax, residuals): a few per cent more.
    d, n, depth = 192, 5, 12
    matmul = depth * n * 2 * (d * 3 * d + d * d + 2 * d * 4 * d) + depth * 4 * n * n * d
    matmul += 2 * (16 * 16 * 3) * d * 4 + 2 * d * 1000
    ratio = rows["deit_t"]["fwd_flops_per_image_xla_form"] / matmul
    assert 1.0 < ratio < 1.15, ratio
    assert "train_speed_ratio_vig_over_deit" not in json.dumps(data["bars"])  # no bars run
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vig_t" in proc.stdout and "deit_t" in proc.stdout
