"""Reader for invnet's own model container, format versions 1 and 2 (before safetensors).

Layout: ``b"INVNETCK"`` (8 bytes), sha256 of the payload (32 bytes), then a msgpack map
``{format_version, invnet_version, architecture, arrays, metadata, extra_arrays}`` whose
arrays are ``{"dtype": str, "shape": [...], "data": bytes}`` (version 1 has no
``extra_arrays``). `invnet.io` reads these files; it writes only the current format.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jax
import msgpack
import numpy as np

MAGIC = b"INVNETCK"
_ALLOWED_DTYPES = {"float16", "bfloat16", "float32", "float64", "int32", "int64", "bool", "uint32"}


def _decode(path: Path, key: str, entry: Any) -> np.ndarray:
    if not isinstance(entry, dict) or {"dtype", "shape", "data"} - set(entry):
        raise ValueError(f"invnet.load: {path}: array entry {key!r} is malformed")
    dtype = entry["dtype"]
    if dtype not in _ALLOWED_DTYPES:
        raise ValueError(f"invnet.load: {path}: array {key!r} has unsupported dtype {dtype!r}")
    np_dtype = jax.numpy.dtype(dtype)
    shape = tuple(int(s) for s in entry["shape"])
    data = entry["data"]
    if not isinstance(data, bytes) or len(data) != int(np.prod(shape)) * np_dtype.itemsize:
        raise ValueError(f"invnet.load: {path}: array {key!r} has the wrong number of bytes")
    return np.frombuffer(data, dtype=np_dtype).reshape(shape).copy()


def _arrays(path: Path, payload: dict, field: str) -> dict[str, np.ndarray]:
    entries = payload.get(field, {})
    if not isinstance(entries, dict):
        raise ValueError(f"invnet.load: {path} {field} is not a map")
    return {k: _decode(path, k, v) for k, v in entries.items()}


def read(path: Path, blob: bytes, check_version) -> dict[str, Any]:
    """The fields of `invnet.io.ModelFile` from a version 1 or 2 file's bytes."""
    if len(blob) < len(MAGIC) + 32:
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
        raise ValueError(
            f"invnet.load: {path} payload cannot be decoded ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(payload, dict):
        raise ValueError(f"invnet.load: {path} payload is not a map")
    fmt = payload.get("format_version")
    check_version(path, fmt, payload.get("invnet_version"))
    if fmt not in (1, 2):
        raise ValueError(f"invnet.load: {path} has format version {fmt!r} in the old container")
    metadata = payload.get("metadata", {})
    if not isinstance(payload.get("architecture"), dict) or not isinstance(metadata, dict):
        raise ValueError(f"invnet.load: {path} has a malformed header")
    return {
        "format_version": fmt,
        "invnet_version": str(payload.get("invnet_version", "?")),
        "architecture": payload["architecture"],
        "metadata": metadata,
        "arrays": _arrays(path, payload, "arrays"),
        "extra_arrays": _arrays(path, payload, "extra_arrays"),
    }
