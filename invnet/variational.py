r"""Variational inference: fit a flow ``q`` to an unnormalised density ``p~`` (no data).

The target is a function ``log_density(x) -> log p~(x)`` (one value per row; ``p = p~ / Z``
with ``Z`` unknown): a Boltzmann distribution ``exp(-E(x)/kT)``, a Bayesian posterior
``p(data | x) p(x)``. `fit_variational` draws samples from the flow with their ``log q``
(one inverse pass, reparameterised so gradients flow through the samples) and minimises

* the reverse KL (``importance_samples=1``): ``L = mean_i [log q(x_i) - log p~(x_i)]
  = KL(q || p) - log Z >= -log Z``;
* or the importance-weighted bound (``importance_samples=K > 1``, IWAE):
  ``L_K = -mean_b log (1/K) sum_k w_bk``, ``w = p~(x) / q(x)``, which is tighter
  (``-log Z <= L_K <= L_1``) and less mode-seeking as ``K`` grows.

The gradient (``gradient=``) is by default the path gradient: the samples are drawn
reparameterised (one inverse pass) and their ``log q`` is taken with the parameters held
(one forward pass), so the score term, zero in expectation, is dropped ("sticking the
landing" for ``K = 1``, the doubly reparameterised gradient for ``K > 1``) and the
gradient's variance vanishes where ``q = p``. ``gradient="total"`` differentiates the
objective as written, from the inverse pass alone.

Quality is measured by the importance weights ``w_i = p~(x_i) / q(x_i)``, ``x_i ~ q``:
``log Z ~ log mean_i w_i`` (unbiased in ``Z``) and the normalised effective sample size
``ESS = (sum w)^2 / (n sum w^2)`` in ``(0, 1]``, 1 when ``q = p``. Both are reported for
every step's batch and by `importance_estimate` for a fresh, larger sample.

The default optimizer is adam with its learning rate cosine-decayed from ``learning_rate``
to 1% of it over the ``steps`` of the call (`default_optimizer`): the last steps then move
the parameters little, so the flow a fit ends with is not one noisy iterate. Chosen on
three tuning targets that the examples do not use (docs: bases-and-variational).

Steps run in jitted chunks (``jax.lax.scan`` over ``chunk`` optimizer steps per call); a
step whose loss, gradients or update is not finite (a sample where ``log p~`` is ``-inf``)
is not applied. Ctrl-C between or during a chunk ends training and leaves the flow at the
parameters of the last finished chunk (``history.stop_reason == "interrupted"``).

References: Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015;
Burda et al., "Importance Weighted Autoencoders", ICLR 2016; Roeder et al., "Sticking the
Landing", NeurIPS 2017; Tucker et al., "Doubly Reparameterized Gradient Estimators for Monte
Carlo Objectives", ICLR 2019; Kong (1992) and Owen,
"Monte Carlo theory, methods and examples" (2013), ch. 9, for the ESS.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.scipy.special import logsumexp
from tqdm.auto import tqdm

__all__ = ["fit_variational", "importance_estimate", "VariationalHistory", "effective_sample_size"]

DECAY_TO = 0.01  # the default schedule ends at this fraction of the learning rate


def default_optimizer(learning_rate, steps: int) -> optax.GradientTransformation:
    """`fit_variational`'s optimizer when none is given: adam, its learning rate
    cosine-decayed from ``learning_rate`` to ``DECAY_TO`` (1%) of it over ``steps`` (a
    callable ``learning_rate`` is taken as the schedule itself)."""
    if callable(learning_rate):
        return optax.adam(learning_rate)
    number = int | float | np.number | np.ndarray | jax.Array
    if isinstance(learning_rate, bool) or not (
        isinstance(learning_rate, number) and np.ndim(learning_rate) == 0
    ):
        raise TypeError(
            f"fit_variational: learning_rate must be a number or an optax schedule, got "
            f"{type(learning_rate).__name__}"
        )
    learning_rate = float(learning_rate)
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(
            f"fit_variational: learning_rate must be a finite number > 0, got {learning_rate!r} "
            "(a negative rate climbs the loss)"
        )
    return optax.adam(default_schedule(learning_rate, steps))


def default_schedule(learning_rate: float, steps: int) -> optax.Schedule:
    """The default optimizer's learning rate: cosine from ``learning_rate`` down to
    ``DECAY_TO`` of it at step ``steps`` (to give a peer the same schedule)."""
    return optax.cosine_decay_schedule(learning_rate, steps, alpha=DECAY_TO)


@dataclass
class VariationalHistory:
    """What `fit_variational` did, one entry per optimizer step.

    ``loss[t]``: the objective of step ``t``'s batch (nats; reverse KL minus ``log Z``, or
    the IWAE bound). ``ess[t]``, ``log_z[t]``: normalised ESS and ``log Z`` estimate from the
    same batch's importance weights. ``nonfinite_steps`` counts steps not applied.
    ``stop_reason``: ``"steps"`` or ``"interrupted"`` (Ctrl-C).
    """

    loss: list[float] = field(default_factory=list)
    ess: list[float] = field(default_factory=list)
    log_z: list[float] = field(default_factory=list)
    steps: int = 0
    nonfinite_steps: int = 0
    stop_reason: str = "steps"
    seconds: float = 0.0


def effective_sample_size(log_weights: jax.Array) -> jax.Array:
    r"""Normalised ESS of importance weights given as logs: ``(sum w)^2 / (n sum w^2)``.

    Computed in log space (``exp(2 lse(lw) - lse(2 lw) - log n)``), so huge or tiny weights
    do not overflow; non-finite log-weights (``-inf``: zero weight) count as zero weight.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> float(invnet.effective_sample_size(jnp.zeros(8)))
        1.0
        >>> round(float(invnet.effective_sample_size(jnp.array([0.0, -jnp.inf]))), 6)
        0.5
    """
    lw = jnp.where(jnp.isnan(log_weights), -jnp.inf, log_weights)
    n = lw.shape[-1]
    return jnp.exp(2 * logsumexp(lw, axis=-1) - logsumexp(2 * lw, axis=-1) - math.log(n))


def _checked(log_density, x, like):
    """``log p~(x)`` in ``like``'s dtype, or a clear error when it is not one value per row."""
    log_p = jnp.asarray(log_density(x))
    if log_p.shape != like.shape:
        raise ValueError(
            f"fit_variational: log_density(x) for x of shape {x.shape} returned shape "
            f"{log_p.shape}; it must give one value per row, shape {like.shape} (wrap a "
            "function of a single point in jax.vmap)"
        )
    return log_p.astype(like.dtype)


