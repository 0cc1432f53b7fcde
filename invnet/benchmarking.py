"""How fast is my model's inverse? ``invnet.bench(model)`` and ``invnet bench PATH``.

For one model and one batch size, times each operation in each way of running it:

* operations: ``forward`` (``(y, log_det)``), ``inverse`` (``(x, log_det)``), ``log_det``
  (the forward's log-det alone) and, for an `invnet.Flow`, ``sample`` (``batch_size``
  draws: base sample and inverse);
* modes: ``eager`` (op by op, under ``jax.disable_jit()``: what the model costs without any
  compilation), ``call`` (the model's own method as a user calls it, e.g.
  ``model.forward(x)`` or ``flow.sample(key, n)``), ``jit`` (as written: ``nnx.split`` once and
  ``jax.jit`` of a function that merges and calls the method) and ``compiled``
  (`invnet.freeze`, precomputed inverses).

Fair comparison: every mode is first called (trace, compile, run: reported apart as
``first_call_s``) and warmed up (``warmup`` calls); then the ``repeats`` timed samples are
taken **round by round, interleaved**: each round times every op in every mode once, in
an order rotated from round to round, so a change of load on the machine (other processes,
CPU clocks) falls on all modes alike instead of on whichever mode ran last. A sample loops
the call until it lasts ``min_time`` seconds (``time.perf_counter``, ending with
``jax.block_until_ready``). Each row reports the median and the spread of its samples
(quartiles, min, max). Per op, ``ranking`` orders the modes by median and joins two
neighbours with ``<`` only when their interquartile ranges do not overlap, else with ``~``;
when even the fastest two overlap it says ``not ranked: spread too wide`` (run with more
``repeats``, a longer ``min_time``, or on a quieter machine). Inputs are standard normal of
shape ``(batch_size, *event_shape)`` in the model's dtype (float64 when its parameters are
float64 and x64 is on, else float32).

JSON schema (``BenchReport.to_dict()``, ``invnet bench --json``), version ``invnet.bench/2``
(``/1`` lacked the spread keys and ``ranking``; `BenchReport.from_dict` reads both):

.. code-block:: text

    schema             "invnet.bench/1"
    model              {"type": str, "params": int, "dtype": "float32"|"float64",
                        "event_shape": [int, ...], "cond_dim": int, "flow": bool}
    batch_size         int
    device             {"platform": str, "kind": str, "name": str}
    versions           {"jax": str, "invnet": str}
    repeats, warmup    int
    min_time           float, seconds
    compile_build_s    float | null: seconds of invnet.freeze(model) (null: not compiled)
    peak_memory_bytes  int | null: device's peak bytes in use after the run (null where the
                       backend reports none, e.g. CPUs)
    results            [{"op": str, "mode": str, "time_s": float (median),
                         "first_call_s": float, "samples_per_s": float (at the median),
                         "xla_temp_bytes": int | null, "q1_s", "q3_s", "min_s", "max_s":
                         float (quartiles and extremes of the samples)}, ...]
    round_trip         {mode: float}: max|inverse(forward(x)) - x| / max|x|, per mode
    skipped            {mode: str}: modes that could not run, with the reason
    ranking            {op: str}: e.g. "compiled < jit ~ call < eager", with
                       "; not ranked: spread too wide" when the fastest two overlap

Example:
    >>> import invnet
    >>> from flax import nnx
    >>> model = invnet.Sequential(invnet.LULinear(4, rngs=nnx.Rngs(0)), invnet.LeakyReLU(0.5))
    >>> report = invnet.bench(model, batch_size=8, modes=("jit", "compiled"), min_time=0.0)
    >>> [r["op"] for r in report.results if r["mode"] == "compiled"]
    ['forward', 'inverse', 'log_det']
    >>> report.round_trip["compiled"] < 1e-5
    True
    >>> print(report.table())  # doctest: +ELLIPSIS
    Sequential: 40 parameters, float32, event shape (4,)
    ...
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from invnet._version import __version__
from invnet.core import Bijector, unify_shapes

__all__ = ["bench", "BenchReport", "SCHEMA", "MODES", "OPS"]

SCHEMA = "invnet.bench/2"
_OLD_SCHEMAS = ("invnet.bench/1",)  # read by BenchReport.from_dict
MODES = ("eager", "call", "jit", "compiled")
OPS = ("forward", "inverse", "log_det", "sample")


@dataclass
class BenchReport:
    """The result of `invnet.bench`; ``to_dict``/``to_json`` follow the module's schema,
    ``table()`` is the readable form."""

    model: dict[str, Any]
    batch_size: int
    device: dict[str, str]
    versions: dict[str, str]
    repeats: int
    warmup: int
    min_time: float
    compile_build_s: float | None
    peak_memory_bytes: int | None
    results: list[dict[str, Any]] = field(default_factory=list)
    round_trip: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    ranking: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchReport:
        """Rebuild a report from ``to_dict()`` / ``--json`` output (e.g. to print its table)."""
        data = dict(data)
        if data.pop("schema", SCHEMA) not in (SCHEMA, *_OLD_SCHEMAS):
            raise ValueError(f"BenchReport.from_dict: expected schema {SCHEMA!r}")
        return cls(**data)

    def time(self, op: str, mode: str) -> float | None:
        """Median seconds of ``op`` in ``mode`` (None if not measured)."""
        for r in self.results:
            if r["op"] == op and r["mode"] == mode:
                return r["time_s"]
        return None

    def table(self) -> str:
        m = self.model
        mem = self.peak_memory_bytes
        lines = [
            f"{m['type']}: {m['params']:,} parameters, {m['dtype']}, event shape "
            f"{tuple(m['event_shape'])}" + (f", cond_dim {m['cond_dim']}" if m["cond_dim"] else ""),
            f"batch {self.batch_size} on {self.device['platform']} ({self.device['kind']}); "
            f"median of {self.repeats} samples, modes interleaved round by round; peak device "
            "memory " + ("n/a" if mem is None else f"{mem / 2**20:.1f} MiB"),
            "",
            f"{'op':<8} {'mode':<9} {'time':>11} {'IQR':>21} {'samples/s':>11} {'first call':>11}",
        ]
        for r in self.results:
            iqr = "" if "q1_s" not in r else f"{_fmt_s(r['q1_s'])} - {_fmt_s(r['q3_s'])}"
            lines.append(
                f"{r['op']:<8} {r['mode']:<9} {_fmt_s(r['time_s']):>11} {iqr:>21} "
                f"{r['samples_per_s']:>11.3g} {_fmt_s(r['first_call_s']):>11}"
            )
        if self.ranking:
            lines += ["", "ranking by median ('<': interquartile ranges apart, '~': they overlap)"]
            lines += [f"{op:<8} {order}" for op, order in self.ranking.items()]
        lines.append("")
        trip = ", ".join(f"{k} {v:.1e}" for k, v in self.round_trip.items())
        lines.append(f"round trip (max|x' - x| / max|x|): {trip}")
        if self.compile_build_s is not None:
            lines.append(f"invnet.freeze(model): {_fmt_s(self.compile_build_s)}")
        for mode, why in self.skipped.items():
            lines.append(f"skipped {mode}: {why}")
        return "\n".join(lines)


def _fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


# --------------------------------------------------------------------------- timing
def _first_call(fn: Callable[[], Any], warmup: int, min_time: float) -> tuple[float, int]:
    """``(first_call_s, inner)``: the first call (trace, compile, run), then ``warmup``
    calls, then how many calls one sample loops to last ``min_time`` seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn())
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return first, max(1, int(min_time / max(time.perf_counter() - t0, 1e-9)))


