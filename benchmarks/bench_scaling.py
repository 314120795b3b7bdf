"""Data-parallel scaling on the GPUs of one host, and restoring its checkpoints elsewhere.

Three measurements, each in its own processes (so that each sees only the GPUs it names):

1. **Step throughput** (``benchmarks/bench_train.py``: the trainer's full jitted step on batches
   already on the devices) on 1 GPU with the per-GPU batch, then on all GPUs with per-GPU
   batch x GPUs, replicated and FSDP-sharded parameters. Scaling efficiency = images/s on
   n GPUs / (n x images/s on 1 GPU).
2. **End to end**: ``python -m train.main`` on all GPUs (fake images through the Grain host
   pipeline with RandAugment), a checkpoint half-way and at the end, evaluation at the end.
3. **Restore**: copies of that workdir resumed by ``train.main`` on 1 GPU and on the CPU
   (``JAX_PLATFORMS=cpu``). Both resume at the last step, find nothing left to train and
   evaluate the restored state; their eval loss must equal the multi-GPU run's.

Prints a table and writes JSON::

    python benchmarks/bench_scaling.py --model vig_s --per-device-batch 128 \\
        --out benchmarks/results/scaling_h200x2.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(gpus: str | None, cpu: bool = False) -> dict[str, str]:
    """This process's environment with only ``gpus`` visible (or the CPU only)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    return env


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(cmd)}  (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'all')})")
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True
    )


def _wait(proc: subprocess.Popen, log: Path, name: str) -> None:
    if proc.wait() != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); log tail:\n{tail}")


def _throughput_cmd(args, gpus: int, param_sharding: str, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.bench_train",
        "--models",
        args.model,
        "--batch",
        str(args.per_device_batch * gpus),
        "--img",
        str(args.img),
        "--dtype",
        args.dtype,
        "--param-sharding",
        param_sharding,
        "--warmup",
        "5",
        "--steps",
        str(args.steps),
        "--out",
        str(out),
    ]


def _train_cmd(args, workdir: Path, gpus: int) -> list[str]:
    """train.main on fake data; the same flags resume (and only evaluate) at the end."""
    half = args.train_steps // 2
    return [
        sys.executable,
        "-m",
        "train.main",
        f"--config=configs/{args.model}.py:fake",
        f"--workdir={workdir}",
        f"--config.batch_size={args.per_device_batch * gpus}",
        f"--config.data.img_size={args.img}",
        f"--config.model.dtype={args.dtype}",
        f"--config.total_steps={args.train_steps}",
        "--config.warmup_steps=5",
        f"--config.checkpoint_every_steps={half}",
        f"--config.eval_every_steps={args.train_steps}",
        f"--config.log_every_steps={args.log_every}",
        f"--config.data.fake_num_examples={args.per_device_batch * gpus * args.train_steps}",
        f"--config.data.num_workers={args.num_workers}",
        "--config.progress_bar=False",
        "--config.async_checkpointing=False",
    ]


def _read_bench(path: Path) -> dict:
    row = json.loads(path.read_text())["results"][0]
    if "error" in row:
        raise RuntimeError(f"{path}: {row['error']}")
    return row


def _read_summary(workdir: Path) -> dict:
    return json.loads((workdir / "summary.json").read_text())


