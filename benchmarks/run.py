"""invnet benchmark suite: one command, JSON + markdown table + PNG plot.

    python benchmarks/run.py --device cpu --quick      # about a minute on 2 CPU cores
    python benchmarks/run.py --device cpu              # full CPU suite (<~10 minutes)
    python benchmarks/run.py --device gpu --out DIR    # on a CUDA machine (benchmarks/gpu.sh)

Sections (``--only`` picks some):

* ``lu``: one `LULinear` across D: forward, inverse, log-det; jitted eager layer (two
  triangular solves) vs `invnet.freeze` (one GEMM; with and without refinement) vs naive
  inversion on every call (``jnp.linalg.solve`` of the dense W, ``pinv``).
* ``models``: LU + LeakyReLU stacks and affine-coupling flows: eager (op by op), jit
  (``nnx.split`` + ``jax.jit``) and compiled; forward, inverse, log-det.
* ``gd``: exact compiled inverse vs reconstructing the input by gradient descent (Adam on
  ``|f(x) - y|^2``, fully jitted).
* ``accuracy``: the LU inverse methods on well- and ill-conditioned matrices.
* ``precision``: each matmul precision mode: time and round-trip error.
* ``reversible``: reversible vs ordinary backprop, XLA temp memory and step time vs depth.
* ``peers``: distrax / flowjax LU layers with the same weights (in this interpreter if they
  import, else in ``--peers-python``; skipped with a message otherwise).
* ``flows``: ``Flow.sample`` / ``log_prob`` as users call them (compiled by default) vs
  hand-jitted vs eager, with first-call (compile) times (``benchmarks/flows.py``).
* ``layers``: per layer, ``invnet.freeze`` (with and without the log-det) vs plain jit and
  the layers' default calls; dispatch overhead; LU inverse bias before/after the GEMM.
* ``flow_peers``: a RealNVP-style flow in invnet, distrax and flowjax: sampling,
  log-density and an Adam training step (``benchmarks/flow_peers.py``; skipped with a
  message when the peers do not import).

Timing: every function is jitted and run once to compile; then interleaved samples, each
ending in ``block_until_ready``; the median is reported. All arrays are float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SECTIONS = (
    "lu",
    "models",
    "gd",
    "accuracy",
    "precision",
    "reversible",
    "peers",
    "flows",
    "layers",
    "flow_peers",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes, about a minute on CPU")
    p.add_argument("--tiny", action="store_true", help="smallest sizes (used by the tests)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument(
        "--out",
        default=None,
        help="results folder (default: $OUT if set, else benchmarks/results/<device>)",
    )
    p.add_argument("--precision", default="highest", help="precision for the speed sections")
    p.add_argument(
        "--peers-python",
        default=os.environ.get("INVNET_PEERS_PYTHON"),
        help="python with distrax/flowjax installed (default $INVNET_PEERS_PYTHON)",
    )
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def _fast_sizes(flow_dims, flow_n, flow_batch, flow_blocks, flow_hidden, layer_dims):
    """Sizes of the ``flows`` / ``layers`` / ``flow_peers`` sections."""
    return dict(
        flow_dims=flow_dims,
        flow_n=flow_n,
        flow_batch=flow_batch,
        flow_blocks=flow_blocks,
        flow_hidden=flow_hidden,
        layer_dims=layer_dims,
    )


def sizes(args) -> dict:
    gpu = args.device == "gpu"
    if args.tiny:
        return dict(
            lu_dims=[16],
            models_dims=[8],
            batch=64,
            max_elems=1 << 12,
            depth=2,
            hidden=16,
            gd_steps=50,
            acc_dim=16,
            prec_dim=16,
            rev_depths=[2, 4],
            rev_dim=8,
            rev_hidden=16,
            rev_batch=16,
            peer_dims=[16],
            repeats=2,
            eager_max_dim=8,
            naive_max_dim=16,
            **_fast_sizes([4], 64, 32, 2, 8, [8]),
        )
    if args.quick:
        return dict(
            lu_dims=[64, 256],
            models_dims=[64],
            batch=1024,
            max_elems=1 << 18,
            depth=4,
            hidden=64,
            gd_steps=300,
            acc_dim=64,
            prec_dim=256,
            rev_depths=[4, 16],
            rev_dim=16,
            rev_hidden=64,
            rev_batch=128,
            peer_dims=[64, 256],
            repeats=3,
            eager_max_dim=64,
            naive_max_dim=256,
            **_fast_sizes([8, 64], 8192, 256, 4, 64, [64, 256]),
        )
    return dict(
        lu_dims=[64, 256, 1024, 4096],
        models_dims=[64, 256, 1024],
        batch=65536 if gpu else 4096,
        max_elems=(1 << 28) if gpu else (1 << 20),
        depth=4,
        hidden=256,
        gd_steps=1000,
        acc_dim=256,
        prec_dim=4096 if gpu else 1024,
        rev_depths=[4, 8, 16, 32, 64],
        rev_dim=32,
        rev_hidden=128,
        rev_batch=512,
        peer_dims=[64, 256, 1024, 4096] if gpu else [64, 256, 1024],
        repeats=7,
        eager_max_dim=256,
        naive_max_dim=4096 if gpu else 1024,
        **_fast_sizes([8, 64], 65536, 1024, 10, 64, [64, 256, 1024]),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if args.device == "gpu" and jax.default_backend() != "gpu":
        print(
            f"--device gpu but JAX's backend is {jax.default_backend()!r}: install a CUDA "
            "jax (pip install -e '.[cuda]') or run with --device cpu",
            file=sys.stderr,
        )
        return 2
    import _util
    import sections

    cfg = sizes(args)
    if args.repeats:
        cfg["repeats"] = args.repeats
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    out = Path(args.out or os.environ.get("OUT") or HERE / "results" / args.device)
    out.mkdir(parents=True, exist_ok=True)
    env = _util.env_info(args.device)
    env.update(
        mode=mode,
        precision=args.precision,
        sizes=cfg,
        command="python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    results: dict = {"env": env, "sections": {}, "skipped": {}}
    t_start = time.perf_counter()
    for name in SECTIONS:
        if name not in args.only:
            continue
        t0 = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            rows, skipped = getattr(sections, name)(cfg, args)
        except sections.Skip as exc:
            rows, skipped = [], str(exc)
        results["sections"][name] = rows
        if skipped:
            results["skipped"][name] = skipped
            print(f"[{name}] skipped: {skipped}", flush=True)
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))  # partial, kept on abort
    env["total_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    import report

    (out / "table.md").write_text(report.markdown(results))
    if not args.no_plot:
        msg = report.plot(results, out / "plot.png")
        if msg:
            print(msg)
    print(report.markdown(results))
    print(
        f"wrote {out}/results.json, table.md"
        + ("" if args.no_plot else ", plot.png")
        + f" in {env['total_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