def _sample(fn: Callable[[], Any], inner: int) -> float:
    """Seconds per call over ``inner`` calls, ended by ``jax.block_until_ready``."""
    t0 = time.perf_counter()
    for _ in range(inner):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / inner


def _interleaved(timed: dict[tuple[str, str], tuple], modes, repeats: int) -> dict:
    """``repeats`` samples of every ``(op, mode)`` in ``timed`` (``{key: (fn, inner)}``),
    round by round: each round visits every op and, per op, every mode once, starting one
    mode later than the round before, so load drift is shared by all modes."""
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in timed}
    for r in range(repeats):
        order = [modes[(i + r) % len(modes)] for i in range(len(modes))]
        for op in OPS:
            for mode in order:
                if (op, mode) in timed:
                    fn, inner = timed[op, mode]
                    samples[op, mode].append(_sample(fn, inner))
    return samples


def _row(op: str, mode: str, first: float, samples: list[float], n: int) -> dict[str, Any]:
    median = statistics.median(samples)
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else [median] * 3
    return {
        "op": op,
        "mode": mode,
        "time_s": median,
        "first_call_s": first,
        "samples_per_s": n / median if median > 0 else math.inf,
        "xla_temp_bytes": None,
        "q1_s": max(min(q1, median), min(samples)),  # quantiles may step outside: clip
        "q3_s": min(max(q3, median), max(samples)),
        "min_s": min(samples),
        "max_s": max(samples),
    }


