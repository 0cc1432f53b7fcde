"""Tests run in float64 by default (tight tolerances); float32 cases pass dtypes explicitly.

Property tests (hypothesis) are derandomised by default, so a run of the suite is
reproducible and CI cannot fail by the luck of the draw; ``HYPOTHESIS_PROFILE=explore``
draws fresh random examples on every run (how new bugs are found: run it in a loop).
"""

import os

import jax
from hypothesis import settings

jax.config.update("jax_enable_x64", True)

settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
