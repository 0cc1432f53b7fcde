"""invnet: invertible neural networks on JAX and Flax NNX.

Every layer is a bijection with ``forward(x) -> (y, log_det)`` and an exact
``inverse(y) -> (x, log_det)``; see `invnet.core` for the contract.
"""

from invnet.compile import LU_INVERSE_METHODS, Compiled, StaleCompiledError, compile
from invnet.core import PRECISIONS, Bijector, Buffer, Inverse, Sequential, set_precision
from invnet.io import load, read_metadata, save
from invnet.layers import (
    MLP,
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    LeakyReLU,
    LULinear,
    Permute,
    data_init,
)
from invnet.reversible import Reversible, reversible

__version__ = "0.1.0"

__all__ = [
    "Bijector",
    "Buffer",
    "Sequential",
    "Inverse",
    "LULinear",
    "LeakyReLU",
    "AffineCoupling",
    "AdditiveCoupling",
    "MLP",
    "Permute",
    "ActNorm",
    "data_init",
    "set_precision",
    "PRECISIONS",
    "save",
    "load",
    "read_metadata",
    "compile",
    "Compiled",
    "StaleCompiledError",
    "LU_INVERSE_METHODS",
    "reversible",
    "Reversible",
]
