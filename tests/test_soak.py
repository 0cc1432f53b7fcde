"""Soak: a coupling flow trained for 20,000 optimizer steps never takes a non-finite step.

Marked ``slow`` (deselected by default): ``python -m pytest -m slow tests/test_soak.py -s``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import invnet
from invnet.demo import build_flow, moons

STEPS, BATCH, EPOCHS = 20_000, 128, 100


@pytest.mark.slow
def test_twenty_thousand_steps_without_a_nonfinite_step(tmp_path):
    steps_per_epoch = STEPS // EPOCHS
    x = moons(BATCH * steps_per_epoch, seed=0)
    x_val = moons(2048, seed=1)
    flow = build_flow(blocks=8, hidden=64, seed=0)
    history = invnet.fit(
        flow, x, validation={"x": x_val}, epochs=EPOCHS, batch_size=BATCH, learning_rate=2e-3,
        checkpoints=invnet.Checkpoints(tmp_path, every=25), progress=False,
    )  # fmt: skip
    print(
        f"\nsoak: {history.steps} steps in {history.seconds:.1f} s; non-finite steps "
        f"{history.nonfinite_steps}; train NLL {history.train_loss[0]:.4f} -> "
        f"{history.train_loss[-1]:.4f}; val NLL {history.val_loss[0]:.4f} -> "
        f"{history.val_loss[-1]:.4f} (best {history.best_loss:.4f} at epoch {history.best_epoch})"
    )
    assert history.steps == STEPS and history.epochs == EPOCHS
    assert history.nonfinite_steps == 0 and history.nonfinite_at == []
    assert history.stop_reason == "epochs"
    assert np.all(np.isfinite(history.train_loss)) and np.all(np.isfinite(history.val_loss))
    # the loss went down: by a clear margin, and the late epochs beat the early ones
    assert history.val_loss[-1] < history.val_loss[0] - 0.5
    assert np.mean(history.train_loss[-10:]) < np.mean(history.train_loss[:10])
    for leaf in jax.tree.leaves(nnx.state(flow)):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert bool(jnp.all(jnp.isfinite(flow.log_prob(jnp.asarray(x_val)))))
    # the periodic checkpoints stayed loadable throughout
    assert len(history.checkpoints) == EPOCHS // 25 + 1
    for path in history.checkpoints:
        invnet.load(path)
