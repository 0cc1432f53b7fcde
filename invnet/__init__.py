"""invnet: invertible neural networks on JAX and Flax NNX.

Every layer is a bijection with ``forward(x) -> (y, log_det)`` and an exact
``inverse(y) -> (x, log_det)``; see `invnet.core` for the contract.
"""

from invnet._runtime import BakedParametersWarning, NonFiniteWarning, eager
from invnet._version import __version__
from invnet.benchmarking import BenchReport, bench
from invnet.builders import affine_flow, spline_flow
from invnet.compiled import (
    LU_INVERSE_METHODS,
    Compiled,
    CompiledTraceError,
    PureFunctions,
    StaleCompiledError,
    freeze,
)
from invnet.compiled import compile as compile  # the former name of freeze; not in __all__
from invnet.containers import Inverse, Sequential
from invnet.convert import NotInvertibleError, from_dense
from invnet.core import PRECISIONS, Bijector, Buffer, set_precision
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
    TransformerAutoregressive,
    data_init,
)
from invnet.objectives import InverseProblem, MaximumLikelihood, Regression, mmd, sample_posterior
from invnet.parallel import data_mesh, replicate, shard_batch
from invnet.pixel_data import bits_per_dim, dequantize
from invnet.revprop import Reversible as Reversible  # the class behind reversible(); not in __all__
from invnet.revprop import reversible
from invnet.tarflow import NoisyMaximumLikelihood, tarflow, tarflow_denoise
from invnet.train import Checkpoints, EarlyStopping, History, NonFiniteStepWarning, fit
from invnet.training.compile_cache import enable_compilation_cache
from invnet.variational import (
    VariationalHistory,
    effective_sample_size,
    fit_variational,
    importance_estimate,
)
from invnet.verification import VerifyReport, explain_nonfinite, verify

__all__ = [
    "__version__",
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
    "explain_nonfinite",
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
    "EarlyStopping",
    "Checkpoints",
    "History",
    "NonFiniteStepWarning",
    "MaximumLikelihood",
    "Regression",
    "InverseProblem",
    "mmd",
    "sample_posterior",
    "freeze",
    "eager",
    "BakedParametersWarning",
    "NonFiniteWarning",
    "Compiled",
    "StaleCompiledError",
    "CompiledTraceError",
    "PureFunctions",
    "LU_INVERSE_METHODS",
    "reversible",
    "Tanh",
    "Sigmoid",
    "SplineCoupling",
    "MaskedAutoregressive",
    "Householder",
    "spline_flow",
    "affine_flow",
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
    "TransformerAutoregressive",
    "tarflow",
    "NoisyMaximumLikelihood",
    "tarflow_denoise",
    "enable_compilation_cache",
]


def __dir__():
    """The public names only: the implementation modules (``invnet.core``, ``invnet.walk``,
    ...) stay importable for tools and tests, but tab completion shows what users call."""
    return sorted(__all__)
