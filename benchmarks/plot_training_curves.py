"""Draws the eval accuracy curves of several training runs on one plot and writes JSON.

Each run is a ``metrics.jsonl`` written by ``train.main``; epochs come from its
``train/epoch`` records. Example (the CIFAR-10 comparison in docs/training.md):

    python -m benchmarks.plot_training_curves \\
        ViG-T=benchmarks/results/cifar10_vig_t.jsonl \\
        DeiT-T=benchmarks/results/cifar10_deit_t.jsonl \\
        --title "CIFAR-10, 32 px, same recipe, H100" --out benchmarks/results/cifar10_curves
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from train import report


def curves(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """{metric: [(epoch, value), ...]} for the eval metrics of one run."""
    records = report.read_metrics(path) if Path(path).is_dir() else _read(path)
    steps_per_epoch = None
    for r in records:
        if r.get("train/epoch"):
            steps_per_epoch = r["step"] / r["train/epoch"]
    scale = steps_per_epoch or 1.0
    out: dict[str, list[tuple[float, float]]] = {}
    for key in ("eval/top1", "eval_ema/top1", "eval/top5", "eval/loss"):
        by_step = {r["step"]: r[key] for r in records if key in r}
        out[key] = [(round(s / scale, 3), v) for s, v in sorted(by_step.items())]
    return out


def _read(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=path/to/metrics.jsonl")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", required=True, help="output path without extension")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {}
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    for spec in args.runs:
        label, _, path = spec.partition("=")
        data[label] = c = curves(path)
        (line,) = ax.plot(*zip(*c["eval/top1"], strict=True), marker=".", label=f"{label}")
        if c["eval_ema/top1"]:
            ax.plot(
                *zip(*c["eval_ema/top1"], strict=True),
                linestyle="--",
                color=line.get_color(),
                label=f"{label} (EMA)",
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png")
    Path(args.out + ".json").write_text(json.dumps({"title": args.title, "runs": data}, indent=1))
    print(f"{'epoch':>6} " + " ".join(f"{label:>12}" for label in data))
    epochs = sorted({e for c in data.values() for e, _ in c["eval/top1"]})
    for e in epochs:
        row = []
        for c in data.values():
            v = dict(c["eval/top1"]).get(e)
            row.append(f"{v:12.2f}" if v is not None else " " * 12)
        print(f"{e:6.1f} " + " ".join(row))
    print(f"wrote {args.out}.png and {args.out}.json")


if __name__ == "__main__":
    main()
