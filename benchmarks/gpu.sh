#!/usr/bin/env bash
# invnet GPU benchmarks and GPU tests. Run from anywhere on a machine with a CUDA jax:
#
#   bash benchmarks/gpu.sh                 # results in $OUT if set, else benchmarks/results/gpu
#   QUICK=1 bash benchmarks/gpu.sh         # small sizes (about a minute)
#
# Needs python3 with jax (CUDA), flax, optax, numpy, scipy; invnet is used from this checkout
# through PYTHONPATH (no install, no internet). matplotlib (plot), pytest (GPU tests) and
# distrax/flowjax (peers) are optional: missing ones are skipped with a message.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results/gpu}"
mkdir -p "$DEST"
status=0

"$PY" - <<'PY' 2>&1 | tee "$DEST/device.txt"
import jax
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
PY

extra=()
if [ "${QUICK:-0}" = "1" ]; then extra+=(--quick); fi
"$PY" benchmarks/run.py --device gpu --out "$DEST" "${extra[@]}" 2>&1 | tee "$DEST/run.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# error-corrected split products (invnet.splitmm) vs "highest", "default" and XLA's presets:
# error against float64 and TFLOP/s on the tensor cores (splitmm.json, splitmm.md)
smm=()
if [ "${QUICK:-0}" = "1" ]; then smm+=(--dims 1024 --batch 8192); fi
"$PY" benchmarks/splitmm.py --device gpu --out "$DEST" "${smm[@]}" 2>&1 | tee "$DEST/splitmm.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# image flows: Conv1x1 / Glow forward, inverse, log-det (jit vs compiled), Glow training step,
# reversible vs ordinary backprop memory by depth (images_gpu.json, images_gpu.md, images_gpu.png)
"$PY" benchmarks/images.py --out "$DEST" "${extra[@]}" 2>&1 | tee "$DEST/images.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# invnet bench on a saved GLOW-like flow (LU + affine coupling x4, D=256): the user-facing
# numbers (eager / call / jit / compiled, first-call times, peak GPU memory)
"$PY" - "$DEST/bench_model.invnet" <<'PY'
import sys
from flax import nnx
import invnet
rngs = nnx.Rngs(0)
blocks = []
for _ in range(4):
    blocks += [invnet.LULinear(256, rngs=rngs), invnet.AffineCoupling(256, hidden=(512, 512), rngs=rngs)]
invnet.save(invnet.Flow(invnet.Sequential(*blocks)), sys.argv[1])
PY
if "$PY" -m invnet.cli bench "$DEST/bench_model.invnet" --device gpu --batch-size 65536 --json \
  > "$DEST/bench.json" 2> "$DEST/bench.log"; then
  "$PY" -c "import json, sys; from invnet.benchmarking import BenchReport as R
print(R.from_dict(json.load(open(sys.argv[1]))).table())" "$DEST/bench.json" | tee "$DEST/bench.txt"
else
  status=1; cat "$DEST/bench.log"
fi

# TarFlow inverse on the device: sequential (KV cache) vs jacobi sweeps at several tolerances;
# jacobi's parallel sweeps are meant for accelerators (on 2 CPU cores sequential won)
tf=(--epochs 2)
if [ "${QUICK:-0}" = "1" ]; then tf=(--epochs 1 --repeats 3); fi
"$PY" benchmarks/tarflow.py "${tf[@]}" --json "$DEST/tarflow_gpu.json" 2>&1 | tee "$DEST/tarflow.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# LU layers: the default inverse against the forward (interleaved medians)
"$PY" benchmarks/lu_speed.py --only ratio 2>&1 | tee "$DEST/lu_speed.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pytest -o addopts="" -m gpu tests/test_gpu.py tests/test_splitmm.py -q -p no:cacheprovider 2>&1 | tee "$DEST/pytest_gpu.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "pytest is not installed: GPU tests (tests/test_gpu.py) skipped" | tee "$DEST/pytest_gpu.log"
fi
echo "results in $DEST (results.json, table.md, plot.png, splitmm.md, images_gpu.md, tarflow_gpu.json, lu_speed.log, run.log, pytest_gpu.log)"
exit $status
