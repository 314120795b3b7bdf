"""Resolution study: ViG vs DeiT training/inference speed, peak memory and FLOPs, 224 to 2048 px.

For each model (ViG-T/S, DeiT-T/S), resolution and dtype ("bfloat16" = bf16 compute with fp32
parameters, or "float32") this measures, on random data already on the device:

* training images/s: one jitted step = forward, softmax cross-entropy, backward, AdamW update,
  with the state donated; median over timed steps after a warm-up, ``block_until_ready`` each;
* inference images/s: the jitted forward in eval mode, same batch, same process;
* peak device memory: XLA's buffer plan of the executable (``compile().memory_analysis()``:
  arguments + outputs - donated + temporaries; on the H100 it equals the allocator's peak to
  within 13 KB) and, where it can be attributed, the measured process peak
  (``jax.Device.memory_stats()["peak_bytes_in_use"]``, which JAX cannot reset: a unit's measured
  peak is kept only when the process peak rose while that unit ran, so units run in ascending
  order of their plans);
* FLOPs per image of the forward pass, on the host: a CPU subprocess traces every model with
  every op in plain XLA (BiGLA "xla", attention "xla"; the Pallas and cuDNN custom calls of the
  GPU run are opaque to XLA's cost analysis) and reports XLA's cost analysis of the lowering
  (not compiled; 2 FLOPs per multiply-add, elementwise work included) and the multiply-adds of
  every dot and convolution in the jaxpr (x2), the number comparable to the papers' counts.

Where the time goes and how it is cut: per configuration the old one-subprocess-per-config
design spent ~4 s starting JAX, 12-19 s compiling the random init, 4-13 s compiling inference
and 17-46 s compiling the training step, against ~3 s of measuring. Now one child process runs
many units (model, resolution, dtype, batch): per chunk of units it compiles everything first
on ``--compile-workers`` threads (XLA compiles without the GIL; ahead of time from abstract
shapes, so the batch is chosen by the compiled memory plan before anything runs), then times the
units one after another with nothing else running. Parameters are initialised once per model
and reused at every resolution (position embeddings redrawn at the new size). A persistent
compilation cache (``--cache-dir``) makes a restarted child (after an out-of-memory) and a
``--resume`` on the same machine reuse executables, and XLA's per-fusion autotuning results.
The child prints a line per finished compilation (``COMPILED``/``READY``, echoed in the log);
every line resets the parent's stall clock, so only a child silent for ``--stall-seconds``
(longer than any one compilation: ~130 s for a ViG train step with 6 compiling at once) counts
as hung; it is replaced by one that compiles on a single thread. One that dies while timing a
unit is replaced, the unit marked as failed. ``--compile-workers 1`` compiles serially from the
start. A chunk whose compilation would not finish in time is lost whole (compile threads cannot
be stopped), so before each chunk the child compiles only the prefix that its estimate (compile
seconds per unit of a full chunk, timing seconds per ViG / DeiT unit; guessed from the H100 run,
then measured) says it can compile and time before the deadline; the rest is left for
``--resume``.

Timing a ViG unit took ~12-17 s on the H100 against ~1-3 s for DeiT although its timed steps
take ~1 s: the excess was in the first call of each executable. With the depthwise conv as
shifted products (``vig_jax/dwconv.py``) the first calls take 0.0-0.2 s on the H200 (rows'
``infer_first_call_s`` / ``train_first_call_s``): a hint, not established, that the time
went into cuDNN's set-up of the depthwise conv (the GPU changed too).

Order: the issue's bars (ViG-T and DeiT-T in bf16 at 224/b128, 1024/b8, 2048/b8), then bf16 at
all resolutions (ViG-T/DeiT-T, then ViG-S/DeiT-S), then fp32. Each configuration uses the
largest batch of 128, 64, ..., 1 whose plan fits (``--fit-fraction`` of the device limit). Rows
are written to ``--out`` as they arrive; ``--max-seconds`` bounds the sweep; ``--resume`` skips
units already measured. Prints a table and draws three panels (throughput, memory, FLOPs
against resolution) with the official code's numbers (vig-reference.md section 13) marked.

    # NEXT SESSION (H100): one `run` call, timeout_s=580 (no machine for three sessions; each
    # refusal costs ~90 s of the 1800 s, so make the first call do everything).
    # Off by default until timed on a GPU: the Pallas gate and RMSNorm kernels
    # (PALLAS_GATES_BY_DEFAULT, PALLAS_NORM_BY_DEFAULT), the depthwise conv's SiLU slope options
    # (pallas_kernels.dwconv.SAVE_SLOPE_MAX_TOKENS / FUSED_SLOPE_BY_DEFAULT), SwiGLU keeping
    # its output for short sequences (vig_jax.layers.SWIGLU_KEEP_MAX_TOKENS), BiGLA's merged
    # backward kernel (pallas_kernels.bigla.triton.MERGE_BACKWARD_BY_DEFAULT, its warps
    # MERGED_BACKWARD_WARPS), the SwiGLU kernels (vig_jax.layers.PALLAS_SWIGLU_BY_DEFAULT);
    # on but never timed:
    # ViG's stem product (vig_jax.layers.STEM_AS_PRODUCT). The GPU tests
    # (~60 s), every switch against the default in one process (benchmarks/ab_step.py: the
    # bars' step, compiled together, timed in rotation; ~200 s for 8 variants, estimated;
    # ``--sets-out``: the winners, faster than their model's baseline by > 0.3 % with the same
    # loss, as ``--set`` flags), then the bars with the winners set in the measuring child
    # (recorded in every row; last run ea769b4, all off: 224 / 1024 / 2048 at 0.71x / 1.22x /
    # 2.79x). Flip the defaults of the winners afterwards, in a commit that cites the JSON.
    python3 -m pytest -q tests/test_gates_kernel.py tests/test_rms_norm_kernel.py \
        tests/test_dwconv_kernel.py
    python3 -m pytest -q tests/test_bigla_triton.py tests/test_bigla_packed.py -k merge
    python3 -m pytest -q tests/test_swiglu_kernel.py
    G=vig_jax.bigla.PALLAS_GATES_BY_DEFAULT=True; N=vig_jax.layers.PALLAS_NORM_BY_DEFAULT=True
    P=pallas_kernels.dwconv; S=$P.SAVE_SLOPE_MAX_TOKENS=1024,$P.FUSED_SLOPE_BY_DEFAULT=True
    K=vig_jax.layers.SWIGLU_KEEP_MAX_TOKENS=1024
    M=pallas_kernels.bigla.triton.MERGE_BACKWARD_BY_DEFAULT=True
    W=vig_jax.layers.PALLAS_SWIGLU_BY_DEFAULT=True
    python3 -m benchmarks.ab_step --rounds 2 --compile-workers 12 --out $OUT/ab.json \
        --sets-out $OUT/sets.txt deit=deit_t vig=vig_t \
        vig_cudnn_stem=vig_t,vig_jax.layers.STEM_AS_PRODUCT=False vig_gates=vig_t,$G \
        vig_norm=vig_t,$N vig_slope=vig_t,$S vig_keep=vig_t,$K vig_merge=vig_t,$M \
        vig_merge2=vig_t,$M,pallas_kernels.bigla.triton.MERGED_BACKWARD_WARPS=2 \
        vig_swiglu=vig_t,$W vig_all=vig_t,$G,$N,$S,$K,$M,$W
    # (static estimate without a GPU, benchmarks/static_step.py at 7cfc316 / 49aefe0: HBM
    # bytes of the step 29.9 GB, gates -2.1, keep -0.9, slope -0.1, norm +0.2, merged BiGLA
    # backward -2.3 (with gates, slope, keep: 24.5), SwiGLU kernels -1.2 more (23.2), DeiT-T
    # 18.9; the SwiGLU kernels plan 333 MiB more at 1024 / 8: check that bar's peak; DeiT's
    # patch product
    # (vig_jax.deit.PATCH_EMBED_AS_PRODUCT) +3.6 GB, so it is no longer among the variants)
    # (drop a variant whose kernel failed its GPU test; a variant
    # ``vig_nocb=vig_t,xla_gpu_enable_command_buffer=`` would time the step without CUDA
    # graphs, for the ~2.2 ms between step and kernel sum)
    python3 -m benchmarks.bench_resolution --models vig_t,deit_t --resolutions 224,1024,2048 \
        --dtypes bfloat16 --no-flops --max-seconds 300 $(cat $OUT/sets.txt) \
        --out $OUT/resolution_bars.json
    # then the rest (ViG-S / DeiT-S past 224 px, fp32), continuing a committed JSON:
    cp benchmarks/results/resolution_bars_h100_006b448.json $OUT/r.json && PYTHONUNBUFFERED=1 \
        python3 -m benchmarks.bench_resolution --resume --no-flops --max-seconds 535 \
        --out $OUT/r.json
    # Measured on the H200 (b839a53): chunks of 6 units, ~125 s compiling (ViG train steps
    # 64-87 s each, 12 threads), ~10 s timing; 18 units (bf16 ViG-T / DeiT-T, 224-2048 px)
    # in 504 s with the start. On the H100 (cfbd9a3) the three bars and the 1024 / 2048
    # largest-batch rows took 348 s.
    # H200, from scratch (writes JSON, PNG and the child's stderr under $OUT):
    PYTHONUNBUFFERED=1 python3 -m benchmarks.bench_resolution --max-seconds 535 --no-flops \
        --out $OUT/resolution_h200.json
    # FLOPs only (CPU, any machine), and the plan:
    python -m benchmarks.bench_resolution --flops-only --out /tmp/flops.json
    python -m benchmarks.bench_resolution --list
    # CPU smoke run (tiny resolution and batch), and redrawing table and figure from JSON
    # (counting on the CPU any FLOPs the rows lack):
    python -m benchmarks.bench_resolution --smoke --out /tmp/res.json
    python -m benchmarks.bench_resolution --plot-only --out benchmarks/results/resolution_h200.json
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import importlib
import json
import math
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODELS = ("vig_t", "deit_t", "vig_s", "deit_s")
RESOLUTIONS = (224, 384, 512, 768, 1024, 1536, 2048)
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
# First guess of the training activation bytes per token and image (bf16), from the H100 plans
# of the bars (ViG-T: 148, 140, 150 KB at 224, 1024, 2048 px; DeiT-T: 126, 111, 119 KB); the
# small models are guessed at twice that. The compiled plan corrects a wrong guess, at the cost
# of a second compilation (~130 s of a compile thread for a ViG train step on the H100).
BYTES_PER_TOKEN = {"vig_t": 150e3, "deit_t": 120e3, "vig_s": 300e3, "deit_s": 240e3}
DEPTH_HEADS = {"deit_t": (12, 3), "deit_s": (12, 6)}
EXIT_RUNTIME_OOM = 3
_STDOUT_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# Units of work and small helpers shared by parent and child.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
    """One measurement: a model at one resolution and dtype, at a fixed or automatic batch.

    Attributes:
      model: registry name ("vig_t", ...).
      img: image side in pixels.
      dtype: "bfloat16" (compute; parameters fp32) or "float32".
      batch: fixed batch (a bar), or None for the largest candidate <= ``cap`` that fits.
      cap: the largest batch an automatic unit may use.
    """

    model: str
    img: int
    dtype: str
    batch: int | None = None
    cap: int = 128

    @property
    def name(self) -> str:
        return f"{self.model}/{self.img}/{self.dtype}/{self.batch or 'auto'}"


def parse_switch(spec: str) -> tuple[str, str, Any]:
    """``MODULE.ATTR=VALUE`` -> (module, attribute, value), VALUE a Python literal.

    A switch is a module-level constant read when a model is built or traced (the
    ``*_BY_DEFAULT`` constants, policy limits). Raises ValueError naming ``spec`` when it is
    malformed or the attribute does not exist (a misspelt switch would silently time the
    default)."""
    target, sep, literal = spec.partition("=")
    module, dot, attr = target.rpartition(".")
    if not sep or not dot or not attr:
        raise ValueError(f"switch {spec!r}; expected MODULE.ATTR=VALUE")
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"switch {spec!r}: {literal!r} is not a Python literal") from err
    if not hasattr(importlib.import_module(module), attr):
        raise ValueError(f"switch {spec!r}: {module} has no attribute {attr!r}")
    return module, attr, value


def set_switches(switches: list[list[Any]] | tuple[tuple[str, str, Any], ...]) -> None:
    """Sets each (module, attribute, value) of :func:`parse_switch` for the rest of the process."""
    for module, attr, value in switches:
        setattr(importlib.import_module(module), attr, value)


def say(line: str) -> None:
    """Writes one whole line to stdout and flushes it (the child's compile threads share the
    pipe, and every line resets the parent's stall clock)."""
    with _STDOUT_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _is_oom(err: BaseException | str) -> bool:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return any(m in text for m in OOM_MARKERS)


def _short(err: BaseException, limit: int = 600) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


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


def tokens(img: int, model: str) -> int:
    """Sequence length: (img/16)^2 patches, plus DeiT's class token."""
    return (img // 16) ** 2 + (1 if model.startswith("deit") else 0)


def predict_fit(
    candidates: list[int], batch: int, peak: int, fixed: int, budget: float
) -> int | None:
    """Largest candidate whose peak, linear in the batch beyond ``fixed``, stays within budget.

    Args:
      candidates: batch sizes to choose from.
      batch, peak: a measured (or planned) batch and its peak bytes.
      fixed: bytes that do not grow with the batch (parameters, optimizer state).
      budget: bytes a batch may use.

    Returns:
      The largest fitting candidate, or None when none fits.
    """
    per_image = max(peak - fixed, 1) / batch
    fitting = [b for b in candidates if fixed + b * per_image <= budget]
    return max(fitting) if fitting else None


def choose_batch(
    plan_of: Callable[[int], int],
    start: int,
    candidates: list[int],
    fixed: int,
    budget: float,
) -> tuple[int | None, dict[int, int]]:
    """The largest candidate whose compiled memory plan fits, with few compilations.

    Compiles ``start``; from its plan (linear in the batch beyond ``fixed``) jumps to the
    largest candidate predicted to fit, up or down, until the prediction is confirmed.

    Args:
      plan_of: batch -> planned bytes (compiles; the caller caches).
      start: the first batch to compile.
      candidates: allowed batches.
      fixed: batch-independent bytes (state).
      budget: bytes a batch may use.

    Returns:
      (the largest tried candidate that fits, or None; {batch: planned bytes} of every try).
    """
    tried: dict[int, int] = {}
    batch = start
    while batch is not None and batch not in tried:
        plan = tried[batch] = plan_of(batch)
        fits = [b for b, p in tried.items() if p <= budget]
        too_big = min((b for b, p in tried.items() if p > budget), default=math.inf)
        lo = max(fits, default=0)
        # Only candidates between the largest known fit and the smallest known misfit are open.
        open_ = [b for b in candidates if lo < b < too_big and b not in tried]
        if plan <= budget:
            batch = predict_fit([b for b in open_ if b > batch], batch, plan, fixed, budget)
        else:
            below = [b for b in open_ if b < batch]
            guess = predict_fit(below, batch, plan, fixed, budget)
            batch = guess if guess is not None else (min(below) if below else None)
            if batch is not None and lo and batch < lo:
                batch = None
    fits = [b for b, p in tried.items() if p <= budget]
    return (max(fits) if fits else None), tried


# --------------------------------------------------------------------------------------------
# FLOPs on the host (CPU): all-XLA lowering, XLA cost analysis and dot/conv count.
# --------------------------------------------------------------------------------------------


def matmul_flops(jaxpr: Any) -> float:
    """2 x the multiply-adds of every dot_general and convolution in a jaxpr.

    Sub-jaxprs are walked (``scan`` bodies times their length; the largest ``cond`` branch;
    ``while`` bodies once).

    Args:
      jaxpr: a ``Jaxpr`` or ``ClosedJaxpr``.

    Returns:
      FLOPs (2 per multiply-add).
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[i] for i in contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_features
        subs = [_as_jaxpr(v) for v in eqn.params.values()]
        subs = [s for s in subs if s is not None]
        if name == "cond":
            branches = eqn.params["branches"]
            total += max(matmul_flops(b) for b in branches)
            continue
        times = eqn.params.get("length", 1) if name == "scan" else 1
        total += times * sum(matmul_flops(s) for s in subs)
    return total


def _as_jaxpr(value: Any) -> Any:
    """``value`` if it is a (closed) jaxpr, else None."""
    if hasattr(value, "eqns"):
        return value
    if hasattr(value, "jaxpr") and hasattr(value, "consts"):
        return value.jaxpr
    return None


def count_flops(model: str, img: int) -> dict[str, Any]:
    """Forward FLOPs per image of ``model`` at ``img`` px, every op in plain XLA.

    Traced and lowered at batch 1 from abstract shapes (nothing is allocated or compiled), so
    it is cheap at any resolution. Run it on the CPU backend: GPU lowerings give no cost
    analysis.

    Args:
      model: registry name.
      img: image side in pixels.

    Returns:
      {"model", "img_size", "fwd_flops_per_image_xla_form": XLA's cost analysis (2 per
      multiply-add, elementwise ops included), "fwd_matmul_flops_per_image": 2 x multiply-adds
      of dots and convolutions}.
    """
    import jax
    import jax.numpy as jnp

    # The depthwise conv as a convolution, so that the dots + convs count sees its multiply-adds.
    m = _Model(model, img, "float32", bigla_impl="xla", attention_impl="xla", conv_impl="cudnn")
    _, graphdef_eval, params, rest = m.graphdefs()
    images = jax.ShapeDtypeStruct((1, img, img, 3), jnp.float32)
    traced = jax.jit(m.forward_fn(graphdef_eval)).trace(params, rest, images)
    return {
        "model": model,
        "img_size": img,
        "fwd_flops_per_image_xla_form": _cost(traced.lower().cost_analysis())["flops"],
        "fwd_matmul_flops_per_image": matmul_flops(traced.jaxpr),
    }


def flops_child(points: list[list[Any]]) -> None:
    """Prints one ``FLOPS {json}`` line per (model, img) (child process, CPU backend)."""
    for model, img in points:
        try:
            row = count_flops(model, int(img))
        except Exception as err:  # noqa: BLE001 - reported, the sweep goes on.
            row = {"model": model, "img_size": int(img), "flops_error": _short(err)}
        print("FLOPS " + json.dumps(row), flush=True)


# --------------------------------------------------------------------------------------------
# Child side: compile a chunk of units in parallel, then time them one by one.
# --------------------------------------------------------------------------------------------


class _Model:
    """One model at one resolution and dtype: abstract graph, forward and train step."""

    def __init__(
        self,
        model: str,
        img: int,
        dtype: str,
        bigla_impl: str | None = None,
        attention_impl: str | None = None,
        conv_impl: str | None = None,
        output_impl: str | None = None,
        gate_impl: str | None = None,
        norm_impl: str | None = None,
    ):
        import jax.numpy as jnp
        import optax
        from flax import nnx

        from pallas_kernels.bigla import api as bigla_api
        from vig_jax import create_model, deit
        from vig_jax.bigla import default_gate_implementation, default_output_implementation
        from vig_jax.dwconv import default_implementation as default_conv

        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {DTYPES}")
        self.model, self.img, self.dtype = model, img, dtype
        self.jnp, self.nnx, self.optax = jnp, nnx, optax
        self.compute_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        if model.startswith("vig"):
            self.impl = bigla_impl or bigla_api.default_implementation()
        else:
            self.impl = attention_impl or deit.default_attention_implementation(self.compute_dtype)
        # ViG only: the depthwise conv's implementation, the model's default unless given.
        vig = model.startswith("vig")
        self.conv_impl = (conv_impl or default_conv()) if vig else None
        self.output_impl = (output_impl or default_output_implementation()) if vig else None
        self.gate_impl = (gate_impl or default_gate_implementation()) if vig else None
        # Plain ViG's RMSNorms (ViG-H has LayerNorms): passed only when asked for.
        self.norm_impl = norm_impl
        self.create_model = create_model
        self.tx = optax.adamw(1e-3, weight_decay=0.05)

    def build(self):
        """A fresh model [B, img, img, 3] -> [B, 1000] logits, in train mode."""
        return self.create_model(
            self.model,
            num_classes=1000,
            img_size=self.img,
            dtype=self.compute_dtype,
            param_dtype=self.jnp.float32,
            implementation=self.impl,
            rngs=self.nnx.Rngs(0),
            **({"conv_implementation": self.conv_impl} if self.conv_impl else {}),
            **({"output_implementation": self.output_impl} if self.output_impl else {}),
            **({"gate_implementation": self.gate_impl} if self.gate_impl else {}),
            **({"norm_implementation": self.norm_impl} if self.norm_impl else {}),
        )

    def graphdefs(self):
        """(train graphdef, eval graphdef, abstract params, abstract rest) without allocating."""
        nnx = self.nnx
        abstract = nnx.eval_shape(self.build)
        abstract.train()
        graphdef_train, params, rest = nnx.split(abstract, nnx.Param, ...)
        abstract.eval()
        graphdef_eval = nnx.graphdef(abstract)
        return graphdef_train, graphdef_eval, params, rest

    def init_fn(self):
        nnx = self.nnx

        def init():
            """() -> (params, rest) of a freshly initialised model."""
            _, params, rest = nnx.split(self.build(), nnx.Param, ...)
            return params, rest

        return init

    def forward_fn(self, graphdef_eval):
        nnx = self.nnx

        def forward(params, rest, images):
            """images [B, H, W, 3] -> logits [B, 1000] in eval mode."""
            return nnx.merge(graphdef_eval, params, rest, copy=True)(images)

        return forward

    def train_step_fn(self, graphdef_train):
        import jax

        nnx, optax, tx = self.nnx, self.optax, self.tx

        def train_step(state, images, labels):
            """One AdamW step on softmax CE; state = (params, opt_state, rest)."""
            params, opt_state, rest = state

            def loss_fn(p):
                model = nnx.merge(graphdef_train, p, rest, copy=True)
                logits = model(images)
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                return loss, nnx.split(model, nnx.Param, ...)[2]

            (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state, new_rest), loss

        return train_step

    def prep_fn(self, batch: int):
        import jax

        jnp, tx, img = self.jnp, self.tx, self.img

        def prep(params):
            """params -> (AdamW state, images [B, img, img, 3] N(0, 1), labels [B])."""
            key_img, key_lbl = jax.random.split(jax.random.key(1))
            images = jax.random.normal(key_img, (batch, img, img, 3), jnp.float32)
            labels = jax.random.randint(key_lbl, (batch,), 0, 1000)
            return tx.init(params), images, labels

        return prep


@dataclasses.dataclass
class ChildConfig:
    """What one child process does: chunks of units, compiled per chunk, then timed."""

    chunks: list[list[dict[str, Any]]]
    fit_fraction: float = 0.9
    bigla_impl: str | None = None
    attention_impl: str | None = None
    conv_impl: str | None = None
    output_impl: str | None = None
    gate_impl: str | None = None
    norm_impl: str | None = None
    switches: list[list[Any]] = dataclasses.field(default_factory=list)  # [module, attr, value]
    warmup: int = 2
    max_steps: int = 20
    min_steps: int = 3
    measure_seconds: float = 1.0
    compile_workers: int = 12
    cache_dir: str | None = None
    deadline: float = math.inf  # time.time() after which nothing new starts
    # Guesses (H100) that decide how much of a chunk is compiled when time runs short; the
    # child replaces them by what it measures: compile wall seconds per unit of a full chunk
    # and at least per chunk, and seconds to time one unit (first calls included).
    est_compile_s_per_unit: float = 28.0
    est_compile_s_min: float = 120.0
    est_time_s: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"vig": 18.0, "deit": 4.0}
    )


@dataclasses.dataclass
class _Prepared:
    """A unit compiled and ready to time."""

    index: int
    unit: Unit
    model: _Model
    batch: int
    train: Any
    infer: Any
    prep: Any
    abstract_params: Any
    info: dict[str, Any]


class _Child:
    """Compiles units on a thread pool and times them on the main thread."""

    def __init__(self, cfg: ChildConfig):
        import jax
        import numpy as np

        self.jax, self.np, self.cfg = jax, np, cfg
        device = jax.local_devices()[0]
        stats = device.memory_stats() or {}
        self.limit = stats.get("bytes_limit")
        self.lock = threading.Lock()
        self.host_state: dict[str, concurrent.futures.Future] = {}  # model -> (params, rest)

    # ---- compile phase (worker threads) ----------------------------------------------------
    def start_batch(self, unit: Unit, fixed: int) -> int:
        """First batch to compile: from a per-token estimate (quadratic for XLA attention)."""
        cands = [b for b in BATCH_CANDIDATES if b <= unit.cap]
        if unit.batch is not None:
            return unit.batch
        if not self.limit:
            return cands[0]
        per_image = BYTES_PER_TOKEN.get(unit.model, 250e3) * tokens(unit.img, unit.model)
        if unit.dtype == "float32":
            per_image *= 2
            if unit.model in DEPTH_HEADS and self.cfg.attention_impl != "cudnn":
                depth, heads = DEPTH_HEADS[unit.model]
                per_image += 3 * 4 * depth * heads * tokens(unit.img, unit.model) ** 2
        budget = self.cfg.fit_fraction * self.limit
        fit = [b for b in cands if fixed + b * per_image <= budget]
        return max(fit) if fit else cands[-1]

    def host_init(self, m: _Model):
        """(params, rest) of ``m.model`` on the host, initialised once per model."""
        with self.lock:
            fut = self.host_state.get(m.model)
            owner = fut is None
            if owner:
                fut = self.host_state[m.model] = concurrent.futures.Future()
        if owner:
            t = time.perf_counter()
            try:
                params, rest = self.jax.jit(m.init_fn())()
                fut.set_result((self.jax.device_get(params), _host_rest(rest)))
            except Exception as err:  # noqa: BLE001 - re-raised in every waiting unit.
                fut.set_exception(err)
            say(f"COMPILED -1 init {m.model} {time.perf_counter() - t:.0f}")
        return fut.result()

    def prepare(self, index: int, unit: Unit) -> _Prepared:
        """Lowers and compiles the train step (at the chosen batch), the forward and the
        state/data preparation of ``unit``; initialises the model's parameters once."""
        jax, jnp = self.jax, self.jax.numpy
        t0 = time.perf_counter()
        m = _Model(
            unit.model,
            unit.img,
            unit.dtype,
            self.cfg.bigla_impl,
            self.cfg.attention_impl,
            self.cfg.conv_impl,
            self.cfg.output_impl,
            self.cfg.gate_impl,
            self.cfg.norm_impl,
        )
        graphdef_train, graphdef_eval, params, rest = m.graphdefs()
        opt = jax.eval_shape(m.tx.init, params)
        state = (params, opt, rest)
        fixed = int(sum(x.size * _itemsize(x.dtype) for x in jax.tree.leaves(state)))
        step = jax.jit(m.train_step_fn(graphdef_train), donate_argnums=0)
        compiled: dict[int, Any] = {}

        def images(b):
            return jax.ShapeDtypeStruct((b, unit.img, unit.img, 3), jnp.float32)

        def plan_of(b: int) -> int:
            t = time.perf_counter()
            labels = jax.ShapeDtypeStruct((b,), jnp.int32)
            compiled[b] = step.lower(state, images(b), labels).compile()
            plan = _planned_bytes(compiled[b])
            say(f"COMPILED {index} train b{b} {time.perf_counter() - t:.0f}")
            return plan if plan is not None else 0

        start = self.start_batch(unit, fixed)
        info: dict[str, Any] = {"state_bytes": fixed, "bytes_limit": self.limit}
        if unit.batch is not None or not self.limit:
            plan = plan_of(start)
            tried = {start: plan}
            fits = not self.limit or plan <= self.limit
            batch = start if fits else None
        else:
            cands = [b for b in BATCH_CANDIDATES if b <= unit.cap]
            batch, tried = choose_batch(
                plan_of, start, cands, fixed, self.cfg.fit_fraction * self.limit
            )
        info["batch_tries"] = {str(b): p for b, p in tried.items()}
        info["compile_train_s"] = time.perf_counter() - t0
        if batch is None:
            b = min(tried)
            raise MemoryError(
                f"Out of memory (XLA buffer plan): batch {b} plans {tried[b] / MIB:.0f} MiB, "
                f"device limit {self.limit / MIB:.0f} MiB"
            )
        train = compiled[batch]
        info["xla_train_bytes"] = tried[batch]
        info["train_flops_xla_compiled"] = _cost(train.cost_analysis())["flops"]
        t1 = time.perf_counter()
        infer = jax.jit(m.forward_fn(graphdef_eval)).lower(params, rest, images(batch)).compile()
        prep = jax.jit(m.prep_fn(batch)).lower(params).compile()
        info["compile_infer_s"] = time.perf_counter() - t1
        say(f"COMPILED {index} infer b{batch} {info['compile_infer_s']:.0f}")
        info["xla_infer_bytes"] = _planned_bytes(infer)
        info["custom_calls"] = sorted(set(_custom_calls(infer)) | set(_custom_calls(train)))
        t2 = time.perf_counter()
        self.host_init(m)
        info["init_s"] = time.perf_counter() - t2
        info["prepare_s"] = time.perf_counter() - t0
        say(f"READY {index} {info['prepare_s']:.0f}")
        return _Prepared(index, unit, m, batch, train, infer, prep, params, info)

    # ---- timing phase (main thread) --------------------------------------------------------
    def device_state(self, p: _Prepared):
        """(params, rest) on the device: the model's host init, pos-embeddings redrawn."""
        params, rest = self.host_init(p.model)
        params = reuse_params(p.abstract_params, params)
        return self.jax.device_put(params), _device_rest(rest)

    def peak(self) -> int | None:
        return (self.jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")

    def timed(self, call: Callable[[], Any]) -> tuple[float | None, list[float]]:
        """Runs ``call()`` (which blocks) warmup times, then times it.

        Returns:
          (seconds of the first warm-up call, None without warm-up; seconds per timed call).
        """
        cfg = self.cfg
        first = None
        for w in range(cfg.warmup):
            t0 = time.perf_counter()
            call()
            if w == 0:
                first = time.perf_counter() - t0
        times: list[float] = []
        t_start = time.perf_counter()
        while len(times) < cfg.max_steps:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
            if len(times) >= cfg.min_steps and time.perf_counter() - t_start > cfg.measure_seconds:
                break
        return first, times

    def time_unit(self, p: _Prepared) -> dict[str, Any]:
        """Measures inference then training of a prepared unit; returns its result row."""
        jax = self.jax
        row: dict[str, Any] = {"batch": p.batch, "implementation": p.model.impl, **p.info}
        if p.model.conv_impl:
            row["conv_implementation"] = p.model.conv_impl
        if p.model.output_impl:
            row["output_implementation"] = p.model.output_impl
        if p.model.gate_impl:
            row["gate_implementation"] = p.model.gate_impl
        if p.model.norm_impl:
            row["norm_implementation"] = p.model.norm_impl
        t0 = time.perf_counter()
        peak0 = self.peak()
        params, rest = self.device_state(p)
        opt_state, images, labels = p.prep(params)
        jax.block_until_ready((params, rest, opt_state, images, labels))
        row["state_s"] = time.perf_counter() - t0
        first, times = self.timed(lambda: jax.block_until_ready(p.infer(params, rest, images)))
        row["infer_first_call_s"] = first
        row["infer_ms"] = 1e3 * statistics.median(times)
        row["infer_img_s"] = p.batch / statistics.median(times)
        peak1 = self.peak()
        holder: dict[str, Any] = {"state": (params, opt_state, rest)}
        params = opt_state = rest = None  # the donated buffers live only in holder

        def one_step():
            holder["state"], holder["loss"] = p.train(holder["state"], images, labels)
            jax.block_until_ready(holder["loss"])

        first, times = self.timed(one_step)
        row["train_first_call_s"] = first
        peak2 = self.peak()
        row["train_ms"] = 1e3 * statistics.median(times)
        row["train_ms_min"] = 1e3 * min(times)
        row["train_steps_timed"] = len(times)
        row["train_img_s"] = p.batch / statistics.median(times)
        row["loss"] = float(holder["loss"])
        # A measured peak belongs to this unit only if the process peak rose while it ran.
        row["peak_infer_bytes"] = peak1 if peak0 is not None and peak1 > peak0 else None
        row["peak_train_bytes"] = peak2 if peak1 is not None and peak2 > peak1 else None
        for x in jax.tree.leaves((holder["state"], images, labels)):
            try:
                x.delete()
            except Exception:  # noqa: BLE001 - already deleted or not deletable: freed by GC.
                pass
        holder.clear()
        row["time_s"] = time.perf_counter() - t0
        return row


def reuse_params(abstract: Any, host: Any, seed: int = 0) -> Any:
    """Parameters for a model at another resolution from ones initialised at the first.

    Only position embeddings depend on the resolution; a leaf whose shape differs is redrawn
    from a normal(0, 0.02) truncated at 2 sigma (the models' position-embedding init).

    Args:
      abstract: the model's parameters at the new resolution (ShapeDtypeStruct leaves).
      host: parameters of the same model (same tree) at another resolution (NumPy leaves).
      seed: NumPy seed of the redrawn leaves.

    Returns:
      ``abstract``'s tree with NumPy leaves of its shapes and dtypes.
    """
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(a, h):
        if h.shape == a.shape:
            return h
        return (np.clip(rng.standard_normal(a.shape), -2.0, 2.0) * 0.02).astype(a.dtype)

    return jax.tree.map(fill, abstract, host)


def _itemsize(dtype: Any) -> int:
    """Bytes per element (PRNG key arrays: their key data)."""
    try:
        return dtype.itemsize
    except Exception:  # noqa: BLE001 - extended dtypes without an itemsize.
        return 8


def _host_rest(rest: Any) -> Any:
    """Non-parameter state on the host; PRNG keys as (key data, implementation)."""
    import jax

    def get(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return ("key", jax.device_get(jax.random.key_data(x)), jax.random.key_impl(x))
        return jax.device_get(x)

    return jax.tree.map(get, rest)


def _device_rest(rest: Any) -> Any:
    """Inverse of :func:`_host_rest`, on the default device."""
    import jax

    def put(x):
        if isinstance(x, tuple) and len(x) == 3 and x[0] == "key":
            return jax.random.wrap_key_data(jax.device_put(x[1]), impl=x[2])
        return jax.device_put(x)

    return jax.tree.map(put, rest, is_leaf=lambda x: isinstance(x, tuple))


def _setup_jax(cache_dir: str | None) -> None:
    """Persistent compilation cache (executables and XLA's autotuning results)."""
    import jax

    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _family(model: str) -> str:
    return "vig" if model.startswith("vig") else "deit"


def compile_order(units: list[tuple[int, Unit]]) -> list[tuple[int, Unit]]:
    """(index, unit) pairs, the longest compilations first: ViG (a train step compiles ~2x
    longer than DeiT's), then larger images (more likely to need a second batch); with fewer
    compile threads than units, the threads that finish last then run short ones."""
    return sorted(units, key=lambda iu: (_family(iu[1].model) != "vig", -iu[1].img))


def units_that_fit(
    units: list[Unit],
    seconds: float,
    per_unit: float,
    minimum: float,
    time_s: dict[str, float],
) -> int:
    """How many of ``units`` (a prefix, in priority order) a child can compile together and
    then time within ``seconds``; a chunk whose compilation hits the deadline is lost whole.

    Args:
      units: the chunk, in priority order.
      seconds: time left to the deadline.
      per_unit: compile wall seconds per unit of a full chunk (threads in parallel).
      minimum: compile wall seconds of any chunk (one unit's longest path).
      time_s: {"vig" | "deit": seconds to time one unit, first calls included}.

    Returns:
      The length of the longest prefix whose estimate fits (0: none).
    """
    worst = max(time_s.values(), default=0.0)
    for n in range(len(units), 0, -1):
        timing = sum(time_s.get(_family(u.model), worst) for u in units[:n])
        if max(minimum, per_unit * n) + timing <= seconds:
            return n
    return 0


def child_main(cfg: ChildConfig) -> None:
    """Runs ``cfg`` and prints ``CHUNK``/``START``/``RESULT {json}`` lines; exits with
    :data:`EXIT_RUNTIME_OOM` after an out-of-memory while running (the parent restarts)."""
    _setup_jax(cfg.cache_dir)
    set_switches(cfg.switches)
    import flax
    import jax

    base = {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "switches": {f"{m}.{a}": v for m, a, v in cfg.switches},
    }
    from pallas_kernels.bigla import api as bigla_api

    base["bigla_default_implementation"] = bigla_api.default_implementation()
    child = _Child(cfg)
    pool = concurrent.futures.ThreadPoolExecutor(max(1, cfg.compile_workers))

    def emit(index: int, unit: Unit, row: dict[str, Any]) -> None:
        out = {**base, "unit": index, **dataclasses.asdict(unit), **row}
        out["img_size"] = out.pop("img")
        out["auto"] = unit.batch is None
        say("RESULT " + json.dumps(out))

    def skip(units: list[tuple[int, Unit]]) -> None:
        for i, u in units:
            emit(i, u, {"batch": u.batch or 0, "status": "skipped", "error": "deadline"})

    est_time = dict(cfg.est_time_s)
    per_unit = cfg.est_compile_s_per_unit
    index = 0
    for c, chunk in enumerate(cfg.chunks):
        units = [(index + i, Unit(**u)) for i, u in enumerate(chunk)]
        index += len(chunk)
        n = units_that_fit(
            [u for _, u in units],
            cfg.deadline - time.time(),
            per_unit,
            cfg.est_compile_s_min,
            est_time,
        )
        if n < len(units):  # what cannot be compiled and timed in time is left for --resume
            skip(units[n:])
            units = units[:n]
        if not units:
            continue
        say(f"CHUNK {c}")
        t0 = time.perf_counter()
        for m in dict.fromkeys(u.model for _, u in units):  # the parameters, first
            u = next(u for _, u in units if u.model == m)
            model = _Model(
                m,
                u.img,
                u.dtype,
                cfg.bigla_impl,
                cfg.attention_impl,
                cfg.conv_impl,
                cfg.output_impl,
                cfg.gate_impl,
                cfg.norm_impl,
            )
            pool.submit(child.host_init, model)
        futures = {pool.submit(child.prepare, i, u): (i, u) for i, u in compile_order(units)}
        ready: list[_Prepared] = []
        try:
            for fut in concurrent.futures.as_completed(futures, cfg.deadline - time.time()):
                i, u = futures[fut]
                try:
                    ready.append(fut.result())
                except Exception as err:  # noqa: BLE001 - a row per failed unit.
                    status = "oom" if _is_oom(err) else "error"
                    emit(i, u, {"batch": u.batch or 0, "status": status, "error": _short(err)})
        except concurrent.futures.TimeoutError:
            for p in ready:
                emit(p.index, p.unit, {"batch": p.batch, "status": "skipped", "error": "deadline"})
            for fut, (i, u) in futures.items():
                if not fut.done():
                    emit(i, u, {"batch": u.batch or 0, "status": "skipped", "error": "deadline"})
            say(f"compile phase of chunk {c} hit the deadline")
            os._exit(0)  # compile threads cannot be interrupted
        compile_s = time.perf_counter() - t0
        if len(units) >= 4:
            per_unit = compile_s / len(units)
        # Ascending plans: the process peak then rises with (almost) every unit.
        ready.sort(key=lambda p: p.info.get("xla_train_bytes") or 0)
        for p in ready:
            family = _family(p.unit.model)
            need = max(3 * cfg.measure_seconds + 5, est_time.get(family, 0.0))
            if time.time() + need > cfg.deadline:
                emit(p.index, p.unit, {"batch": p.batch, "status": "skipped", "error": "deadline"})
                continue
            say(f"START {p.index}")
            try:
                row = child.time_unit(p)
                est_time[family] = 1.2 * row["time_s"] + 1.0
                row["status"] = "ok"
                row["chunk_compile_s"] = compile_s
            except Exception as err:  # noqa: BLE001 - OOM or other failure ends this process.
                row = {"batch": p.batch, "status": "oom" if _is_oom(err) else "error"}
                row["error"] = _short(err)
                emit(p.index, p.unit, row)
                if row["status"] == "oom":
                    sys.stdout.flush()
                    os._exit(EXIT_RUNTIME_OOM)
                continue
            emit(p.index, p.unit, row)
    sys.stdout.flush()
    os._exit(0)  # do not wait for XLA's thread pools to wind down


# --------------------------------------------------------------------------------------------
# Parent side: plan, run children within the time budget, collect rows.
# --------------------------------------------------------------------------------------------


def plan_units(args: argparse.Namespace) -> list[list[Unit]]:
    """The study in chunks, in priority order: the bars; bf16 for the tiny models, then the
    small ones (ascending resolution); fp32 likewise. Chunks hold at most ``--chunk-size``."""
    models = [m for m in args.models.split(",") if m]
    resolutions = [int(r) for r in args.resolutions.split(",") if r]
    fp32_res = resolutions
    if args.fp32_resolutions:
        fp32_res = [int(r) for r in args.fp32_resolutions.split(",") if r]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for m in models:
        if m not in LABELS and not args.smoke:
            raise ValueError(f"model {m!r}; expected some of {list(LABELS)}")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtype {d!r}; expected some of {DTYPES}")
    cap = args.max_batch
    bars: list[Unit] = []
    if not args.no_bars and "bfloat16" in dtypes:
        for model, img, batch in BARS:
            if model in models and img in resolutions and batch <= cap:
                bars.append(Unit(model, img, "bfloat16", batch, cap))
    # An automatic unit whose cap is a bar's batch is that bar.
    covered = {(u.model, u.img, u.dtype) for u in bars if u.batch == cap}
    rest: list[Unit] = []
    for dtype in dtypes:
        res = resolutions if dtype == "bfloat16" else [r for r in resolutions if r in fp32_res]
        groups = [[m for m in models if m.endswith("_t")], [m for m in models if m.endswith("_s")]]
        groups.append([m for m in models if not m.endswith(("_t", "_s"))])
        for group in groups:
            for img in res:
                for model in group:
                    if (model, img, dtype) not in covered:
                        rest.append(Unit(model, img, dtype, None, cap))
    chunks = [bars] if bars else []
    size = max(1, args.chunk_size)
    chunks += [rest[i : i + size] for i in range(0, len(rest), size)]
    return chunks


def _unit_done(rows: list[dict[str, Any]], unit: Unit) -> bool:
    """True when ``rows`` hold an ok/oom result of ``unit`` (for --resume)."""
    for r in rows:
        if (r["model"], r["img_size"], r["dtype"]) != (unit.model, unit.img, unit.dtype):
            continue
        if r.get("status") not in ("ok", "oom") or r.get("runtime_oom"):
            continue  # an out-of-memory while running is retried at a smaller batch
        if unit.batch is None and r.get("auto"):
            return True
        if unit.batch is not None and r.get("batch") == unit.batch and not r.get("auto"):
            return True
    return False


def pump_lines(
    lines: queue.Queue,
    on_line: Callable[[str], None],
    timeout: float,
    stall_seconds: float,
    clock: Callable[[], float] = time.monotonic,
) -> str | None:
    """Feeds a child's stdout lines (``None`` = end of output) to ``on_line`` as they come.

    Every line, heartbeats included, resets the stall clock.

    Returns:
      None at the end of the output; "timeout" when ``timeout`` seconds have passed; "stalled"
      when ``stall_seconds`` passed without a line.
    """
    end = clock() + timeout
    while True:
        left = end - clock()
        if left <= 0:
            return "timeout"
        try:
            line = lines.get(timeout=min(left, stall_seconds))
        except queue.Empty:
            return "timeout" if clock() >= end - 0.2 else "stalled"
        if line is None:
            return None
        on_line(line.rstrip("\n"))


class Runner:
    """Runs the plan in child processes within a deadline and keeps every result row."""

    def __init__(self, args: argparse.Namespace, rows: list[dict[str, Any]], clock=time.monotonic):
        self.args = args
        self.rows = rows
        self.clock = clock
        self.start = self.clock()
        self.deadline = self.start + args.max_seconds
        self.flops: dict[tuple[str, int], dict[str, Any]] = {}
        self.workers = args.compile_workers  # drops to 1 after a crash while compiling

    def time_left(self) -> float:
        return self.deadline - self.clock()

    def save(self) -> None:
        write_json(self.args, self.rows, self.clock() - self.start)

    def pending(self) -> list[list[Unit]]:
        chunks = [[u for u in c if not _unit_done(self.rows, u)] for c in plan_units(self.args)]
        return [c for c in chunks if c]

    def run_all(self) -> None:
        """Runs the plan (restarting the child after an out-of-memory or a crash), collects
        the host-side FLOPs, writes the JSON."""
        chunks = self.pending()
        points = sorted({(u.model, u.img) for c in chunks for u in c})
        flops = self.start_flops(points)
        for _ in range(8):  # children: the first, plus restarts
            if not chunks or self.time_left() < 20:
                break
            new, status = self.run_child(chunks)
            done = {(r["unit"]) for r in new if "unit" in r}
            units = [u for c in chunks for u in c]
            retry: list[Unit] = []
            for r in new:
                if r.get("status") == "oom" and r.get("auto") and r.get("runtime_oom"):
                    smaller = [b for b in BATCH_CANDIDATES if b < r["batch"]]
                    if smaller:
                        u = units[r["unit"]]
                        retry.append(dataclasses.replace(u, cap=smaller[0]))
            left = [
                [u for j, u in _indexed(chunks, k) if j not in done] for k in range(len(chunks))
            ]
            chunks = ([retry] if retry else []) + [c for c in left if c]
            if status == 0:
                break
        if flops is not None:
            self.collect_flops(flops)
        self.merge_flops()
        self.save()

    def start_flops(self, points: list[tuple[str, int]]) -> subprocess.Popen | None:
        """Starts the CPU subprocess that counts FLOPs (concurrent with the device work)."""
        have = {
            (r["model"], r["img_size"]) for r in self.rows if r.get("fwd_flops_per_image_xla_form")
        }
        todo = [list(p) for p in points if p not in have]
        if not todo or self.args.no_flops:
            return None
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
        cmd = [sys.executable, "-m", "benchmarks.bench_resolution", "--flops-child"]
        return subprocess.Popen(
            cmd + [json.dumps(todo)],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            preexec_fn=lambda: os.nice(10),
        )

    def collect_flops(self, proc: subprocess.Popen) -> None:
        try:
            stdout, _ = proc.communicate(timeout=max(5.0, self.time_left() + 15))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        for line in stdout.splitlines():
            if line.startswith("FLOPS "):
                r = json.loads(line[6:])
                self.flops[(r["model"], r["img_size"])] = r

    def merge_flops(self) -> None:
        for r in self.rows:
            f = self.flops.get((r["model"], r["img_size"]))
            if f:
                for k in ("fwd_flops_per_image_xla_form", "fwd_matmul_flops_per_image"):
                    if k in f:
                        r[k] = f[k]

    def child_command(self, cfg: ChildConfig) -> list[str]:
        return [
            sys.executable,
            "-m",
            "benchmarks.bench_resolution",
            "--child",
            json.dumps(dataclasses.asdict(cfg)),
        ]

    def launch(self, cfg: ChildConfig, timeout: float, on_line: Callable[[str], None]):
        """Runs a child on ``cfg``, calling ``on_line`` for each stdout line as it comes.

        Returns:
          (stderr tail, exit code, "timeout" (killed at the deadline) or "stalled" (killed
          after ``--stall-seconds`` without a line; the child prints one per compilation, so
          only a compilation that runs that long, or a hang, is killed)).
        """
        cmd = self.child_command(cfg)
        env = dict(os.environ)
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(self.args.mem_fraction))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        err_path = Path(self.args.out).with_suffix(".child_stderr.txt")
        err_path.parent.mkdir(parents=True, exist_ok=True)
        with open(err_path, "w") as err_file:
            proc = subprocess.Popen(
                cmd,
                cwd=Path(__file__).resolve().parents[1],
                env=env,
                stdout=subprocess.PIPE,
                stderr=err_file,
                text=True,
            )
            lines: queue.Queue = queue.Queue()
            reader = threading.Thread(
                target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)],
                daemon=True,
            )
            reader.start()
            stop = pump_lines(lines, on_line, timeout, self.args.stall_seconds)
            if stop is not None:
                proc.kill()  # out of time, or silent too long (a hung compile)
            code = proc.wait()
            status: int | str = code if stop is None else stop
        tail = err_path.read_text(errors="replace")[-600:]
        return tail, status

    def run_child(self, chunks: list[list[Unit]]) -> tuple[list[dict[str, Any]], int | str]:
        """Runs one child over ``chunks``; records its rows as they arrive; blames a crash on
        the unit it was timing (or on the chunk it was compiling)."""
        args = self.args
        cfg = ChildConfig(
            chunks=[[dataclasses.asdict(u) for u in c] for c in chunks],
            fit_fraction=args.fit_fraction,
            bigla_impl=args.bigla_impl,
            attention_impl=args.attention_impl,
            conv_impl=args.conv_impl,
            output_impl=args.output_impl,
            gate_impl=args.gate_impl,
            norm_impl=args.norm_impl,
            switches=args.switches,
            warmup=args.warmup,
            max_steps=args.steps,
            min_steps=min(3, args.steps),
            measure_seconds=args.measure_seconds,
            compile_workers=self.workers,
            cache_dir=args.cache_dir or None,
            deadline=time.time() + self.time_left() - 10,
        )
        units = [u for c in chunks for u in c]
        new: list[dict[str, Any]] = []
        marks: dict[str, Any] = {"chunk": None, "start": None, "phase": None}
        t0 = self.clock()
        print(f"child: {len(units)} units in {len(chunks)} chunks [{self.time_left():.0f} s left]")

        def on_line(line: str) -> None:
            if line.startswith("RESULT "):
                r = json.loads(line[7:])
                r["bar"] = _is_bar(r["model"], r["img_size"], r["batch"], r["dtype"])
                new.append(r)
                self.rows.append(r)
                print("     " + _row_summary(r), flush=True)
                self.save()
            elif line.startswith("CHUNK "):
                marks["chunk"], marks["phase"] = int(line[6:]), "compile"
                print(f"  compiling chunk {marks['chunk']} [{self.time_left():.0f} s left]")
            elif line.startswith("START "):
                marks["start"], marks["phase"] = int(line[6:]), "timing"
            elif line.startswith(("COMPILED ", "READY ")):
                print("       " + _heartbeat(line, units), flush=True)

        tail, status = self.launch(cfg, max(5.0, self.time_left()), on_line)
        reported = {r["unit"] for r in new}
        if status == EXIT_RUNTIME_OOM:
            for r in new:
                if r["unit"] == marks["start"] and r.get("status") == "oom":
                    r["runtime_oom"] = True
        elif status not in (0, "timeout"):
            # Died while timing a unit: blame it. Died while compiling a chunk: first retry
            # with one compile thread, then blame the chunk.
            blamed = []
            if marks["phase"] == "timing" and marks["start"] not in reported:
                blamed = [marks["start"]]
            elif marks["phase"] == "compile" and self.workers > 1:
                print(f"child died compiling ({status}); compiling on one thread from now on")
                self.workers = 1
            elif marks["phase"] == "compile":
                first = sum(len(c) for c in chunks[: marks["chunk"]])
                blamed = [
                    i
                    for i in range(first, first + len(chunks[marks["chunk"]]))
                    if i not in reported
                ]
            kind = "oom" if _is_oom(tail) else "error"
            for i in blamed:
                u = units[i]
                r = {
                    "unit": i,
                    "model": u.model,
                    "img_size": u.img,
                    "dtype": u.dtype,
                    "batch": u.batch or 0,
                    "auto": u.batch is None,
                    "status": kind,
                    "error": f"child exit {status}: {tail}",
                    "bar": False,
                }
                new.append(r)
                self.rows.append(r)
                print("     " + _row_summary(r), flush=True)
        print(f"child exit {status} after {self.clock() - t0:.0f} s", flush=True)
        self.save()
        return new, status