def _ranking(rows: list[dict[str, Any]]) -> str:
    """One op's modes by median: ``a < b`` when ``a``'s third quartile is below ``b``'s
    first (their interquartile ranges are apart), ``a ~ b`` when the ranges overlap; with
    ``"; not ranked: spread too wide"`` when the two fastest overlap."""
    rows = sorted(rows, key=lambda r: r["time_s"])
    text = rows[0]["mode"]
    for a, b in zip(rows[:-1], rows[1:], strict=True):
        text += f" {'<' if a['q3_s'] < b['q1_s'] else '~'} {b['mode']}"
    if len(rows) > 1 and not rows[0]["q3_s"] < rows[1]["q1_s"]:
        text += "; not ranked: spread too wide"
    return text


def _temp_bytes(jitted, *args) -> int | None:
    try:
        stats = jitted.lower(*args).compile().memory_analysis()
        return int(stats.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


# ------------------------------------------------------------------ the four modes
def _eager_calls(model, x, cond, key, n):
    def eager(f):
        def run():
            with jax.disable_jit():
                return f()

        return run

    calls = _call_calls(model, x, cond, key, n)
    return {op: eager(f) for op, f in calls.items()}


def _call_calls(model, x, cond, key, n):
    calls = {
        "forward": lambda: model.forward(x, cond=cond),
        "inverse": lambda: model.inverse(x, cond=cond),
        "log_det": lambda: model.forward(x, cond=cond)[1],
    }
    if hasattr(model, "sample"):
        calls["sample"] = lambda: model.sample(key, n, cond=cond, dtype=x.dtype)
    return calls


def _jit_calls(model, x, cond, key, n):
    graphdef, state = nnx.split(model)

    def method(name, pick=None):
        def run(state, x, cond):
            out = getattr(nnx.merge(graphdef, state), name)(x, cond=cond)
            return out if pick is None else out[pick]

        return jax.jit(run)

    fns = {
        "forward": (method("forward"), (state, x, cond)),
        "inverse": (method("inverse"), (state, x, cond)),
        "log_det": (method("forward", 1), (state, x, cond)),
    }
    if hasattr(model, "sample"):

        def sample(state, key, cond):
            return nnx.merge(graphdef, state).sample(key, n, cond=cond, dtype=x.dtype)

        fns["sample"] = (jax.jit(sample), (state, key, cond))
    return fns


def _compiled_calls(model, x, cond, key, n):
    from invnet.compiled import freeze as compile_model

    t0 = time.perf_counter()
    fast = compile_model(model)
    build = time.perf_counter() - t0
    calls = {
        "forward": lambda: fast.forward(x, cond=cond),
        "inverse": lambda: fast.inverse(x, cond=cond),
        "log_det": lambda: fast.log_det(x, cond=cond),
    }
    if hasattr(model, "sample"):
        draw = jax.jit(lambda key: model.base.sample(key, (n, *x.shape[1:]), x.dtype))
        calls["sample"] = lambda: fast.inverse(draw(key), cond=cond)[0]
    return calls, fast, build


def _rel_err(x_back, x) -> float:
    x_back, x = np.asarray(x_back, np.float64), np.asarray(x, np.float64)
    return float(np.max(np.abs(x_back - x)) / max(np.max(np.abs(x)), np.finfo(float).tiny))


# ------------------------------------------------------------------------ bench()
def bench(
    model: Bijector,
    *,
    batch_size: int = 1024,
    cond: jax.Array | int | None = None,
    shape: Sequence[int] | None = None,
    device: str | jax.Device | None = None,
    repeats: int = 7,
    warmup: int = 1,
    min_time: float = 0.01,
    modes: Sequence[str] = MODES,
    seed: int = 0,
) -> BenchReport:
    """Time ``model``'s forward, inverse, log-det (and sampling, for a `Flow`) in each mode.

    ``batch_size``: samples per call. ``cond``: for a conditional model (``cond_dim > 0``,
    then required), an array ``(cond_dim,)`` or ``(N, cond_dim)`` (rows cut to the batch,
    or repeated in order when ``N < batch_size``), or an int
    ``cond_dim`` to draw standard-normal conditions; refused for an unconditional model.
    ``shape``: the event shape, needed only when the model's events have no fixed size
    (e.g. elementwise layers alone); a `Flow` with ``event_shape`` (a Glow) knows its own.
    ``device``: ``"cpu"``, ``"gpu"``, a `jax.Device`, or None (jax's default).
    ``modes``: a subset of `MODES`. See the module docstring for what is measured.
    """
    modes = tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"bench: modes must be a non-empty subset of {MODES}, got {modes}")
    if batch_size < 1:
        raise ValueError(f"bench: batch_size must be >= 1, got {batch_size}")
    dev = _device(device)
    event = _event_shape(model, shape)
    dtype = _model_dtype(model)
    with jax.default_device(dev):
        nnx.update(model, jax.device_put(nnx.state(model), dev))
        kx, kc, ks = jax.random.split(jax.random.key(seed), 3)
        x = jax.random.normal(kx, (batch_size, *event), dtype)
        cond = _condition(model, cond, batch_size, dtype, kc)
        report = BenchReport(
            model=_describe(model, event, dtype),
            batch_size=batch_size,
            device={"platform": dev.platform, "kind": dev.device_kind, "name": str(dev)},
            versions={"jax": jax.__version__, "invnet": __version__},
            repeats=repeats,
            warmup=warmup,
            min_time=min_time,
            compile_build_s=None,
            peak_memory_bytes=None,
        )
        graphdef, state = nnx.split(model)
        run_forward = jax.jit(lambda s, x, c: nnx.merge(graphdef, s).forward(x, cond=c)[0])
        y = jax.block_until_ready(run_forward(state, x, cond))  # the inverses' input
        _measure(report, modes, model, x, y, cond, ks)
        report.peak_memory_bytes = _peak_memory(dev)
    return report


