"""Run output (train/report.py): progress bar, JSON lines, plots, summary line."""

import io
import json

from train import report


def test_progress_bar_shows_throughput_eta_and_loss():
    stream = io.StringIO()
    bar = report.ProgressBar(100, 32, stream=stream, line_interval_s=0.0)
    bar._window.clear()
    bar._window.append((0.0, 0))
    bar._window.append((2.0, 10))  # 10 steps of 32 images in 2 s: 160 img/s.
    assert bar.images_per_second() == 160.0
    bar.update(10, loss=1.25, force=True)
    line = stream.getvalue()
    assert "10/100" in line and "img/s" in line and "ETA" in line and "loss 1.2500" in line


def test_metrics_lines_plots_and_summary(tmp_path):
    rep = report.Reporter(tmp_path, tensorboard=True)
    for step in (10, 20, 30):
        rep.write(step, {"train/loss": 2.0 - step / 100, "train/lr": 1e-3})
    rep.write(30, {"eval/top1": 41.5, "eval/top5": 90.0, "eval/loss": 1.7})
    rep.close()
    with open(tmp_path / report.METRICS_FILE, "a") as f:
        f.write('{"step": 40, "train/lo')  # A line cut by a kill is ignored.
    records = report.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [10, 20, 30, 30]
    assert any((tmp_path / "tensorboard").iterdir())
    written = report.make_plots(tmp_path, steps_per_epoch=10)
    assert {p.name for p in written} == {"loss.png", "accuracy.png"}
    assert all(p.stat().st_size > 1000 for p in written)

    summary = {
        "model": "vig_t",
        "step": 30,
        "eval/top1": 41.5,
        "eval/top5": 90.0,
        "wall_s": 12.0,
        "skipped_images": 2,
    }
    line = report.write_summary(tmp_path, summary)
    assert line.startswith("DONE vig_t step 30") and "top-1 41.50%" in line
    assert "top-5 90.00%" in line and "2 unreadable images skipped" in line
    assert json.loads((tmp_path / report.SUMMARY_FILE).read_text())["eval/top1"] == 41.5
