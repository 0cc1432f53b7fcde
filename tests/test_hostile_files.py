"""Model files a user did not write: a valid checksum does not make a file safe to build.

Each file here is re-hashed after tampering, so it passes the integrity check; `invnet.load`
must refuse it with a ``ValueError`` before allocating what the architecture asks for, and
the CLI must exit 2 with its one-line error (and the JSON object with ``--json``)."""

import hashlib
import json

import msgpack
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import invnet
from invnet import _io_legacy as io_legacy
from invnet import io
from invnet.cli import main


def write(path, architecture, arrays=None):
    """An invnet file with this architecture (a dict, or raw JSON text) and these model
    arrays, with a correct checksum."""
    text = architecture if isinstance(architecture, str) else json.dumps(architecture)
    meta = {
        "format": "invnet",
        "format_version": "3",
        "invnet_version": "test",
        "architecture": text,
        "metadata": "{}",
    }
    tensors = {"model/" + k: np.asarray(v) for k, v in (arrays or {}).items()}
    meta["sha256"] = io._digest(meta, {k: io._entry(a) for k, a in tensors.items()})
    with open(path, "wb") as f:
        f.write(safetensors.numpy.save(tensors, metadata=meta))
    return path


def arrays_of(model):
    return {k: np.asarray(v) for k, v in io._flat_pure(model).items()}


def nested(depth: int) -> str:
    """``depth`` `Inverse` wrappers around a LeakyReLU, as JSON text (json.dumps itself
    recurses too deeply for 5000)."""
    leaf = '{"type": "LeakyReLU", "config": {"negative_slope": 0.5}}'
    return '{"type": "Inverse", "config": {}, "children": [' * depth + leaf + "]}" * depth


def tampered(tmp_path, which):
    """A file of each kind that must be refused, with the words its error must contain."""
    path = tmp_path / f"{which}.invnet"
    if which == "huge_lu":  # 352 bytes that asked for 10.8 GB
        return write(path, {"type": "LULinear", "config": {"dim": 30000}}), "needs at least"
    if which == "huge_mlp":  # small dim, huge hidden widths next to the arrays of a tiny one
        small = invnet.AffineCoupling(4, hidden=(2,), rngs=nnx.Rngs(0))
        spec = {**small.to_spec(), "config": {**small.get_config(), "hidden": [10**5, 10**5]}}
        return write(path, spec, arrays_of(small)), "needs at least"
    if which == "deep_json":  # deeper than Python's JSON reader recurses
        return write(path, nested(5000)), "nests JSON too deeply"
    if which == "deep_spec":  # readable JSON, but deeper than invnet builds
        return write(path, nested(io.MAX_DEPTH + 1)), f"more than {io.MAX_DEPTH} deep"
    if which == "legacy_deep":  # the old msgpack container goes through the same checks
        spec = {"type": "LeakyReLU", "config": {"negative_slope": 0.5}}
        for _ in range(io.MAX_DEPTH + 1):
            spec = {"type": "Inverse", "config": {}, "children": [spec]}
        body = msgpack.packb(
            {"format_version": 2, "invnet_version": "test", "architecture": spec,
             "arrays": {}, "metadata": {}, "extra_arrays": {}}
        )  # fmt: skip
        path.write_bytes(io_legacy.MAGIC + hashlib.sha256(body).digest() + body)
        return path, f"more than {io.MAX_DEPTH} deep"
    if which == "not_a_permutation":
        model = invnet.Sequential(invnet.Permute(4, rngs=nnx.Rngs(0)), invnet.LeakyReLU(0.5))
        arrays = arrays_of(model)
        arrays["layers/0/perm"] = np.array([0, 0, 1, 2], np.int32)
        return write(path, model.to_spec(), arrays), "not a permutation"
    if which == "lu_perm":
        model = invnet.LULinear(3, rngs=nnx.Rngs(0))
        arrays = arrays_of(model)
        arrays["inv_perm"] = arrays["perm"][::-1].copy()  # no longer perm's inverse
        return write(path, model.to_spec(), arrays), "inverse of perm"
    if which == "zero_sign":  # a singular W whose log-det would read sum(log_scale) = 0
        model = invnet.LULinear(3, rngs=nnx.Rngs(0))
        arrays = arrays_of(model)
        arrays["sign"] = np.array([1.0, 0.0, -1.0], np.float32)
        return write(path, model.to_spec(), arrays), "+1 and -1"
    if which == "made_mask":  # a mask that lets feature 1 see itself
        model = invnet.MaskedAutoregressive(3, hidden=(4,), rngs=nnx.Rngs(0))
        arrays = arrays_of(model)
        arrays["made/out/mask"] = np.ones_like(arrays["made/out/mask"])
        return write(path, model.to_spec(), arrays), "autoregressive mask"
    if which == "bad_config":  # a config the layer's constructor cannot take
        return write(path, {"type": "FactorOut", "config": {}}), "cannot be built"
    if which == "no_children":
        return write(path, {"type": "Inverse", "config": {}, "children": []}), "cannot be built"
    raise AssertionError(which)


KINDS = [
    "huge_lu", "huge_mlp", "deep_json", "deep_spec", "legacy_deep", "not_a_permutation", "lu_perm",
    "zero_sign", "made_mask", "bad_config", "no_children",
]  # fmt: skip


@pytest.mark.parametrize("which", KINDS)
def test_load_refuses(tmp_path, which):
    path, words = tampered(tmp_path, which)
    with pytest.raises(ValueError, match="invnet.load") as info:
        invnet.load(path)
    assert words in str(info.value)


def test_huge_architecture_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    path, _ = tampered(tmp_path, "huge_lu")
    assert path.stat().st_size < 400

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before its size was checked")

    monkeypatch.setattr(io, "from_spec", no_build)
    with pytest.raises(ValueError, match=r"900,000,000 stored values .* stores 0"):
        invnet.load(path)


@pytest.mark.parametrize("which", KINDS)
def test_cli_exit_2_and_json(tmp_path, capsys, which):
    path, words = tampered(tmp_path, which)
    assert main(["verify", str(path), "--json"]) == 2
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["ok"] is False and report["exit_code"] == 2 and words in report["error"]
    assert out.err.startswith("invnet verify: error:") and len(out.err.splitlines()) == 1
    assert main(["bench", str(path), "--json"]) == 2
    out = capsys.readouterr()
    assert json.loads(out.out)["exit_code"] == 2
    assert out.err.startswith("invnet bench: error:") and words in out.err


def test_legit_nesting_and_buffers_still_load(tmp_path):
    """The limits leave real files alone: MAX_DEPTH nested containers, a reversed Permute,
    a MAF and an LU layer round-trip through save and load."""
    path = write(tmp_path / "deep_ok.invnet", nested(io.MAX_DEPTH - 1))
    assert isinstance(invnet.load(path), invnet.Inverse)
    rngs = nnx.Rngs(0)
    model = invnet.Sequential(
        invnet.Permute(3, mode="reverse"),
        invnet.LULinear(3, rngs=rngs),
        invnet.MaskedAutoregressive(3, hidden=(4,), cond_dim=2, rngs=rngs),
    )
    again = invnet.load(invnet.save(model, tmp_path / "ok.invnet"))
    x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    cond = np.ones((2, 2), np.float32)
    np.testing.assert_array_equal(again.forward(x, cond=cond)[0], model.forward(x, cond=cond)[0])
