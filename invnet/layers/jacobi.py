r"""The inverse of a causal (autoregressive) layer by Jacobi sweeps, with a certificate.

A causal layer computes ``y_t = tau(x_t; theta_t(x_{<t}))`` for tokens ``t = 0..T-1`` (a
token is a feature of `invnet.MaskedAutoregressive` or a patch of
`invnet.TransformerAutoregressive`). Its inverse solves ``x = G(x)`` with

    G(x)_t = tau^{-1}(y_t; theta_t(x_{<t}))          (one sweep: one parallel conditioner pass)

A Jacobi sweep updates every token at once from the current estimate. Token 0 needs no
other token, so after sweep 1 it is exact; by induction after ``k`` sweeps tokens ``< k``
are exact, whatever the start: **``T`` sweeps give the exact inverse** (the same arithmetic,
so the same bits, as the one-token-at-a-time inverse), and a fixed point reached earlier
(``G(x) = x``) is the exact inverse too. In practice the later tokens settle long before
their turn, so most samples stop after far fewer sweeps (Song et al. 2021; TarFlow's
users report 2.5-5x).

`jacobi_inverse` stops a sample when its estimate stops changing,
``max_t |x_k - x_{k-1}| <= tol * max(1, max_t |x_k|)`` (``tol = 0``: to the bit), or when it
has had ``T`` sweeps (exact by the induction above); it stops the batch when every sample
has stopped or at ``max_sweeps``. Per sample it returns a `Certificate`: the sweeps used,
the last change, and whether it converged. A sample that hit the cap without converging is
**not** an inverse: the layers set it to NaN in their ordinary ``inverse`` (so
`invnet.verify` counts it) and report it in ``inverse_with_certificate``.

The loop is a ``lax.fori_loop`` of ``max_sweeps`` steps whose body is skipped (``lax.cond``)
once the whole batch has stopped, so it stays reverse-differentiable (``jax.grad``,
``jax.jacrev``) and costs only the sweeps it runs. Under ``jax.vmap`` the skip becomes a
select and every step runs.

Reference: Song, Meng, Liao & Ermon, "Accelerating Feedforward Computation via Parallel
Nonlinear Equation Solving", ICML 2021; Zhai et al., "Normalizing Flows are Capable
Generative Models" (TarFlow), 2024.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from invnet import _runtime

__all__ = [
    "Certificate",
    "CertifiedInverse",
    "jacobi_inverse",
    "INVERSE_METHODS",
    "check_inverse_method",
]

INVERSE_METHODS = ("sequential", "jacobi")


class Certificate(NamedTuple):
    """Per sample (arrays of the batch shape): ``sweeps`` conditioner passes used (int32),
    ``change`` the max abs change of the last sweep, ``residual`` ``max |f(x_hat) - y|``
    (one more forward pass), ``converged`` (bool). The sequential inverse reports ``T``
    sweeps, change 0 and converged True."""

    sweeps: jax.Array
    change: jax.Array
    residual: jax.Array
    converged: jax.Array

    def summary(self) -> dict:
        """Plain numbers over the batch (for reports)."""
        conv = jnp.asarray(self.converged)
        return {
            "samples": int(conv.size),
            "unconverged": int(jnp.sum(~conv)),
            "max_sweeps_used": int(jnp.max(self.sweeps)) if conv.size else 0,
            "mean_sweeps": float(jnp.mean(self.sweeps)) if conv.size else 0.0,
            "max_change": float(jnp.max(self.change)) if conv.size else 0.0,
            "max_residual": float(jnp.nanmax(self.residual)) if conv.size else 0.0,
        }


def check_inverse_method(name: str, method: str, max_sweeps, tol) -> None:
    """Refuse an unknown method, a cap below 1 or a negative tolerance, saying what to do."""
    if method not in INVERSE_METHODS:
        raise ValueError(f"{name}: inverse_method must be one of {INVERSE_METHODS}, got {method!r}")
    if max_sweeps is not None and (not isinstance(max_sweeps, int) or max_sweeps < 1):
        raise ValueError(
            f"{name}: max_sweeps must be a positive integer or None (None: as many sweeps as "
            f"tokens, always exact), got {max_sweeps!r}"
        )
    if not (tol >= 0.0 and tol < 1.0):
        raise ValueError(f"{name}: tol must be in [0, 1) (0: stop when nothing changes), got {tol}")


def _per_sample(a: jax.Array) -> jax.Array:
    """Max over all axes but the first (the flattened batch)."""
    return jnp.max(a.reshape(a.shape[0], -1), axis=-1)


def jacobi_inverse(
    sweep: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    x0: jax.Array,
    *,
    n_tokens: int,
    max_sweeps: int,
    tol: float,
):
    """Iterate ``x <- sweep(x)[0]`` from ``x0`` (batch on axis 0) as described above.

    ``sweep(x) -> (G(x), per-element log-derivative of the inverse)``. Returns
    ``(x, log_det_elements, sweeps, change, converged)``; ``x`` is the last estimate,
    unconverged samples included (the caller decides what to do with them).
    """
    n = x0.shape[0]

    def run(k, carry):
        x, ld, sweeps, change, done = carry
        x_new, ld_new = sweep(x)
        delta = _per_sample(jnp.abs(x_new - x))
        scale = jnp.maximum(_per_sample(jnp.abs(x_new)), jnp.ones((), x.dtype))
        settled = (delta <= tol * scale) | (k + 1 >= n_tokens)  # fixed point, or T sweeps
        keep = done.reshape((n,) + (1,) * (x.ndim - 1))
        return (
            jnp.where(keep, x, x_new),
            jnp.where(keep, ld, ld_new),
            jnp.where(done, sweeps, k + 1),
            jnp.where(done, change, delta),
            done | settled,
        )

    def body(k, carry):
        return jax.lax.cond(jnp.all(carry[4]), lambda _, c: c, run, k, carry)

    start = (
        x0,
        jnp.zeros_like(x0),
        jnp.zeros((n,), jnp.int32),
        jnp.full((n,), jnp.inf, x0.dtype),
        jnp.zeros((n,), bool),
    )
    return jax.lax.fori_loop(0, max_sweeps, body, start)


def nan_unconverged(x, log_det, converged):
    """``x`` and ``log_det`` with unconverged samples (batch axis 0) set to NaN."""
    keep = converged.reshape(converged.shape + (1,) * (x.ndim - 1))
    nan = jnp.full((), jnp.nan, x.dtype)
    return jnp.where(keep, x, nan), jnp.where(converged, log_det, nan)


class CertifiedInverse:
    """Mixin for causal `invnet.Bijector` layers: the inverse chosen at construction
    (``inverse_method``, ``max_sweeps``, ``tol``) and `inverse_with_certificate`.

    The layer provides ``n_tokens()``, ``_sweep(x, y, cond) -> (G(x), log-derivatives)``
    and ``_sequential_inverse(y, cond) -> (x, log-derivatives)``, both on arrays with one
    flattened batch axis in front of the event, and sets ``inverse_method``, ``max_sweeps``
    and ``tol`` (checked with `check_inverse_method`).
    """

    def inverse_with_certificate(
        self, y, *, cond=None, method: str | None = None, max_sweeps=None, tol=None
    ):
        """``(x, log_det, certificate)``: the inverse by ``method`` (default: the layer's
        ``inverse_method``) with a per-sample `Certificate` (sweeps, last change, residual
        ``max |forward(x) - y|``, converged). ``max_sweeps`` (default: the layer's; ``None``
        means the number of tokens, always exact) caps the Jacobi sweeps; ``tol`` (default:
        the layer's) is the relative change that counts as settled. Unconverged samples are
        NaN in ``x`` and ``log_det``, and ``certificate.converged`` is False for them."""
        method = self.inverse_method if method is None else method
        max_sweeps = self.max_sweeps if max_sweeps is None else max_sweeps
        tol = self.tol if tol is None else float(tol)
        check_inverse_method(type(self).__name__, method, max_sweeps, tol)
        y = self._check_input(y, "y", inverse=True)
        return _certified(self, y, cond, method=method, max_sweeps=max_sweeps, tol=tol)

    def _inverse(self, y, cond):
        x, log_det, _ = self._solve(y, cond, self.inverse_method, self.max_sweeps, self.tol)
        return x, log_det

    def _solve(self, y, cond, method, max_sweeps, tol, residual: bool = False):
        """The inverse of validated ``y`` (any batch shape) and its certificate."""
        batch = self.batch_shape(y, inverse=True)
        event = y.shape[len(batch) :]
        n = 1
        for b in batch:
            n *= b
        y_flat = y.reshape(n, *event)
        c_flat = None if cond is None else cond.reshape(n, cond.shape[-1])
        tokens = self.n_tokens()
        if method == "sequential":
            x, ld = self._sequential_inverse(y_flat, c_flat)
            sweeps = jnp.full((n,), tokens, jnp.int32)
            change = jnp.zeros((n,), y.dtype)
            converged = jnp.ones((n,), bool)
        else:
            cap = tokens if max_sweeps is None else int(max_sweeps)
            x, ld, sweeps, change, converged = jacobi_inverse(
                lambda v: self._sweep(v, y_flat, c_flat),
                y_flat,
                n_tokens=tokens,
                max_sweeps=cap,
                tol=tol,
            )
        log_det = jnp.sum(ld.reshape(n, -1), axis=-1)
        res = jnp.zeros((n,), y.dtype)
        if residual:
            y_again, _ = self._forward(x, c_flat)
            res = _per_sample(jnp.abs(y_again - y_flat))
        x, log_det = nan_unconverged(x, log_det, converged)
        cert = Certificate(sweeps, change, res, converged)
        cert = jax.tree.map(lambda a: a.reshape(batch), cert)
        return x.reshape(y.shape), log_det.reshape(batch), cert


@_runtime.compiled(static=("tol",))
def _certified(layer, y, cond, *, method, max_sweeps, tol):
    """`CertifiedInverse.inverse_with_certificate` after its checks (compiled by the
    runtime)."""
    cond = layer._check_cond(cond, y, inverse=True)
    with layer._precision_scope(y.dtype):
        return layer._solve(y, cond, method, max_sweeps, tol, residual=True)
