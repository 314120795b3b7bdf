"""The training loop: ``train_and_evaluate(config, workdir)``.

The official ViG recipe (vig-reference.md section 10) with Optax: AdamW with the official
weight-decay mask, per-step linear warm-up then cosine (timm ``CosineLRScheduler`` with
``warmup_prefix``), learning rates scaled by global batch / 512, global-norm clipping, an EMA of
the parameters (evaluated and checkpointed), mixup / cutmix with label smoothing, RandAugment,
random erasing and per-variant drop path.

The model is a Flax NNX module split into a static graph and pure state; the step is a pure
function of ``TrainState`` jitted over one mesh with explicit in/out shardings and a donated
state. Randomness of step ``s`` is ``fold_in(key, s)``, so a resumed run computes bit for bit
what an uninterrupted one computes.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from train import augment, checkpoint, data, report, sharding
from vig_jax import create_model

IDENTITY_KEYS = ("model", "num_classes", "img_size", "patch_size")


# ---------------------------------------------------------------------------------------------
# State, model, optimizer
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; all of it is checkpointed.

    Attributes:
      step: int32 [] optimizer steps done.
      params: ``nnx.State`` of the model's ``nnx.Param``s (param_dtype).
      opt_state: Optax state (clip + AdamW moments + schedule count).
      ema_params: EMA of ``params`` (empty State when EMA is off).
      model_state: the model's other variables (none for ViG / DeiT), e.g. batch statistics.
      rng: uint32 key data; step ``s`` uses ``fold_in(key, s)``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    model_state: Any
    rng: jax.Array


def _dtype(name: str):
    try:
        return jnp.dtype(name)
    except TypeError as err:
        raise ValueError(f"dtype {name!r}; expected e.g. 'float32' or 'bfloat16'") from err


def model_builder(config: ml_collections.ConfigDict, num_classes: int) -> Callable[[], nnx.Module]:
    """A zero-argument function creating the configured model (for eval_shape and init)."""
    mc = config.model
    extra = {}
    for key in (
        "conv_implementation",
        "output_implementation",
        "gate_implementation",
        "norm_implementation",
    ):
        if mc.get(key):
            extra[key] = mc[key]

    def build() -> nnx.Module:
        return create_model(
            mc.name,
            num_classes=num_classes,
            img_size=config.data.img_size,
            dtype=_dtype(mc.dtype),
            param_dtype=_dtype(mc.param_dtype),
            implementation=mc.implementation or None,
            drop_path_rate=mc.drop_path_rate,
            patch_size=mc.patch_size or None,
            rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1),
            **extra,
        )

    return build


def _path_names(path) -> list[str]:
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return [n for n in names if n != "value"]


def weight_decay_mask(params: Any) -> Any:
    """Official mask (utils/optimizer.py ``set_weight_decay``): decay unless ndim == 1 or the
    name ends in ``bias``. Position embeddings and conv kernels are decayed.

    Args:
      params: pytree of arrays (an ``nnx.State``).

    Returns:
      Same structure with bools.
    """

    def decays(path, x) -> bool:
        names = _path_names(path)
        return bool(len(x.shape) > 1 and not (names and names[-1] == "bias"))

    return jax.tree_util.tree_map_with_path(decays, params)


def lr_schedule(
    base_lr: float,
    warmup_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
) -> optax.Schedule:
    """timm ``CosineLRScheduler(t_in_epochs=False, warmup_prefix=True)`` per step.

    ``lr(s) = warmup_lr + s (base - warmup_lr) / W`` for ``s < W``, then
    ``min_lr + (base - min_lr)(1 + cos(pi (s - W) / (T - W))) / 2``.
    """
    cosine = optax.cosine_decay_schedule(
        base_lr,
        decay_steps=max(total_steps - warmup_steps, 1),
        alpha=min_lr / base_lr if base_lr > 0 else 0.0,
    )
    if warmup_steps <= 0:
        return cosine
    warmup = optax.linear_schedule(warmup_lr, base_lr, transition_steps=warmup_steps)
    return optax.join_schedules([warmup, cosine], boundaries=[warmup_steps])


def create_optimizer(
    config: ml_collections.ConfigDict, total_steps: int, warmup_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clip by global norm, then AdamW with the official mask and the scaled schedule.

    Learning rates are ``config.optim.{lr, warmup_lr, min_lr} * batch_size / 512``.
    """
    oc = config.optim
    scale = config.batch_size / oc.lr_batch_denominator
    schedule = lr_schedule(
        oc.lr * scale, oc.warmup_lr * scale, oc.min_lr * scale, warmup_steps, total_steps
    )
    parts = []
    if oc.clip_grad > 0:
        parts.append(optax.clip_by_global_norm(oc.clip_grad))
    parts.append(
        optax.adamw(
            schedule,
            b1=oc.b1,
            b2=oc.b2,
            eps=oc.eps,
            weight_decay=oc.weight_decay,
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts), schedule


# ---------------------------------------------------------------------------------------------
# Compiled functions
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Components:
    """The model's static parts and the jitted init / train / eval functions for one mesh."""

    graphdef: Any
    graphdef_eval: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any
    rngs_shardings: Any
    abstract_state: Any
    init: Callable[[], tuple[TrainState, Any]]
    train_step: Callable[[TrainState, Any, dict], tuple[TrainState, dict]]
    eval_step: Callable[[Any, Any, Any, dict], dict]
    mesh: jax.sharding.Mesh


def _train_metrics(loss, logits, targets, grads, params, lr) -> dict[str, jax.Array]:
    return {
        "train/loss": loss,
        "train/top1": 100.0
        * jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)).astype(jnp.float32),
        "train/grad_norm": optax.tree.norm(grads),
        "train/param_norm": optax.tree.norm(params),
        "train/lr": lr,
    }


