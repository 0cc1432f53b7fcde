"""Save and load models: architecture + parameters in one safetensors file, atomic writes.

File layout (format version 3): a standard `safetensors <https://huggingface.co/docs/safetensors>`_
file (an 8-byte header length, a JSON header, then the raw little-endian tensor bytes), so
numpy, torch and the Hugging Face tools can read the arrays, and loading never runs code::

    tensors         "model/<path/to/variable>"   every variable of the model (nnx state)
                    "extra/<name>"               optional arrays beside the model
                                                 (`invnet.fit` keeps its optimizer state
                                                 and keys here)
    __metadata__    format          "invnet"
    (all strings)   format_version  "3"
                    invnet_version  the version that wrote the file
                    architecture    JSON of the model's ``to_spec()`` (layer types and
                                    constructor arguments)
                    metadata        JSON of the user's metadata, e.g. a training step
                    sha256          hex sha256 over every other metadata entry and every
                                    tensor's name, dtype, shape and bytes

Loading checks the container, the checksum, the format version, the layer types (only
invnet's registered classes are built), then, before anything is built, the architecture's
nesting depth (at most `MAX_DEPTH` containers deep) and its size (each layer's
``min_stored_values(config)``, a lower bound on the values its variables hold, summed, must
not exceed what the file stores: a few hundred bytes cannot ask for gigabytes); after the
build, every array's name, dtype and shape against the rebuilt model, and each layer's fixed
buffers (its ``check_buffers()``: permutations are permutations, signs are +-1, masks are
the ones its config makes); any failure is a ``ValueError`` that says what is wrong. Stored dtypes:
float16, bfloat16, float32, float64, int32, int64, uint32, bool (others are refused when
saving). Files of format versions 1 and 2 (invnet's earlier msgpack container) still load.

Writes go to a hidden temporary file ``.<name>.<host>-<pid>-<random>.invnet-partial`` in
the target folder, are fsynced, then renamed over the target, so an interrupted save leaves
the previous file intact. A process killed mid-write cannot delete its temporary file; the
next `save` into that folder removes such leftovers of dead processes on the same host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from invnet import _io_legacy as io_legacy
from invnet._version import __version__
from invnet.core import LAYER_TYPES, Bijector, from_spec
from invnet.walk import nodes

__all__ = [
    "save", "load", "read_file", "ModelFile", "read_metadata", "read_extra_arrays",
    "FORMAT_VERSION", "PARTIAL_SUFFIX", "MAX_DEPTH",
]  # fmt: skip

FORMAT_VERSION = 3
MAX_DEPTH = 100  # nesting of containers in a file's architecture (a Glow of 6 levels: ~10)
_READABLE_VERSIONS = (1, 2, 3)  # 1, 2: the msgpack container (invnet.io_legacy)
_MODEL, _EXTRA = "model/", "extra/"
# numpy dtype name -> safetensors tag, for the dtypes a model file may hold
_TAGS = {
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
    "int32": "I32", "int64": "I64", "uint32": "U32", "bool": "BOOL",
}  # fmt: skip
_DTYPES = {tag: jax.numpy.dtype(name) for name, tag in _TAGS.items()}
PARTIAL_SUFFIX = ".invnet-partial"
_PARTIAL = re.compile(
    r"^\.(?P<target>.+)\.(?P<host>[^/]+)-(?P<pid>\d+)-[0-9a-f]{8}\.invnet-partial$"
)


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


def _digest(meta: dict[str, str], tensors: dict[str, tuple[str, list[int], Any]]) -> str:
    """sha256 over the metadata entries (but ``sha256``) and each tensor (tag, shape, bytes)."""
    h = hashlib.sha256()
    for key in sorted(k for k in meta if k != "sha256"):
        h.update(json.dumps([key, meta[key]]).encode() + b"\n")
    for name in sorted(tensors):
        tag, shape, data = tensors[name]
        h.update(json.dumps([name, tag, list(shape), len(data)]).encode() + b"\n")
        h.update(data)
    return h.hexdigest()


def _host_array(name: str, arr) -> np.ndarray:
    a = np.asarray(jax.device_get(arr), order="C")  # order="C" keeps 0-d arrays 0-d
    if a.dtype.name not in _TAGS:
        raise TypeError(
            f"invnet.save: array {name!r} has dtype {a.dtype.name}, which invnet files do not "
            f"store; supported: {', '.join(_TAGS)} (cast it, e.g. to float32)"
        )
    return a


def _entry(a: np.ndarray) -> tuple[str, list[int], np.ndarray]:
    """(tag, shape, bytes) as `_digest` reads them; the bytes are a view, not a copy."""
    return _TAGS[a.dtype.name], list(a.shape), a.reshape(-1).view(np.uint8)


def _to_json(what: str, value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"invnet.save: {what} must be JSON-able (numbers, strings, lists, dicts with "
            f"string keys): {err}"
        ) from None


def _remove_stale_partials(folder: Path) -> None:
    """Delete temporary files of saves into ``folder`` whose process died (same host)."""
    host = socket.gethostname()
    for entry in folder.glob(f".*{PARTIAL_SUFFIX}"):
        m = _PARTIAL.match(entry.name)
        if m is None or m["host"] != host or int(m["pid"]) == os.getpid():
            continue
        try:
            os.kill(int(m["pid"]), 0)
        except ProcessLookupError:  # its writer is gone: nobody will rename it
            entry.unlink(missing_ok=True)
        except OSError:  # alive (another user's process) or unknown: leave it
            pass


def _atomic_write(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path.parent)
    name = f".{path.name}.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp = path.parent / f"{name}{PARTIAL_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode: 0o666 - umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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

    ``metadata`` is any JSON-able dict (numbers, strings, lists, dicts) stored beside the
    model; read it back with `invnet.read_metadata`. ``extra_arrays`` maps names to arrays
    (e.g. an optimizer state's leaves) stored in the same file under the same checksum; read
    them back with `invnet.read_extra_arrays`. Returns the path written. The file is a
    safetensors file (see the module docs).

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
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"invnet.save: {path} is a directory; pass a file path such as {path / 'model.invnet'}"
        )
    arrays = {_MODEL + k: _host_array(k, v) for k, v in _flat_pure(model).items()}
    arrays.update(
        {_EXTRA + str(k): _host_array(str(k), v) for k, v in (extra_arrays or {}).items()}
    )
    meta = {
        "format": "invnet",
        "format_version": str(FORMAT_VERSION),
        "invnet_version": __version__,
        "architecture": _to_json("the architecture (to_spec)", model.to_spec()),
        "metadata": _to_json("metadata", metadata or {}),
    }
    meta["sha256"] = _digest(meta, {k: _entry(a) for k, a in arrays.items()})
    blob = safetensors.numpy.save(arrays, metadata=meta)
    try:
        _atomic_write(path, blob)
    except OSError as err:  # name the user's path, not the temporary file
        raise OSError(err.errno, f"invnet.save: cannot write {path}: {err.strerror}") from err
    return path


@dataclass(frozen=True)
class ModelFile:
    """A model file read and checked by `read_file`; nothing built yet.

    ``arrays`` maps each model variable's path to its value, ``extra_arrays`` the arrays
    stored beside the model (``{}`` if none), ``metadata`` the user's dict.
    """

    path: Path
    format_version: int
    invnet_version: str
    architecture: dict
    metadata: dict
    arrays: dict[str, np.ndarray]
    extra_arrays: dict[str, np.ndarray]

    def build(self) -> Bijector:
        """The model: the architecture's depth and size checked against the stored arrays,
        built (only invnet's own layer types), every variable checked (name, shape, dtype)
        and set from the file, then each layer's buffers validated."""
        _check_architecture(self.path, self.architecture, self.arrays)
        try:
            model = from_spec(self.architecture)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
            what = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(
                f"invnet.load: {self.path}: its architecture cannot be built "
                f"({type(err).__name__}: {what})"
            ) from None
        expected = _flat_pure(model)
        missing = sorted(set(expected) - set(self.arrays))
        extra = sorted(set(self.arrays) - set(expected))
        if missing or extra:
            raise ValueError(
                f"invnet.load: {self.path} does not match its architecture "
                f"(missing {missing[:5]}, unexpected {extra[:5]})"
            )
        for key, ref in expected.items():
            arr, ref = self.arrays[key], np.asarray(ref)
            if arr.shape != ref.shape or arr.dtype != ref.dtype:
                raise ValueError(
                    f"invnet.load: {key!r} has shape {arr.shape} {arr.dtype}, the architecture "
                    f"expects {ref.shape} {ref.dtype}"
                )
        state = nnx.state(model)

        def fill(prefix: str, node: dict) -> dict:
            out = {}
            for k, v in node.items():
                key = f"{prefix}/{k}" if prefix else str(k)
                out[k] = (
                    fill(key, v) if isinstance(v, dict) else jax.numpy.asarray(self.arrays[key])
                )
            return out

        nnx.replace_by_pure_dict(state, fill("", nnx.to_pure_dict(state)))
        nnx.update(model, state)
        _check_buffers(self.path, model)
        return model


def _layer_specs(path: Path, architecture: dict) -> list[dict]:
    """Every layer spec of ``architecture``, walked without recursion; refuses nesting
    deeper than `MAX_DEPTH` and specs that are not ``{"type": ..., ...}`` maps."""
    out, todo = [], [(architecture, 1)]
    while todo:
        spec, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise ValueError(
                f"invnet.load: {path}: the architecture nests layers more than {MAX_DEPTH} "
                "deep; invnet does not build such files (damaged or crafted)"
            )
        children = spec.get("children", []) if isinstance(spec, dict) else None
        if not isinstance(children, list) or not isinstance(spec.get("config", {}), dict):
            raise ValueError(f"invnet.load: {path} has a malformed architecture entry")
        out.append(spec)
        todo += [(child, depth + 1) for child in children]
    return out


def _min_values(cls, config: dict) -> int:
    """``cls.min_stored_values(config)``: 0 for layers without the method, and for a
    config the layer's constructor will refuse anyway (its error is the clearer one)."""
    bound = getattr(cls, "min_stored_values", None)
    if bound is None:
        return 0
    try:
        return max(0, int(bound(config)))
    except (TypeError, ValueError, KeyError, OverflowError):
        return 0


def _check_architecture(path: Path, architecture: dict, arrays: dict[str, np.ndarray]) -> None:
    """Refuse, before building anything, an architecture nested too deeply or one whose
    layers need more values than the file stores (e.g. ``LULinear(dim=30000)`` beside a
    few bytes of arrays would allocate gigabytes to find the mismatch)."""
    stored = sum(int(a.size) for a in arrays.values())
    need, largest = 0, (0, "")
    for spec in _layer_specs(path, architecture):
        cls = LAYER_TYPES.get(spec.get("type"))
        n = 0 if cls is None else _min_values(cls, spec.get("config", {}))
        need += n
        largest = max(largest, (n, f"{spec.get('type')}({spec.get('config', {})})"))
    if need > stored:
        what = largest[1] if len(largest[1]) < 120 else largest[1][:117] + "..."
        raise ValueError(
            f"invnet.load: {path}: the architecture needs at least {need:,} stored values "
            f"(largest layer: {what}) but the file stores {stored:,}; it is damaged or was "
            "not written by invnet.save (nothing was built)"
        )


def _check_buffers(path: Path, model: Bijector) -> None:
    """Each layer's ``check_buffers()`` (fixed arrays a checksum cannot vouch for: a
    re-hashed file may hold a permutation that is not one, or a zero sign)."""
    for node in nodes(model):
        check = getattr(node, "check_buffers", None)
        if check is not None:
            try:
                check()
            except ValueError as err:
                raise ValueError(f"invnet.load: {path}: {err}") from None


def _refuse_version(path, fmt, writer) -> None:
    if fmt not in _READABLE_VERSIONS:
        raise ValueError(
            f"invnet.load: {path} has format version {fmt!r}; this invnet reads "
            f"{list(_READABLE_VERSIONS)} (written by invnet {writer!r})"
        )


def _tensors(path: Path, blob: bytes) -> dict[str, tuple[str, list[int], bytearray]]:
    try:
        entries = safetensors.deserialize(blob)
    except Exception as err:  # safetensors raises its own error type
        raise ValueError(
            f"invnet.load: {path} is not an invnet model file, or it is corrupted or "
            f"truncated (safetensors: {err})"
        ) from None
    return {name: (e["dtype"], list(e["shape"]), e["data"]) for name, e in entries}


def _header_metadata(path: Path, blob: bytes) -> dict[str, str]:
    size = int.from_bytes(blob[:8], "little")  # already validated by safetensors
    meta = json.loads(blob[8 : 8 + size]).get("__metadata__") or {}
    if meta.get("format") != "invnet":
        raise ValueError(
            f"invnet.load: {path} is a safetensors file but not an invnet model file "
            "(no invnet metadata); load its arrays with safetensors itself"
        )
    return meta


def _decode(path: Path, name: str, tag: str, shape: list[int], data) -> np.ndarray:
    if tag not in _DTYPES:
        raise ValueError(f"invnet.load: {path}: array {name!r} has unsupported dtype {tag!r}")
    dtype = _DTYPES[tag]
    if len(data) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"invnet.load: {path}: array {name!r} has the wrong number of bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def read_file(path: str | os.PathLike) -> ModelFile:
    """Read a model file written by `invnet.save` (any format version) and check its
    integrity; ``.build()`` the result for the model. Raises ``ValueError`` for a damaged,
    tampered, foreign or newer file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"invnet.load: no such file: {path}")
    blob = path.read_bytes()
    if blob.startswith(io_legacy.MAGIC):
        return ModelFile(path=path, **io_legacy.read(path, blob, _refuse_version))
    tensors = _tensors(path, blob)
    meta = _header_metadata(path, blob)
    fmt = meta.get("format_version", "")
    _refuse_version(path, int(fmt) if fmt.isdigit() else fmt, meta.get("invnet_version"))
    if meta.get("sha256") != _digest(meta, tensors):
        raise ValueError(
            f"invnet.load: {path} is corrupted or was modified (checksum mismatch); "
            "use an earlier copy"
        )
    try:
        architecture, user = json.loads(meta["architecture"]), json.loads(meta["metadata"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"invnet.load: {path} has a malformed header: {err}") from None
    except RecursionError:
        raise ValueError(
            f"invnet.load: {path}: its header nests JSON too deeply to read (damaged or "
            "crafted); invnet does not build such files"
        ) from None
    if (
        fmt != str(FORMAT_VERSION)
        or not isinstance(architecture, dict)
        or not isinstance(user, dict)
    ):
        raise ValueError(f"invnet.load: {path} has a malformed header")
    arrays, extra = {}, {}
    for name, entry in tensors.items():
        for prefix, into in ((_MODEL, arrays), (_EXTRA, extra)):
            if name.startswith(prefix):
                into[name[len(prefix) :]] = _decode(path, name, *entry)
                break
        else:
            raise ValueError(f"invnet.load: {path} holds an unexpected array {name!r}")
    return ModelFile(
        path=path, format_version=int(fmt), invnet_version=meta.get("invnet_version", "?"),
        architecture=architecture, metadata=user, arrays=arrays, extra_arrays=extra,
    )  # fmt: skip


def load(path: str | os.PathLike) -> Bijector:
    """Rebuild a model saved by `invnet.save`, without the user's code. See module docs."""
    return read_file(path).build()


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` dict stored by `invnet.save` (after the same integrity checks)."""
    return read_file(path).metadata


def read_extra_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The ``extra_arrays`` stored by `invnet.save` (after the same integrity checks);
    ``{}`` for files without any (and for format version 1 files)."""
    return read_file(path).extra_arrays
