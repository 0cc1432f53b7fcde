"""Bijective layers, one family per module."""

from invnet.layers.activations import LeakyReLU
from invnet.layers.coupling import MLP, AdditiveCoupling, AffineCoupling
from invnet.layers.linear import LULinear
from invnet.layers.norm import ActNorm, data_init
from invnet.layers.permute import Permute
from invnet.layers.reshape import Reshape

__all__ = [
    "LULinear",
    "LeakyReLU",
    "AffineCoupling",
    "AdditiveCoupling",
    "MLP",
    "Permute",
    "Reshape",
    "ActNorm",
    "data_init",
]
