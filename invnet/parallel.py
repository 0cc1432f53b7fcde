"""Data parallelism on JAX's own sharding: batch split along a ``"data"`` mesh axis,
parameters replicated; XLA inserts the gradient all-reduce. No home-made communication.

`invnet.fit` takes the mesh: ``invnet.fit(model, x, mesh=invnet.data_mesh())`` (or
``mesh="all"``) shards every batch along the ``"data"`` axis and replicates the parameters
and optimizer state (the batch size must be a multiple of the device count). The helpers
below are the same placement for hand-written loops.

Single host: ``mesh = invnet.data_mesh()`` uses every local device. Several processes
(one per GPU node, or several on one machine): call ``jax.distributed.initialize(...)`` in
every process first (coordinator address, process count and id come from the cluster
environment or arguments; on CPU also ``jax.config.update(
"jax_cpu_collectives_implementation", "gloo")``), then ``invnet.data_mesh()`` spans every
device of every process. With `fit`, every process passes the same arrays and key: each
process places its own copy on its own devices (`replicate` builds the global array from
the process-local data, nothing is sent), each device computes its slice of each batch,
results are read back from the local replica (`to_host`), and process 0 writes the
checkpoints. ``tests/test_multiprocess.py`` runs this with 2 processes of 2 CPU devices
each and checks it against 1 process of 4 devices. In a hand-written loop each process
feeds its own slice of the global batch to `shard_batch`
(``jax.make_array_from_process_local_data``).

On a CPU-only machine, ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before
jax is imported) gives 4 devices to try it with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["data_mesh", "shard_batch", "replicate", "to_host"]

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


def _place(a, sharding: NamedSharding):
    """``a`` (the same value in every process) as a global array with ``sharding``."""
    if sharding.is_fully_addressable:  # one process: a plain transfer
        return jax.device_put(a, sharding)
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):  # keys travel as their data
        impl = jax.random.key_impl(a)
        return jax.random.wrap_key_data(_place(jax.random.key_data(a), sharding), impl=impl)
    host = np.asarray(jax.device_get(a))
    # each process builds its own devices' shards from its own copy: no communication
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` (parameters, optimizer state) on all devices of ``mesh``.

    With several processes every process must pass the same values (e.g. the same data and
    seed); each one fills its own devices' copies.
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda a: _place(a, sharding), tree)


def _host_one(a) -> np.ndarray:
    if not isinstance(a, jax.Array) or a.is_fully_addressable:
        return np.asarray(a)
    if a.is_fully_replicated:  # every process holds the whole value: read a local copy
        return np.asarray(a.addressable_data(0))
    # sharded over several processes: a collective, so every process must call it
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def to_host(tree: Any) -> Any:
    """Every array of ``tree`` as a numpy array in this process.

    Replicated arrays are read from a local copy (no communication, so one process may call
    it alone, e.g. to write a checkpoint); an array sharded across processes is gathered,
    which every process must then call together.
    """
    return jax.tree.map(_host_one, tree)
