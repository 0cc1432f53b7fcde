"""Save and load models: architecture + parameters in one file, no pickle, atomic writes.

File layout (format version 2; version 1 files, which lack ``extra_arrays``, still load)::

    b"INVNETCK"                      8 bytes, magic
    sha256(payload)                  32 bytes
    payload                          msgpack map:
        format_version  int
        invnet_version  str
        architecture    the model's ``to_spec()`` (layer types + constructor arguments)
        arrays          {"path/to/variable": {"dtype": str, "shape": [...], "data": bytes}}
        metadata        user data (JSON-able), e.g. a training step
        extra_arrays    {"name": {"dtype", "shape", "data"}}: optional arrays beside the
                        model (`invnet.fit` keeps its optimizer state and keys here)

Loading checks the magic, the checksum, the format version, the layer types (only invnet's
registered classes are built) and every array's path, dtype and shape against the rebuilt
model; any mismatch is a ``ValueError`` that says what is wrong. Extra arrays pass the same
checksum and the same dtype/size checks. Nothing in the file is ever
executed. Writes go to a temporary file in the target folder, are fsynced, then renamed
over the target, so an interrupted save leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import jax
import msgpack
import numpy as np
from flax import nnx

from invnet.core import Bijector, from_spec

__all__ = ["save", "load", "read_metadata", "read_extra_arrays", "FORMAT_VERSION"]

MAGIC = b"INVNETCK"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # 1: no extra_arrays
_ALLOWED_DTYPES = {"float16", "bfloat16", "float32", "float64", "int32", "int64", "bool", "uint32"}


def _invnet_version() -> str:
    try:
        return version("invnet")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _flat_pure(model: nnx.Module) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            flat[prefix] = node

    walk("", nnx.to_pure_dict(nnx.state(model)))
    return flat


def _encode(arr) -> dict[str, Any]:
    a = np.asarray(jax.device_get(arr))
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tobytes()}


def _decode(key: str, entry: Any) -> np.ndarray:
    if not isinstance(entry, dict) or {"dtype", "shape", "data"} - set(entry):
        raise ValueError(f"invnet.load: array entry {key!r} is malformed")
    dtype = entry["dtype"]
    if dtype not in _ALLOWED_DTYPES:
        raise ValueError(f"invnet.load: array {key!r} has unsupported dtype {dtype!r}")
    np_dtype = jax.numpy.dtype(dtype)
    shape = tuple(int(s) for s in entry["shape"])
    data = entry["data"]
    if not isinstance(data, bytes) or len(data) != int(np.prod(shape)) * np_dtype.itemsize:
        raise ValueError(f"invnet.load: array {key!r} has the wrong number of bytes")
    return np.frombuffer(data, dtype=np_dtype).reshape(shape).copy()


def _atomic_write(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass


def save(
    model: Bijector,
    path: str | os.PathLike,
    *,
    metadata: dict | None = None,
    extra_arrays: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` (architecture and every variable) to ``path``, atomically.

    ``metadata`` is any msgpack-able dict (numbers, strings, lists, dicts) stored beside the
    model; read it back with `invnet.read_metadata`. ``extra_arrays`` maps names to arrays
    (e.g. an optimizer state's leaves) stored in the same file under the same checksum; read
    them back with `invnet.read_extra_arrays`. Returns the path written.

    Example:
        >>> import tempfile, os, jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> model = invnet.Sequential(invnet.LULinear(3, rngs=nnx.Rngs(0)), invnet.LeakyReLU(0.3))
        >>> path = invnet.save(model, os.path.join(tempfile.mkdtemp(), "m.invnet"))
        >>> again = invnet.load(path)
        >>> bool(jnp.all(again(jnp.ones(3)) == model(jnp.ones(3))))
        True
    """
    if not isinstance(model, Bijector):
        raise TypeError(f"invnet.save: expected an invnet Bijector, got {type(model).__name__}")
    payload = {
        "format_version": FORMAT_VERSION,
        "invnet_version": _invnet_version(),
        "architecture": model.to_spec(),
        "arrays": {k: _encode(v) for k, v in _flat_pure(model).items()},
        "metadata": metadata or {},
        "extra_arrays": {str(k): _encode(v) for k, v in (extra_arrays or {}).items()},
    }
    body = msgpack.packb(payload, use_bin_type=True)
    path = Path(path)
    _atomic_write(path, MAGIC + hashlib.sha256(body).digest() + body)
    return path


def _read_payload(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"invnet.load: no such file: {path}")
    blob = path.read_bytes()
    if len(blob) < len(MAGIC) + 32 or not blob.startswith(MAGIC):
        raise ValueError(f"invnet.load: {path} is not an invnet model file (bad header)")
    digest, body = blob[len(MAGIC) : len(MAGIC) + 32], blob[len(MAGIC) + 32 :]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(
            f"invnet.load: {path} is corrupted or truncated (checksum mismatch); "
            "use an earlier copy"
        )
    try:
        payload = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several types
        raise ValueError(f"invnet.load: {path} payload cannot be decoded: {err}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"invnet.load: {path} payload is not a map")
    fmt = payload.get("format_version")
    if fmt not in _READABLE_VERSIONS:
        raise ValueError(
            f"invnet.load: {path} has format version {fmt!r}; this invnet reads "
            f"{list(_READABLE_VERSIONS)} (written by invnet {payload.get('invnet_version')!r})"
        )
    return payload


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` dict stored by `invnet.save` (after the same integrity checks)."""
    return _read_payload(path).get("metadata", {})


def read_extra_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The ``extra_arrays`` stored by `invnet.save` (after the same integrity checks);
    ``{}`` for files without any (and for format version 1 files)."""
    return _extra_arrays(_read_payload(path), path)


def _extra_arrays(payload: dict[str, Any], path) -> dict[str, np.ndarray]:
    extra = payload.get("extra_arrays", {})
    if not isinstance(extra, dict):
        raise ValueError(f"invnet.load: {path} extra_arrays is not a map")
    return {k: _decode(k, v) for k, v in extra.items()}


def load(path: str | os.PathLike) -> Bijector:
    """Rebuild a model saved by `invnet.save`, without the user's code. See module docs."""
    return _model_from_payload(_read_payload(path), path)


def _model_from_payload(payload: dict[str, Any], path) -> Bijector:
    model = from_spec(payload["architecture"])
    arrays = payload.get("arrays", {})
    expected = _flat_pure(model)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(
            f"invnet.load: {path} does not match its architecture "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    values = {}
    for key, ref in expected.items():
        arr = _decode(key, arrays[key])
        ref = np.asarray(ref)
        if arr.shape != ref.shape or arr.dtype != ref.dtype:
            raise ValueError(
                f"invnet.load: {key!r} has shape {arr.shape} {arr.dtype}, the architecture "
                f"expects {ref.shape} {ref.dtype}"
            )
        values[key] = arr
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)

    def fill(prefix: str, node: dict) -> dict:
        out = {}
        for k, v in node.items():
            key = f"{prefix}/{k}" if prefix else str(k)
            out[k] = fill(key, v) if isinstance(v, dict) else jax.numpy.asarray(values[key])
        return out

    nnx.replace_by_pure_dict(state, fill("", pure))
    nnx.update(model, state)
    return model
