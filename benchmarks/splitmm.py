"""Accuracy and speed of the matmul precision modes, incl. error-corrected split products.

    python benchmarks/splitmm.py --device cpu            # emulated accuracy (CPU, ~1 minute)
    python benchmarks/splitmm.py --device gpu --out DIR  # real tensor cores: error + speed

Every mode of `invnet.splitmm.MODES` multiplies float32 ``A (B x D)`` by ``W (D x D)``
(entries N(0, 1)):

* ``product``: relative error ``max|C - C64| / max|C64|`` against a float64 product of the
  same float32 inputs (on the first ``--ref-rows`` rows: the float64 reference runs on the
  host), the real path's error (GPU) and the emulated one (every product's operands rounded
  to TF32/bf16, float32 accumulation: what a tensor core computes; any backend), and on a
  GPU the time and TFLOP/s of the real path.
* ``roundtrip``: an affine layer's round trip as the compiled `LULinear` does it,
  ``y = x W^T + b``, ``x' = (y - b) W^{-T}`` with ``W = I + 0.1 G / sqrt(D)`` and its inverse
  formed in float64 and rounded once, both products in the mode: the relative error
  ``max|x' - x| / max|x|`` and the time of the pair.

On a CPU only the emulated errors are measured (the real path is exact float32 there, and
timing emulation says nothing about tensor cores); ``--time`` times the real path anyway.
Writes ``splitmm.json`` and ``splitmm.md`` to ``--out`` (default ``$OUT`` or
``benchmarks/results/<device>``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="D (default per device)")
    p.add_argument("--batch", type=int, default=None, help="B (default per device)")
    p.add_argument("--ref-rows", type=int, default=256, help="rows checked against float64")
    p.add_argument("--modes", nargs="+", default=None, help="default: all of splitmm.MODES")
    p.add_argument("--time", action="store_true", help="time the real path on a CPU too")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _setup(device: str):
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if device == "gpu" else "cpu")
    import jax

    if device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu but jax's backend is {jax.default_backend()!r}")
    return jax


def _rel(c, ref) -> float:
    import numpy as np

    c = np.asarray(c, np.float64)
    return float(np.max(np.abs(c - ref)) / max(np.max(np.abs(ref)), 1e-300))


def product_rows(args, modes, dim, batch, timed):
    import jax
    import numpy as np
    from _util import timeit_many

    from invnet import splitmm

    ka, kb = jax.random.split(jax.random.key(args.seed + dim))
    a = jax.random.normal(ka, (batch, dim), np.float32)
    w = jax.random.normal(kb, (dim, dim), np.float32)
    rows = min(args.ref_rows, batch)
    ref = np.asarray(a[:rows], np.float64) @ np.asarray(w, np.float64)
    real_ok = [m for m in modes if m != "tf32x3" or jax.default_backend() == "gpu"]
    fns = {m: jax.jit(lambda a, w, m=m: splitmm.matmul(a, w, m)) for m in real_ok}
    times = timeit_many([(fns[m], (a, w)) for m in real_ok], repeats=args.repeats) if timed else []
    times = dict(zip(real_ok, times, strict=False))
    out = []
    for m in modes:
        emu = splitmm.matmul(a[:rows], w, m, emulate=True)
        row = {"dim": dim, "batch": batch, "mode": m, "emulated_err": _rel(emu, ref)}
        if m in fns and timed:
            row["err"] = _rel(fns[m](a, w)[:rows], ref)
        if m in times:
            row["ms"] = times[m] * 1e3
            row["tflops"] = 2.0 * batch * dim * dim / times[m] / 1e12
        out.append(row)
    return out


def roundtrip_rows(args, modes, dim, batch, timed):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from _util import timeit_many

    from invnet import splitmm

    rng = np.random.default_rng(args.seed + dim)
    w64 = np.eye(dim) + 0.1 * rng.standard_normal((dim, dim)) / np.sqrt(dim)
    w = jnp.asarray(w64, jnp.float32)
    w_inv = jnp.asarray(np.linalg.inv(w64), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(dim), jnp.float32)
    x = jax.random.normal(jax.random.key(args.seed), (batch, dim), jnp.float32)

    def trip(x, w, w_inv, bias, mode, emulate=False):
        y = splitmm.matmul(x, w.T, mode, emulate=emulate) + bias
        return splitmm.matmul(y - bias, w_inv.T, mode, emulate=emulate)

    ok = [m for m in modes if m != "tf32x3" or jax.default_backend() == "gpu"]
    fns = {m: jax.jit(lambda x, w, wi, b, m=m: trip(x, w, wi, b, m)) for m in ok}
    consts = (w, w_inv, bias)
    times = timeit_many([(fns[m], (x, *consts)) for m in ok], repeats=args.repeats) if timed else []
    times = dict(zip(ok, times, strict=False))
    rows = min(args.ref_rows, batch)
    out = []
    for m in modes:
        emu = trip(x[:rows], *consts, m, emulate=True)
        row = {
            "dim": dim,
            "batch": batch,
            "mode": m,
            "emulated_err": _rel(emu, np.asarray(x[:rows])),
        }
        if m in fns and timed:
            row["err"] = _rel(fns[m](x, *consts), np.asarray(x))
        if m in times:
            row["ms"] = times[m] * 1e3
        out.append(row)
    return out


def markdown(results) -> str:
    lines = []
    for section, title in (("product", "Product A @ W"), ("roundtrip", "Affine round trip")):
        lines += [f"### {title} ({results['env']['device_kind']})", ""]
        lines += ["| D | batch | mode | error (real) | error (emulated) | ms | TFLOP/s |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for r in results[section]:
            err = f"{r['err']:.2e}" if "err" in r else "-"
            ms = f"{r['ms']:.3f}" if "ms" in r else "-"
            tf = f"{r['tflops']:.1f}" if "tflops" in r else "-"
            lines.append(
                f"| {r['dim']} | {r['batch']} | {r['mode']} | {err} | "
                f"{r['emulated_err']:.2e} | {ms} | {tf} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    jax = _setup(args.device)
    from _util import env_info

    from invnet import splitmm

    gpu = jax.default_backend() == "gpu"
    dims = args.dims or ([1024, 4096] if gpu else [64, 256])
    batch = args.batch or (65536 if gpu else 512)
    modes = args.modes or list(splitmm.MODES)
    timed = gpu or args.time
    results = {"env": env_info(args.device), "product": [], "roundtrip": []}
    for dim in dims:
        results["product"] += product_rows(args, modes, dim, batch, timed)
        results["roundtrip"] += roundtrip_rows(args, modes, dim, batch, timed)
    out = Path(args.out or os.environ.get("OUT") or HERE / "results" / args.device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "splitmm.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "splitmm.md").write_text(table)
    print(table)
    print(f"wrote {out}/splitmm.json, splitmm.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
