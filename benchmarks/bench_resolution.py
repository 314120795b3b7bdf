"""Resolution study: ViG vs DeiT training/inference speed, peak memory and FLOPs, 224 to 2048 px.

For each model (ViG-T/S, DeiT-T/S), resolution and dtype ("bfloat16" = bf16 compute with fp32
parameters, or "float32") this measures, on random data already on the device:

* training images/s: one jitted step = forward, softmax cross-entropy, backward, AdamW update,
  with the state donated; median over timed steps after a warm-up, ``block_until_ready`` each;
* inference images/s: the jitted forward in eval mode, same batch;
* peak device memory, ``jax.Device.memory_stats()["peak_bytes_in_use"]`` (the whole process:
  parameters, optimizer state, batch, activations). JAX cannot reset the peak, so every
  (model, resolution, dtype) runs in a fresh subprocess of this script, which also isolates
  out-of-memory failures. Inside one subprocess batches only grow, so each training peak is
  that batch's own; an inference peak is kept only for the first batch of a subprocess;
* FLOPs from XLA's cost analysis: of the timed executables (``compile().cost_analysis()``,
  which does not see inside custom calls: Pallas BiGLA kernels, cuDNN attention), and of the
  same model lowered with every op in plain XLA (BiGLA "xla", attention "xla"), which counts
  everything and is what the figure shows (forward FLOPs per image, 2 per multiply-add).

The batch is the largest of 128, 64, ..., 1 that fits: predicted from the previous resolution,
raised inside the subprocess when the measured memory says a larger one fits, halved in a fresh
subprocess on out-of-memory. The issue's bars are measured explicitly: ViG-T and DeiT-T in bf16
at 224 with batch 128, and at 1024 and 2048 with batch 8. Configurations run in priority order
(the bars, then bf16 for all models at all resolutions, then fp32 at fewer resolutions) until
``--max-seconds`` is spent; results are written to ``--out`` after every subprocess, and
``--resume`` skips configurations already in it. Prints a table and draws a three-panel figure
(throughput, memory, FLOPs against resolution, log scales) with the official code's numbers
(vig-reference.md section 13) marked.

    # H100: as much of the plan as fits in 500 s, in priority order (--list prints the plan);
    # run again with --resume (same --out) to measure the rest:
    python -m benchmarks.bench_resolution --max-seconds 500 \\
        --out benchmarks/results/resolution_h100.json --png benchmarks/results/resolution_h100.png
    # CPU smoke run (tiny resolution and batch):
    python -m benchmarks.bench_resolution --smoke --out /tmp/res.json --png /tmp/res.png
    # Redraw the figure and the table from a JSON file:
    python -m benchmarks.bench_resolution --plot-only --out benchmarks/results/resolution_h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODELS = ("vig_t", "deit_t", "vig_s", "deit_s")
RESOLUTIONS = (224, 384, 512, 768, 1024, 1536, 2048)
FP32_RESOLUTIONS = (224, 512, 1024, 2048)
BATCH_CANDIDATES = (128, 64, 32, 16, 8, 4, 2, 1)
DTYPES = ("bfloat16", "float32")
# The bars, all bf16: (model, resolution, batch).
BARS = (
    ("vig_t", 224, 128),
    ("deit_t", 224, 128),
    ("vig_t", 1024, 8),
    ("deit_t", 1024, 8),
    ("vig_t", 2048, 8),
    ("deit_t", 2048, 8),
)
# Official code on one H100 (vig-reference.md section 13): training step (forward, CE, backward,
# AdamW), random weights, inputs on the GPU; "bf16" = torch autocast. Peak memory is the extra
# memory over the model already on the GPU.
OFFICIAL_TRAIN = (
    # name, our model it compares with, resolution, batch, {dtype: (img/s, peak extra MiB)}
    ("ViG-T (official)", "vig_t", 224, 128, {"float32": (1330, 6283), "bfloat16": (1333, 3621)}),
    ("DeiT-T (timm)", "deit_t", 224, 128, {"float32": (2793, 3738), "bfloat16": (5497, 2221)}),
    ("ViG-T (official)", "vig_t", 1024, 8, {"float32": (68, 7971), "bfloat16": (81, 4517)}),
    ("DeiT-T (timm)", "deit_t", 1024, 8, {"float32": (46, 4838), "bfloat16": (259, 2844)}),
)
LABELS = {"vig_t": "ViG-T", "vig_s": "ViG-S", "deit_t": "DeiT-T", "deit_s": "DeiT-S"}
COLORS = {"vig_t": "tab:red", "vig_s": "tab:orange", "deit_t": "tab:blue", "deit_s": "tab:cyan"}
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")
MIB = 2**20


# --------------------------------------------------------------------------------------------
# Child side: measure one (model, resolution, dtype) at one or more batch sizes.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChildSpec:
    """What one subprocess measures.

    Attributes:
      model: registry name ("vig_t", ...).
      img: image side in pixels.
      dtype: "bfloat16" (compute; parameters fp32) or "float32".
      batches: batch sizes measured in this order (ascending, so each training peak is its own).
      auto_max: when set, after ``batches`` the largest candidate <= auto_max that the measured
        memory predicts to fit is measured too (if larger than the last batch).
      fit_fraction: a batch "fits" when its predicted peak is below this share of the limit.
      bigla_impl: BiGLA implementation for ViG (None: the op's default).
      attention_impl: attention implementation for DeiT (None: cuDNN on GPU with bf16).
      warmup, max_steps, min_steps, measure_seconds: timing (steps stop after measure_seconds).
      count_flops: lower the all-XLA model to count FLOPs per image.
    """

    model: str
    img: int
    dtype: str
    batches: list[int]
    auto_max: int | None = None
    fit_fraction: float = 0.85
    bigla_impl: str | None = None
    attention_impl: str | None = None
    warmup: int = 2
    max_steps: int = 20
    min_steps: int = 3
    measure_seconds: float = 2.0
    count_flops: bool = True


def _is_oom(err: BaseException | str) -> bool:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return any(m in text for m in OOM_MARKERS)


def _cost(analysis: Any) -> dict[str, float]:
    """XLA cost analysis (a dict, or a list of one dict in older JAX) -> {"flops", "bytes"}."""
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {
        "flops": float(analysis.get("flops", float("nan"))),
        "bytes": float(analysis.get("bytes accessed", float("nan"))),
    }


def _planned_bytes(compiled: Any) -> int | None:
    """XLA's buffer plan of an executable: arguments + outputs - aliased + temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it.
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def _custom_calls(compiled: Any) -> list[str]:
    """Custom-call targets in the optimised HLO (shows cuDNN attention / Pallas kernels ran)."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001
        return []
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))


class _Measure:
    """Builds the model, the jitted forward and train step for one spec (child process only)."""

    def __init__(self, spec: ChildSpec):
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx

        from pallas_kernels.bigla import api as bigla_api
        from vig_jax import create_model, deit

        if spec.dtype not in DTYPES:
            raise ValueError(f"dtype={spec.dtype!r}; expected one of {DTYPES}")
        self.jax, self.jnp, self.nnx, self.optax = jax, jnp, nnx, optax
        self.spec = spec
        self.compute_dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else jnp.float32
        self.is_vig = spec.model.startswith("vig")
        if self.is_vig:
            self.impl = spec.bigla_impl or bigla_api.default_implementation()
        else:
            self.impl = spec.attention_impl or deit.default_attention_implementation(
                self.compute_dtype
            )
        self.bigla_default = bigla_api.default_implementation()
        self.create_model = create_model
        self.tx = optax.adamw(1e-3, weight_decay=0.05)
        self._init = None
        self._graphdefs = None

    def build(self, implementation: str):
        """A fresh model [B, img, img, 3] -> [B, 1000] logits, in train mode."""
        return self.create_model(
            self.spec.model,
            num_classes=1000,
            img_size=self.spec.img,
            dtype=self.compute_dtype,
            param_dtype=self.jnp.float32,
            implementation=implementation,
            rngs=self.nnx.Rngs(0),
        )

    def graphdefs(self, implementation: str):
        """(train graphdef, eval graphdef, abstract params, abstract rest) without allocating."""
        nnx = self.nnx
        abstract = nnx.eval_shape(lambda: self.build(implementation))
        abstract.train()
        graphdef_train, params, rest = nnx.split(abstract, nnx.Param, ...)
        abstract.eval()
        graphdef_eval = nnx.graphdef(abstract)
        return graphdef_train, graphdef_eval, params, rest

    def forward_fn(self, graphdef_eval):
        nnx = self.nnx

        def forward(params, rest, images):
            """images [B, H, W, 3] -> logits [B, 1000] in eval mode."""
            return nnx.merge(graphdef_eval, params, rest, copy=True)(images)

        return forward

    def train_step_fn(self, graphdef_train):
        nnx, optax, tx = self.nnx, self.optax, self.tx

        def train_step(state, images, labels):
            """One AdamW step on softmax CE; state = (params, opt_state, rest)."""
            params, opt_state, rest = state

            def loss_fn(p):
                model = nnx.merge(graphdef_train, p, rest, copy=True)
                logits = model(images)
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                return loss, nnx.split(model, nnx.Param, ...)[2]

            (loss, new_rest), grads = self.jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state, new_rest), loss

        return train_step

    def flops_per_image(self) -> dict[str, float]:
        """Forward FLOPs per image of the all-XLA model (lowered at batch 1, not compiled)."""
        jax, jnp = self.jax, self.jnp
        _, graphdef_eval, params, rest = self.graphdefs("xla")
        images = jax.ShapeDtypeStruct((1, self.spec.img, self.spec.img, 3), jnp.float32)
        fwd = jax.jit(self.forward_fn(graphdef_eval)).lower(params, rest, images)
        return {"fwd_flops_per_image_xla_form": _cost(fwd.cost_analysis())["flops"]}

    def memory(self) -> dict[str, int]:
        return dict(self.jax.local_devices()[0].memory_stats() or {})

    def timed(self, call, n_warmup: int) -> list[float]:
        """Runs ``call()`` (which blocks) n_warmup times, then times it; seconds per call."""
        spec = self.spec
        for _ in range(n_warmup):
            call()
        times: list[float] = []
        t_start = time.perf_counter()
        while len(times) < spec.max_steps:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
            if (
                len(times) >= spec.min_steps
                and time.perf_counter() - t_start > spec.measure_seconds
            ):
                break
        return times

    def run_batch(self, batch: int, first_in_process: bool) -> dict[str, Any]:
        """Measures inference then training at ``batch``; returns one result row."""
        jax, jnp, spec = self.jax, self.jnp, self.spec
        row: dict[str, Any] = {"batch": batch, "implementation": self.impl}
        t0 = time.perf_counter()
        if self._init is None:  # once per process: later batches reuse graphs and executables
            self._graphdefs = self.graphdefs(self.impl)

            def init():
                _, params, rest = self.nnx.split(self.build(self.impl), self.nnx.Param, ...)
                return params, rest

            self._init = jax.jit(init)
        graphdef_train, graphdef_eval, _, _ = self._graphdefs
        params, rest = self._init()
        key_img, key_lbl = jax.random.split(jax.random.key(1))
        images = jax.random.normal(key_img, (batch, spec.img, spec.img, 3), jnp.float32)
        labels = jax.random.randint(key_lbl, (batch,), 0, 1000)
        jax.block_until_ready((params, rest, images, labels))
        row["init_s"] = time.perf_counter() - t0

        # Inference first: its peak is its own when it is the first thing this process runs.
        t0 = time.perf_counter()
        infer = jax.jit(self.forward_fn(graphdef_eval)).lower(params, rest, images).compile()
        row["compile_infer_s"] = time.perf_counter() - t0
        row["infer_flops"] = _cost(infer.cost_analysis())["flops"]
        row["xla_infer_bytes"] = _planned_bytes(infer)
        row["custom_calls"] = _custom_calls(infer)
        times = self.timed(lambda: jax.block_until_ready(infer(params, rest, images)), spec.warmup)
        row["infer_ms"] = 1e3 * statistics.median(times)
        row["infer_img_s"] = batch / statistics.median(times)
        stats = self.memory()
        row["bytes_limit"] = stats.get("bytes_limit")
        row["peak_infer_bytes"] = stats.get("peak_bytes_in_use") if first_in_process else None

        # Training.
        opt_state = jax.jit(self.tx.init)(params)
        state = (params, opt_state, rest)
        row["state_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(state)))
        t0 = time.perf_counter()
        step = jax.jit(self.train_step_fn(graphdef_train), donate_argnums=0)
        compiled = step.lower(state, images, labels).compile()
        row["compile_train_s"] = time.perf_counter() - t0
        row["train_flops"] = _cost(compiled.cost_analysis())["flops"]
        row["xla_train_bytes"] = _planned_bytes(compiled)
        row["custom_calls"] = sorted(set(row["custom_calls"]) | set(_custom_calls(compiled)))
        holder = {"state": state}
        state = params = opt_state = rest = None  # the donated buffers live only in holder

        def one_step():
            holder["state"], holder["loss"] = compiled(holder["state"], images, labels)
            jax.block_until_ready(holder["loss"])

        times = self.timed(one_step, spec.warmup)
        row["train_ms"] = 1e3 * statistics.median(times)
        row["train_ms_min"] = 1e3 * min(times)
        row["train_steps_timed"] = len(times)
        row["train_img_s"] = batch / statistics.median(times)
        row["loss"] = float(holder["loss"])
        row["peak_train_bytes"] = self.memory().get("peak_bytes_in_use")
        holder.clear()
        return row


def predict_fit(
    candidates: list[int], batch: int, peak: int, fixed: int, limit: int, fraction: float
) -> int | None:
    """Largest candidate whose peak, linear in the batch beyond ``fixed``, stays under the limit.

    Args:
      candidates: batch sizes to choose from.
      batch, peak: a measured batch and its peak bytes.
      fixed: bytes that do not grow with the batch (parameters, optimizer state).
      limit, fraction: the allocator's limit and the share of it a batch may use.

    Returns:
      The largest fitting candidate, or None when none fits.
    """
    per_image = max(peak - fixed, 1) / batch
    fitting = [b for b in candidates if fixed + b * per_image <= fraction * limit]
    return max(fitting) if fitting else None


def child_main(spec: ChildSpec) -> None:
    """Measures ``spec`` and prints one ``RESULT {json}`` line per batch (then exits)."""
    t_start = time.perf_counter()
    import flax
    import jax

    base = {
        "model": spec.model,
        "img_size": spec.img,
        "dtype": spec.dtype,
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "flax": flax.__version__,
    }

    def emit(row: dict[str, Any]) -> None:
        print("RESULT " + json.dumps({**base, **row}), flush=True)

    try:
        measure = _Measure(spec)
        base["bigla_default_implementation"] = measure.bigla_default
    except Exception as err:  # noqa: BLE001 - reported to the parent as a row.
        emit({"batch": spec.batches[0], "status": "error", "error": _short(err)})
        return
    if spec.count_flops:
        try:
            base.update(measure.flops_per_image())
        except Exception as err:  # noqa: BLE001 - FLOPs are optional; speed and memory are not.
            base["flops_error"] = _short(err)

    batches = list(spec.batches)
    i, last_ok = 0, None
    while i < len(batches):
        batch = batches[i]
        print(f"START {batch}", flush=True)  # the parent blames this batch if the process dies
        t0 = time.perf_counter()
        try:
            row = measure.run_batch(batch, first_in_process=i == 0)
            row["status"] = "ok"
            last_ok = row
        except Exception as err:  # noqa: BLE001 - OOM or other failure ends this process.
            row = {"batch": batch, "status": "oom" if _is_oom(err) else "error"}
            row["error"] = _short(err)
        row["batch_wall_s"] = time.perf_counter() - t0
        row["process_s"] = time.perf_counter() - t_start
        emit(row)
        if row["status"] != "ok":
            return
        i += 1
        if i == len(batches):
            target = next_auto_batch(last_ok, spec.auto_max, spec.fit_fraction)
            if target:
                batches.append(target)


def next_auto_batch(
    last_ok: dict[str, Any] | None, auto_max: int | None, fit_fraction: float
) -> int | None:
    """The larger batch a subprocess measures after its list: the largest candidate in
    (last measured, auto_max] predicted (from the last measurement) to fit, or None."""
    if not auto_max or not last_ok or not last_ok.get("bytes_limit"):
        return None
    if not last_ok.get("peak_train_bytes"):
        return None
    cands = [b for b in BATCH_CANDIDATES if last_ok["batch"] < b <= auto_max]
    return predict_fit(
        cands,
        last_ok["batch"],
        last_ok["peak_train_bytes"],
        last_ok["state_bytes"],
        last_ok["bytes_limit"],
        fit_fraction,
    )


def _short(err: BaseException, limit: int = 600) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


# --------------------------------------------------------------------------------------------
# Parent side: plan, run subprocesses within the time budget, collect rows.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Point:
    """One (model, resolution, dtype) of the study, with the batches it must measure."""

    model: str
    img: int
    dtype: str
    forced: tuple[int, ...] = ()


def plan_points(args: argparse.Namespace) -> list[Point]:
    """The study in priority order: bars, bf16 everywhere, then fp32 at fewer resolutions."""
    models = [m for m in args.models.split(",") if m]
    resolutions = [int(r) for r in args.resolutions.split(",") if r]
    fp32_res = [int(r) for r in args.fp32_resolutions.split(",") if r]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for m in models:
        if m not in LABELS and not args.smoke:
            raise ValueError(f"model {m!r}; expected some of {list(LABELS)}")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtype {d!r}; expected some of {DTYPES}")
    forced: dict[tuple[str, int, str], set[int]] = {}
    order: list[tuple[str, int, str]] = []

    def add(model: str, img: int, dtype: str, batch: int | None = None) -> None:
        key = (model, img, dtype)
        if key not in forced:
            forced[key] = set()
            order.append(key)
        if batch is not None:
            forced[key].add(batch)

    if not args.no_bars and "bfloat16" in dtypes:
        for model, img, batch in BARS:
            if model in models and img in resolutions:
                add(model, img, "bfloat16", batch)
    for dtype in dtypes:
        res = resolutions if dtype == "bfloat16" else [r for r in resolutions if r in fp32_res]
        # Tiny models first at every resolution (the headline pair), then the small ones.
        groups = [[m for m in models if m.endswith("_t")], [m for m in models if m.endswith("_s")]]
        groups.append([m for m in models if not m.endswith(("_t", "_s"))])
        for group in groups:
            for img in res:
                for model in group:
                    add(model, img, dtype)
    return [Point(m, i, d, tuple(sorted(forced[(m, i, d)]))) for m, i, d in order]


class Runner:
    """Runs points in subprocesses within a deadline and keeps every result row."""

    def __init__(self, args: argparse.Namespace, rows: list[dict[str, Any]], clock=time.monotonic):
        self.args = args
        self.rows = rows
        self.clock = clock
        self.start = self.clock()
        self.deadline = self.start + args.max_seconds
        self.durations: list[float] = []
        self.dead: dict[tuple[str, str], int] = {}  # (model, dtype) -> img where batch 1 OOMed
        self.candidates = [b for b in BATCH_CANDIDATES if b <= args.max_batch]

    # ---- bookkeeping -----------------------------------------------------------------------
    def ok_rows(self, model: str, dtype: str, img: int | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.rows
            if r.get("status") == "ok"
            and r["model"] == model
            and r["dtype"] == dtype
            and (img is None or r["img_size"] == img)
        ]

    def predict_start(self, point: Point) -> int:
        """First batch to try: scaled from the largest smaller resolution measured, else the
        largest candidate."""
        prev = [
            r
            for r in self.ok_rows(point.model, point.dtype)
            if r["img_size"] < point.img and r.get("peak_train_bytes") and r.get("bytes_limit")
        ]
        if not prev:
            return self.candidates[0]
        ref = max(prev, key=lambda r: (r["img_size"], r["batch"]))
        fixed = ref["state_bytes"]
        growth = (point.img / ref["img_size"]) ** 2
        if ref.get("implementation") == "xla" and point.model.startswith("deit"):
            growth = growth**2  # XLA attention keeps the N x N scores: memory grows as N^2.
        per_image = max(ref["peak_train_bytes"] - fixed, 1) / ref["batch"] * growth
        budget = self.args.fit_fraction * ref["bytes_limit"]
        fit = [b for b in self.candidates if fixed + b * per_image <= budget]
        return max(fit) if fit else self.candidates[-1]

    def time_left(self) -> float:
        return self.deadline - self.clock()

    def expected_child_s(self) -> float:
        return statistics.median(self.durations[-6:]) if self.durations else 40.0

    def save(self) -> None:
        write_json(self.args, self.rows, self.clock() - self.start)

    # ---- running ---------------------------------------------------------------------------
    def run_point(self, point: Point) -> None:
        """Measures the forced batches and the largest fitting batch of ``point``.

        The first subprocess measures the forced batches and the predicted batch in ascending
        order, then the largest candidate its own memory reading says fits. On out-of-memory at
        batch b, a fresh subprocess tries the forced batches below b and b's next candidate
        down (binary back-off), until something fits or batch 1 fails.
        """
        key = (point.model, point.dtype)
        if key in self.dead and point.img > self.dead[key]:
            self.skip(
                point, f"batch {self.candidates[-1]} ran out of memory at {self.dead[key]} px"
            )
            return
        here = [
            r
            for r in self.rows
            if (r["model"], r["img_size"], r["dtype"]) == (point.model, point.img, point.dtype)
        ]
        ok = {r["batch"] for r in here if r.get("status") == "ok"}
        oom_min = min((r["batch"] for r in here if r.get("status") == "oom"), default=math.inf)
        explicit = set(point.forced)
        if not ok:
            explicit.add(self.predict_start(point))
        auto = True
        for _ in range(4):  # at most 4 subprocesses per point
            todo = sorted(b for b in explicit if b < oom_min and b not in ok)
            if not todo:
                break
            if self.time_left() < max(0.7 * self.expected_child_s(), 10.0):
                self.skip(point, "time budget spent", batches=todo)
                return
            below = [b for b in self.candidates if b < oom_min]
            auto_max = max(below) if auto and below and max(below) > todo[-1] else None
            new = self.run_child(point, todo, auto_max)
            ok |= {r["batch"] for r in new if r["status"] == "ok"}
            failed = [r for r in new if r["status"] != "ok"]
            if not failed or failed[0]["status"] != "oom":
                break  # done, or an error / timeout: no back-off
            oom_min = min(oom_min, failed[0]["batch"])
            best_ok = max((b for b in ok if b < oom_min), default=0)
            between = [b for b in self.candidates if best_ok < b < oom_min]
            explicit = set(point.forced) | ({max(between)} if between else set())
            auto = False  # a larger batch already ran out of memory
        if not ok and oom_min <= self.candidates[-1]:
            self.dead[key] = point.img
        for b in point.forced:
            if b > oom_min and not self.row_at(point, b):
                # Not run: a smaller batch already ran out of memory, so this one would too.
                self.rows.append(
                    {
                        "model": point.model,
                        "img_size": point.img,
                        "dtype": point.dtype,
                        "batch": b,
                        "status": "oom",
                        "implied": True,
                        "error": f"not run: batch {oom_min} already ran out of memory",
                        "bar": _is_bar(point.model, point.img, b, point.dtype),
                    }
                )

    def row_at(self, point: Point, batch: int) -> dict[str, Any] | None:
        """The ok or oom row of ``point`` at ``batch``, if any."""
        return _row_at(self.rows, point.model, point.img, batch, point.dtype)

    def run_all(self) -> None:
        """Runs the whole plan in priority order and writes the JSON."""
        for point in plan_points(self.args):
            self.run_point(point)
        self.save()

    def launch(self, spec: ChildSpec, timeout: float) -> tuple[str, str, int | str]:
        """Runs this script on ``spec`` in a subprocess: (stdout, stderr, exit code or
        "timeout")."""
        cmd = [sys.executable, "-m", "benchmarks.bench_resolution", "--child"]
        cmd.append(json.dumps(dataclasses.asdict(spec)))
        env = dict(os.environ)
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(self.args.mem_fraction))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            proc = subprocess.run(
                cmd,
                cwd=Path(__file__).resolve().parents[1],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as err:
            return _text(err.stdout), _text(err.stderr), "timeout"
        return proc.stdout, proc.stderr, proc.returncode

    def skip(self, point: Point, why: str, batches: list[int] | None = None) -> None:
        for b in batches or sorted(set(point.forced) or {0}):
            self.rows.append(
                {
                    "model": point.model,
                    "img_size": point.img,
                    "dtype": point.dtype,
                    "batch": b,
                    "status": "skipped",
                    "error": why,
                }
            )
        print(f"skip {point.model} {point.img}px {point.dtype}: {why}", flush=True)

    def run_child(
        self, point: Point, batches: list[int], auto_max: int | None
    ) -> list[dict[str, Any]]:
        """Runs one subprocess; returns (and records) its rows."""
        args = self.args
        have_flops = any(
            r.get("fwd_flops_per_image_xla_form")
            for r in self.rows
            if (r["model"], r["img_size"]) == (point.model, point.img)
        )
        spec = ChildSpec(
            model=point.model,
            img=point.img,
            dtype=point.dtype,
            batches=batches,
            auto_max=auto_max,
            fit_fraction=args.fit_fraction,
            bigla_impl=args.bigla_impl,
            attention_impl=args.attention_impl,
            warmup=args.warmup,
            max_steps=args.steps,
            min_steps=min(3, args.steps),
            measure_seconds=args.measure_seconds,
            count_flops=not have_flops,
        )
        timeout = max(5.0, min(args.child_timeout, self.time_left()))
        t0 = self.clock()
        print(
            f"run  {point.model} {point.img}px {point.dtype} batches {batches}"
            f"{f' (then up to {auto_max})' if auto_max and auto_max > batches[-1] else ''}"
            f"  [{self.time_left():.0f} s left]",
            flush=True,
        )
        stdout, stderr, status = self.launch(spec, timeout)
        wall = self.clock() - t0
        self.durations.append(wall)
        lines = stdout.splitlines()
        rows = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
        started = [int(line[6:]) for line in lines if line.startswith("START ")]
        reported = {r["batch"] for r in rows}
        unreported = [b for b in started if b not in reported]
        if status != 0 and (unreported or not rows):
            # The process died (timeout, crash, kill) while measuring this batch.
            tail = stderr[-600:] if stderr else ""
            kind = "timeout" if status == "timeout" else ("oom" if _is_oom(tail) else "error")
            rows.append(
                {
                    "model": point.model,
                    "img_size": point.img,
                    "dtype": point.dtype,
                    "batch": unreported[0] if unreported else batches[0],
                    "status": kind,
                    "error": f"subprocess exit {status}: {tail}",
                }
            )
        for r in rows:
            r["subprocess_wall_s"] = wall
            r["bar"] = _is_bar(r["model"], r["img_size"], r["batch"], r["dtype"])
            self.rows.append(r)
            print("     " + _row_summary(r), flush=True)
        self.save()
        return rows


def _is_bar(model: str, img: int, batch: int, dtype: str) -> bool:
    return (model, img, batch) in BARS and dtype == "bfloat16"


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _row_summary(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"batch {r['batch']:>3}: {r.get('status')} {str(r.get('error', ''))[:160]}"
    peak = r.get("peak_train_bytes")
    return (
        f"batch {r['batch']:>3}: train {r['train_img_s']:9.1f} img/s, infer "
        f"{r['infer_img_s']:9.1f} img/s, peak {_mib(peak)} MiB, "
        f"compile {r['compile_train_s'] + r['compile_infer_s']:.1f} s, {r.get('implementation')}"
        f"; custom calls {','.join(r.get('custom_calls', [])) or 'none'}"
    )


def _mib(x: float | None) -> str:
    return f"{x / MIB:.0f}" if x else "-"


# --------------------------------------------------------------------------------------------
# Output: JSON, table, figure.
# --------------------------------------------------------------------------------------------


def write_json(args: argparse.Namespace, rows: list[dict[str, Any]], elapsed: float) -> None:
    """Writes every row, the bar checks and the official numbers to ``args.out``."""
    if not args.out:
        return
    first = next((r for r in rows if r.get("device")), {})
    out = {
        "benchmark": "resolution_study",
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.bench_resolution"])
        + " "
        + " ".join(sys.argv[1:]),
        "device": first.get("device"),
        "backend": first.get("backend"),
        "jax": first.get("jax"),
        "flax": first.get("flax"),
        "bigla_default_implementation": first.get("bigla_default_implementation"),
        "elapsed_s": elapsed,
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "official_train": [
            {"name": n, "compare_with": m, "img_size": i, "batch": b, "by_dtype": d}
            for n, m, i, b, d in OFFICIAL_TRAIN
        ],
        "bars": bar_checks(rows),
        "rows": rows,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)


def best_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(model, dtype, img) -> the ok row with the largest batch."""
    best: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        key = (r["model"], r["dtype"], r["img_size"])
        if key not in best or r["batch"] > best[key]["batch"]:
            best[key] = r
    return best


def _row_at(rows, model, img, batch, dtype="bfloat16"):
    for r in rows:
        if (r["model"], r["img_size"], r["batch"], r["dtype"]) == (model, img, batch, dtype):
            if r.get("status") in ("ok", "oom"):
                return r
    return None


def bar_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's bars (bf16): ViG-T vs DeiT-T at (224, 128), (1024, 8), (2048, 8)."""
    checks = []
    for img, batch in ((224, 128), (1024, 8), (2048, 8)):
        v, d = _row_at(rows, "vig_t", img, batch), _row_at(rows, "deit_t", img, batch)
        check: dict[str, Any] = {"img_size": img, "batch": batch, "dtype": "bfloat16"}
        check["vig_t"] = v.get("status") if v else "not run"
        check["deit_t"] = d.get("status") if d else "not run"
        if v and d and v["status"] == d["status"] == "ok":
            check["train_speed_ratio_vig_over_deit"] = v["train_img_s"] / d["train_img_s"]
            check["infer_speed_ratio_vig_over_deit"] = v["infer_img_s"] / d["infer_img_s"]
            if v.get("peak_train_bytes") and d.get("peak_train_bytes"):
                check["peak_train_mib"] = {
                    "vig_t": v["peak_train_bytes"] / MIB,
                    "deit_t": d["peak_train_bytes"] / MIB,
                }
        checks.append(check)
    return checks


def print_table(rows: list[dict[str, Any]], header: str = "") -> None:
    """Prints every measured configuration, then the bar checks."""
    if header:
        print("\n" + header)
    cols = (
        f"{'model':<7} {'dtype':<9} {'px':>5} {'batch':>5} {'train img/s':>11} "
        f"{'infer img/s':>11} {'train peak MiB':>14} {'infer peak MiB':>14} "
        f"{'fwd GFLOP/img':>13} {'impl':<7} status"
    )
    print(cols)
    print("-" * len(cols))
    key = lambda r: (  # noqa: E731
        DTYPES.index(r["dtype"]) if r["dtype"] in DTYPES else 9,
        r["model"],
        r["img_size"],
        r["batch"],
    )
    flops = {
        (r["model"], r["img_size"]): r["fwd_flops_per_image_xla_form"]
        for r in rows
        if r.get("fwd_flops_per_image_xla_form")
    }
    for r in sorted(rows, key=key):
        f = flops.get((r["model"], r["img_size"]))
        if r.get("status") == "ok":
            print(
                f"{r['model']:<7} {r['dtype']:<9} {r['img_size']:>5} {r['batch']:>5} "
                f"{r['train_img_s']:>11.1f} {r['infer_img_s']:>11.1f} "
                f"{_mib(r.get('peak_train_bytes')):>14} {_mib(r.get('peak_infer_bytes')):>14} "
                f"{f / 1e9 if f else float('nan'):>13.2f} {r.get('implementation', ''):<7} ok"
                f"{' (bar)' if r.get('bar') else ''}"
            )
        else:
            print(
                f"{r['model']:<7} {r['dtype']:<9} {r['img_size']:>5} {r['batch']:>5} "
                f"{'':>11} {'':>11} {'':>14} {'':>14} {'':>13} {'':<7} {r.get('status')}"
                f": {str(r.get('error', ''))[:70]}"
            )
    print("\nbars (bf16, ViG-T vs our DeiT-T; official ViG-T/timm DeiT-T: 0.24x at 224,")
    print("      81 vs 259 img/s at 1024 batch 8):")
    for c in bar_checks(rows):
        ratio = c.get("train_speed_ratio_vig_over_deit")
        mem = c.get("peak_train_mib")
        text = f"  {c['img_size']:>4} px batch {c['batch']:>3}: "
        text += f"vig_t {c['vig_t']}, deit_t {c['deit_t']}"
        if ratio:
            text += f"; train speed ViG-T/DeiT-T {ratio:.2f}x"
        if mem:
            text += f"; peak MiB {mem['vig_t']:.0f} vs {mem['deit_t']:.0f}"
        print(text)


def _positive(x: Any) -> bool:
    """True for a finite number > 0 (FLOP counts can be NaN where XLA gives no estimate)."""
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Three log-log panels against resolution: train/infer img/s, peak MiB/image, GFLOP/image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_rows(rows)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax_speed, ax_mem, ax_flops = axes
    styles = {"bfloat16": "-", "float32": "--"}
    models = sorted({k[0] for k in best}, key=lambda m: (MODELS + (m,)).index(m))
    for model in models:
        color = COLORS.get(model, "gray")
        label = LABELS.get(model, model)
        for dtype in DTYPES:
            pts = sorted((k[2], r) for k, r in best.items() if k[:2] == (model, dtype))
            if not pts:
                continue
            x = [p for p, _ in pts]
            tag = f"{label} {'bf16' if dtype == 'bfloat16' else 'fp32'}"
            ax_speed.plot(
                x,
                [r["train_img_s"] for _, r in pts],
                styles[dtype],
                color=color,
                marker="o",
                label=f"{tag} train",
            )
            if dtype == "bfloat16":
                for p, r in pts:
                    ax_speed.annotate(
                        f"b{r['batch']}",
                        (p, r["train_img_s"]),
                        textcoords="offset points",
                        xytext=(3, 4),
                        fontsize=6,
                        color=color,
                    )
                ax_speed.plot(
                    x,
                    [r["infer_img_s"] for _, r in pts],
                    ":",
                    color=color,
                    marker=".",
                    alpha=0.6,
                    label=f"{tag} inference",
                )
            mem = [
                (p, r["peak_train_bytes"] / MIB / r["batch"])
                for p, r in pts
                if r.get("peak_train_bytes")
            ]
            if mem:
                ax_mem.plot(
                    *zip(*mem, strict=True), styles[dtype], color=color, marker="o", label=tag
                )
        flops = sorted(
            {
                (r["img_size"], r["fwd_flops_per_image_xla_form"])
                for r in rows
                if r["model"] == model and _positive(r.get("fwd_flops_per_image_xla_form"))
            }
        )
        if flops:
            ax_flops.plot(
                [p for p, _ in flops],
                [f / 1e9 for _, f in flops],
                "-",
                color=color,
                marker="o",
                label=label,
            )
        # Our runs at the official batch (the bars), hollow, to sit next to the official stars.
        for r in rows:
            if r.get("bar") and r["model"] == model and r.get("status") == "ok":
                ax_speed.plot(r["img_size"], r["train_img_s"], "o", mfc="none", mec=color, ms=11)
        # Out of memory: an x at the bottom of the panels.
        ooms = sorted({k for k in _oom_points(rows, best) if k[0] == model})
        for _, _dtype, img in ooms:
            for ax in (ax_speed, ax_mem):
                ax.plot(
                    img,
                    0.0,
                    "x",
                    color=color,
                    ms=10,
                    mew=2,
                    clip_on=False,
                    transform=ax.get_xaxis_transform(),
                )
    for name, model, img, batch, by_dtype in OFFICIAL_TRAIN:
        speed, extra_mib = by_dtype["bfloat16"]
        color = COLORS.get(model, "gray")
        ax_speed.plot(
            img,
            speed,
            "*",
            color=color,
            mec="black",
            ms=14,
            label=f"{name} bf16 train, batch {batch}",
        )
        ax_mem.plot(
            img,
            extra_mib / batch,
            "*",
            color=color,
            mec="black",
            ms=14,
            label=f"{name} bf16, batch {batch} (extra memory)",
        )
    for ax, ylabel in (
        (ax_speed, "images/s"),
        (ax_mem, "peak training memory / batch (MiB per image)"),
        (ax_flops, "forward GFLOP per image (XLA, all-XLA lowering)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({k[2] for k in best} | {r["img_size"] for r in rows} | {224, 1024}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
        ax.set_xlabel("resolution (px); x = out of memory at every batch")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_speed.set_title("throughput, largest batch <= 128 that fits")
    ax_mem.set_title("peak device memory (ours: process peak; official: extra)")
    ax_flops.set_title("FLOPs")
    fig.legend(handles=_legend_handles(models), loc="lower center", ncol=6, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend_handles(models: list[str]) -> list[Any]:
    """One figure legend: colours are models, line styles and markers are what was measured."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=COLORS.get(m, "gray"), marker="o", label=LABELS.get(m, m))
        for m in models
    ]
    k = dict(color="black")
    handles += [
        Line2D([], [], ls="-", **k, label="bf16 train (b = batch)"),
        Line2D([], [], ls="--", **k, label="fp32 train"),
        Line2D([], [], ls=":", **k, label="bf16 inference"),
        Line2D(
            [],
            [],
            ls="",
            marker="o",
            mfc="none",
            mec="black",
            ms=10,
            label="ours at the official batch (bf16)",
        ),
        Line2D(
            [],
            [],
            ls="",
            marker="*",
            color="gray",
            mec="black",
            ms=13,
            label="official ViG-T / timm DeiT-T, bf16 (vig-reference 13)",
        ),
        Line2D([], [], ls="", marker="x", color="black", mew=2, label="out of memory"),
    ]
    return handles


def _oom_points(rows, best) -> set[tuple[str, str, int]]:
    """(model, dtype, img) that ran out of memory and have no ok row at any batch."""
    return {
        (r["model"], r["dtype"], r["img_size"])
        for r in rows
        if r.get("status") == "oom" and (r["model"], r["dtype"], r["img_size"]) not in best
    }


def _title(rows: list[dict[str, Any]]) -> str:
    first = next((r for r in rows if r.get("device")), {})
    return (
        f"vig-jax resolution study on {first.get('device', '?')} "
        f"(jax {first.get('jax', '?')}, BiGLA {_impls(rows, 'vig')}, "
        f"DeiT attention {_impls(rows, 'deit')}); random data, AdamW step, donated state"
    )


def _impls(rows, prefix: str) -> str:
    found = sorted(
        {
            f"{r['implementation']}"
            for r in rows
            if r.get("status") == "ok" and r["model"].startswith(prefix)
        }
    )
    return "/".join(found) or "?"


# --------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--resolutions", default=",".join(map(str, RESOLUTIONS)))
    p.add_argument("--fp32-resolutions", default=",".join(map(str, FP32_RESOLUTIONS)))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--max-batch", type=int, default=128)
    p.add_argument("--no-bars", action="store_true", help="skip the issue's fixed-batch bars")
    p.add_argument("--bigla-impl", default=None, help="BiGLA implementation (default: fastest)")
    p.add_argument("--attention-impl", default=None, choices=(None, "xla", "cudnn"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="most timed steps per measurement")
    p.add_argument("--measure-seconds", type=float, default=1.5)
    p.add_argument("--max-seconds", type=float, default=510.0, help="time budget of the sweep")
    p.add_argument("--child-timeout", type=float, default=240.0)
    p.add_argument("--fit-fraction", type=float, default=0.85)
    p.add_argument(
        "--mem-fraction",
        type=float,
        default=0.92,
        help="XLA_PYTHON_CLIENT_MEM_FRACTION for the subprocesses",
    )
    p.add_argument("--out", default="benchmarks/results/resolution.json")
    p.add_argument("--png", default=None, help="figure (default: --out with .png)")
    p.add_argument("--resume", action="store_true", help="keep ok/oom rows already in --out")
    p.add_argument("--plot-only", action="store_true", help="redraw table and figure from --out")
    p.add_argument("--list", action="store_true", help="print the plan in priority order, exit")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU check: ViG-T and DeiT-T at 32 px, batch 2, fp32, no bars",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.models = "vig_t,deit_t"
        args.resolutions = args.fp32_resolutions = "32"
        args.dtypes = "float32"
        args.max_batch = 2
        args.no_bars = True
        args.warmup, args.steps, args.measure_seconds = 1, 2, 0.0
    if args.max_batch not in BATCH_CANDIDATES:
        raise ValueError(f"--max-batch {args.max_batch}; expected one of {BATCH_CANDIDATES}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(ChildSpec(**json.loads(args.child)))
        return
    if args.list:
        for i, point in enumerate(plan_points(args)):
            forced = f", batch {list(point.forced)} forced" if point.forced else ""
            print(f"{i:>3} {point.model:<7} {point.img:>5} px {point.dtype}{forced}")
        return
    png = args.png or str(Path(args.out).with_suffix(".png"))
    rows: list[dict[str, Any]] = []
    if (args.resume or args.plot_only) and args.out and Path(args.out).exists():
        rows = [
            r
            for r in json.loads(Path(args.out).read_text())["rows"]
            if r.get("status") in ("ok", "oom")
        ]
        print(f"read {len(rows)} rows from {args.out}")
    if not args.plot_only:
        runner = Runner(args, rows)
        runner.run_all()
        print(f"\nsweep took {runner.clock() - runner.start:.0f} s; wrote {args.out}")
    print_table(rows, _title(rows))
    if rows:
        plot(rows, png, _title(rows))
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
