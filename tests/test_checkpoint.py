"""Model files survive faults: truncation, corruption, tampering, mismatch, SIGKILL; older
formats still load; save errors name the user's path."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import nnx

import invnet
import invnet.io
from invnet._io_legacy import MAGIC

ROOT = Path(__file__).resolve().parents[1]
LEGACY_V2 = Path(__file__).parent / "data" / "legacy_v2.invnet"


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


def _header(path: Path) -> dict[str, str]:
    blob = path.read_bytes()
    return json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])["__metadata__"]


def _repack(path: Path, mutate) -> None:
    """Decode a model file, let ``mutate(tensors, metadata)`` change it, write it back with
    a valid checksum (so only the check under test can refuse it)."""
    tensors = safetensors.numpy.load(path.read_bytes())
    meta = _header(path)
    mutate(tensors, meta)
    tags = {**invnet.io._TAGS, "complex64": "C64"}
    entries = {k: (tags[a.dtype.name], list(a.shape), a.tobytes()) for k, a in tensors.items()}
    meta["sha256"] = invnet.io._digest(meta, entries)
    path.write_bytes(safetensors.numpy.save(tensors, metadata=meta))


def _repack_legacy(path: Path, mutate) -> None:
    """The same for a format 1/2 file (msgpack payload behind magic + sha256)."""
    payload = msgpack.unpackb(path.read_bytes()[len(MAGIC) + 32 :], raw=False)
    mutate(payload)
    body = msgpack.packb(payload, use_bin_type=True)
    path.write_bytes(MAGIC + hashlib.sha256(body).digest() + body)


def test_metadata_round_trip_and_the_file_is_plain_safetensors(saved):
    model, path = saved
    assert invnet.read_metadata(path) == {"step": 7}
    # any safetensors reader sees the arrays and the header
    tensors = safetensors.numpy.load(path.read_bytes())
    np.testing.assert_array_equal(tensors["model/layers/0/lower"], model.layers[0].lower[...])
    meta = _header(path)
    assert meta["format"] == "invnet" and meta["format_version"] == "3"
    assert json.loads(meta["architecture"]) == json.loads(json.dumps(model.to_spec()))
    assert len(meta["sha256"]) == 64 and "invnet_version" in meta


def test_truncated_file_is_refused(saved):
    _, path = saved
    blob = path.read_bytes()
    for cut in (0, 5, 8, 40, len(blob) // 2, len(blob) - 1):
        path.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="not an invnet model file.*corrupted or truncated"):
            invnet.load(path)


def test_flipped_byte_is_refused(saved):
    _, path = saved
    blob = path.read_bytes()
    header_end = 8 + int.from_bytes(blob[:8], "little")
    # a digit inside the architecture JSON (still valid JSON), then a byte of tensor data
    arch_digit = blob.index(b"negative_slope") + len(b'negative_slope\\": 0.')
    for at, new in ((arch_digit, ord("7")), (header_end + 3, blob[header_end + 3] ^ 0xFF)):
        damaged = bytearray(blob)
        damaged[at] = new
        path.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match="checksum mismatch"):
            invnet.load(path)


def test_missing_file_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        invnet.load(tmp_path / "nope.invnet")
    (tmp_path / "weights.npz").write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(ValueError, match="not an invnet model file"):
        invnet.load(tmp_path / "weights.npz")
    foreign = tmp_path / "bert.safetensors"
    foreign.write_bytes(safetensors.numpy.save({"w": np.ones(3, np.float32)}))
    with pytest.raises(ValueError, match="safetensors file but not an invnet model file"):
        invnet.load(foreign)


def test_future_format_version_is_refused(saved):
    _, path = saved
    _repack(path, lambda t, m: m.update(format_version="99"))
    with pytest.raises(ValueError, match="format version 99"):
        invnet.load(path)


def test_tampered_architecture_never_runs_code(saved, tmp_path):
    _, path = saved
    marker = tmp_path / "pwned"

    def mutate(tensors, meta):
        arch = json.loads(meta["architecture"])
        arch["type"] = "os.system"
        arch["config"] = {"command": f"touch {marker}"}
        meta["architecture"] = json.dumps(arch)

    _repack(path, mutate)
    with pytest.raises(ValueError, match="unknown layer type 'os.system'"):
        invnet.load(path)
    assert not marker.exists()


def test_mismatched_arrays_are_refused(saved):
    _, path = saved

    def wrong_shape(tensors, meta):
        key = next(k for k in tensors if k.endswith("log_scale"))
        tensors[key] = np.zeros(3, np.float32)

    _repack(path, wrong_shape)
    with pytest.raises(ValueError, match="log_scale"):
        invnet.load(path)


def test_architecture_without_its_arrays_is_refused(saved):
    _, path = saved

    def grow(tensors, meta):
        arch = json.loads(meta["architecture"])
        arch["children"].append(arch["children"][0])
        meta["architecture"] = json.dumps(arch)

    _repack(path, grow)
    with pytest.raises(ValueError, match="does not match its architecture"):
        invnet.load(path)


def test_unsupported_dtypes_are_refused(saved, tmp_path):
    _, path = saved
    _repack(path, lambda t, m: t.update({"model/layers/1/x": np.zeros(2, np.complex64)}))
    with pytest.raises(ValueError, match="unsupported dtype 'C64'"):
        invnet.load(path)
    with pytest.raises(TypeError, match="dtype complex128, which invnet files do not store"):
        invnet.save(_model(), tmp_path / "c.invnet", extra_arrays={"z": np.ones(2, complex)})
    assert not (tmp_path / "c.invnet").exists()


def test_bfloat16_and_float16_round_trip(tmp_path):
    # bfloat16 is stored under safetensors' own BF16 tag (which safetensors.numpy cannot
    # load): invnet decodes it itself, bit for bit
    extra = {
        "h": np.arange(4, dtype=np.float16),
        "b": np.asarray([1.5, -2.25, 3e38], ml_dtypes.bfloat16),
        "s": np.asarray(3, np.int32),  # a 0-d array stays 0-d
    }
    path = invnet.save(_model(), tmp_path / "m.invnet", extra_arrays=extra)
    got = invnet.read_extra_arrays(path)
    for name, value in extra.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        np.testing.assert_array_equal(got[name], value)


def test_legacy_format_2_file_still_loads():
    # tests/data/legacy_v2.invnet was written by invnet.save at commit 69e9b68 (format 2,
    # msgpack): a perturbed Sequential(LULinear(3), LeakyReLU(0.2), AffineCoupling(3,
    # hidden=(4,)), ActNorm(3)), metadata holding a probe input and its outputs, and two
    # extra arrays
    model = invnet.load(LEGACY_V2)
    meta = invnet.read_metadata(LEGACY_V2)
    assert invnet.io.read_file(LEGACY_V2).format_version == 2 and meta["step"] == 7
    y, log_det = model.forward(jnp.asarray(meta["probe_x"], jnp.float32))
    np.testing.assert_array_equal(y, np.asarray(meta["probe_y"], np.float32))
    np.testing.assert_array_equal(log_det, np.asarray(meta["probe_log_det"], np.float32))
    extra = invnet.read_extra_arrays(LEGACY_V2)
    np.testing.assert_array_equal(extra["b/c"], np.arange(6.0).reshape(2, 3))
    assert extra["fit/key"].dtype == np.uint32


def test_legacy_format_1_and_damaged_legacy_files(tmp_path):
    path = tmp_path / "v1.invnet"
    shutil.copy(LEGACY_V2, path)
    _repack_legacy(path, lambda p: (p.pop("extra_arrays"), p.update(format_version=1)))
    assert invnet.read_extra_arrays(path) == {}
    assert invnet.load(path).to_spec() == invnet.load(LEGACY_V2).to_spec()
    _repack_legacy(path, lambda p: p["arrays"]["layers/0/bias"].update(dtype="object"))
    with pytest.raises(ValueError, match="unsupported dtype 'object'"):
        invnet.load(path)
    blob = bytearray(LEGACY_V2.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum mismatch"):
        invnet.load(path)
    # re-saving a legacy model writes the current format
    again = invnet.save(invnet.load(LEGACY_V2), tmp_path / "v3.invnet")
    assert invnet.io.read_file(again).format_version == 3


def test_save_errors_name_the_users_path(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=f"{folder} is a directory.*model.invnet"):
        invnet.save(_model(), folder)
    blocker = tmp_path / "file"
    blocker.write_text("")
    target = blocker / "m.invnet"  # its folder is a file
    with pytest.raises(OSError, match=f"cannot write {target}") as info:
        invnet.save(_model(), target)
    assert "partial" not in str(info.value) and info.value.errno in (errno.ENOTDIR, errno.EEXIST)
    if os.geteuid() != 0:  # root may write anywhere
        folder.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match=f"cannot write {folder / 'm.invnet'}:"):
                invnet.save(_model(), folder / "m.invnet")
        finally:
            folder.chmod(0o700)


@pytest.mark.extended  # a subprocess killed mid-save; CI runs it
def test_sigkill_during_save_keeps_the_previous_file_and_the_next_save_cleans_up(tmp_path):
    path = tmp_path / "ckpt.invnet"
    first = _model(seed=0)
    invnet.save(first, path)
    reference = first(jnp.ones(4))
    marker = tmp_path.parent / f"{tmp_path.name}-writing"
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
    # the interrupted write left one hidden, recognisable temporary file beside the target
    (leftover,) = [p.name for p in tmp_path.iterdir() if p != path]
    assert leftover.startswith(".ckpt.invnet.") and leftover.endswith(".invnet-partial")
    loaded = invnet.load(path)  # the previous file, intact
    np.testing.assert_array_equal(loaded(jnp.ones(4)), reference)
    # the next save into the folder removes the dead writer's temporary file
    invnet.save(first, tmp_path / "other.invnet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.invnet", "other.invnet"]
