"""Verify a model: round trips, per-layer errors, log-dets, float64 drift, conditioning.

`invnet.verify(model, x)` (in `invnet.verification.checks`) runs, in one `jax.jit`-compiled
pass, every check below and returns a `VerifyReport` (in `invnet.verification.report`, which
renders it as a table or JSON). Inputs are validated by the model's own checks (the same
messages as ``model.forward``), so a sample is one event of the model: a vector ``(D,)``, an
image ``(H, W, C)``, ...; the output event may have another shape (a reshape or squeeze).

* **Round trips.** ``x -> y = f(x) -> f^{-1}(y)`` and ``y -> x' = f^{-1}(y) -> f(x')``, each
  direction recomputed from its own input (nothing is cached, so a wrong inverse cannot hide
  behind a stored forward result). Per sample ``i`` the relative error is
  ``||x_i - f^{-1}(f(x_i))||_inf / max(||x_i||_inf, ||y_i||_inf)``, norms over all event
  axes: the scale of both ends, so a large bias (``y`` far from 0) or an input near 0 does not
  turn rounding into a fake failure. Max and mean of the absolute and relative errors are
  reported.
* **Per layer.** The model is walked into its leaf layers (`invnet.walk.steps`: nested
  `Sequential`, `Inverse`, `Flow`, `Reversible`, and the inside of multi-branch layers such
  as `FactorOut`, each row named by its path) and each layer is round-tripped on the
  intermediate states that reach it (``h_k = f_k(h_{k-1})``, then ``f_k^{-1}(h_k)`` against
  ``h_{k-1}``; and the same from the output side), so the report names the layer that loses
  precision.
* **Log-det.** ``log|det J|`` from ``slogdet(jax.jacrev(f))`` of the flattened event map
  (a ``D x D`` Jacobian) on a small subsample, against the model's ``log_det``, for
  ``forward`` and for ``inverse``; and ``forward`` + ``inverse`` log-dets summing to 0.
* **float64 drift.** The same parameters cast to float64 (under ``jax.enable_x64``) re-run
  forward and inverse; the report gives the float32-vs-float64 difference of outputs and
  log-dets and the float64 round-trip error.
* **Conditioning.** Each layer states how much a round trip through it can amplify relative
  rounding errors (`invnet.Bijector.error_bound`: ``cond(W)`` of an `LULinear`,
  ``1 / slope`` of a `LeakyReLU`, ``exp(2 * clamp)`` of an `AffineCoupling`, 1 for
  permutations and reshapes, ...); the overall bound is their product.
* **Tolerance.** ``tol = min(SAFETY * D * eps * bound, sqrt(eps))`` with ``SAFETY = 10``,
  ``D`` the event size (elements of one sample) and ``eps`` the machine epsilon of the
  input's dtype: ``D * eps * bound`` is the textbook rounding bound of a D-term product or
  triangular solve (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3 and 8),
  the factor 10 covers the forward and inverse each adding their own. The ``sqrt(eps)`` cap
  (3.5e-4 in float32) says that a model whose conditioning allows it to lose more than half
  its digits fails, however well that loss is explained. Each layer is checked against the
  same rule with its own bound; ``tol=`` overrides the round-trip tolerance of the model and
  of every layer. Log-dets are checked per sample against
  ``SAFETY * eps * (D * cond(J) + |log_det| + 1)``.
* **Non-finite values.** Samples with NaN/inf inputs (or conditions) are counted and left out
  of the statistics; NaN/inf outputs of finite inputs are counted and fail the check.
  `explain_nonfinite` (in `invnet.verification.nonfinite`) names the layer where each such
  sample left the model's range.
"""

from invnet.verification.checks import SAFETY, layer_bound, verify
from invnet.verification.nonfinite import (
    NonFiniteLayer,
    NonFiniteReport,
    explain_nonfinite,
    warn_nonfinite,
)
from invnet.verification.report import ErrorStats, LayerCheck, VerifyReport

__all__ = [
    "verify",
    "VerifyReport",
    "ErrorStats",
    "LayerCheck",
    "SAFETY",
    "layer_bound",
    "explain_nonfinite",
    "warn_nonfinite",
    "NonFiniteReport",
    "NonFiniteLayer",
]
