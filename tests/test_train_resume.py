"""Never lose progress: SIGKILL + restart is bitwise equal to an uninterrupted run, SIGTERM
saves the current step, a non-finite loss stops with the last good checkpoint named, and a
workdir of another run is refused without touching it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_utils import make_image_folder, register_tiny_model, tiny_config

from train import checkpoint, report, trainer

HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def _command(workdir: Path, data_root: Path, **overrides) -> list[str]:
    return [
        sys.executable,
        str(HERE / "train_utils.py"),
        "train",
        str(workdir),
        str(data_root),
        json.dumps(overrides),
    ]


def _train(workdir, data_root, **overrides) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _command(workdir, data_root, **overrides),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (status {proc.returncode}) before the event")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.005)


def _saved_state(workdir: Path, step: int) -> list[np.ndarray]:
    restored = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return [np.asarray(x) for x in jax.tree.leaves(restored)]


def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_identical(data_root, tmp_path):
    steps = dict(total_steps=120, checkpoint_every_steps=10, log_every_steps=10)
    _train(tmp_path / "ref", data_root, **steps)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(killed, data_root, **steps),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    _wait_for(lambda: (killed / "checkpoints" / "20").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    kept = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert 20 in kept and max(kept) < 120  # Killed mid-run.

    resumed = _train(killed, data_root, **steps)
    assert "resumed from" in resumed.stderr
    ref_state, new_state = _saved_state(tmp_path / "ref", 120), _saved_state(killed, 120)
    assert len(ref_state) == len(new_state) > 10
    for a, b in zip(ref_state, new_state, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_the_current_step_and_exits_143(data_root, tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _command(
            workdir,
            data_root,
            total_steps=100_000,
            checkpoint_every_steps=1000,
            log_every_steps=5,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )

    def trained_a_little() -> bool:
        return any(r["step"] >= 10 for r in report.read_metrics(workdir))

    _wait_for(trained_a_little, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-4000:]
    summary = json.loads((workdir / report.SUMMARY_FILE).read_text())
    assert summary["preempted"] is True
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == [summary["step"]]  # The current step, not a scheduled checkpoint.
    assert 10 <= summary["step"] < 1000
    assert summary["checkpoint"].endswith(f"checkpoints/{summary['step']}")


def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(data_root, tmp_path):
    register_tiny_model()
    config = tiny_config(
        data_root,
        total_steps=60,
        warmup_steps=0,
        checkpoint_every_steps=1,
        async_checkpointing=False,
        **{"optim.lr": 1e12, "optim.clip_grad": 0.0},
    )
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step (\d+)") as err:
        trainer.train_and_evaluate(config, str(tmp_path))
    msg = str(err.value)
    bad_step = int(msg.split(" at step ")[1].split()[0])
    good = checkpoint.Checkpointer(tmp_path).latest_step()
    assert good == bad_step - 1
    assert f"checkpoints/{good} (step {good})" in msg


def test_other_runs_workdir_is_refused_and_left_untouched(data_root, tmp_path):
    register_tiny_model()
    trainer.train_and_evaluate(tiny_config(data_root, total_steps=2), str(tmp_path))
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "checkpoints").rglob("*"))
    other = tiny_config(data_root, total_steps=4, **{"data.img_size": 16})
    with pytest.raises(checkpoint.CheckpointMismatchError, match="img_size"):
        trainer.train_and_evaluate(other, str(tmp_path))
    after = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "checkpoints").rglob("*"))
    assert before == after

    # The same run again, already finished: only evaluates, keeps the step.
    summary = trainer.train_and_evaluate(tiny_config(data_root, total_steps=2), str(tmp_path))
    assert summary["step"] == 2 and "eval/top1" in summary
