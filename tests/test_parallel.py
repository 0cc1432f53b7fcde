"""Data-parallel `invnet.fit` on 4 forced CPU devices matches single-device training.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is imported,
so the check runs in a subprocess (float32, no x64).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import invnet
    from invnet.demo import build_flow, moons
    from invnet.training.placement import placement_for

    assert jax.device_count() == 4, jax.devices()
    x, x_val = moons(512, seed=0), moons(96, seed=1)
    seen = []  # (shape, sharding) of the batch as the objective sees it, at trace time

    def spy(model, batch, key):
        jax.debug.inspect_array_sharding(
            batch["x"], callback=lambda s: seen.append((batch["x"].shape, s)))
        return -jnp.mean(model.log_prob(batch["x"]))

    def run(mesh):
        flow = build_flow(blocks=2, hidden=16, seed=0)
        h = invnet.fit(flow, x, validation={"x": x_val}, objective=spy, epochs=5,
                       batch_size=64, learning_rate=1e-2, key=1, mesh=mesh, progress=False)
        return flow, h

    flow_1, h_1 = run(None)
    seen_single, seen[:] = list(seen), []
    flow_4, h_4 = run(invnet.data_mesh())
    params = lambda f: [np.asarray(a) for a in jax.tree.leaves(nnx.state(f, nnx.Param))]
    step = [s for shape, s in seen if shape == (64, 2)]
    leaf = jax.tree.leaves(nnx.state(flow_4, nnx.Param))[0]
    try:
        invnet.fit(build_flow(blocks=1, hidden=4), x, batch_size=30, mesh="all", progress=False)
        error = None
    except ValueError as err:
        error = str(err)
    print(json.dumps({
        "train_1": h_1.train_loss, "train_4": h_4.train_loss,
        "val_1": h_1.val_loss, "val_4": h_4.val_loss,
        "param_diff": max(float(np.max(np.abs(a - b)))
                          for a, b in zip(params(flow_1), params(flow_4))),
        "single_devices": [len(s.device_set) for shape, s in seen_single if shape == (64, 2)],
        "step_specs": [list(s.spec) for s in step],
        "step_devices": [len(s.device_set) for s in step],
        "step_shard_shapes": [list(s.shard_shape((64, 2))) for s in step],
        "model_devices_after": len(leaf.devices()),
        "all_devices": placement_for("all").devices,
        "error": error,
    }))
    """
)


@pytest.fixture(scope="module")
def four_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", CHILD],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.extended  # 4 devices in a subprocess: ~10 s
def test_four_devices_match_one_device(four_devices):
    r = four_devices
    # Same data order and keys; only the order of the float32 sums differs (each device sums
    # its quarter of the batch, then an all-reduce). Stated tolerance: 1e-5 relative on the
    # per-epoch losses over 5 epochs x 8 Adam steps (observed: equal in float32).
    assert len(r["train_4"]) == len(r["val_4"]) == 5
    for key in ("train", "val"):
        for a, b in zip(r[f"{key}_1"], r[f"{key}_4"], strict=True):
            assert abs(a - b) <= 1e-5 * abs(a), (key, a, b)
    assert r["param_diff"] < 1e-5  # observed 6e-7


@pytest.mark.extended  # the same subprocess
def test_batches_are_sharded_inside_the_step(four_devices):
    r = four_devices
    # inside the training step, the (64, 2) batch is split along its batch axis over the
    # 4 devices: 16 rows each; without a mesh it sits whole on one device
    assert r["step_specs"] and all(s == ["data"] for s in r["step_specs"])
    assert set(r["step_devices"]) == {4} and r["step_shard_shapes"][0] == [16, 2]
    assert r["single_devices"] and set(r["single_devices"]) == {1}
    assert r["model_devices_after"] == 1  # the trained model is back on one device
    assert r["all_devices"] == 4


@pytest.mark.extended  # the same subprocess
def test_batch_size_must_divide_over_the_devices(four_devices):
    error = four_devices["error"]
    assert error is not None and "batch_size 30 is not divisible by the 4 devices" in error
    assert "28 or 32" in error


@pytest.mark.extended  # slow; CI runs it
def test_docs_example_resumes_on_four_devices(tmp_path):
    # the docs' "Several devices" example: mesh="all" on 4 devices, then a resume
    page = (ROOT / "docs" / "guide" / "checkpoints-and-scaling.md").read_text()
    text = page.split("## Several devices\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ckpt" / "last.invnet").is_file()


MANY_STEPS = textwrap.dedent(
    """
    import jax, numpy as np
    from flax import nnx
    import invnet

    assert jax.device_count() == 2, jax.devices()
    x = np.random.default_rng(0).normal(size=(16384, 8)).astype(np.float32)
    flow = invnet.affine_flow(8, base="normal", rngs=nnx.Rngs(0))
    h = invnet.fit(flow, x, epochs=2, batch_size=256, mesh="all", validation=0, progress=False)
    assert len(h.train_loss) == 2 and np.all(np.isfinite(h.train_loss)), h.train_loss
    print("done")
    """
)


@pytest.mark.extended  # 2 devices in a subprocess: ~10 s
def test_many_small_steps_on_two_cpu_devices_do_not_deadlock():
    # 64 fast steps per epoch dispatched back to back made XLA's CPU all-reduce between the
    # two in-process devices wait forever; after 40 s XLA aborted the process (SIGABRT)
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", MANY_STEPS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("done")