def _measure(report: BenchReport, modes, model, x, y, cond, key) -> None:
    """Prepare each mode (first call and warmup of every op), then time them interleaved;
    fills ``report.results`` (op by op), ``round_trip``, ``skipped`` and ``ranking``."""
    n, prepared = x.shape[0], {}
    for mode in modes:
        try:
            calls, jitted = _mode_calls(report, mode, model, x, y, cond, key)
            first = {op: _first_call(f, report.warmup, report.min_time) for op, f in calls.items()}
            prepared[mode] = (calls, first, jitted)
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            report.skipped[mode] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    timed = {
        (op, mode): (calls[op], first[op][1])
        for mode, (calls, first, _) in prepared.items()
        for op in calls
    }
    samples = _interleaved(timed, tuple(prepared), report.repeats)
    for op in OPS:
        rows = [
            _row(op, mode, prepared[mode][1][op][0], samples[op, mode], n)
            for mode in prepared
            if (op, mode) in samples
        ]
        report.results += rows
        if rows:
            report.ranking[op] = _ranking(rows)
    for mode, (calls, _, _) in prepared.items():
        report.round_trip[mode] = _rel_err(calls["inverse"]()[0], x)
    if "jit" in prepared:  # after the timing, so that the first calls compiled from scratch
        jitted = prepared["jit"][2]
        for row in report.results:
            if row["mode"] == "jit":
                row["xla_temp_bytes"] = _temp_bytes(jitted[row["op"]][0], *jitted[row["op"]][1])


def _mode_calls(report: BenchReport, mode, model, x, y, cond, key):
    """``({op: call}, jitted)`` of one mode: each call runs the op once (the inverses on
    ``y = forward(x)``); ``jitted`` maps ops to ``(jax.jit function, args)`` in ``jit`` mode."""
    n = x.shape[0]
    if mode == "jit":
        fns = _jit_calls(model, x, cond, key, n)
        fns["inverse"] = (fns["inverse"][0], (fns["inverse"][1][0], y, cond))
        return {op: (lambda f=f, a=a: f(*a)) for op, (f, a) in fns.items()}, fns
    if mode == "compiled":
        calls, fast, report.compile_build_s = _compiled_calls(model, x, cond, key, n)
        calls["inverse"] = lambda: fast.inverse(y, cond=cond)
        return calls, None
    make = _eager_calls if mode == "eager" else _call_calls
    calls = make(model, x, cond, key, n)
    calls["inverse"] = make(model, y, cond, key, n)["inverse"]
    return calls, None


