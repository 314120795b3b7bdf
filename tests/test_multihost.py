"""Several hosts, simulated by two JAX processes on this machine, train like one process.

The main test starts ``tests/train_utils.py train`` (which calls ``train_and_evaluate``, as
``train.main`` does) as two processes that find each other through the environment variables a
cluster launch would set (``JAX_COORDINATOR_ADDRESS`` on loopback, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``), each with 2 fake CPU devices and gloo collectives: one 4-device mesh over
two hosts. A third process trains the same config on one device. With the device-side
augmentations that draw per row (mixup / cutmix, random erasing, drop path) off, a step does
not depend on the row order of the global batch, so the two-process run must equal the
one-device run: same train and eval metrics, and the checkpoints both runs wrote after each
step, restored here on one CPU device, hold the same state (parameters, Adam moments, EMA).

The two-process run is done twice, with replicated and with FSDP-sharded parameters (the
latter writes parameter shards from both processes into one Orbax checkpoint). Resuming
the two-process run in one process is refused with a clear error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from train_utils import CLASSES, register_tiny_model, tiny_config

from train import checkpoint, data, sharding, trainer

HERE = Path(__file__).resolve().parent
PROCESS_TIMEOUT_S = 240.0
STACK_DUMP_WAIT_S = 2.0  # For faulthandler to write the stacks.
LOG_TAIL_CHARS = 12_000  # Of each log in a failure message: room for all threads' stacks.
# A run set that hangs is started once more (see _run); a second hang fails the test.
HANG_RETRIES = 1
# The official recipe minus the per-row device randomness (see the module docstring); host
# RandAugment stays on. A large LR so that one step moves parameters by ~6e-3.
OVERRIDES = {
    "total_steps": 2,
    "warmup_steps": 0,
    "checkpoint_every_steps": 1,
    "optim.lr": 0.5,
    "aug.mixup": 0.0,
    "aug.cutmix": 0.0,
    "aug.random_erasing": 0.0,
    "model.drop_path_rate": 0.0,
}
# Launcher variables that would make a child join some other job.
_FOREIGN_ENV = ("JAX_", "SLURM_", "OMPI_", "PMI_", "PMIX_", "XLA_FLAGS")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV)}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        **extra,
    )
    return env


def _host_env(port: int, process_id: int) -> dict[str, str]:
    """What a launcher sets on host ``process_id`` of 2 (docs/multihost.md)."""
    return _env(
        2,
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",  # Loopback only, not every interface.
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(process_id),
    )


def _start(workdir: Path, env: dict[str, str], log: Path, **overrides) -> subprocess.Popen:
    command = [
        sys.executable,
        str(HERE / "train_utils.py"),
        "train",
        str(workdir),
        "",  # No image folder: the fake source.
        json.dumps({**OVERRIDES, **overrides}),
    ]
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def _dump_stacks(procs: dict[str, subprocess.Popen]) -> None:
    """Has every live process write all its threads' Python stacks to its log (the SIGUSR1
    handler of ``train_utils.py``), so that a hang shows where each process waits."""
    alive = [p for p in procs.values() if p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGUSR1)
    if alive:
        time.sleep(STACK_DUMP_WAIT_S)


class _Hung(AssertionError):
    """Processes were still running at the time limit, and none had failed."""


def _wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, Path]) -> None:
    """Waits for every process; on a failure or the time limit kills the rest and fails.

    A process left alone after its peer died would wait in a collective until JAX's heartbeat
    timeout, so the others are killed as soon as one fails. Before that, every live process
    writes its threads' stacks to its log (:func:`_dump_stacks`), which the failure shows.
    """
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs.values()):
            failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                what = f"{failed} failed" if failed else f"timed out after {PROCESS_TIMEOUT_S} s"
                _dump_stacks(procs)
                tails = "\n".join(
                    f"--- {n} (status {procs[n].poll()}):\n{logs[n].read_text()[-LOG_TAIL_CHARS:]}"
                    for n in procs
                )
                raise (AssertionError if failed else _Hung)(f"{what}\n{tails}")
            time.sleep(0.2)
        failed = {n: p.returncode for n, p in procs.items() if p.returncode != 0}
        assert not failed, "\n".join(
            f"--- {n}:\n{logs[n].read_text()[-LOG_TAIL_CHARS:]}" for n in failed
        )
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


Runs = dict[str, tuple[Path, dict[str, str], dict]]  # name -> (workdir, env, overrides)


def _run(make_runs: Callable[[], Runs], logdir: Path) -> dict[str, str]:
    """Starts every run of ``make_runs()`` at once; returns their logs.

    A set whose processes hang past ``PROCESS_TIMEOUT_S`` is started again from empty
    workdirs (``make_runs`` picks a new coordinator port), at most ``HANG_RETRIES`` times, with
    the hung processes' stacks in a warning. Once in five CI runs on the 2-core machine the
    two-process pair stopped after step 1's checkpoint; ~45 runs here, loaded and not, never
    did, so the cause is unknown: the stacks are there for the next one. A process that fails,
    or a set that hangs again, fails the test.
    """
    hangs = 0
    while True:
        runs = make_runs()
        logs = {name: logdir / f"{name}.log" for name in runs}
        procs = {
            name: _start(workdir, env, logs[name], **overrides)
            for name, (workdir, env, overrides) in runs.items()
        }
        try:
            _wait_all(procs, logs)
        except _Hung as hung:
            hangs += 1
            if hangs > HANG_RETRIES:
                raise
            warnings.warn(f"starting a hung run set again:\n{hung}", stacklevel=2)
            for workdir, _, _ in runs.values():
                shutil.rmtree(workdir, ignore_errors=True)
            continue
        return {name: log.read_text() for name, log in logs.items()}


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _eval_line(log: str) -> str:
    lines = re.findall(r"step 2 eval: .*", log)
    assert len(lines) == 1, log[-3000:]
    return lines[0]


def _restore_on_one_device(workdir: Path, step: int, param_sharding: str) -> trainer.TrainState:
    """The trainer's own restore path, on a 1-device mesh of this (single) process."""
    register_tiny_model()
    config = tiny_config(param_sharding=param_sharding, **OVERRIDES)
    mesh = sharding.make_mesh(jax.devices()[:1])
    comps = trainer.build_components(config, mesh, len(CLASSES), 2, 0)
    ckpt = checkpoint.Checkpointer(workdir, best_metric=None)
    try:
        meta = trainer.run_meta(config, len(CLASSES))
        return ckpt.restore(step, comps.abstract_state, None, meta, trainer.IDENTITY_KEYS)
    finally:
        ckpt.close()


