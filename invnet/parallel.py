"""Data parallelism on JAX's own sharding: batch split along a ``"data"`` mesh axis,
parameters replicated; XLA inserts the gradient all-reduce. No home-made communication.

`invnet.fit` takes the mesh: ``invnet.fit(model, x, mesh=invnet.data_mesh())`` (or
``mesh="all"``) shards every batch along the ``"data"`` axis and replicates the parameters
and optimizer state (the batch size must be a multiple of the device count). The helpers
below are the same placement for hand-written loops.

Single host: ``mesh = invnet.data_mesh()`` uses every local device. Multi-host (several
processes, e.g. one per GPU node): call ``jax.distributed.initialize()`` in every process
first (coordinator address, process count and id come from the cluster environment or
arguments), then ``invnet.data_mesh()`` spans every device of every process. With `fit`,
every process passes the same arrays and key (they are replicated; each device computes its
slice of each batch) and process 0 writes the checkpoints. In a hand-written loop each
process feeds its own slice of the global batch (``jax.make_array_from_process_local_data``
is what `shard_batch` uses when ``jax.process_count() > 1``). Multi-host runs are written
for but not tested here (one machine).

On a CPU-only machine, ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before
jax is imported) gives 4 devices to try it with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["data_mesh", "shard_batch", "replicate"]

AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices; an int takes
    the first that many)."""
    if devices is None:
        devs = jax.devices()
    elif isinstance(devices, int):
        avail = jax.devices()
        if not 1 <= devices <= len(avail):
            raise ValueError(f"data_mesh: asked for {devices} devices, {len(avail)} available")
        devs = avail[:devices]
    else:
        devs = list(devices)
    return Mesh(np.asarray(devs), (AXIS,))


def _check_divisible(n: int, mesh: Mesh) -> None:
    size = mesh.shape[AXIS]
    if n % size:
        raise ValueError(
            f"batch size {n} is not divisible by the {size} devices of the data mesh; "
            f"use a batch size that is a multiple of {size}"
        )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place every array of ``batch`` (a pytree) split along its first axis over ``mesh``."""
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))

    def put(a):
        if a is None:
            return None
        if jax.process_count() > 1:  # pragma: no cover - multi-host only
            return jax.make_array_from_process_local_data(sharding, np.asarray(a))
        _check_divisible(a.shape[0], mesh)
        return jax.device_put(a, sharding)

    return jax.tree.map(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` (parameters, optimizer state) on all devices of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
