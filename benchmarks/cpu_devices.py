"""`invnet.fit` on a multi-core CPU: one JAX device (XLA's threads inside each operation)
against data parallel over one CPU device per core (``jax_num_cpu_devices`` and
``fit(..., mesh="all")``), per model.

JAX's CPU backend starts with one device, and XLA then parallelises inside each operation;
small convolutions and the many small elementwise operations of a flow leave most of the
second core idle. Split into one device per core, each core runs its own share of the
batch. Whether that pays depends on the model: per step the gradients are all-reduced
across the devices, which costs more than a small model's whole step.

The device count must be set before JAX starts, so every measurement runs in its own
process (``python benchmarks/cpu_devices.py --child MODEL N``); the parent alternates the
device counts round by round so that load drift hits both alike, and reports the median
milliseconds per training step of the epochs after the first (the first also compiles),
with the first epoch's seconds apart.

    python benchmarks/cpu_devices.py                 # about 4 minutes on 2 cores
    python benchmarks/cpu_devices.py --models glow32 --rounds 3 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import invnet  # importing starts no JAX backend, so the child can still set its devices

MODELS = {
    # name: (builder, data shape, batch, epochs, rows)
    "glow32": (lambda rngs: invnet.glow((32, 32, 3), levels=3, steps=4, hidden=32, rngs=rngs),
               (32, 32, 3), 64, 4, 1024),
    "glow8": (lambda rngs: invnet.glow((8, 8, 1), levels=2, steps=4, hidden=32, rngs=rngs),
              (8, 8, 1), 64, 4, 2048),
    "affine8": (lambda rngs: invnet.affine_flow(8, rngs=rngs), (8,), 256, 4, 16384),
    "spline8": (lambda rngs: invnet.spline_flow(8, rngs=rngs), (8,), 256, 4, 16384),
}  # fmt: skip


def child(model: str, devices: int) -> dict:
    """Runs in a fresh process: fit ``model`` on ``devices`` CPU devices, time its epochs."""
    jax.config.update("jax_num_cpu_devices", devices)  # before any JAX operation
    build, shape, batch, epochs, rows = MODELS[model]
    flow = build(nnx.Rngs(0))
    data = np.random.default_rng(0)
    x = data.uniform(size=(rows, *shape)) if len(shape) == 3 else data.normal(size=(rows, *shape))
    x = x.astype(np.float32)
    mesh = "all" if devices > 1 else None
    t0 = time.perf_counter()
    history = invnet.fit(flow, x, epochs=epochs, batch_size=batch, mesh=mesh, validation=0,
                         progress=False)  # fmt: skip
    total = time.perf_counter() - t0
    steps = rows // batch
    later = history.epoch_seconds[1:]
    return {
        "model": model,
        "devices": len(jax.devices()),
        "steps_per_epoch": steps,
        "first_epoch_s": history.epoch_seconds[0],
        "ms_per_step": statistics.median(later) / steps * 1e3,
        "total_s": total,
        "final_loss": history.train_loss[-1],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--devices", type=int, default=os.cpu_count() or 2,
                        help="CPU devices for the data-parallel runs (default: cores)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0
    load_before = os.getloadavg()
    runs = []
    for r in range(args.rounds):
        for model in args.models:
            counts = [1, args.devices] if r % 2 == 0 else [args.devices, 1]
            for n in counts:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", model, str(n)],
                    capture_output=True, text=True, check=True,
                    env={**os.environ, "JAX_PLATFORMS": "cpu"},  # the CPU, also beside a GPU
                )  # fmt: skip
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row.update(round=r, load=os.getloadavg()[0])
                runs.append(row)
                print(f"round {r} {model:8s} {n} device(s): {row['ms_per_step']:7.2f} ms/step, "
                      f"first epoch {row['first_epoch_s']:5.1f} s, load {row['load']:.2f}",
                      flush=True)  # fmt: skip
    print(f"\nmedian over {args.rounds} rounds (load average before {load_before[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f})")  # fmt: skip
    print(f"{'model':8s} {'1 device':>12s} {f'{args.devices} devices':>12s} {'speedup':>8s}")
    summary = {}
    for model in args.models:
        one = statistics.median(x["ms_per_step"] for x in runs if x["model"] == model
                                and x["devices"] == 1)  # fmt: skip
        many = statistics.median(x["ms_per_step"] for x in runs if x["model"] == model
                                 and x["devices"] == args.devices)  # fmt: skip
        summary[model] = {"one_device_ms": one, "data_parallel_ms": many, "speedup": one / many}
        print(f"{model:8s} {one:9.2f} ms {many:9.2f} ms {one / many:7.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python benchmarks/cpu_devices.py", *(argv or sys.argv[1:])])
        record = {"command": command,
                  "models": args.models, "cpu_count": os.cpu_count(),
                  "precision": "float32", "summary": summary, "runs": runs}  # fmt: skip
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