def _log_weights(model, log_density, key, n, dtype, cond):
    """Samples ``x ~ q`` with ``log w = log p~(x) - log q(x)``; checks the target's output."""
    x, log_q = model.sample_and_log_prob(key, n, cond=cond, dtype=dtype)
    return _checked(log_density, x, log_q) - log_q


def _objective(model, held, log_density, key, batch_size, k, dtype, cond):
    """The bound's value and a surrogate whose gradient is the chosen estimator's.

    ``held=None`` ("total"): the plain reparameterised gradient of the bound. Otherwise
    ("path") ``log q`` is taken by ``held`` (the same flow, its parameters held fixed) at the
    samples that ``model`` draws, so gradients reach the parameters only through the
    samples: the score term, zero in expectation, is dropped (Roeder et al.'s "sticking the
    landing" for ``k = 1``; with ``k > 1`` each sample weighted by its squared normalised
    weight, Tucker et al.'s doubly reparameterised IWAE gradient). Costs one forward pass
    more per step."""
    n = batch_size * k
    if held is None:
        lw = _log_weights(model, log_density, key, n, dtype, cond)
    else:
        x = model.sample(key, n, cond=cond, dtype=dtype)
        log_q = held.log_prob(x, cond=cond)
        lw = _checked(log_density, x, log_q) - log_q
    if k == 1:
        loss = -jnp.mean(lw)
    elif held is None:
        loss = -jnp.mean(logsumexp(lw.reshape(batch_size, k), axis=-1) - math.log(k))
    else:
        grouped = lw.reshape(batch_size, k)
        weight = jax.lax.stop_gradient(jax.nn.softmax(grouped, axis=-1) ** 2)
        surrogate = -jnp.mean(jnp.sum(weight * grouped, axis=-1))
        value = -jnp.mean(logsumexp(grouped, axis=-1) - math.log(k))
        loss = jax.lax.stop_gradient(value) + surrogate - jax.lax.stop_gradient(surrogate)
    lw = jax.lax.stop_gradient(lw)
    return loss, (effective_sample_size(lw), logsumexp(lw) - math.log(lw.shape[0]))


