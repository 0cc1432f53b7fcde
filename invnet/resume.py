"""Resumable `invnet.fit` checkpoints: everything a run needs to go on exactly where it was.

A checkpoint written by `invnet.fit` is an ordinary `invnet.save` file (the model can be
loaded by `invnet.load` alone) that also carries the training state:

=========================  ==========================================================
where                      what
=========================  ==========================================================
``metadata["fit"]``        ``next_epoch``; the `History` so far; epochs without
                           improvement (early stopping); batch size, shuffle, row
                           counts and a sha256 fingerprint of the training and
                           validation arrays; the PRNG key implementation
``extra_arrays``           ``fit/opt_state/NNNNN``: the optimizer state's leaves;
                           ``fit/key``, ``fit/val_key``: the key data;
                           ``fit/params/NNNNN``: the loop's parameters when the file's
                           model holds others (``last.invnet`` after ``restore_best``);
                           ``fit/best/NNNNN``: the best-validation parameters
=========================  ==========================================================

Leaves are stored in ``jax.tree.leaves`` order and put back into the structure of
``optimizer.init(params)`` (resp. the model's parameters), with every count, shape and dtype
checked: nothing in the file decides what gets built. Resuming runs the remaining epochs
with the restored keys, so the data order and the per-step keys are those of the
uninterrupted run, and on one device the final parameters are bitwise the same.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

from invnet.core import Bijector
from invnet.io import read_file

STATE_VERSION = 1
_PREFIX = "fit/"


def fingerprint(*trees: dict[str, Any] | None) -> str:
    """sha256 over names, dtypes, shapes and bytes of the arrays of the given dicts."""
    h = hashlib.sha256()
    for tree in trees:
        h.update(b"|")
        for name in sorted(tree or {}):
            a = np.asarray(tree[name])
            h.update(f"{name}:{a.dtype.name}:{a.shape};".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _leaves(prefix: str, tree) -> dict[str, np.ndarray]:
    leaves = jax.tree.leaves(tree)
    return {f"{_PREFIX}{prefix}/{i:05d}": np.asarray(a) for i, a in enumerate(leaves)}


def pack(
    *,
    opt_state,
    key: jax.Array,
    val_key: jax.Array,
    loop_params=None,
    best_params=None,
) -> dict[str, np.ndarray]:
    """The ``extra_arrays`` of a fit checkpoint (arrays already on the host)."""
    arrays = _leaves("opt_state", opt_state)
    arrays[f"{_PREFIX}key"] = np.asarray(jax.random.key_data(key))
    arrays[f"{_PREFIX}val_key"] = np.asarray(jax.random.key_data(val_key))
    if loop_params is not None:
        arrays.update(_leaves("params", loop_params))
    if best_params is not None:
        arrays.update(_leaves("best", best_params))
    return arrays


def _unflatten(arrays: dict[str, np.ndarray], prefix: str, like, path, what: str):
    names = sorted(k for k in arrays if k.startswith(f"{_PREFIX}{prefix}/"))
    ref, treedef = jax.tree.flatten(like)
    if len(names) != len(ref):
        raise ValueError(
            f"invnet.fit: {path} holds {len(names)} {what} arrays, this run has {len(ref)}; "
            "resume with the same model and the same kind of optimizer"
        )
    leaves = []
    for name, r in zip(names, ref, strict=True):
        a = arrays[name]
        if a.shape != np.shape(r) or a.dtype != np.asarray(r).dtype:
            raise ValueError(
                f"invnet.fit: {path}: {what} array {name} is {a.shape} {a.dtype}, this run "
                f"expects {np.shape(r)} {np.asarray(r).dtype}"
            )
        leaves.append(jax.numpy.asarray(a))
    return jax.tree.unflatten(treedef, leaves)


class Checkpoint:
    """A fit checkpoint read once (one checksum pass) and checked against the run."""

    def __init__(self, path):
        self.path = path
        saved = read_file(path)  # every integrity check; nothing built yet
        meta = saved.metadata
        state = meta.get("fit") if isinstance(meta, dict) else None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"invnet.fit: {path} is not a resumable fit checkpoint (no training state "
                f"version {STATE_VERSION}); write one with invnet.fit(..., checkpoints=...)"
            )
        required = {"next_epoch": int, "bad_epochs": int, "has_best": bool, "key_impl": str}
        for name, kind in required.items():
            if not isinstance(state.get(name), kind):
                raise ValueError(f"invnet.fit: {path} has a malformed training state ({name})")
        self.state = state
        self.model = saved.build()
        self.arrays = saved.extra_arrays

    def check_run(self, model: Bijector, *, batch_size, shuffle, data_sha256) -> None:
        if self.model.to_spec() != model.to_spec():
            raise ValueError(
                f"invnet.fit: {self.path} holds a different architecture than the model "
                "being trained; resume with the model the checkpoint was written for"
            )
        for name, now in (("batch_size", batch_size), ("shuffle", shuffle)):
            if self.state.get(name) != now:
                raise ValueError(
                    f"invnet.fit: {self.path} was written with {name}={self.state.get(name)!r}, "
                    f"this run has {name}={now!r}; resuming needs the same data order"
                )
        if self.state.get("data_sha256") != data_sha256:
            raise ValueError(
                f"invnet.fit: {self.path} was written for other training/validation data "
                "(fingerprint mismatch); resume with the same x, y, cond, validation data and "
                "key (the key decides the val_fraction split)"
            )

    def history(self, fields: set[str], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The saved `History` fields; ``optional`` ones may be missing (older files)."""
        saved = self.state.get("history")
        if not isinstance(saved, dict) or not fields - optional <= set(saved) <= fields:
            raise ValueError(f"invnet.fit: {self.path} has a malformed training history")
        return saved

    def key(self, name: str) -> jax.Array:
        return jax.random.wrap_key_data(
            jax.numpy.asarray(self.arrays[f"{_PREFIX}{name}"]), impl=self.state["key_impl"]
        )

    def opt_state(self, like):
        return _unflatten(self.arrays, "opt_state", like, self.path, "optimizer state")

    def params(self, which: str, like):
        """``which`` = ``"params"`` (loop) or ``"best"``; ``None`` when not stored."""
        if not any(k.startswith(f"{_PREFIX}{which}/") for k in self.arrays):
            return None
        return _unflatten(self.arrays, which, like, self.path, f"{which} parameter")
