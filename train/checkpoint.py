"""Orbax checkpoints of the whole training state and the Grain iterator position.

One ``orbax.checkpoint.CheckpointManager`` (V0 API with ``args=``) in ``<workdir>/checkpoints``.
Each step directory holds three items:

* ``state``: the train state pytree (step, params, optimizer state, EMA params, other model
  variables, RNG key data), restored with the shardings of the current mesh, so a checkpoint
  written on N devices restores on M;
* ``data``: the Grain iterator state (one file per process);
* ``meta``: JSON with the run's identity (model, classes, image size, ...), checked on resume
  so that a workdir is never resumed by, or overwritten with, a different model.

Keeps the last ``max_to_keep`` checkpoints plus the best one by an eval metric. Saving is
asynchronous; writes are atomic (Orbax finalises a step directory only when complete), so a
kill at any moment leaves the previous checkpoints intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

STEP_DIR = "checkpoints"


class CheckpointMismatchError(ValueError):
    """The workdir holds checkpoints of a different run."""


class Checkpointer:
    """Saves and restores (train state, data iterator, run identity) in ``<workdir>/checkpoints``.

    Args:
      workdir: the run's directory.
      max_to_keep: the newest checkpoints kept.
      best_metric: metrics key ranking checkpoints (e.g. "eval/top1"); the best one is kept
        besides the newest. None keeps only the newest.
      async_save: write in a background thread.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        max_to_keep: int = 3,
        best_metric: str | None = "eval/top1",
        async_save: bool = True,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep}; expected >= 1")
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        if best_metric:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[best_metric],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        )
        self.directory = Path(workdir).expanduser().absolute() / STEP_DIR
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all finished checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def step_path(self, step: int) -> Path:
        """Directory of the checkpoint of ``step``."""
        return self.directory / str(step)

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: grain.DatasetIterator | None,
        meta: dict[str, Any],
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Starts saving a checkpoint of ``step`` (returns before the write ends if async).

        Args:
          step: the number of optimizer steps done.
          state: the train state pytree.
          data_iterator: the Grain iterator positioned after the last consumed batch.
          meta: JSON-serialisable identity of the run.
          metrics: eval metrics of this step (for keeping the best checkpoint).

        Returns:
          True if a checkpoint was started (False if this step is already saved).
        """
        if step in self._manager.all_steps():
            return False
        items = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave(meta),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self._manager.save(
            step, args=ocp.args.Composite(**items), metrics=metrics, force=True
        )
        return bool(saved)

    def reached_preemption(self, step: int) -> bool:
        """True when JAX's multi-host preemption sync point is reached (all hosts agree)."""
        return self._manager.reached_preemption(step)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` item of checkpoint ``step``."""
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def restore(
        self,
        step: int,
        abstract_state: Any,
        data_iterator: grain.DatasetIterator | None,
        meta: dict[str, Any],
        identity_keys: tuple[str, ...],
    ) -> Any:
        """Restores checkpoint ``step`` into ``abstract_state``'s shapes and shardings.

        The data iterator's position is restored in place.

        Args:
          step: which checkpoint.
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings.
          data_iterator: iterator to reposition, or None.
          meta: the current run's identity.
          identity_keys: keys of ``meta`` that must equal the checkpoint's.

        Raises:
          CheckpointMismatchError: the checkpoint belongs to a different run.
        """
        saved_meta = self.read_meta(step)
        diffs = {
            k: (saved_meta.get(k), meta.get(k))
            for k in identity_keys
            if saved_meta.get(k) != meta.get(k)
        }
        if diffs:
            detail = ", ".join(
                f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items()
            )
            raise CheckpointMismatchError(
                f"{self.step_path(step)} was written by a different run ({detail}). "
                "Nothing was changed. Use another --workdir, or restore the original config."
            )
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return out.state

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``state`` carrying ``shardings`` (the restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def log_checkpoints(checkpointer: Checkpointer) -> None:
    """Logs the checkpoints present (used when resuming)."""
    steps = checkpointer.all_steps()
    if steps:
        logging.info("checkpoints in %s: steps %s", checkpointer.directory, steps)
