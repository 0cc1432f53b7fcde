"""Training throughput of `invnet.fit` vs device count (data parallel, ``mesh=``).

Each device count runs in its own process, because
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (N CPU devices on one machine) must be
set before jax is imported. One device runs ``mesh=None``; N > 1 runs
``mesh=invnet.data_mesh(N)``. The workload: a 4-block affine-coupling flow (8-D, hidden
128x128) trained by maximum likelihood, batch 1024, 16 Adam steps per epoch; throughput is
training samples per second over the epochs after the first (which includes compilation),
median of epochs. On a GPU machine the forced-device flag does nothing and there is usually
one GPU: device counts above what is available are reported as skipped.

Usage::

    python benchmarks/scaling.py                    # 1, 2, 4 devices; about 30 s on CPU
    python benchmarks/scaling.py --devices 1 2 4 8 --epochs 6

Writes ``benchmarks/results/scaling_<platform>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child(n_devices: int, epochs: int, batch_size: int, steps: int) -> dict:
    import jax
    import numpy as np

    import invnet
    from invnet.demo import build_flow

    info = {
        "devices": n_devices,
        "available": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }
    if jax.device_count() < n_devices:
        return {**info, "skipped": f"only {jax.device_count()} device(s)"}
    rng = np.random.default_rng(0)
    n = batch_size * steps
    centers = rng.normal(size=(4, 8)) * 3
    x = (centers[rng.integers(0, 4, n)] + rng.normal(size=(n, 8))).astype(np.float32)
    flow = build_flow(8, blocks=4, hidden=128, seed=0)
    mesh = None if n_devices == 1 else invnet.data_mesh(n_devices)
    history = invnet.fit(
        flow, x, epochs=epochs, batch_size=batch_size, learning_rate=1e-3, mesh=mesh,
        progress=False,
    )  # fmt: skip
    steady = history.epoch_seconds[1:]
    per_epoch = float(np.median(steady))
    return {
        **info,
        "batch_size": batch_size,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "first_epoch_s": history.epoch_seconds[0],
        "epoch_s": per_epoch,
        "samples_per_s": n / per_epoch,
        "final_train_loss": history.train_loss[-1],
        "nonfinite_steps": history.nonfinite_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per epoch")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.epochs, args.batch_size, args.steps)))
        return

    rows = []
    for n in args.devices:
        env = dict(os.environ)
        flag = f"--xla_force_host_platform_device_count={n}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, __file__, "--child", str(n), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps)]  # fmt: skip
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["process_s"] = time.perf_counter() - t0
        rows.append(row)
        shown = row.get("skipped") or f"{row['samples_per_s']:,.0f} samples/s"
        print(f"{n} device(s): {shown}", flush=True)

    ran = [r for r in rows if "skipped" not in r]
    base = ran[0]["samples_per_s"] if ran else None
    plat = rows[0]["platform"]
    result = {
        "benchmark": "invnet.fit throughput vs data-parallel device count",
        "host": {
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_at_end": os.getloadavg()[0],
        },
        "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"scaling_{plat}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# invnet.fit throughput vs device count ({plat}, {rows[0]['device_kind']}, "
        f"{os.cpu_count()} CPU cores, jax {rows[0]['jax']})",
        "",
        "| devices | samples/s | speed-up | epoch (s) | first epoch incl. compile (s) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['devices']} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(
                f"| {r['devices']} | {r['samples_per_s']:,.0f} | "
                f"{r['samples_per_s'] / base:.2f}x | {r['epoch_s']:.3f} | "
                f"{r['first_epoch_s']:.2f} |"
            )
    if plat == "cpu":
        lines += [
            "",
            "Forced CPU devices share the host's cores, and one CPU device already runs its "
            "matmuls on several threads, so on CPU this measures the overhead of the sharded "
            "step (all-reduce, smaller per-device batches), not a speed-up; data parallelism "
            f"pays off with several accelerators. Load average at the end: "
            f"{result['host']['load_average_1min_at_end']:.2f} (a shared machine is noisy).",
        ]
    lines += ["", f"Command: `{result['command'].strip()}`", ""]
    (args.out / f"scaling_{plat}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