def _heartbeat(line: str, units: list[Unit]) -> str:
    """A child's "COMPILED <unit> <what> <s>" or "READY <unit> <s>" line, for the log."""
    kind, index, *rest = line.split()
    i = int(index)
    name = units[i].name if 0 <= i < len(units) else ""
    words = [kind.lower(), name, *rest[:-1], f"({rest[-1]} s)"]
    return " ".join(w for w in words if w)


def _indexed(chunks: list[list[Unit]], k: int) -> list[tuple[int, Unit]]:
    """(global unit index, unit) of chunk ``k``."""
    first = sum(len(c) for c in chunks[:k])
    return list(enumerate(chunks[k], start=first))


def _is_bar(model: str, img: int, batch: int, dtype: str) -> bool:
    return (model, img, batch) in BARS and dtype == "bfloat16"


def _row_summary(r: dict[str, Any]) -> str:
    head = f"{r['model']:<7} {r['img_size']:>5} px {r['dtype']:<9}"
    if r.get("status") != "ok":
        return f"{head} batch {r['batch']:>3}: {r.get('status')} {str(r.get('error', ''))[:160]}"
    return (
        f"{head} batch {r['batch']:>3}: train {r['train_img_s']:9.1f} img/s, infer "
        f"{r['infer_img_s']:9.1f} img/s, peak {_mib(_train_peak(r))} MiB, "
        f"prepare {r.get('prepare_s', 0):.0f} s, time {r.get('time_s', 0):.1f} s (first calls "
        f"{r.get('infer_first_call_s') or 0:.1f} + {r.get('train_first_call_s') or 0:.1f} s), "
        f"{r.get('implementation')}; custom calls {','.join(r.get('custom_calls', [])) or 'none'}"
    )


