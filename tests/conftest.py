"""Tests run in float64 by default (tight tolerances); float32 cases pass dtypes explicitly,
under strict dtype promotion (no implicit float32/float64 mixing anywhere in invnet).

Property tests (hypothesis) are derandomised by default, so a run of the suite is
reproducible and CI cannot fail by the luck of the draw; ``HYPOTHESIS_PROFILE=explore``
draws fresh random examples on every run (how new bugs are found: run it in a loop).
"""

import os

import jax
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

settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
