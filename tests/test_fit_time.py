"""A user's time and work in `invnet.fit`: compile once, say so, keep the work on Ctrl-C,
refuse slips in its arguments. (Compile *times* are measured in benchmarks/first_epoch.py.)
"""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import invnet
from invnet.demo import moons


def _tiny_flow(seed=0):
    return invnet.Flow(invnet.AffineCoupling(2, hidden=(8,), rngs=nnx.Rngs(seed)))


def _params(model):
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _counting_objective(traces):
    def objective(model, batch, key):  # runs in Python only while jax traces it
        traces.append(1)
        return -jnp.mean(model.log_prob(batch["x"]))

    return objective


def test_a_new_learning_rate_reuses_the_compiled_step():
    traces = []
    objective = _counting_objective(traces)
    x = moons(64, seed=0)
    kw = dict(objective=objective, epochs=1, batch_size=16, progress=False)
    invnet.fit(_tiny_flow(), x, learning_rate=1e-3, **kw)
    first = len(traces)
    flow = _tiny_flow()
    before = _params(flow)
    invnet.fit(flow, x, learning_rate=2e-2, **kw)  # the default adam: nothing retraced
    assert len(traces) == first
    # and the new rate is the one used: a bigger rate moves the parameters further
    slow = _tiny_flow()
    invnet.fit(slow, x, learning_rate=1e-4, **kw)
    far = max(np.abs(a - b).max() for a, b in zip(_params(flow), before, strict=True))
    near = max(np.abs(a - b).max() for a, b in zip(_params(slow), before, strict=True))
    assert far > 10 * near > 0


def test_the_learning_rate_trains_as_plain_adam_did():
    # the rate in the optimizer state gives the same parameters as optax.adam(rate)
    x = moons(64, seed=0)
    a, b = _tiny_flow(), _tiny_flow()
    kw = dict(epochs=2, batch_size=16, progress=False)
    invnet.fit(a, x, learning_rate=5e-3, **kw)
    invnet.fit(b, x, optimizer=optax.adam(5e-3), **kw)
    for p, q in zip(_params(a), _params(b), strict=True):
        np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-7)


def test_the_progress_bar_says_it_is_compiling(capsys):
    invnet.training.epoch.clear_cache()
    history = invnet.fit(_tiny_flow(), moons(64, seed=0), epochs=2, batch_size=16,
                         progress=True)  # fmt: skip
    err = capsys.readouterr().err
    assert "compiling..." in err
    assert history.compile_seconds > 0
    assert len(history.epoch_seconds) == 2