def _train_peak(r: dict[str, Any]) -> float | None:
    """Measured training peak where attributable, else XLA's buffer plan."""
    return r.get("peak_train_bytes") or r.get("xla_train_bytes")


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
            if _train_peak(v) and _train_peak(d):
                check["peak_train_mib"] = {
                    "vig_t": _train_peak(v) / MIB,
                    "deit_t": _train_peak(d) / MIB,
                }
        checks.append(check)
    return checks


def print_table(rows: list[dict[str, Any]], header: str = "") -> None:
    """Prints every measured configuration, then the bar checks.

    Peak MiB: measured process peak, or XLA's buffer plan (marked ``p``) where the measured
    peak could not be attributed. FLOPs: forward per image, 2 per multiply-add, XLA's count of
    the all-XLA lowering (elementwise ops included) and dots/convolutions only.
    """
    if header:
        print("\n" + header)
    cols = (
        f"{'model':<7} {'dtype':<9} {'px':>5} {'batch':>5} {'train img/s':>11} "
        f"{'infer img/s':>11} {'train peak MiB':>14} {'GFLOP xla':>10} {'GFLOP mm':>9} "
        f"{'impl':<7} status"
    )
    print(cols)
    print("-" * len(cols))
    key = lambda r: (  # noqa: E731
        DTYPES.index(r["dtype"]) if r["dtype"] in DTYPES else 9,
        MODELS.index(r["model"]) if r["model"] in MODELS else 9,
        r["img_size"],
        r["batch"],
    )
    flops = _flops_by_point(rows)
    for r in sorted(rows, key=key):
        f = flops.get((r["model"], r["img_size"]), {})
        fx = f.get("fwd_flops_per_image_xla_form", float("nan")) / 1e9
        fm = f.get("fwd_matmul_flops_per_image", float("nan")) / 1e9
        head = f"{r['model']:<7} {r['dtype']:<9} {r['img_size']:>5} {r['batch']:>5} "
        if r.get("status") == "ok":
            peak = _mib(_train_peak(r)) + ("" if r.get("peak_train_bytes") else "p")
            print(
                head + f"{r['train_img_s']:>11.1f} {r['infer_img_s']:>11.1f} {peak:>14} "
                f"{fx:>10.2f} {fm:>9.2f} {r.get('implementation', ''):<7} ok"
                f"{' (bar)' if r.get('bar') else ''}"
            )
        else:
            print(
                head + f"{'':>11} {'':>11} {'':>14} {fx:>10.2f} {fm:>9.2f} {'':<7} "
                f"{r.get('status')}: {str(r.get('error', ''))[:70]}"
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
            mem = [(p, _train_peak(r) / MIB / r["batch"]) for p, r in pts if _train_peak(r)]
            if mem:
                ax_mem.plot(
                    *zip(*mem, strict=True), styles[dtype], color=color, marker="o", label=tag
                )
        f = _flops_by_point(rows)
        for k, style, what in (
            ("fwd_flops_per_image_xla_form", "-", "XLA"),
            ("fwd_matmul_flops_per_image", ":", "dots+convs"),
        ):
            pts_f = sorted(
                (img, v[k]) for (m, img), v in f.items() if m == model and _positive(v.get(k))
            )
            if pts_f:
                ax_flops.plot(
                    [p for p, _ in pts_f],
                    [v / 1e9 for _, v in pts_f],
                    style,
                    color=color,
                    marker="o" if style == "-" else ".",
                    label=f"{label} {what}",
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
        (ax_flops, "forward GFLOP per image (2 per multiply-add)"),
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
    ax_mem.set_title("peak device memory (ours: process peak / XLA plan; official: extra)")
    ax_flops.set_title("FLOPs: XLA cost analysis (solid), dots+convs only (dotted)")
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


def _flops_by_point(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """(model, img) -> the FLOP counts found in any row of it."""
    out: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        for k in ("fwd_flops_per_image_xla_form", "fwd_matmul_flops_per_image"):
            if _positive(r.get(k)):
                out.setdefault((r["model"], r["img_size"]), {})[k] = r[k]
    return out


# --------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--resolutions", default=",".join(map(str, RESOLUTIONS)))
    p.add_argument(
        "--fp32-resolutions", default=None, help="fp32 subset (default: all of --resolutions)"
    )
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--max-batch", type=int, default=128)
    p.add_argument("--no-bars", action="store_true", help="skip the issue's fixed-batch bars")
    p.add_argument("--bigla-impl", default=None, help="BiGLA implementation (default: fastest)")
    p.add_argument("--attention-impl", default=None, choices=(None, "xla", "cudnn"))
    p.add_argument(
        "--conv-impl",
        default=None,
        help="ViG depthwise conv (vig_jax.dwconv.IMPLEMENTATIONS; default: pallas on a GPU)",
    )
    p.add_argument("--output-impl", default=None, help="ViG gated output: xla | pallas (GPU)")
    p.add_argument("--gate-impl", default=None, help="ViG forget gates: xla | pallas (GPU)")
    p.add_argument(
        "--norm-impl", default=None, help="plain ViG's RMSNorms: xla | pallas (GPU); ViG-H: unset"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODULE.ATTR=VALUE",
        help="set a module-level switch in the measuring process (repeatable; recorded per row)",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="most timed steps per measurement")
    p.add_argument("--measure-seconds", type=float, default=1.0)
    p.add_argument("--max-seconds", type=float, default=540.0, help="time budget of the sweep")
    p.add_argument("--fit-fraction", type=float, default=0.9)
    p.add_argument(
        "--chunk-size",
        type=int,
        default=6,
        help="units compiled together (H100: 6 compiled in 163 s on 8 threads; a bigger chunk "
        "hardly compiles faster per unit, and one cut off by the deadline is lost whole)",
    )
    p.add_argument("--compile-workers", type=int, default=12, help="compile threads per chunk")
    p.add_argument(
        "--stall-seconds",
        type=float,
        default=300.0,
        help="kill a child that prints nothing for this long (it prints a line per "
        "compilation; then compile on one thread)",
    )
    p.add_argument(
        "--cache-dir",
        default=".cache/jax_bench_resolution",
        help="persistent compilation cache ('' = none)",
    )
    p.add_argument(
        "--mem-fraction",
        type=float,
        default=0.92,
        help="XLA_PYTHON_CLIENT_MEM_FRACTION for the child",
    )
    p.add_argument("--out", default="benchmarks/results/resolution.json")
    p.add_argument("--png", default=None, help="figure (default: --out with .png)")
    p.add_argument("--resume", action="store_true", help="keep ok/oom rows already in --out")
    p.add_argument("--plot-only", action="store_true", help="redraw table and figure from --out")
    p.add_argument("--list", action="store_true", help="print the plan in priority order, exit")
    p.add_argument("--no-flops", action="store_true", help="skip the host-side FLOP count")
    p.add_argument(
        "--flops-only", action="store_true", help="count FLOPs (CPU) for the plan, print, exit"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU check: ViG-T and DeiT-T at 32 px, batch 2, fp32, no bars",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--flops-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.models = "vig_t,deit_t"
        args.resolutions = args.fp32_resolutions = "32"
        args.dtypes = "float32"
        args.max_batch = 2
        args.no_bars = True
        args.warmup, args.steps, args.measure_seconds = 1, 2, 0.0
        args.compile_workers = 2
    # Parsed once, here: a bad switch fails before any child starts.
    args.switches = [list(parse_switch(spec)) for spec in args.set]
    if args.max_batch not in BATCH_CANDIDATES:
        raise ValueError(f"--max-batch {args.max_batch}; expected one of {BATCH_CANDIDATES}")
    return args


def flops_table(points: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """FLOPs of ``points`` from a CPU subprocess (the same path the sweep uses)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, "-m", "benchmarks.bench_resolution", "--flops-child"]
    proc = subprocess.run(
        cmd + [json.dumps([list(p) for p in points])],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(x[6:]) for x in proc.stdout.splitlines() if x.startswith("FLOPS ")]


def print_flops(table: list[dict[str, Any]]) -> None:
    print(f"{'model':<7} {'px':>5} {'GFLOP xla':>10} {'GFLOP mm':>9} {'GMAC mm':>8}")
    for r in table:
        fx = r.get("fwd_flops_per_image_xla_form", float("nan")) / 1e9
        fm = r.get("fwd_matmul_flops_per_image", float("nan")) / 1e9
        print(f"{r['model']:<7} {r['img_size']:>5} {fx:>10.3f} {fm:>9.3f} {fm / 2:>8.3f}")


def add_missing_flops(data: dict[str, Any], path: str) -> None:
    """Counts (on this host's CPU) the FLOPs that rows of ``data`` lack; rewrites ``path``."""
    missing = sorted(
        {
            (r["model"], r["img_size"])
            for r in data["rows"]
            if not _positive(r.get("fwd_matmul_flops_per_image")) and r["model"] in LABELS
        }
    )
    if not missing:
        return
    print(f"counting FLOPs of {len(missing)} (model, resolution) points on the CPU")
    by_point = {(f["model"], f["img_size"]): f for f in flops_table(missing)}
    for r in data["rows"]:
        for k, v in by_point.get((r["model"], r["img_size"]), {}).items():
            if k.startswith("fwd_"):
                r[k] = v
    Path(path).write_text(json.dumps(data, indent=1))


def read_rows(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the JSON at ``path``, its ok/oom rows): what ``--resume`` keeps; rows skipped at the
    deadline or failed are dropped, so that their units run again."""
    data = json.loads(Path(path).read_text())
    return data, [r for r in data["rows"] if r.get("status") in ("ok", "oom")]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(ChildConfig(**json.loads(args.child)))
        return
    if args.flops_child:
        flops_child(json.loads(args.flops_child))
        return
    chunks = plan_units(args)
    if args.list:
        i = 0
        for c, chunk in enumerate(chunks):
            for u in chunk:
                print(
                    f"{i:>3} chunk {c} {u.model:<7} {u.img:>5} px {u.dtype:<9} "
                    f"batch {u.batch or 'auto'}"
                )
                i += 1
        return
    if args.flops_only:
        points = sorted({(u.model, u.img) for c in chunks for u in c})
        table = flops_table(points)
        print_flops(table)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"flops": table}, indent=1))
        return
    png = args.png or str(Path(args.out).with_suffix(".png"))
    rows: list[dict[str, Any]] = []
    data: dict[str, Any] = {}
    if (args.resume or args.plot_only) and args.out and Path(args.out).exists():
        data, rows = read_rows(args.out)
        print(f"read {len(rows)} rows from {args.out}")
    if args.plot_only and data and not args.no_flops:
        add_missing_flops(data, args.out)
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
