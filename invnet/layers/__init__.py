"""Bijective layers, one family per module."""

from invnet.layers.activations import LeakyReLU, Sigmoid, Tanh
from invnet.layers.autoregressive import MaskedAutoregressive
from invnet.layers.conv import Conv1x1
from invnet.layers.conv_coupling import ConvAdditiveCoupling, ConvAffineCoupling, ConvNet
from invnet.layers.coupling import MLP, AdditiveCoupling, AffineCoupling
from invnet.layers.linear import LULinear
from invnet.layers.multiscale import FactorOut
from invnet.layers.norm import ActNorm, data_init
from invnet.layers.orthogonal import Householder
from invnet.layers.permute import Permute
from invnet.layers.pixels import Dequantize, Logit
from invnet.layers.reshape import Reshape
from invnet.layers.spline import SplineCoupling
from invnet.layers.squeeze import HaarDownsample, Squeeze
from invnet.layers.tarflow import TransformerAutoregressive

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
    "Tanh",
    "Sigmoid",
    "SplineCoupling",
    "MaskedAutoregressive",
    "Householder",
    "Conv1x1",
    "Squeeze",
    "HaarDownsample",
    "ConvAffineCoupling",
    "ConvAdditiveCoupling",
    "ConvNet",
    "FactorOut",
    "Logit",
    "Dequantize",
    "TransformerAutoregressive",
]
