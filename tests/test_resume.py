"""Resuming `invnet.fit` from its checkpoints reproduces the uninterrupted run exactly."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from test_checkpoint import _repack

import invnet
import invnet.io
import invnet.resume
import invnet.train
from invnet.demo import moons

EPOCHS, CRASH_AFTER = 6, 2


class _ProcessDied(BaseException):
    """A crash that ends the process on the spot (a Ctrl-C, by contrast, writes last.invnet)."""


def _flow(seed=0):
    # ActNorm: a buffer (its `initialized` flag) besides the parameters
    rngs = nnx.Rngs(seed)
    return invnet.Flow(
        invnet.Sequential(
            invnet.ActNorm(2),
            invnet.AffineCoupling(2, hidden=(8,), rngs=rngs),
            invnet.Permute(2, mode="reverse"),
            invnet.AffineCoupling(2, hidden=(8,), rngs=rngs),
        )
    )


def _state(model):
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model))]


def _comparable(history):
    skip = {"seconds", "epoch_seconds", "compile_seconds", "checkpoints"}
    return {k: v for k, v in dataclasses.asdict(history).items() if k not in skip}


def _run(model, tmp, **kw):
    args = dict(
        validation=0.25, epochs=EPOCHS, batch_size=16, key=4, learning_rate=3e-2,
        checkpoints=invnet.Checkpoints(tmp, every=1, save_best=True), progress=False,
        optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-2)),
    )  # fmt: skip
    args.update(kw)
    return invnet.fit(model, moons(96, seed=0), **args)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    flow = _flow()
    history = _run(flow, tmp)
    return flow, history, tmp


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(
    uninterrupted, tmp_path, monkeypatch
):
    flow, history, _ = uninterrupted
    # the interrupted run: the process "dies" right after writing epoch CRASH_AFTER's file
    real_save = invnet.train.save

    def save_then_crash(model, path, **kw):
        out = real_save(model, path, **kw)
        if path.name == f"epoch_{CRASH_AFTER:04d}.invnet":
            raise _ProcessDied("simulated crash")
        return out

    monkeypatch.setattr(invnet.train, "save", save_then_crash)
    with pytest.raises(_ProcessDied):
        _run(_flow(), tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "last.invnet").exists()

    # resume into a differently initialised model: everything must come from the file
    resumed = _flow(seed=42)
    again = _run(resumed, tmp_path, resume_from=tmp_path / f"epoch_{CRASH_AFTER:04d}.invnet")
    # bitwise: same data order, same keys, same optimizer state (CPU, float32)
    for a, b in zip(_state(resumed), _state(flow), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _comparable(again) == _comparable(history)
    assert again.epochs == EPOCHS and len(again.val_loss) == EPOCHS
    assert history.best_epoch is not None and history.best_epoch < EPOCHS - 1  # restore_best used
    for name in ("last.invnet", f"epoch_{EPOCHS:04d}.invnet"):
        full = invnet.load(uninterrupted[2] / name)
        for a, b in zip(_state(invnet.load(tmp_path / name)), _state(full), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.extended  # the tests around it resume from last and from an epoch file
def test_resume_from_last_continues_training(uninterrupted, tmp_path):
    # last.invnet's model holds the restored best parameters; the loop goes on from the
    # last ones (stored beside them), exactly as a longer uninterrupted run would
    _, history, full_dir = uninterrupted
    more = _flow(seed=1)
    extended = _run(more, tmp_path / "a", epochs=EPOCHS + 2, resume_from=full_dir / "last.invnet")
    longer = _flow()
    reference = _run(longer, tmp_path / "b", epochs=EPOCHS + 2)
    assert extended.train_loss[:EPOCHS] == history.train_loss
    assert _comparable(extended) == _comparable(reference)
    for a, b in zip(_state(more), _state(longer), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_from_last_when_its_best_epoch_was_the_last_one(tmp_path):
    """With ``key=3`` the best validation loss falls in the last epoch, so ``last.invnet``
    stores the best parameters once, as the loop's. A resumed run used to take the model's
    own (split) state for them, which later checkpoint writes overwrote: it ended at its
    last parameters instead of the best ones."""
    first = _run(_flow(), tmp_path / "first", key=3)
    assert first.best_epoch == EPOCHS - 1
    more = _flow(seed=1)
    extended = _run(more, tmp_path / "a", key=3, epochs=EPOCHS + 2,
                    resume_from=tmp_path / "first" / "last.invnet")  # fmt: skip
    longer = _flow()
    reference = _run(longer, tmp_path / "b", key=3, epochs=EPOCHS + 2)
    assert _comparable(extended) == _comparable(reference)
    assert reference.best_epoch < EPOCHS + 1  # the run ends on its restored best
    for a, b in zip(_state(more), _state(longer), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_refuses_a_different_run(uninterrupted, tmp_path):
    _, _, full_dir = uninterrupted
    path = full_dir / "epoch_0002.invnet"
    with pytest.raises(ValueError, match="other training/validation data"):
        invnet.fit(_flow(), moons(96, seed=5), validation=0.25, batch_size=16, key=3,
                   resume_from=path, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="batch_size"):
        _run(_flow(), tmp_path, batch_size=8, resume_from=path)
    with pytest.raises(ValueError, match="optimizer state"):
        _run(_flow(), tmp_path, optimizer=optax.sgd(0.1), resume_from=path)
    wider = invnet.Flow(invnet.AffineCoupling(2, hidden=(16,), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="different architecture"):
        _run(wider, tmp_path, resume_from=path)
    plain = invnet.save(_flow(), tmp_path / "plain.invnet")
    with pytest.raises(ValueError, match="not a resumable fit checkpoint"):
        _run(_flow(), tmp_path, resume_from=plain)


def test_extra_arrays_round_trip_and_pass_the_same_checks(tmp_path):
    model = _flow()
    extra = {"a": np.arange(3, dtype=np.int32), "b/c": np.ones((2, 2), np.float32)}
    path = invnet.save(model, tmp_path / "m.invnet", extra_arrays=extra)
    got = invnet.read_extra_arrays(path)
    assert set(got) == {"a", "b/c"}
    np.testing.assert_array_equal(got["b/c"], extra["b/c"])
    assert invnet.read_extra_arrays(invnet.save(model, tmp_path / "none.invnet")) == {}
    # extra arrays pass the same checks as the model's: dtype, checksum
    _repack(path, lambda t, m: t.update({"extra/x": np.zeros(1, np.complex64)}))
    with pytest.raises(ValueError, match="unsupported dtype"):
        invnet.read_extra_arrays(path)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF  # the last byte of the last tensor
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum mismatch"):
        invnet.read_extra_arrays(path)


def test_resume_reads_files_through_public_io_only():
    # invnet.resume builds on invnet.io's public reader, not on its private helpers
    tree = ast.parse(Path(invnet.resume.__file__).read_text())
    names = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "invnet.io"
        for alias in node.names
    ]
    assert names and all(name in invnet.io.__all__ for name in names), names
