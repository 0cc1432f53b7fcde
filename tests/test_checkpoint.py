"""Checkpoint files survive faults: truncation, corruption, tampering, mismatch, SIGKILL."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from flax import nnx

import invnet
from invnet.io import MAGIC

ROOT = Path(__file__).resolve().parents[1]


def _model(seed=0, dim=4):
    rngs = nnx.Rngs(seed)
    return invnet.Sequential(
        invnet.LULinear(dim, rngs=rngs),
        invnet.LeakyReLU(0.2),
        invnet.AffineCoupling(dim, hidden=(8,), rngs=rngs),
    )


@pytest.fixture
def saved(tmp_path):
    model = _model()
    return model, invnet.save(model, tmp_path / "m.invnet", metadata={"step": 7})


def _repack(path: Path, mutate) -> None:
    """Decode a checkpoint, apply ``mutate`` to the payload, write it back with a valid checksum."""
    blob = path.read_bytes()
    payload = msgpack.unpackb(blob[len(MAGIC) + 32 :], raw=False)
    mutate(payload)
    body = msgpack.packb(payload, use_bin_type=True)
    path.write_bytes(MAGIC + hashlib.sha256(body).digest() + body)


def test_metadata_round_trip(saved):
    _, path = saved
    assert invnet.read_metadata(path) == {"step": 7}


def test_truncated_file_is_refused(saved):
    _, path = saved
    blob = path.read_bytes()
    for cut in (0, 5, len(MAGIC) + 10, len(blob) // 2, len(blob) - 1):
        path.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="not an invnet model file|corrupted or truncated"):
            invnet.load(path)


def test_flipped_byte_is_refused(saved):
    _, path = saved
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum"):
        invnet.load(path)


def test_missing_file_and_foreign_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        invnet.load(tmp_path / "nope.invnet")
    (tmp_path / "weights.npz").write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(ValueError, match="not an invnet model file"):
        invnet.load(tmp_path / "weights.npz")


def test_future_format_version_is_refused(saved):
    _, path = saved
    _repack(path, lambda p: p.update(format_version=99))
    with pytest.raises(ValueError, match="format version 99"):
        invnet.load(path)


def test_tampered_architecture_never_runs_code(saved, tmp_path):
    _, path = saved
    marker = tmp_path / "pwned"

    def mutate(p):
        p["architecture"]["type"] = "os.system"
        p["architecture"]["config"] = {"command": f"touch {marker}"}

    _repack(path, mutate)
    with pytest.raises(ValueError, match="unknown layer type 'os.system'"):
        invnet.load(path)
    assert not marker.exists()


def test_mismatched_arrays_are_refused(saved):
    _, path = saved

    def wrong_shape(p):
        key = next(k for k in p["arrays"] if k.endswith("log_scale"))
        p["arrays"][key] = {"dtype": "float32", "shape": [3], "data": np.zeros(3, "f4").tobytes()}

    _repack(path, wrong_shape)
    with pytest.raises(ValueError, match="log_scale"):
        invnet.load(path)


def test_architecture_without_its_arrays_is_refused(saved):
    _, path = saved
    _repack(path, lambda p: p["architecture"]["children"].append(p["architecture"]["children"][0]))
    with pytest.raises(ValueError, match="does not match its architecture"):
        invnet.load(path)


def test_object_dtype_is_refused(saved):
    _, path = saved

    def obj(p):
        key = next(iter(p["arrays"]))
        p["arrays"][key]["dtype"] = "object"

    _repack(path, obj)
    with pytest.raises(ValueError, match="unsupported dtype 'object'"):
        invnet.load(path)


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.invnet"
    first = _model(seed=0)
    invnet.save(first, path)
    reference = first(jnp.ones(4))
    marker = tmp_path / "writing"
    # the child saves a different model; we kill it while its data sits in the temp file,
    # after it was written and before the rename (fsync is patched to announce and stall)
    child = textwrap.dedent(
        f"""
        import os, time, pathlib
        from flax import nnx
        import invnet, invnet.io
        def stall(fd):
            pathlib.Path({str(marker)!r}).write_text("x")
            time.sleep(60)
        invnet.io.os.fsync = stall
        rngs = nnx.Rngs(1)
        model = invnet.Sequential(invnet.LULinear(4, rngs=rngs), invnet.LeakyReLU(0.2),
                                  invnet.AffineCoupling(4, hidden=(8,), rngs=rngs))
        invnet.save(model, {str(path)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "child exited before it reached the write"
            assert time.time() < deadline, "child never reached the write"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the kill should have interrupted a write to a temporary file"
    loaded = invnet.load(path)  # the previous checkpoint, intact
    np.testing.assert_array_equal(loaded(jnp.ones(4)), reference)
