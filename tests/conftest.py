"""Tests run in float64 by default (tight tolerances); float32 cases pass dtypes explicitly."""

import jax

jax.config.update("jax_enable_x64", True)
