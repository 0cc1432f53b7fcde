"""One Glow training step at 32x32x3 (issue 19's target): invnet against normflows, each at
its defaults, in one process, samples interleaved.

The models, the step and the peer are those of ``benchmarks/images.py`` (its ``train``
section): ``invnet.glow((32, 32, 3), levels=3, steps=4, hidden=32)``, batch 64, uniform
[0, 1) images, parameters perturbed by 0.02 and ActNorm data-initialised; one step is
``jax.jit`` of ``value_and_grad`` of the NLL (nats per dimension) and an ``optax.adam(1e-3)``
update. normflows' Glow of the same architecture runs eagerly at torch's defaults: the
thread count torch picks itself and the OpenMP environment as found (this script sets no
``OMP_*`` variable; the report prints what it ran with). ``--torch-threads 1`` adds the same
model on one torch thread beside it, labelled.

Timing: rounds; in each round every variant runs ``--inner`` steps back to back (after a
warm-up), in a rotating order, so load drift hits all of them alike. Reported: the median
over rounds of ms per step, the spread (the 25th and 75th percentiles), and the 1-minute
load average before, after and at every round (the machine is shared).

    python benchmarks/glow_step.py      # 1-3 minutes on 2 cores (longer when they are busy:
                                        # torch's default threads then slow down many-fold)
                                        # with a row data-parallel over one CPU device per core
    python benchmarks/glow_step.py --compare-before --torch-threads 1 --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.errors import TraceContextError

import invnet

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _util  # noqa: E402
import images  # noqa: E402

SPEC = dict(shape=(32, 32, 3), levels=3, steps=4, hidden=32)


@contextlib.contextmanager
def before_glow_step():
    """Traces invnet's step as the library did before the Glow-step changes of issue 19 (for
    ``--compare-before``): every ActNorm computed its batch statistics on every step (a
    select picked the stored values), and the affine coupling read its raw parameters
    through a reshape and a transpose. Same values either way (the script checks)."""
    from invnet.layers import transformers
    from invnet.layers.norm import ActNorm

    def init_from(self, x, force=False, inverse=False):
        mean, std = self._finite_stats(x)
        dt = self.param_dtype
        if inverse:
            new_bias, new_log_scale = (mean / std).astype(dt), jnp.log(std).astype(dt)
        else:
            new_bias, new_log_scale = (-mean).astype(dt), (-jnp.log(std)).astype(dt)
        done = jnp.asarray(False if force else self.initialized[...])
        bias = jnp.where(done, self.bias[...], new_bias)
        log_scale = jnp.where(done, self.log_scale[...], new_log_scale)
        try:
            self.bias[...], self.log_scale[...] = bias, log_scale
            self.initialized[...] = jnp.asarray(True)
        except TraceContextError:
            pass
        return bias, log_scale

    saved = ActNorm._init_from, transformers.Affine.takes_parts
    ActNorm._init_from, transformers.Affine.takes_parts = init_from, False
    try:
        yield
    finally:
        ActNorm._init_from, transformers.Affine.takes_parts = saved


def _rounds(calls: dict, rounds: int, inner: int) -> dict:
    """``{name: [ms per step of each round]}`` for ``{name: fn}`` (``fn()`` blocks)."""
    names = list(calls)
    for fn in calls.values():  # warm up (compiled already)
        fn()
        fn()
    out = {name: [] for name in names}
    loads = []
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            for _ in range(inner):
                calls[name]()
            out[name].append((time.perf_counter() - t0) / inner * 1e3)
        loads.append(os.getloadavg()[0])
    out["_load"] = loads
    return out


def _summary(samples):
    q = np.percentile(samples, [25, 50, 75])
    return {"median_ms": float(q[1]), "p25_ms": float(q[0]), "p75_ms": float(q[2])}


def _max_abs_diff(a, b) -> float:
    """Largest ``|a - b|`` over two ``(loss, params)`` results of one step (host copies, so
    arrays on different devices compare)."""
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def invnet_step(spec, batch, precision="highest", context=contextlib.nullcontext, mesh=None):
    """``(call, (loss0, new_params), compile_s)``: invnet's training step on one batch,
    traced (compiled) inside ``context()``, ready to time. With ``mesh`` (`invnet.data_mesh`)
    the step runs data-parallel as ``invnet.fit(..., mesh=mesh)`` runs it: the batch split
    over the mesh's devices, the parameters and optimizer state replicated."""
    flow = images._glow(spec["shape"], spec["levels"], spec["steps"], spec["hidden"], batch,
                        precision)  # fmt: skip
    x = images._images(spec["shape"], batch)
    step, state = images._train_step(flow)
    if mesh is not None:
        state, x = invnet.replicate(state, mesh), invnet.shard_batch(x, mesh)
    with context():
        t0 = time.perf_counter()
        params, _, loss0 = jax.block_until_ready(step(*state, x))
        compile_s = time.perf_counter() - t0

    def call():
        jax.block_until_ready(step(*state, x))

    return call, (loss0, params), compile_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument(
        "--torch-threads",
        type=int,
        nargs="*",
        default=[],
        help="extra torch thread counts to time beside torch's default",
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=os.cpu_count() or 1,
        help="also time invnet's step data-parallel over this many CPU devices "
        "(jax_num_cpu_devices; the one-device row runs on the first of them); default: "
        "one per core; 1 for none",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument(
        "--compare-before",
        action="store_true",
        help="also time invnet's step as traced before issue 19's changes",
    )
    args = parser.parse_args(argv)
    if args.cpu_devices > 1:  # before anything starts JAX's backends
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    load_before = os.getloadavg()
    env = _util.env_info(jax.default_backend())
    peer, info = images.load_normflows()  # before anything sets a torch thread count
    calls = {}
    call, (loss0, params), compile_s = invnet_step(SPEC, args.batch)
    calls["invnet (jax.jit, XLA CPU defaults)"] = call
    extra = {"invnet_compile_s": compile_s, "invnet_loss_first": float(loss0)}
    if args.cpu_devices > 1 and jax.default_backend() == "cpu":  # not beside a GPU's step
        mesh = invnet.data_mesh(args.cpu_devices)
        call_m, (loss_m, params_m), compile_m = invnet_step(SPEC, args.batch, mesh=mesh)
        calls[f"invnet data-parallel, {args.cpu_devices} CPU devices"] = call_m
        extra["data_parallel_compile_s"] = compile_m
        # the order of the float32 sums differs
        extra["data_parallel_vs_one_device_max_abs_diff"] = _max_abs_diff(
            (loss_m, params_m), (loss0, params)
        )
    if args.compare_before:
        call_b, (loss_b, params_b), _ = invnet_step(SPEC, args.batch, context=before_glow_step)
        calls["invnet before issue 19's changes"] = call_b
        extra["before_vs_now_max_abs_diff"] = _max_abs_diff((loss_b, params_b), (loss0, params))
    if peer is not None:
        torch = peer[0]
        x = images._images(SPEC["shape"], args.batch)
        x_init = images._images(SPEC["shape"], args.batch, seed=3)
        default = info["torch_default_threads"]
        nf_step, losses, first_s, _ = images._nf_train(peer, dict(SPEC), x, x_init, 2, default)
        extra.update(normflows_first_step_s=first_s, normflows_loss_first=losses[0])
        for n in [default] + [n for n in args.torch_threads if n != default]:
            label = f"normflows (torch default: {n} threads)" if n == default else (
                f"normflows (torch.set_num_threads({n}))")  # fmt: skip

            def on(n=n):
                torch.set_num_threads(n)
                nf_step()

            calls[label] = on
    samples = _rounds(calls, args.rounds, args.inner)
    load_after = os.getloadavg()
    rows = {name: _summary(s) for name, s in samples.items() if not name.startswith("_")}
    result = {
        "env": env,
        "spec": {**SPEC, "batch": args.batch, "precision": "float32, matmul highest"},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "peer": info,
        "load_before": load_before,
        "load_after": load_after,
        "load_per_round": samples["_load"],
        "rows": rows,
        "samples_ms": {k: v for k, v in samples.items() if not k.startswith("_")},
        **extra,
        "command": " ".join(["python benchmarks/glow_step.py", *(argv or sys.argv[1:])]),
    }
    base = next(iter(rows.values()))["median_ms"]
    print(f"load average before {load_before}, after {load_after}")
    print(f"OMP_WAIT_POLICY={result['omp_wait_policy']} XLA_FLAGS={result['xla_flags']}")
    if "data_parallel_vs_one_device_max_abs_diff" in extra:
        print(f"data-parallel vs one device, loss and parameters after one step: max |diff| "
              f"{extra['data_parallel_vs_one_device_max_abs_diff']:.1e}")  # fmt: skip
    if "before_vs_now_max_abs_diff" in extra:
        print(f"before vs now, loss and parameters after one step: max |diff| "
              f"{extra['before_vs_now_max_abs_diff']:.1e}")  # fmt: skip
    for name, r in rows.items():
        print(f"{name:48s} {r['median_ms']:7.1f} ms  [{r['p25_ms']:.1f}, {r['p75_ms']:.1f}]"
              f"  invnet speedup {r['median_ms'] / base:.2f}x")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
