"""Tests run in float64 by default (tight tolerances); float32 cases pass dtypes explicitly,
under strict dtype promotion (no implicit float32/float64 mixing anywhere in invnet).

Property tests (hypothesis) are derandomised by default, so a run of the suite is
reproducible and CI cannot fail by the luck of the draw; ``HYPOTHESIS_PROFILE=explore``
draws fresh random examples on every run (how new bugs are found: run it in a loop).
"""

import os

import jax
import pytest
from hypothesis import settings

jax.config.update("jax_enable_x64", True)
# Strict dtype promotion: JAX refuses every implicit promotion between different dtypes
# (a float32 array with a float64 one, an int32 with a float), so any mixed-dtype op left in
# invnet raises here instead of silently computing in whichever dtype wins. Python scalars
# (weak types) stay fine. The environment variable carries it to the suite's subprocesses
# (doctests, multi-process runs). Third-party and user code that is not strict-clean
# (optax's update inside invnet.fit, the examples' and benchmarks' own optax loops) runs
# under jax.numpy_dtype_promotion("standard"), scoped where it is called.
jax.config.update("jax_numpy_dtype_promotion", "strict")
os.environ["JAX_NUMPY_DTYPE_PROMOTION"] = "strict"


def pytest_configure(config):
    """The default command (which leaves out ``extended``) compiles with XLA's CPU backend at
    optimisation level 0: the same HLO, the same fusions and the same IEEE arithmetic (XLA
    never enables fast-math by default), but LLVM skips its expensive passes, which makes
    compiling, most of the suite's time, about 2x faster. The extended run (CI's second
    command) compiles at the default level, as users do. ``INVNET_TEST_XLA_OPT=default``
    keeps the default level in any run. Set here, before JAX's backend starts; subprocesses
    inherit it through the environment."""
    markexpr = config.getoption("markexpr", "") or ""
    fast = "not extended" in markexpr and os.environ.get("INVNET_TEST_XLA_OPT") != "default"
    if fast and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


# Every compiled function keeps its machine code mapped into the process (about three memory
# maps per executable on XLA:CPU), and Linux caps a process at vm.max_map_count maps (65,530
# by default). A pytest-xdist worker of the extended run compiles tens of thousands of
# functions (op by op references, one function per contract case and dtype, ...); past the
# cap XLA's compiler crashed the worker with a segmentation fault (seen in CI at ~65% of the
# extended run). After any test that leaves the process above MAP_BUDGET maps (60% of the
# cap), JAX's compilation caches are cleared: the executables only those caches hold are
# freed and their maps with them (the next test recompiles what it needs).
def _map_cap() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as cap:
            return int(cap.read())
    except (OSError, ValueError):
        return 65_530


MAP_BUDGET = int(0.6 * _map_cap())


def _memory_maps() -> int:
    try:
        with open(f"/proc/{os.getpid()}/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux: no such cap to stay under
        return 0


@pytest.fixture(autouse=True)
def _stay_under_the_memory_map_cap():
    yield
    if _memory_maps() > MAP_BUDGET:
        jax.clear_caches()


settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