# ------------------------------------------------------------------------ helpers
def _device(device) -> jax.Device:
    if device is None:
        return jax.devices()[0]
    if isinstance(device, jax.Device):
        return device
    if device not in ("cpu", "gpu"):
        raise ValueError(f"bench: device must be 'cpu', 'gpu' or a jax.Device, got {device!r}")
    try:
        return jax.devices(device)[0]
    except RuntimeError:
        raise ValueError(
            f"bench: no {device} device here (jax backend: {jax.default_backend()!r}); "
            "install jax with CUDA for 'gpu', or use --device cpu"
        ) from None


def _event_shape(model: Bijector, shape) -> tuple[int, ...]:
    """The event to time: ``shape`` if given (checked against the model's event pattern),
    else the pattern itself when every size in it is fixed (a `Flow` built with
    ``event_shape``, e.g. a saved Glow, an LU layer's ``(dim,)``)."""
    pattern = tuple(model.event_pattern())
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"bench: shape must be positive sizes, got {shape}")
        tail = shape[len(shape) - len(pattern) :] if pattern else ()
        if len(shape) < len(pattern) or unify_shapes(tail, pattern) is None:
            raise ValueError(
                f"bench: shape {shape} does not end in the model's event shape "
                f"{_pattern_text(pattern)}"
            )
        return shape
    if any(s is None for s in pattern) or not pattern:
        example = ",".join("8" if s is None else str(s) for s in pattern) or "64"
        raise ValueError(
            f"bench: the model has no fixed input size (its events are "
            f"{_pattern_text(pattern)}, None = any size); give the event shape: "
            f"shape=({example.replace(',', ', ')},) in Python, --shape {example} on the "
            "command line"
        )
    return pattern


def _pattern_text(pattern) -> str:
    return "(" + ", ".join("any" if s is None else str(s) for s in pattern) + ")"


def _model_dtype(model: Bijector):
    dtypes = {np.dtype(a.dtype) for a in jax.tree.leaves(nnx.state(model, nnx.Param))}
    if np.dtype(np.float64) in dtypes and jax.config.read("jax_enable_x64"):
        return jnp.float64
    return jnp.float32


def _condition(model: Bijector, cond, n: int, dtype, key):
    if not model.cond_dim:
        if cond is not None:
            raise ValueError(
                "bench: the model is unconditional (cond_dim=0) but a condition was given; "
                "drop cond / --cond"
            )
        return None
    if cond is None:
        raise ValueError(
            f"bench: the model is conditional (cond_dim={model.cond_dim}); give cond: an array "
            f"(batch, {model.cond_dim}) or ({model.cond_dim},), or the int {model.cond_dim} to "
            "draw standard-normal conditions"
        )
    if isinstance(cond, int | np.integer) and not isinstance(cond, bool):
        if cond != model.cond_dim:
            raise ValueError(f"bench: cond size {cond} != the model's cond_dim {model.cond_dim}")
        return jax.random.normal(key, (n, model.cond_dim), dtype)
    cond = jnp.asarray(cond, dtype)
    if cond.shape == (model.cond_dim,) or cond.shape == (n, model.cond_dim):
        return cond
    if cond.ndim == 2 and cond.shape[1] == model.cond_dim and len(cond) > 0:
        # more rows than the batch: the first n; fewer: repeated in order up to n
        return cond[:n] if len(cond) >= n else jnp.resize(cond, (n, model.cond_dim))
    raise ValueError(
        f"bench: cond has shape {cond.shape}; expected rows of the model's cond_dim "
        f"{model.cond_dim}: (N, {model.cond_dim}) with N >= 1 (repeated or cut to the batch "
        f"of {n}) or ({model.cond_dim},)"
    )


def _describe(model: Bijector, event, dtype) -> dict[str, Any]:
    params = sum(int(np.size(a)) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {
        "type": type(model).__name__,
        "params": params,
        "dtype": np.dtype(dtype).name,
        "event_shape": list(event),
        "cond_dim": int(model.cond_dim),
        "flow": hasattr(model, "sample"),
    }


def _peak_memory(dev: jax.Device) -> int | None:
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    if not stats:
        return None
    peak = stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
    return None if peak is None else int(peak)