def _max_diff(a, b) -> float:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def test_two_processes_train_like_one_process(tmp_path):
    # One test (one set of subprocesses): under pytest-xdist a shared fixture would run once
    # per worker.
    one = tmp_path / "one"

    def replicated_runs() -> Runs:
        port = _free_port()
        runs = {"one": (one, _env(1), {"distributed": "False"})}
        for pid in (0, 1):
            runs[f"replicated{pid}"] = (tmp_path / "replicated", _host_env(port, pid), {})
        return runs

    def fsdp_runs() -> Runs:
        port = _free_port()
        return {
            f"fsdp{pid}": (tmp_path / "fsdp", _host_env(port, pid), {"param_sharding": "fsdp"})
            for pid in (0, 1)
        }

    logs = _run(replicated_runs, tmp_path)
    logs.update(_run(fsdp_runs, tmp_path))

    assert "process 0 of 2, 2 local / 4 global devices" in logs["replicated0"]
    assert "process 1 of 2, 2 local / 4 global devices" in logs["replicated1"]
    assert "jax.distributed" not in logs["one"]
    reference = _metrics(one)
    state_one = {s: _restore_on_one_device(one, s, "replicated") for s in (1, 2)}
    moved = _max_diff(state_one[1].params, state_one[2].params)
    assert moved > 1e-3  # What one step moves a parameter at most (3.9e-3).
    for mode in ("replicated", "fsdp"):
        workdir = tmp_path / mode
        # The processes agree with each other (eval output is one replicated array)...
        assert _eval_line(logs[f"{mode}0"]) == _eval_line(logs[f"{mode}1"])
        # ... only process 0 writes metrics and the summary ...
        metrics = _metrics(workdir)
        assert [m["step"] for m in metrics] == [m["step"] for m in reference]
        assert "DONE" in logs[f"{mode}0"] and "DONE" not in logs[f"{mode}1"]
        # ... and they computed what one process on one device computes.
        for got, want in zip(metrics, reference, strict=True):
            for key in ("train/loss", "train/grad_norm", "eval/loss", "eval_ema/loss"):
                if key in want:
                    assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
            for key in ("train/top1", "eval/top1", "eval_ema/top1"):
                if key in want:
                    assert got[key] == want[key], key
        # Checkpoints: one Grain iterator state per process, state restorable on one device.
        data_files = sorted(p.name for p in (workdir / "checkpoints/2/data").glob("process_*"))
        assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
        for step in (1, 2):
            state = _restore_on_one_device(workdir, step, mode)
            assert int(state.step) == step
            leaf = jax.tree.leaves(state.params)[0]
            assert leaf.sharding.device_set == {jax.devices()[0]}
            # The gradients (in Adam's moments) agree to float32 rounding. Sums in another
            # order (4 devices, 2 hosts) make Adam's g / sqrt(v) differ for near-zero
            # gradients: measured 3.5e-5 at most (FSDP, step 2), 1% of what a step moves.
            assert _max_diff(state.opt_state, state_one[step].opt_state) <= 1e-6, (mode, step)
            assert _max_diff(state.params, state_one[step].params) <= 0.02 * moved, (mode, step)
            assert _max_diff(state.ema_params, state_one[step].ema_params) <= 0.02 * moved
            assert _max_diff(state.rng, state_one[step].rng) == 0

    # Resuming needs the same number of processes (Grain's position is per process).
    workdir = tmp_path / "replicated"
    config = tiny_config(**{**OVERRIDES, "total_steps": 3, "distributed": "False"})
    with pytest.raises(checkpoint.CheckpointMismatchError, match="written by 2 processes"):
        trainer.train_and_evaluate(config, str(workdir))
    ckpt = checkpoint.Checkpointer(workdir, best_metric=None)
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


