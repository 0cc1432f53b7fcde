"""Where `invnet.fit`'s arrays live: one device, or data parallel over a mesh.

Moved from ``invnet/train.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from invnet.parallel import AXIS, data_mesh, replicate, to_host


class Placement:
    """Where arrays live. Single device: where JAX puts them; nothing moves."""

    devices = 1
    max_in_flight: int | None = None  # training steps dispatched ahead at most (None: all)

    def data(self, tree):  # the training and validation arrays
        return tree

    def state(self, tree):  # parameters, optimizer state, buffers, per-epoch order and keys
        return tree

    def batch(self, tree):  # inside the jitted step: the (batch, ...) arrays
        return tree

    def host(self, tree):  # results to read back or keep in the model
        return tree


class MeshPlacement(Placement):
    """Data parallel over the ``"data"`` axis of ``mesh``.

    Every batch is split along its batch axis (``NamedSharding(mesh, P("data"))`` on the
    ``(batch, ...)`` arrays, a sharding constraint inside the jitted step); everything else
    is replicated. The training set itself is replicated, so each
    device gathers its own rows of each shuffled batch without communication; the gradient
    mean over the batch becomes an all-reduce that XLA inserts.
    """

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.devices = mesh.shape[AXIS]
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(AXIS))
        # XLA's CPU all-reduce between devices of one process can deadlock (and abort the
        # process after 40 s) when many steps are queued: seen with jax 0.10.2 on 2 cores
        # with 32 small steps in flight, never with up to 8. Two keep the next step's
        # dispatch overlapping the current one's work.
        if any(d.platform == "cpu" for d in mesh.devices.flat):
            self.max_in_flight = 2

    def data(self, tree):
        return replicate(tree, self.mesh)

    def state(self, tree):
        return replicate(tree, self.mesh)

    def batch(self, tree):
        return jax.lax.with_sharding_constraint(tree, self.batch_sharding)

    def host(self, tree):
        # one copy in this process, back on the default device, uncommitted
        return jax.tree.map(jnp.asarray, to_host(tree))


def placement_for(mesh) -> Placement:
    if mesh is None:
        return Placement()
    if isinstance(mesh, str):
        if mesh != "all":
            raise ValueError(f'invnet.fit: mesh must be None, "all" or a jax Mesh, got {mesh!r}')
        mesh = data_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(f"invnet.fit: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if AXIS not in mesh.axis_names:
        raise ValueError(
            f"invnet.fit: the mesh has axes {mesh.axis_names}, none named {AXIS!r}; "
            "build it with invnet.data_mesh()"
        )
    return MeshPlacement(mesh)
