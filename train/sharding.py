"""One device mesh over all devices of all hosts, the shardings that go with it, and the
multi-host start-up (``jax.distributed.initialize``).

The mesh has a single axis, ``data``, over every device. Batches are split along it; parameters
(and optimizer state and EMA) are either replicated (``param_sharding="replicated"``, plain data
parallelism) or FSDP-sharded on the same axis (``param_sharding="fsdp"``: each array's largest
dimension divisible by the device count is split, arrays smaller than ``fsdp_min_size``
elements stay replicated). XLA's SPMD partitioner inserts the all-gathers and
reduce-scatters; the training code is the same in every case.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
PARAM_SHARDINGS = ("replicated", "fsdp")
_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _multi_process_requested() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return any(int(os.environ.get(name, "1")) > 1 for name in _CLUSTER_ENV)


def _distributed_mode(mode: str | bool) -> str | bool:
    """``config.distributed`` -> "auto", True or False (a command line gives strings)."""
    if isinstance(mode, bool):
        return mode
    text = str(mode).strip().lower()
    if text in ("auto", ""):
        return "auto"
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"distributed={mode!r}; expected 'auto', True or False")


def maybe_initialize_distributed(mode: str | bool = "auto") -> bool:
    """Calls ``jax.distributed.initialize()`` when this is one of several processes.

    Args:
      mode: "auto" initialises when the environment names a coordinator
        (``JAX_COORDINATOR_ADDRESS``, with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``) or a
        multi-task SLURM / Open MPI launch, which ``jax.distributed.initialize`` detects by
        itself; True always initialises; False never does. The strings "True" / "False"
        (what ``--config.distributed=False`` gives) count as the booleans.

    Returns:
      True if JAX runs as several processes now.
    """
    mode = _distributed_mode(mode)
    if mode == "auto":
        mode = _multi_process_requested()
    if not mode:
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs: dict[str, Any] = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    # CPU processes (tests, CPU clusters) need a collectives backend; GPUs use NCCL regardless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def make_mesh(devices: list | None = None, axis_type: str = "auto") -> jax.sharding.Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: every device of every host).

    Args:
      devices: the devices, or None for ``jax.devices()``.
      axis_type: "auto" (XLA picks the layouts of intermediates; what the trainer uses) or
        "explicit" (sharding in types, the jax >= 0.9 default, which the models do not
        support yet: e.g. concatenating a replicated class token to a sharded batch fails);
        passed explicitly either way.
    """
    devices = list(jax.devices() if devices is None else devices)
    kinds = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
    if axis_type not in kinds:
        raise ValueError(f"axis_type={axis_type!r}; expected one of {sorted(kinds)}")
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(kinds[axis_type],), devices=devices
    )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Axis 0 split over ``data``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int) -> P:
    """PartitionSpec splitting the largest dimension of ``shape`` divisible by ``num_shards``.

    Arrays with fewer than ``min_size`` elements, or no such dimension, stay replicated.
    """
    if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % num_shards == 0:
            spec = [None] * len(shape)
            spec[dim] = DATA_AXIS
            return P(*spec)
    return P()


def state_shardings(
    abstract_state: Any,
    mesh: jax.sharding.Mesh,
    mode: str = "replicated",
    fsdp_min_size: int = 2**14,
) -> Any:
    """NamedShardings for every array of ``abstract_state`` (a pytree of ShapeDtypeStructs).

    Args:
      abstract_state: pytree of arrays or ``jax.ShapeDtypeStruct``.
      mesh: from :func:`make_mesh`.
      mode: "replicated" or "fsdp".
      fsdp_min_size: arrays smaller than this stay replicated under FSDP.
    """
    if mode not in PARAM_SHARDINGS:
        raise ValueError(f"param_sharding={mode!r}; expected one of {PARAM_SHARDINGS}")
    n = mesh.shape[DATA_AXIS]

    def sharding(x) -> NamedSharding:
        if mode == "replicated" or not hasattr(x, "shape"):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, fsdp_spec(tuple(x.shape), n, fsdp_min_size))

    return jax.tree.map(sharding, abstract_state)


def host_to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Per-host NumPy batch -> global ``jax.Array``s sharded on ``data`` along axis 0.

    With several processes each host passes its own rows; the global batch is their
    concatenation in process order (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