def test_hosts_share_out_the_global_batch_of_one_process():
    """Host p of P gets rows p, p + P, ... of the one-process batch, augmented the same way."""
    register_tiny_model()
    config = tiny_config(**{"data.fake_num_examples": 20})  # 2.5 batches: crosses an epoch.
    datasets = {
        (p, n): data.create_datasets(config, process_index=p, process_count=n)
        for p, n in ((0, 1), (0, 2), (1, 2))
    }
    iters = {k: iter(ds) for k, (ds, _, _) in datasets.items()}
    for _ in range(5):
        whole = next(iters[0, 1])
        for p in (0, 1):
            part = next(iters[p, 2])
            assert part["image"].shape == (config.batch_size // 2, 8, 8, 3)
            np.testing.assert_array_equal(part["image"], whole["image"][p::2])
            np.testing.assert_array_equal(part["label"], whole["label"][p::2])

    def eval_rows(key) -> list[tuple[int, bytes]]:
        batches = list(datasets[key][1]())
        return sorted(
            (int(label), image.tobytes())
            for b in batches
            for image, label, keep in zip(b["image"], b["label"], b["mask"], strict=True)
            if keep
        )

    one_host = eval_rows((0, 1))
    per_host = [eval_rows((p, 2)) for p in (0, 1)]
    assert len(per_host[0]) == len(per_host[1]) == len(one_host) // 2
    assert sorted(per_host[0] + per_host[1]) == one_host  # Disjoint, and all of it.
    assert len(list(datasets[0, 2][1]())) == len(list(datasets[1, 2][1]()))  # Same steps.


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("True", True), ("false", False), ("0", False), (True, True)],
)
def test_distributed_flag_values(value, expected):
    # --config.distributed=False reaches the trainer as the string "False".
    assert sharding._distributed_mode(value) == expected


def test_distributed_flag_rejects_other_values():
    with pytest.raises(ValueError, match="'sometimes'"):
        sharding._distributed_mode("sometimes")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
        ({"SLURM_NTASKS": "1"}, False),
        ({"SLURM_NTASKS": "4"}, True),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ],
)
def test_multi_process_launch_detected_from_environment(monkeypatch, env, expected):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert sharding._multi_process_requested() is expected
    if not expected:  # "auto" leaves a lone process alone.
        assert sharding.maybe_initialize_distributed("auto") is False
