"""invnet: invertible neural networks on JAX and Flax NNX.

Every layer is a bijection with ``forward(x) -> (y, log_det)`` and an exact
``inverse(y) -> (x, log_det)``; see `invnet.core` for the contract.
"""

from invnet.benchmarking import BenchReport, bench
from invnet.builders import spline_flow
from invnet.compiled import (
    LU_INVERSE_METHODS,
    Compiled,
    CompiledTraceError,
    PureFunctions,
    StaleCompiledError,
    compile,
)
from invnet.convert import NotInvertibleError, from_dense
from invnet.core import PRECISIONS, Bijector, Buffer, Inverse, Sequential, set_precision
from invnet.dispatch import eager
from invnet.distributions import (
    ClassConditionalGaussian,
    DiagonalGaussian,
    Distribution,
    GaussianMixture,
    StudentT,
    Uniform,
)
from invnet.flows import Flow, StandardNormal
from invnet.glow import glow
from invnet.hidden import input_for_hidden, saliency
from invnet.io import load, read_extra_arrays, read_metadata, save
from invnet.layers import (
    MLP,
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Conv1x1,
    ConvAdditiveCoupling,
    ConvAffineCoupling,
    ConvNet,
    Dequantize,
    FactorOut,
    HaarDownsample,
    Householder,
    LeakyReLU,
    Logit,
    LULinear,
    MaskedAutoregressive,
    Permute,
    Reshape,
    Sigmoid,
    SplineCoupling,
    Squeeze,
    Tanh,
    data_init,
)
from invnet.objectives import InverseProblem, MaximumLikelihood, Regression, mmd, sample_posterior
from invnet.parallel import data_mesh, replicate, shard_batch
from invnet.pixel_data import bits_per_dim, dequantize
from invnet.revprop import Reversible, reversible
from invnet.train import History, NonFiniteStepWarning, fit
from invnet.variational import (
    VariationalHistory,
    effective_sample_size,
    fit_variational,
    importance_estimate,
)
from invnet.verification import VerifyReport, verify

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
    "Reshape",
    "ActNorm",
    "data_init",
    "set_precision",
    "PRECISIONS",
    "save",
    "load",
    "read_metadata",
    "read_extra_arrays",
    "data_mesh",
    "shard_batch",
    "replicate",
    "verify",
    "VerifyReport",
    "saliency",
    "input_for_hidden",
    "from_dense",
    "NotInvertibleError",
    "Flow",
    "StandardNormal",
    "Distribution",
    "DiagonalGaussian",
    "GaussianMixture",
    "StudentT",
    "ClassConditionalGaussian",
    "Uniform",
    "fit_variational",
    "importance_estimate",
    "effective_sample_size",
    "VariationalHistory",
    "fit",
    "History",
    "NonFiniteStepWarning",
    "MaximumLikelihood",
    "Regression",
    "InverseProblem",
    "mmd",
    "sample_posterior",
    "compile",
    "eager",
    "Compiled",
    "StaleCompiledError",
    "CompiledTraceError",
    "PureFunctions",
    "LU_INVERSE_METHODS",
    "reversible",
    "Reversible",
    "Tanh",
    "Sigmoid",
    "SplineCoupling",
    "MaskedAutoregressive",
    "Householder",
    "spline_flow",
    "bench",
    "BenchReport",
    "Conv1x1",
    "Squeeze",
    "HaarDownsample",
    "ConvAffineCoupling",
    "ConvAdditiveCoupling",
    "ConvNet",
    "FactorOut",
    "Logit",
    "Dequantize",
    "dequantize",
    "bits_per_dim",
    "glow",
]