def build_components(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    num_classes: int,
    total_steps: int,
    warmup_steps: int,
) -> Components:
    """Builds the model graph, optimizer and jitted step functions for ``mesh``.

    Args:
      config: the run's config.
      mesh: from :func:`train.sharding.make_mesh`.
      num_classes: K.
      total_steps, warmup_steps: for the learning-rate schedule.
    """
    build = model_builder(config, num_classes)
    tx, schedule = create_optimizer(config, total_steps, warmup_steps)
    ema_decay = float(config.ema_decay)
    ac = config.aug

    abstract_model = nnx.eval_shape(build)
    abstract_model.train()
    graphdef, _, _, _ = nnx.split(abstract_model, nnx.Param, nnx.RngState, ...)
    abstract_model.eval()
    graphdef_eval = nnx.graphdef(abstract_model)

    def init() -> tuple[TrainState, Any]:
        model = build()
        _, params, rngs_state, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
        ema = jax.tree.map(jnp.copy, params) if ema_decay > 0 else nnx.State({})
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=ema,
            model_state=rest,
            rng=jax.random.key_data(jax.random.key(config.seed + 2)),
        )
        return state, rngs_state

    abstract_state, abstract_rngs = jax.eval_shape(init)
    state_shardings = sharding.state_shardings(
        abstract_state, mesh, config.param_sharding, config.fsdp_min_size
    )
    state_shardings = state_shardings.replace(
        step=sharding.replicated(mesh), rng=sharding.replicated(mesh)
    )
    rngs_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract_rngs)
    batch_shard = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)

    def train_step(state: TrainState, rngs_state: Any, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_erase, k_mix, k_model = jax.random.split(key, 3)
        x = augment.normalize(batch["image"])
        x = augment.random_erasing(k_erase, x, ac.random_erasing)
        x, targets = augment.mixup_cutmix(
            k_mix,
            x,
            batch["label"],
            num_classes,
            mixup_alpha=ac.mixup,
            cutmix_alpha=ac.cutmix,
            switch_prob=ac.mixup_switch_prob,
            prob=ac.mixup_prob,
            label_smoothing=ac.label_smoothing,
        )

        def loss_fn(params):
            model = nnx.merge(graphdef, params, rngs_state, state.model_state, copy=True)
            nnx.reseed(model, dropout=k_model)
            logits = model(x)
            loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
            new_model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)[3]
            return loss, (logits, new_model_state)

        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema_decay > 0:
            ema = jax.tree.map(lambda e, p: e * ema_decay + p * (1.0 - ema_decay), ema, params)
        metrics = _train_metrics(loss, logits, targets, grads, params, schedule(state.step))
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
            model_state=model_state,
        )
        return new_state, metrics

    def eval_step(params: Any, model_state: Any, rngs_state: Any, batch: dict) -> dict:
        model = nnx.merge(graphdef_eval, params, rngs_state, model_state)
        logits = model(augment.normalize(batch["image"]))
        labels = batch["label"]
        mask = batch["mask"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        k = min(5, num_classes)
        _, top_k = jax.lax.top_k(logits, k)
        top1 = (top_k[:, 0] == labels).astype(jnp.float32)
        top5 = jnp.any(top_k == labels[:, None], axis=-1).astype(jnp.float32)
        return {
            "loss": jnp.sum(loss * mask),
            "top1": jnp.sum(top1 * mask),
            "top5": jnp.sum(top5 * mask),
            "count": jnp.sum(mask),
        }

    with jax.set_mesh(mesh):
        init_jit = jax.jit(init, out_shardings=(state_shardings, rngs_shardings))
        train_jit = jax.jit(
            train_step,
            in_shardings=(state_shardings, rngs_shardings, batch_shard),
            out_shardings=(state_shardings, repl),
            donate_argnums=(0,),
        )
        eval_jit = jax.jit(
            eval_step,
            in_shardings=(
                state_shardings.params,
                state_shardings.model_state,
                rngs_shardings,
                batch_shard,
            ),
            out_shardings=repl,
        )

    def in_mesh(fn):
        def wrapped(*args):
            with jax.set_mesh(mesh):
                return fn(*args)

        return wrapped

    return Components(
        graphdef=graphdef,
        graphdef_eval=graphdef_eval,
        tx=tx,
        schedule=schedule,
        state_shardings=state_shardings,
        rngs_shardings=rngs_shardings,
        abstract_state=checkpoint.abstract_with_shardings(abstract_state, state_shardings),
        init=in_mesh(init_jit),
        train_step=in_mesh(train_jit),
        eval_step=in_mesh(eval_jit),
        mesh=mesh,
    )


# ---------------------------------------------------------------------------------------------
# Loop helpers
# ---------------------------------------------------------------------------------------------


class _StopRequest:
    """Records SIGTERM / SIGINT so the loop can save and exit between steps.

    Only in a single process: with several processes JAX's preemption service (set up by
    ``jax.distributed.initialize``) owns SIGTERM and the loop asks it, through Orbax, for a step
    at which every host saves; a Python handler here would replace JAX's and let one host stop
    alone.
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> None:
        if jax.process_count() > 1:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # Not the main thread (e.g. some test runners).
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # A second Ctrl-C stops at once.
        self.signal = signum
        logging.warning("received signal %d: will save a checkpoint and exit", signum)


def evaluate(
    comps: Components,
    params: Any,
    model_state: Any,
    rngs_state: Any,
    eval_batches: Callable,
    prefix: str,
) -> tuple[dict[str, float], int]:
    """Runs the whole eval split; returns ({prefix/top1, prefix/top5, prefix/loss}, skipped)."""
    totals = None
    skipped = 0
    for batch in eval_batches():
        skipped += int(batch["skipped"].sum())
        out = comps.eval_step(
            params, model_state, rngs_state, sharding.host_to_global(batch, comps.mesh)
        )
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    metrics = {
        f"{prefix}/top1": 100.0 * float(totals["top1"]) / count,
        f"{prefix}/top5": 100.0 * float(totals["top5"]) / count,
        f"{prefix}/loss": float(totals["loss"]) / count,
    }
    return metrics, skipped


def _schedule_lengths(config, num_train: int) -> tuple[int, int, int]:
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{num_train} training images < batch_size {config.batch_size}")
    total = (
        config.total_steps
        if config.total_steps > 0
        else int(round(config.total_epochs * steps_per_epoch))
    )
    warmup = (
        config.warmup_steps
        if config.warmup_steps >= 0
        else int(round(config.warmup_epochs * steps_per_epoch))
    )
    return steps_per_epoch, total, min(warmup, total)


def _every(config_value: int, steps_per_epoch: int) -> int:
    """Config intervals: > 0 steps, 0 once per epoch."""
    return config_value if config_value > 0 else steps_per_epoch


def run_meta(config, num_classes: int) -> dict[str, Any]:
    """The run's identity stored with each checkpoint."""
    return {
        "model": config.model.name,
        "num_classes": num_classes,
        "img_size": config.data.img_size,
        "patch_size": config.model.patch_size or None,
        "batch_size": config.batch_size,
        "param_dtype": config.model.param_dtype,
        "process_count": jax.process_count(),
        "config": config.to_json(),
    }


def check_process_count(ckpt: checkpoint.Checkpointer, step: int) -> None:
    """Resuming needs as many processes as wrote checkpoint ``step`` (Grain's iterator
    position is saved per process); checkpoints older than this check pass.

    Raises:
      checkpoint.CheckpointMismatchError: naming both process counts.
    """
    saved = ckpt.read_meta(step).get("process_count", jax.process_count())
    if saved != jax.process_count():
        raise checkpoint.CheckpointMismatchError(
            f"{ckpt.step_path(step)} was written by {saved} processes and this run has "
            f"{jax.process_count()}: the data pipeline's position is saved per process, so "
            f"resume with {saved} processes. The train state itself restores on any number "
            "of devices and processes (docs/multihost.md). Nothing was changed."
        )


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config.model`` on ``config.data``, evaluating and checkpointing in ``workdir``.

    Resumes from the newest checkpoint in ``workdir`` if there is one. SIGTERM / SIGINT save
    a checkpoint of the current step and return (``summary["preempted"]`` is True).

    Args:
      config: see ``configs/default.py``.
      workdir: output directory (checkpoints, metrics.jsonl, tensorboard/, plots, summary).

    Returns:
      The final summary: step, eval metrics (model and EMA), best top-1, wall time, ...

    Raises:
      FloatingPointError: the loss became non-finite (names the step and the last good
        checkpoint).
      data.DatasetNotFoundError: the dataset is missing (names the path and how to provide it).
      checkpoint.CheckpointMismatchError: the workdir holds another run's checkpoints.
    """
    t_start = time.perf_counter()
    sharding.maybe_initialize_distributed(config.distributed)
    workdir = Path(workdir).expanduser().absolute()
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    mesh = sharding.make_mesh()  # Auto axis: the models are not written for Explicit mode.
    train_ds, eval_batches, info = data.create_datasets(
        config, process_index=jax.process_index(), process_count=jax.process_count()
    )
    num_classes = len(info.classes)
    steps_per_epoch, total_steps, warmup_steps = _schedule_lengths(config, info.num_train)
    eval_every = _every(config.eval_every_steps, steps_per_epoch)
    ckpt_every = _every(config.checkpoint_every_steps, steps_per_epoch)
    logging.info(
        "data: train %s, eval %s | %d devices (%d processes), global batch %d, %d steps/epoch, "
        "%d steps (%d warm-up)",
        info.train_source,
        info.eval_source,
        jax.device_count(),
        jax.process_count(),
        config.batch_size,
        steps_per_epoch,
        total_steps,
        warmup_steps,
    )
    if config.batch_size % jax.device_count():
        raise ValueError(
            f"batch_size={config.batch_size} is not divisible by {jax.device_count()} devices"
        )

    comps = build_components(config, mesh, num_classes, total_steps, warmup_steps)
    meta = run_meta(config, num_classes)
    ckpt = checkpoint.Checkpointer(
        workdir,
        max_to_keep=config.max_checkpoints,
        best_metric=config.best_metric or None,
        async_save=config.async_checkpointing,
    )
    train_iter = iter(train_ds)
    state, rngs_state = comps.init()
    start_step = 0
    latest = ckpt.latest_step()
    if latest is not None:
        checkpoint.log_checkpoints(ckpt)
        try:
            check_process_count(ckpt, latest)
            state = ckpt.restore(latest, comps.abstract_state, train_iter, meta, IDENTITY_KEYS)
        except Exception:
            ckpt.close()
            if hasattr(train_iter, "close"):
                train_iter.close()
            raise
        start_step = int(jax.device_get(state.step))
        logging.info("resumed from %s (step %d)", ckpt.step_path(latest), start_step)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    logging.info("model %s: %d parameters", config.model.name, n_params)

    reporter = report.Reporter(workdir, enabled=is_main, tensorboard=config.tensorboard)
    bar = report.ProgressBar(
        total_steps, config.batch_size, start_step, enabled=is_main and config.progress_bar
    )
    stop = _StopRequest()
    stop.install()
    summary: dict[str, Any] = {"model": config.model.name, "preempted": False}
    skipped_total = 0
    best = {"top1": -1.0, "step": -1}
    last_eval: dict[str, float] = {}
    log_buffer: list[dict[str, float]] = []
    pending: tuple[int, dict] | None = None
    t_log = time.perf_counter()

    def last_good() -> str:
        step = ckpt.latest_step()
        return f"{ckpt.step_path(step)} (step {step})" if step is not None else "none"

    def flush_pending() -> None:
        """Fetches the metrics of the last dispatched step; stops on a non-finite loss."""
        nonlocal pending
        if pending is None:
            return
        step, metrics = pending
        pending = None
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(host["train/loss"]):
            ckpt.wait_until_finished()
            raise FloatingPointError(
                f"non-finite loss {host['train/loss']} at step {step} (lr "
                f"{host['train/lr']:.3g}, grad norm {host['train/grad_norm']:.3g}); last good "
                f"checkpoint: {last_good()}. Nothing after it was saved; lower the learning "
                f"rate or use float32 and resume from it."
            )
        log_buffer.append(host)
        bar.update(step, host["train/loss"])

    def run_eval(step: int) -> dict[str, float]:
        nonlocal skipped_total
        metrics, skipped = evaluate(
            comps, state.params, state.model_state, rngs_state, eval_batches, "eval"
        )
        skipped_total += skipped
        if config.ema_decay > 0:
            ema_metrics, _ = evaluate(
                comps, state.ema_params, state.model_state, rngs_state, eval_batches, "eval_ema"
            )
            metrics.update(ema_metrics)
        top1 = max(metrics["eval/top1"], metrics.get("eval_ema/top1", -1.0))
        if top1 > best["top1"]:
            best.update(top1=top1, step=step)
        reporter.write(step, metrics)
        logging.info(
            "step %d eval: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        )
        return metrics

    def save(step: int, metrics: dict | None = None) -> None:
        if ckpt.save(step, state, train_iter, meta, metrics):
            logging.info("saving checkpoint %s", ckpt.step_path(step))

    try:
        step = start_step
        while step < total_steps and stop.signal is None:
            batch = next(train_iter)
            skipped_total += int(batch["skipped"].sum())
            batch = sharding.host_to_global({k: batch[k] for k in ("image", "label")}, comps.mesh)
            state, metrics = comps.train_step(state, rngs_state, batch)
            flush_pending()
            step += 1
            pending = (step, metrics)
            if jax.process_count() > 1 and ckpt.reached_preemption(step):
                stop.signal = signal.SIGTERM
            if step % config.log_every_steps == 0 or step == total_steps:
                flush_pending()
                now = time.perf_counter()
                averaged = {k: float(np.mean([m[k] for m in log_buffer])) for k in log_buffer[0]}
                averaged["train/img_per_s"] = (
                    len(log_buffer) * config.batch_size / max(now - t_log, 1e-9)
                )
                averaged["train/epoch"] = step / steps_per_epoch
                averaged["data/skipped_images"] = skipped_total
                reporter.write(step, averaged)
                log_buffer.clear()
                t_log = now
            if step % eval_every == 0 or step == total_steps:
                flush_pending()
                last_eval = run_eval(step)
                save(
                    step,
                    {config.best_metric: last_eval[config.best_metric]}
                    if config.best_metric
                    else None,
                )
            elif step % ckpt_every == 0:
                flush_pending()
                save(step)
        flush_pending()
        if stop.signal is not None:
            save(step)
            ckpt.wait_until_finished()
            logging.warning(
                "stopped by signal %d at step %d; checkpoint %s",
                stop.signal,
                step,
                ckpt.step_path(step),
            )
            summary.update(preempted=True, checkpoint=str(ckpt.step_path(step)))
        elif not last_eval:  # Resumed at or after the end: evaluate the restored state.
            last_eval = run_eval(step)
    finally:
        stop.uninstall()
        if hasattr(train_iter, "close"):  # Stops Grain worker processes.
            train_iter.close()
        bar.close()
        ckpt.close()
        reporter.close()

    summary.update(step=step, wall_s=time.perf_counter() - t_start, skipped_images=skipped_total)
    summary.update(last_eval)
    if best["step"] >= 0:
        summary.update({"best/top1": best["top1"], "best/step": best["step"]})
    summary["num_params"] = n_params
    if is_main and not summary["preempted"]:
        summary["plots"] = [str(p) for p in report.make_plots(workdir, steps_per_epoch)]
    report.write_summary(workdir, summary, enabled=is_main)
    return summary