def _finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact)]  # fmt: skip
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


@functools.lru_cache(maxsize=16)
def _chunk_fn(graphdef, log_density, tx, batch_size, k, dtype, steps, gradient):
    """A jitted function running ``steps`` optimizer steps with ``lax.scan``."""

    def loss_fn(params, rest, key, cond):
        model = nnx.merge(graphdef, params, rest)
        held = None
        if gradient == "path":
            held = nnx.merge(graphdef, jax.lax.stop_gradient(params), rest)
        return _objective(model, held, log_density, key, batch_size, k, dtype, cond)

    def step(carry, key):
        params, opt_state, rest, cond = carry
        (loss, (ess, log_z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, rest, key, cond
        )
        with jax.numpy_dtype_promotion("standard"):  # optax's code (see invnet.fit)
            updates, new_opt = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & _finite(grads) & _finite(new_params) & _finite(new_opt)
        params = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_params, params)
        opt_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_opt, opt_state)
        return (params, opt_state, rest, cond), (loss, ess, log_z, ok)

    @jax.jit
    def run(params, opt_state, rest, cond, key):
        keys = jax.random.split(key, steps)
        (params, opt_state, _, _), out = jax.lax.scan(step, (params, opt_state, rest, cond), keys)
        return params, opt_state, out

    return run


def fit_variational(
    flow,
    log_density: Callable[[jax.Array], jax.Array],
    *,
    steps: int = 2000,
    batch_size: int = 256,
    importance_samples: int = 1,
    gradient: str = "path",
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-3,
    key: jax.Array | int = 0,
    cond: jax.Array | None = None,
    dtype=jnp.float32,
    chunk: int = 100,
    progress: bool = True,
) -> VariationalHistory:
    r"""Fit ``flow`` (an `invnet.Flow`, in place) to ``p ~ exp(log_density)`` by reverse KL.

    Args:
        flow: an `invnet.Flow` that can sample (its data shape known).
        log_density: ``x -> log p~(x)``, a JAX-traceable function of a batch ``(n, *event)``
            returning ``(n,)``; its normaliser need not be known. It is traced once per
            call shape; a Python value it reads from outside is fixed at that trace.
        steps: optimizer steps; each draws ``batch_size * importance_samples`` samples.
        importance_samples: ``1`` for the reverse KL, ``K > 1`` for the IWAE bound (module
            docs).
        gradient: ``"path"`` (default) differentiates only through the samples, with
            ``log q`` taken at fixed parameters ("sticking the landing"; for ``K > 1`` the
            doubly reparameterised gradient): its variance vanishes as ``q`` reaches the
            target, at the cost of one more pass through the flow per step. ``"total"``: the
            plain reparameterised gradient of the objective (one inverse pass).
        optimizer: an optax transformation. Default: `default_optimizer`, adam with the
            learning rate cosine-decayed from ``learning_rate`` to 1% of it over ``steps``
            (a second call starts the schedule again).
        learning_rate: the default optimizer's first learning rate (a finite number > 0),
            or an optax schedule for adam.
        key: int seed or PRNG key for the samples.
        cond: a condition for a conditional flow, ``(cond_dim,)`` shared by every sample.
        dtype: the samples' dtype (float32 default; float64 with x64 on).
        chunk: steps per jitted call (the progress bar and Ctrl-C act between chunks).
        progress: a tqdm bar over steps, showing the loss and the ESS.

    Returns the `VariationalHistory` (per-step loss, ESS and ``log Z`` estimate). Check the
    fit with `importance_estimate` on a fresh sample.

    Example:
        >>> import jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> flow = invnet.Flow(invnet.AffineCoupling(2, hidden=(16,), rngs=nnx.Rngs(0)),
        ...                    invnet.DiagonalGaussian(2))
        >>> target = lambda x: -0.5 * jnp.sum((x - 3.0) ** 2, axis=-1)  # N(3, I), Z = 2 pi
        >>> h = invnet.fit_variational(flow, target, steps=300, learning_rate=3e-2,
        ...                            progress=False)
        >>> est = invnet.importance_estimate(flow, target, 1, n=4000)
        >>> bool(abs(est["log_z"] - jnp.log(2 * jnp.pi)) < 0.05), bool(est["ess"] > 0.9)
        (True, True)
    """
    steps, batch_size, k, chunk = (_positive(name, v) for name, v in (
        ("steps", steps), ("batch_size", batch_size), ("importance_samples", importance_samples),
        ("chunk", chunk)))  # fmt: skip
    if not callable(log_density):
        raise TypeError("fit_variational: log_density must be a function x -> log p~(x)")
    if gradient not in ("path", "total"):
        raise ValueError(f"fit_variational: gradient must be 'path' or 'total', got {gradient!r}")
    flow.latent_shape()  # a flow that cannot sample says so here
    key = jax.random.key(key) if isinstance(key, int | np.integer) else key
    cond = None if cond is None else jnp.asarray(cond)
    tx = optimizer if optimizer is not None else default_optimizer(learning_rate, steps)
    graphdef, params, rest = nnx.split(flow, nnx.Param, ...)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(params)
    history, t0 = VariationalHistory(), time.perf_counter()
    bar = tqdm(total=steps, desc="invnet.fit_variational", unit="step", disable=not progress,
               leave=False)  # fmt: skip
    try:
        while history.steps < steps:
            n = min(chunk, steps - history.steps)
            run = _chunk_fn(graphdef, log_density, tx, batch_size, k, jnp.dtype(dtype), n,
                            gradient)  # fmt: skip
            key, sub = jax.random.split(key)
            new_params, new_opt, (loss, ess, log_z, ok) = run(params, opt_state, rest, cond, sub)
            loss, ess, log_z, ok = (np.asarray(a) for a in (loss, ess, log_z, ok))
            params, opt_state = new_params, new_opt  # the chunk finished: keep it
            history.loss += loss.tolist()
            history.ess += ess.tolist()
            history.log_z += log_z.tolist()
            history.steps += n
            history.nonfinite_steps += int(np.sum(~ok))
            bar.update(n)
            bar.set_postfix(loss=f"{np.mean(loss[ok]) if ok.any() else np.nan:.4g}",
                            ess=f"{np.mean(ess):.3f}")  # fmt: skip
    except KeyboardInterrupt:
        history.stop_reason = "interrupted"
    finally:
        bar.close()
        nnx.update(flow, params)
        history.seconds = time.perf_counter() - t0
    return history