def _e2e_img_per_s(workdir: Path) -> float | None:
    """Median train/img_per_s of the logged windows after the first (which holds compilation)."""
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    ips = [r["train/img_per_s"] for r in rows if "train/img_per_s" in r][1:]
    return sorted(ips)[len(ips) // 2] if ips else None


def _gpu_count() -> int:
    out = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.device_count())"],
        env=_env(None),
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vig_s")
    parser.add_argument("--per-device-batch", type=int, default=128)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per throughput run")
    parser.add_argument("--train-steps", type=int, default=40, help="steps of the train.main run")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--num-workers", type=int, default=16, help="Grain workers (train.main)")
    parser.add_argument("--workdir", default="/tmp/bench_scaling")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()

    n = _gpu_count()
    if n < 2:
        raise SystemExit(f"{n} GPU(s) visible; the scaling benchmark needs at least 2")
    base = Path(args.workdir)
    shutil.rmtree(base, ignore_errors=True)
    logs = base / "logs"
    all_gpus = ",".join(str(i) for i in range(n))
    t0 = time.perf_counter()

    # End-to-end run on all GPUs first: its restores then overlap the throughput runs.
    multi = base / "train_multi"
    cmd = _train_cmd(args, multi, n)
    _wait(_start(cmd, _env(all_gpus), logs / "train_multi.log"), logs / "train_multi.log", "train")
    for name in ("restore_1gpu", "restore_cpu"):
        shutil.copytree(multi, base / name)
    cpu = _start(
        _train_cmd(args, base / "restore_cpu", n), _env(None, cpu=True), logs / "restore_cpu.log"
    )
    one = _start(_train_cmd(args, base / "restore_1gpu", n), _env("0"), logs / "restore_1gpu.log")
    bench = {}
    bench[(1, "replicated")] = base / "tp_1_replicated.json"
    single = _start(
        _throughput_cmd(args, 1, "replicated", bench[(1, "replicated")]),
        _env(str(n - 1)),
        logs / "tp_1_replicated.log",
    )
    _wait(single, logs / "tp_1_replicated.log", "1-GPU throughput")
    _wait(one, logs / "restore_1gpu.log", "1-GPU restore")
    for mode in ("replicated", "fsdp"):
        bench[(n, mode)] = base / f"tp_{n}_{mode}.json"
        log = logs / f"tp_{n}_{mode}.log"
        _wait(
            _start(_throughput_cmd(args, n, mode, bench[(n, mode)]), _env(all_gpus), log), log, mode
        )
    _wait(cpu, logs / "restore_cpu.log", "CPU restore")

    rows = {key: _read_bench(path) for key, path in bench.items()}
    single_ips = rows[(1, "replicated")]["img_per_s"]
    throughput = []
    for (gpus, mode), row in rows.items():
        throughput.append(
            {
                "gpus": gpus,
                "param_sharding": mode,
                "global_batch": row["batch"],
                "img_per_s": row["img_per_s"],
                "median_step_ms": row["median_step_ms"],
                "speedup_vs_1gpu": row["img_per_s"] / single_ips,
                "efficiency": row["img_per_s"] / (gpus * single_ips),
                "peak_mem_mib_gpu0": row["peak_mem_mib"],
            }
        )
    summaries = {
        name: _read_summary(base / name) for name in ("train_multi", "restore_1gpu", "restore_cpu")
    }
    ref_loss = summaries["train_multi"]["eval/loss"]
    restore = []
    for name, s in summaries.items():
        restore.append(
            {
                "run": name,
                "step": s["step"],
                "eval/loss": s["eval/loss"],
                "eval_ema/loss": s.get("eval_ema/loss"),
                "eval/top1": s["eval/top1"],
                "rel_diff_eval_loss": abs(s["eval/loss"] - ref_loss) / abs(ref_loss),
            }
        )
    e2e = _e2e_img_per_s(multi)

    import jax  # Only for naming the device; the measurements ran in the children.

    device = f"{jax.devices()[0].device_kind} x {n}"
    print(
        f"\ndevice: {device}, jax {jax.__version__}; {args.model} {args.dtype} at {args.img} px, "
        f"per-GPU batch {args.per_device_batch}, full trainer step, batches on device"
    )
    print(
        f"{'GPUs':>4} {'params':<11} {'batch':>6} {'img/s':>9} {'speed-up':>9} {'efficiency':>10}"
    )
    for r in throughput:
        print(
            f"{r['gpus']:>4} {r['param_sharding']:<11} {r['global_batch']:>6} "
            f"{r['img_per_s']:>9.1f} {r['speedup_vs_1gpu']:>8.2f}x {100 * r['efficiency']:>9.1f}%"
        )
    print(
        f"\ntrain.main on {n} GPUs, Grain host pipeline (fake images, RandAugment): {e2e:.1f} img/s"
        if e2e
        else "\ntrain.main: no throughput logged"
    )
    print(f"{'run':<14} {'step':>5} {'eval loss':>12} {'rel. diff':>10}")
    for r in restore:
        print(
            f"{r['run']:<14} {r['step']:>5} {r['eval/loss']:>12.6f} "
            f"{r['rel_diff_eval_loss']:>10.2e}"
        )
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out:
        out = {
            "benchmark": "data_parallel_scaling",
            "device": device,
            "jax": jax.__version__,
            "args": vars(args),
            "throughput": throughput,
            "train_main_img_per_s": e2e,
            "restore": restore,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
