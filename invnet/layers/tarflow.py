"""Transformer autoregressive flow blocks (TarFlow): a causal transformer over patches."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from invnet.core import Bijector, check_precision, wider_float
from invnet.layers.coupling import DOT_DIMS, promote_wider
from invnet.layers.jacobi import CertifiedInverse, check_inverse_method
from invnet.layers.rq_spline import check_spline_config
from invnet.layers.transformers import TRANSFORMER_NAMES, make_transformer

__all__ = ["TransformerAutoregressive", "CausalTransformer"]


def _linear(n_in, n_out, *, zero=False, param_dtype, rngs):
    init = {"kernel_init": nnx.initializers.zeros_init()} if zero else {}
    return nnx.Linear(n_in, n_out, dot_general=DOT_DIMS, promote_dtype=promote_wider,
                      param_dtype=param_dtype, rngs=rngs, **init)  # fmt: skip


class _LayerNorm(nnx.Module):
    """``(h - mean) / sqrt(var + 1e-6) * scale + bias`` over the last axis."""

    def __init__(self, width: int, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((width,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((width,), param_dtype))

    def __call__(self, h):
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean((h - mean) ** 2, axis=-1, keepdims=True)
        norm = (h - mean) * jax.lax.rsqrt(var + jnp.asarray(1e-6, h.dtype))
        return norm * self.scale[...].astype(h.dtype) + self.bias[...].astype(h.dtype)


class _Block(nnx.Module):
    """Pre-norm transformer block: ``h + attn(ln(h))``, then ``h + mlp(ln(h))``."""

    def __init__(self, width, heads, mlp_ratio, *, param_dtype, rngs):
        self.heads = heads
        opts = dict(param_dtype=param_dtype, rngs=rngs)
        self.ln1 = _LayerNorm(width, param_dtype=param_dtype)
        self.qkv = _linear(width, 3 * width, **opts)
        self.proj = _linear(width, width, **opts)
        self.ln2 = _LayerNorm(width, param_dtype=param_dtype)
        self.fc1 = _linear(width, mlp_ratio * width, **opts)
        self.fc2 = _linear(mlp_ratio * width, width, **opts)

    def _qkv(self, h):
        q, k, v = jnp.split(self.qkv(self.ln1(h)), 3, axis=-1)
        split = lambda a: a.reshape(*a.shape[:-1], self.heads, -1)  # noqa: E731
        return split(q), split(k), split(v)

    def _attend(self, q, k, v, mask):
        """``softmax(q k^T / sqrt(d), masked) v``; q ``(N, Tq, H, d)``, k/v ``(N, Tk, H, d)``;
        masked scores are -inf, so their weights are exactly 0."""
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(q.shape[-1])
        scores = jnp.where(mask, scores, jnp.asarray(-jnp.inf, scores.dtype))
        out = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.proj(out.reshape(*out.shape[:-2], -1))

    def _mlp(self, h):
        return h + self.fc2(jax.nn.gelu(self.fc1(self.ln2(h))))

    def __call__(self, h):
        """All positions at once (causal): ``h`` ``(N, T, W)``."""
        q, k, v = self._qkv(h)
        t = h.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        return self._mlp(h + self._attend(q, k, v, causal))

    def step(self, h, keys, values, t):
        """Position ``t`` alone, ``h`` ``(N, 1, W)``, with the key/value cache of positions
        ``< t`` (``(N, T, H, d)``); returns the new state and the updated cache."""
        q, k, v = self._qkv(h)
        keys = jax.lax.dynamic_update_slice_in_dim(keys, k, t, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(values, v, t, axis=1)
        seen = jnp.arange(keys.shape[1]) <= t
        return self._mlp(h + self._attend(q, keys, values, seen)), keys, values


class CausalTransformer(nnx.Module):
    """The conditioner of `TransformerAutoregressive`: tokens ``(N, T, P)`` -> raw transformer
    parameters ``(N, T, P * n_params)``, where row ``t`` depends only on tokens ``< t``
    (and ``cond``). Position ``t`` reads a learned start vector (``t = 0``) or the embedding
    of token ``t - 1``, plus a learned position embedding and the projected condition; then
    ``depth`` pre-norm blocks (causal multi-head self-attention, GELU MLP), a final layer
    norm and a zero-initialised output projection (the block starts as the identity)."""

    def __init__(self, tokens, token_size, n_out, *, depth, width, heads, mlp_ratio,
                 cond_dim, param_dtype, rngs):  # fmt: skip
        self.tokens, self.width = tokens, width
        self.embed = _linear(token_size, width, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.start = nnx.Param(init(rngs.params(), (width,), param_dtype))
        self.position = nnx.Param(init(rngs.params(), (tokens, width), param_dtype))
        self.cond_proj = (
            _linear(cond_dim, width, param_dtype=param_dtype, rngs=rngs) if cond_dim else None
        )
        self.blocks = nnx.List(
            [_Block(width, heads, mlp_ratio, param_dtype=param_dtype, rngs=rngs)
             for _ in range(depth)]
        )  # fmt: skip
        self.norm = _LayerNorm(width, param_dtype=param_dtype)
        self.out = _linear(width, n_out, zero=True, param_dtype=param_dtype, rngs=rngs)

    def compute_dtype(self, dtype) -> jnp.dtype:
        return wider_float(dtype, self.start[...].dtype)

    def _context(self, cond, dtype):
        if cond is None:
            return jnp.zeros((), dtype)
        return self.cond_proj(cond.astype(dtype))[:, None, :]

    def __call__(self, tokens, cond=None):
        dt = self.compute_dtype(tokens.dtype)
        n = tokens.shape[0]
        start = jnp.broadcast_to(self.start[...].astype(dt), (n, 1, self.width))
        h = jnp.concatenate([start, self.embed(tokens[:, :-1].astype(dt))], axis=1)
        h = h + self.position[...].astype(dt) + self._context(cond, dt)
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h)).astype(tokens.dtype)

    def step(self, previous, t, caches, cond=None):
        """Row ``t`` alone from token ``t - 1`` (``previous``, ``(N, P)``; ignored at
        ``t = 0``) and the caches of every block; returns ``(row (N, n_out), caches)``."""
        dt = caches[0][0].dtype
        n = previous.shape[0]
        start = jnp.broadcast_to(self.start[...].astype(dt), (n, self.width))
        h = jnp.where(t == 0, start, self.embed(previous.astype(dt)))[:, None, :]
        pos = jax.lax.dynamic_index_in_dim(self.position[...].astype(dt), t, keepdims=True)
        h = h + pos + self._context(cond, dt)
        new = []
        for block, (keys, values) in zip(self.blocks, caches, strict=True):
            h, keys, values = block.step(h, keys, values, t)
            new.append((keys, values))
        return self.out(self.norm(h))[:, 0].astype(previous.dtype), tuple(new)

    def empty_caches(self, n, dtype):
        heads = self.blocks[0].heads if len(self.blocks) else 1
        shape = (n, self.tokens, heads, self.width // heads)
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.blocks)


class TransformerAutoregressive(CertifiedInverse, Bijector):
    r"""A TarFlow block: an autoregressive flow over patches with a causal transformer.

    The event is cut into ``T`` tokens of ``P`` numbers each: an image ``(H, W, C)`` into
    ``patch x patch`` patches in raster order (``P = patch^2 C``), a vector ``(D,)`` into
    consecutive runs of ``patch`` numbers (``P = patch``); ``reverse=True`` takes the tokens
    in the opposite order (alternate it between blocks, as TarFlow does). A
    `CausalTransformer` computes from tokens ``x_{<t}`` (and ``cond``) the parameters of an
    elementwise transformer ``tau`` of token ``t``:

        y_t = tau(x_t; theta_t(x_{<t}[, cond]))        t = 0 .. T-1

    with ``tau`` one of `invnet.layers.transformers` (``transformer="affine"``: ``x exp(s) + b``
    with the soft clamp ``s = clamp tanh(s_raw / clamp)``; ``"additive"``; ``"spline"``).

    * Forward: **one** transformer pass over all tokens (causal mask). Log-det:
      ``sum_t sum_i log tau'(x_{t,i})`` (the Jacobian is block triangular), O(D) after the
      pass.
    * Inverse, ``inverse_method="sequential"`` (default): token by token, ``x_t =
      tau^{-1}(y_t; theta_t(x_{<t}))``, with a key/value cache per attention layer, so the
      ``T`` steps together cost about one forward pass (``T`` small matmuls instead of one
      big one: slower on parallel hardware). Exact.
    * ``inverse_method="jacobi"``: parallel sweeps ``x <- tau^{-1}(y; theta(x))`` of all
      tokens, stopped per sample when the estimate stops changing (``tol``; 0: to the bit)
      or after ``max_sweeps`` (default ``None``: ``T`` sweeps, always exact); see
      `invnet.layers.jacobi`. A sample still unconverged at a lower cap is returned as
      **NaN** (`invnet.verify` counts and names it); ``inverse_with_certificate(y)``
      returns ``(x, log_det, certificate)`` with each sample's sweeps, last change,
      residual ``max |f(x) - y|`` and converged flag. Not reverse-differentiable under a
      cap below ``T`` in any useful sense: train through the forward.
    * Invertible for every parameter value (``tau`` is); a round trip amplifies rounding by
      at most ``exp(2 clamp)`` per element for the affine transformer.
    * Init: the output projection is zero, so the block starts as the identity.
    * ``cond_dim > 0``: the condition, projected to ``width``, is added at every position.

    Reference: Zhai et al., "Normalizing Flows are Capable Generative Models" (TarFlow),
    2024; Papamakarios et al., "Masked Autoregressive Flow", NeurIPS 2017; Vaswani et al.,
    "Attention Is All You Need", NeurIPS 2017.

    Example:
        >>> import jax, jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> block = invnet.TransformerAutoregressive((4, 4, 1), patch=2, depth=1, width=16,
        ...                                          heads=2, rngs=nnx.Rngs(0))
        >>> x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
        >>> y, log_det = block.forward(x)            # identity at init
        >>> bool(jnp.allclose(y, x)), log_det.shape
        (True, (3,))
        >>> x_back, _, cert = block.inverse_with_certificate(y, method="jacobi")
        >>> bool(jnp.allclose(x_back, x)), bool(cert.converged.all())
        (True, True)
    """

    def __init__(
        self,
        event_shape,
        *,
        patch: int = 1,
        depth: int = 2,
        width: int = 64,
        heads: int = 4,
        mlp_ratio: int = 4,
        cond_dim: int = 0,
        transformer: str = "affine",
        clamp: float = 2.0,
        bins: int = 8,
        bound: float = 3.0,
        reverse: bool = False,
        inverse_method: str = "sequential",
        max_sweeps: int | None = None,
        tol: float = 0.0,
        param_dtype: Any = jnp.float32,
        precision: str = "highest",
        rngs: nnx.Rngs,
    ):
        name = "TransformerAutoregressive"
        shape = tuple(int(s) for s in np.atleast_1d(event_shape))
        self.event_shape, self.patch = shape, int(patch)
        self.event_ndim = len(shape)
        self.tokens, token_size = _token_layout(name, shape, self.patch)
        for label, v in (("depth", depth), ("width", width), ("heads", heads),
                         ("mlp_ratio", mlp_ratio)):  # fmt: skip
            if not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"{name}: {label} must be a positive integer, got {v!r}")
        if width % heads:
            raise ValueError(f"{name}: width ({width}) must be divisible by heads ({heads})")
        if cond_dim < 0:
            raise ValueError(f"{name}: cond_dim must be >= 0, got {cond_dim}")
        if transformer not in TRANSFORMER_NAMES:
            raise ValueError(
                f"{name}: transformer must be one of {TRANSFORMER_NAMES}, got {transformer!r}"
            )
        if not (clamp > 0 and np.isfinite(clamp)):
            raise ValueError(f"{name}: clamp must be positive and finite, got {clamp}")
        if transformer == "spline":
            check_spline_config(name, bins, bound, 1e-3, 1e-3, 1e-3)
        check_inverse_method(name, inverse_method, max_sweeps, tol)
        self.depth, self.width, self.heads = int(depth), int(width), int(heads)
        self.mlp_ratio, self.cond_dim = int(mlp_ratio), int(cond_dim)
        self.transformer, self.clamp = transformer, float(clamp)
        self.bins, self.bound, self.reverse = int(bins), float(bound), bool(reverse)
        self.inverse_method, self.max_sweeps, self.tol = inverse_method, max_sweeps, float(tol)
        self.param_dtype = jnp.dtype(param_dtype)
        self.precision = check_precision(precision)
        self.token_size = token_size
        self.net = CausalTransformer(
            self.tokens, token_size, token_size * self.tau.n_params, depth=self.depth,
            width=self.width, heads=self.heads, mlp_ratio=self.mlp_ratio,
            cond_dim=self.cond_dim, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip

    def get_config(self) -> dict[str, Any]:
        return {
            "event_shape": list(self.event_shape),
            "patch": self.patch,
            "depth": self.depth,
            "width": self.width,
            "heads": self.heads,
            "mlp_ratio": self.mlp_ratio,
            "cond_dim": self.cond_dim,
            "transformer": self.transformer,
            "clamp": self.clamp,
            "bins": self.bins,
            "bound": self.bound,
            "reverse": self.reverse,
            "inverse_method": self.inverse_method,
            "max_sweeps": self.max_sweeps,
            "tol": self.tol,
            "param_dtype": self.param_dtype.name,
            "precision": self.precision,
        }

    @property
    def tau(self):
        """The elementwise transformer (`invnet.layers.transformers`)."""
        return make_transformer(self.transformer, clamp=self.clamp, bins=self.bins,
                                bound=self.bound)  # fmt: skip

    def event_pattern(self):
        return self.event_shape

    def n_tokens(self) -> int:
        return self.tokens

    def error_bound(self) -> tuple[float, str]:
        return self.tau.error_bound()

    # ---------------------------------------------------------------- tokens <-> event
    def to_tokens(self, x: jax.Array) -> jax.Array:
        """``(N, *event)`` -> ``(N, T, P)`` in the block's token order."""
        n = x.shape[0]
        if self.event_ndim == 3:
            h, w, c = self.event_shape
            p = self.patch
            x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        tokens = x.reshape(n, self.tokens, self.token_size)
        return tokens[:, ::-1] if self.reverse else tokens

    def from_tokens(self, tokens: jax.Array) -> jax.Array:
        """The inverse of `to_tokens`."""
        n = tokens.shape[0]
        if self.reverse:
            tokens = tokens[:, ::-1]
        if self.event_ndim == 3:
            h, w, c = self.event_shape
            p = self.patch
            tokens = tokens.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return tokens.reshape(n, *self.event_shape)

    def _raw(self, rows):
        return rows.reshape(*rows.shape[:-1], self.token_size, self.tau.n_params)

    # ------------------------------------------------------------------------ maps
    def _forward(self, x, cond):
        batch = x.shape[: x.ndim - self.event_ndim]
        n = math.prod(batch)
        c = None if cond is None else cond.reshape(n, self.cond_dim)
        tokens = self.to_tokens(x.reshape(n, *self.event_shape))
        y, ld = self.tau.forward(tokens, self._raw(self.net(tokens, c)))
        return self.from_tokens(y).reshape(x.shape), jnp.sum(ld, axis=(1, 2)).reshape(batch)

    def _sweep(self, x, y, cond):
        """One Jacobi sweep on ``(N, *event)``: every token from the current estimate."""
        raw = self._raw(self.net(self.to_tokens(x), cond))
        x_new, ld = self.tau.inverse(self.to_tokens(y), raw)
        return self.from_tokens(x_new), self.from_tokens(ld)

    def _sequential_inverse(self, y, cond):
        """Token by token with the key/value cache (``(N, *event)``)."""
        y_tok = self.to_tokens(y)
        n = y_tok.shape[0]
        caches = self.net.empty_caches(n, self.net.compute_dtype(y.dtype))

        def step(t, carry):
            x_tok, ld, caches = carry
            previous = jax.lax.dynamic_index_in_dim(x_tok, jnp.maximum(t - 1, 0), 1, False)
            rows, caches = self.net.step(previous, t, caches, cond)
            y_t = jax.lax.dynamic_index_in_dim(y_tok, t, 1, False)
            x_t, ld_t = self.tau.inverse(y_t, self._raw(rows))
            x_tok = jax.lax.dynamic_update_index_in_dim(x_tok, x_t, t, 1)
            ld = jax.lax.dynamic_update_index_in_dim(ld, ld_t, t, 1)
            return x_tok, ld, caches

        start = (jnp.zeros_like(y_tok), jnp.zeros_like(y_tok), caches)
        x_tok, ld, _ = jax.lax.fori_loop(0, self.tokens, step, start)
        return self.from_tokens(x_tok), self.from_tokens(ld)


def _token_layout(name: str, shape: tuple[int, ...], patch: int) -> tuple[int, int]:
    """``(T, P)`` for an event ``shape`` cut into patches of side ``patch``."""
    if patch < 1:
        raise ValueError(f"{name}: patch must be a positive integer, got {patch}")
    if len(shape) == 1:
        (d,) = shape
        if d % patch:
            raise ValueError(f"{name}: a vector of {d} cannot be cut into tokens of {patch}")
        tokens, size = d // patch, patch
    elif len(shape) == 3:
        h, w, c = shape
        if h % patch or w % patch:
            raise ValueError(
                f"{name}: an image {h}x{w} cannot be cut into {patch}x{patch} patches; choose "
                "a patch that divides both sides"
            )
        tokens, size = (h // patch) * (w // patch), patch * patch * c
    else:
        raise ValueError(
            f"{name}: event_shape must be (D,) for vectors or (H, W, C) for images, got {shape}"
        )
    if tokens < 2:
        raise ValueError(f"{name}: the event makes {tokens} token; use a smaller patch (need >= 2)")
    return tokens, size