def importance_estimate(
    flow,
    log_density,
    key: jax.Array | int = 0,
    *,
    n: int = 10_000,
    cond=None,
    dtype=jnp.float32,
    batch_size: int = 10_000,
) -> dict:
    r"""Importance-sampling check of a fitted flow against the target, on ``n`` fresh samples.

    Returns ``{"log_z": log mean w, "ess": normalised ESS, "kl": mean(log q - log p~) +
    log_z}`` with ``w = p~(x) / q(x)``, ``x ~ q``. ``log_z`` estimates the target's
    ``log Z`` (exact when ``q = p``); ``kl`` estimates ``KL(q || p)`` (using that estimate).
    Samples are drawn ``batch_size`` at a time.
    """
    n, batch_size = _positive("n", n), _positive("batch_size", batch_size)
    key = jax.random.key(key) if isinstance(key, int | np.integer) else key
    graphdef, state = nnx.split(flow)

    @functools.partial(jax.jit, static_argnums=2)
    def weights(state, key, m):
        model = nnx.merge(graphdef, state)
        return _log_weights(model, log_density, key, m, jnp.dtype(dtype), cond)

    parts, done = [], 0
    while done < n:
        m = min(batch_size, n - done)
        key, sub = jax.random.split(key)
        parts.append(np.asarray(weights(state, sub, m), np.float64))
        done += m
    lw = np.concatenate(parts)
    log_z = float(logsumexp(lw) - math.log(n))
    return {"log_z": log_z, "ess": float(effective_sample_size(jnp.asarray(lw))),
            "kl": float(log_z - np.mean(lw[np.isfinite(lw)]))}  # fmt: skip


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"fit_variational: {name} must be an integer >= 1, got {value!r}")
    return int(value)