@pytest.fixture
def sigint_raises():
    """Python's own SIGINT handler for the test: a process started in the background by a
    non-interactive shell (``cmd &`` in a script) inherits SIGINT ignored, and then neither
    a Ctrl-C nor these simulated ones reach `fit` (the three tests below failed that way)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _interrupt_after(steps, how):
    """An objective that counts the training steps run (a host callback inside the jitted
    step) and a watcher thread that calls ``how()`` (interrupts the main thread) once
    ``steps`` have started, as a user's Ctrl-C would land: between or during steps (the
    step in flight may then not count)."""
    count = [0]

    def tick():
        count[0] += 1

    def objective(model, batch, key):
        jax.debug.callback(tick)
        return -jnp.mean(model.log_prob(batch["x"]))

    def watch():
        while count[0] < steps:
            time.sleep(0.002)
        how()

    threading.Thread(target=watch, daemon=True).start()
    return objective


def test_ctrl_c_keeps_the_trained_parameters(sigint_raises):
    import _thread

    objective = _interrupt_after(7, _thread.interrupt_main)
    flow, x = _tiny_flow(), moons(64, seed=0)
    start = _params(flow)
    with pytest.raises(KeyboardInterrupt) as info:
        invnet.fit(flow, x, objective=objective, epochs=10_000, batch_size=16,
                   learning_rate=1e-2, progress=False)  # fmt: skip
    now = _params(flow)
    assert any(not np.array_equal(a, b) for a, b in zip(now, start, strict=True))
    assert all(np.isfinite(a).all() for a in now)
    history = info.value.history
    assert history.stop_reason == "interrupted"
    assert history.steps >= 6 and 4 * history.epochs <= history.steps <= 4 * history.epochs + 4
    assert len(history.train_loss) == history.epochs
    assert "interrupted" in "".join(getattr(info.value, "__notes__", []))


def test_a_real_sigint_writes_last_first(tmp_path, sigint_raises):
    objective = _interrupt_after(9, lambda: os.kill(os.getpid(), signal.SIGINT))
    flow, x = _tiny_flow(), moons(64, seed=0)
    start = _params(flow)
    with pytest.raises(KeyboardInterrupt) as info:
        invnet.fit(flow, x, objective=objective, epochs=10_000, batch_size=16,
                   learning_rate=1e-2, checkpoints=tmp_path, progress=False)  # fmt: skip
    history = info.value.history
    assert history.stop_reason == "interrupted" and history.steps >= 8
    assert history.checkpoints == [str(tmp_path / "last.invnet")]
    saved = invnet.load(tmp_path / "last.invnet")
    for a, b in zip(_params(saved), _params(flow), strict=True):
        np.testing.assert_array_equal(a, b)  # the file holds what the model holds
    assert any(not np.array_equal(a, s) for a, s in zip(_params(flow), start, strict=True))
    # and the run resumes from it
    resumed = invnet.fit(_tiny_flow(seed=1), x, epochs=history.epochs + 1, batch_size=16,
                         learning_rate=1e-2, resume_from=tmp_path / "last.invnet",
                         progress=False)  # fmt: skip
    assert resumed.epochs == history.epochs + 1 and resumed.stop_reason == "epochs"


def test_the_optimizer_factory_itself_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"call it: optimizer=optax\.adam\(1e-3\)"):
        invnet.fit(_tiny_flow(), moons(32, seed=0), optimizer=optax.adam, progress=False)
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        invnet.fit(_tiny_flow(), moons(32, seed=0), optimizer="adam", progress=False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"epochs": 1.5}, TypeError, r"epochs must be a whole number .* got 1\.5"),
        ({"batch_size": 32.0}, TypeError, r"batch_size must be a whole number.*batch_size=32"),
        ({"batch_size": True}, TypeError, "batch_size must be a whole number"),
        ({"epochs": -1}, ValueError, "epochs must be an int >= 0"),
        ({"learning_rate": -1}, ValueError, r"learning_rate must be > 0.*learning_rate=1e-3"),
        ({"learning_rate": 0}, ValueError, "learning_rate must be > 0"),
        ({"learning_rate": "fast"}, TypeError, "learning_rate must be a positive number"),
    ],
)
def test_argument_slips_name_the_argument_and_the_fix(kwargs, error, match):
    flow = _tiny_flow()
    before = _params(flow)
    with pytest.raises(error, match=match):
        invnet.fit(flow, moons(32, seed=0), progress=False, **{"batch_size": 16, **kwargs})
    for a, b in zip(_params(flow), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_numpy_integers_are_whole_numbers():
    history = invnet.fit(_tiny_flow(), moons(32, seed=0), epochs=np.int64(1),
                         batch_size=np.int32(16), progress=False)  # fmt: skip
    assert history.steps == 2


def test_ctrl_c_right_after_an_epochs_last_step_still_records_that_epoch(
    monkeypatch, sigint_raises
):
    """An interrupt between an epoch's last step and its bookkeeping used to leave the model
    one epoch ahead of its history (and a resume would replay that epoch)."""
    import _thread

    from invnet.training import epoch

    original, calls = epoch.Epochs.run, [0]

    def run(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            _thread.interrupt_main()
            sum(range(10_000))  # Python runs on: the interrupt lands here, after the steps
        return out

    monkeypatch.setattr(epoch.Epochs, "run", run)
    flow, x = _tiny_flow(), moons(64, seed=0)
    with pytest.raises(KeyboardInterrupt) as info:
        invnet.fit(flow, x, epochs=5, batch_size=16, learning_rate=1e-2, progress=False)
    history = info.value.history
    assert (history.epochs, history.steps, len(history.train_loss)) == (2, 8, 2)
    assert history.stop_reason == "interrupted"
