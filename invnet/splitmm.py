"""Float32-accurate matrix products on tensor cores: error-corrected split precision.

A tensor core multiplies TF32 (10 explicit mantissa bits) or bf16 (7 bits) operands and
accumulates in float32, so one product of float32 matrices at ``Precision.DEFAULT`` carries a
relative error near ``2^-11 ~ 5e-4``. Ootomo & Yokota (2022) recover float32 accuracy by
splitting every operand into a high part and scaled low parts, each exactly a tensor-core
number, and multiplying the parts:

    a = a_0 + 2^-s a_1 + 2^-2s a_2 + ...    a_i = rn(r_i),  r_0 = a,  r_{i+1} = 2^s (r_i - a_i)

where ``rn`` rounds to nearest-even to the tensor-core format (`round_tf32`, `round_bf16`,
integer bit operations on the float32 pattern, so the split is exact and the same on every
backend) and ``s = mantissa bits + 1`` (11 for TF32, 8 for bf16). The scaling by ``2^s``
keeps the low parts out of the subnormal range (the paper's underflow fix); since
``|r_{i+1}| <= |r_i|`` it can never overflow. Then, keeping the terms of order ``< n``
(``n`` = number of pieces),

    A B ~ sum_{k<n} 2^-sk sum_{i+j=k} A_i B_j

is summed from the smallest order up, in float32, outside the tensor cores: each ``A_i B_j``
is its own product at ``Precision.DEFAULT`` with ``preferred_element_type=float32``.

* ``"tf32_corrected"``: n = 2 TF32 pieces, 3 products (``A0 B0 + 2^-11 (A0 B1 + A1 B0)``).
  Round-to-nearest leaves ``|a - a_0 - 2^-11 a_1| <= 2^-22 |a|``, and the dropped term
  ``2^-22 A1 B1`` is of that size too, so the result is as accurate as a float32 product.
* ``"bf16_corrected"``: n = 3 bf16 pieces, 6 products (orders 0, 1, 2); bf16 products are
  requested by casting the pieces to ``bfloat16`` (exact: each piece is a bf16 number).

XLA's presets (``"tf32x3"``, ``"bf16x3"``, ``"bf16x6"``, see `invnet.PRECISIONS`) also split
into several products, but leave their accumulation to the library; on an H100 the measured
``tf32x3`` gave 8x the error of ``"highest"``. What pure JAX cannot control is how the
library accumulates *inside* one product (the paper also moves that accumulation out of the
tensor cores, in a custom kernel); the error that remains is that of a float32 sum.

Emulation (``emulate=True``, any backend): each product rounds both operands to TF32/bf16
(`round_tf32`/`round_bf16`) and multiplies them at ``Precision.HIGHEST`` with float32
accumulation: what a tensor core computes. On a CPU this measures the modes' accuracy;
``emulate=False`` (the default) is the real, fast path on GPUs (on a CPU, DEFAULT is exact
float32, so the real path is exact but slow there).

Measured (``python benchmarks/splitmm.py --device cpu``: CPU, 2 cores, float32 inputs
N(0, 1), every product emulated; ``product``: relative error ``max|C - C64| / max|C64|`` of
``A (512 x 256) @ W (256 x 256)`` against a float64 product of the same inputs; ``round trip``:
``max|x' - x| / max|x|`` of ``x' = ((x W^T + b) - b) W^{-T}``, ``W = I + 0.1 G / 16``):

==============  ========  ==========  ========
mode            product   round trip  products
==============  ========  ==========  ========
highest         5.6e-07   1.1e-06     1 (float32)
default         2.8e-04   8.6e-04     1 TF32
tf32x3          8.3e-07   1.9e-06     3 TF32, truncated split (emulated XLA preset)
bf16x3          3.9e-06   1.7e-05     3 bf16
bf16x6          2.8e-07   1.1e-06     6 bf16
tf32_corrected  6.6e-07   1.3e-06     3 TF32, round-to-nearest split
bf16_corrected  2.8e-07   1.1e-06     6 bf16
==============  ========  ==========  ========

The emulation accumulates each product in float32 with round-to-nearest, so it shows the
error of the splits, not that of a library's accumulation inside the tensor cores: the
emulated XLA presets come out close to float32 here, while on an H100 the real ``tf32x3``
measured 8x the error of "highest". Measure the real path with ``--device gpu``.

Reference: H. Ootomo and R. Yokota, "Recovering single precision accuracy from Tensor Cores
while surpassing the FP32 theoretical peak performance", IJHPCA 36(4), 2022,
arXiv:2203.03341.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from invnet import splitmm
    >>> a = jax.random.normal(jax.random.key(0), (8, 16))
    >>> b = jax.random.normal(jax.random.key(1), (16, 4))
    >>> exact = jnp.matmul(a, b, precision="highest")
    >>> c = splitmm.matmul(a, b, "tf32_corrected", emulate=True)
    >>> bool(jnp.max(jnp.abs(c - exact)) < 1e-5)
    True
    >>> float(splitmm.round_tf32(jnp.float32(1 + 2**-11)))  # a tie: rounds to even
    1.0
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax import lax

from invnet import _context

__all__ = [
    "MODES",
    "CORRECTED",
    "round_mantissa",
    "round_tf32",
    "round_bf16",
    "split",
    "tensor_product",
    "corrected_matmul",
    "matmul",
    "dot_general",
    "dot_general_fn",
    "scoped",
    "scoped_dot_general",
    "scoped_matmul",
    "scoped_conv",
    "Conv",
]

_F32_MANTISSA = 23

# (format, mantissa bits, pieces) of the error-corrected modes
CORRECTED: dict[str, tuple[str, int, int]] = {
    "tf32_corrected": ("tf32", 10, 2),
    "bf16_corrected": ("bf16", 7, 3),
}

# every mode `matmul` accepts -> what it does (for messages and the benchmark)
MODES: dict[str, str] = {
    "highest": "one float32 product at Precision.HIGHEST (exact float32)",
    "default": "one product at Precision.DEFAULT (TF32 tensor cores on NVIDIA GPUs)",
    "tf32x3": "XLA preset TF32_TF32_F32_X3 (GPU only)",
    "bf16x3": "XLA preset BF16_BF16_F32_X3",
    "bf16x6": "XLA preset BF16_BF16_F32_X6",
    "tf32_corrected": "2 TF32 pieces, 3 products, small terms summed in float32 (Ootomo)",
    "bf16_corrected": "3 bf16 pieces, 6 products, small terms summed in float32",
}

_PRESETS = {
    "tf32x3": "TF32_TF32_F32_X3",
    "bf16x3": "BF16_BF16_F32_X3",
    "bf16x6": "BF16_BF16_F32_X6",
}
# how `emulate=True` imitates the presets: (format, mantissa bits, pieces, orders kept);
# XLA's TF32 split truncates (a_1 = a - trunc(a)), its bf16 split rounds (bf16 conversion)
_PRESET_EMULATION = {
    "tf32x3": ("tf32", 10, 2, 2),
    "bf16x3": ("bf16", 7, 2, 2),
    "bf16x6": ("bf16", 7, 3, 3),
}


def round_mantissa(x: jax.Array, bits: int) -> jax.Array:
    """Round float32 ``x`` to nearest, ties to even, keeping ``bits`` explicit mantissa bits.

    Integer arithmetic on the float32 bit pattern: add ``2^(d-1) - 1`` plus the lowest kept
    bit to the pattern and clear the ``d = 23 - bits`` dropped bits. A carry into the
    exponent is the correct rounding up to the next binade; subnormals round on the same
    grid (as the format's own subnormals do); magnitudes past the format's largest finite
    number round to inf (IEEE overflow), inf stays inf, and NaN is returned unchanged.
    """
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        raise TypeError(f"round_mantissa: expected float32, got {x.dtype}")
    if not 0 < bits < _F32_MANTISSA:
        raise ValueError(f"round_mantissa: bits must be in 1..22, got {bits}")
    drop = _F32_MANTISSA - bits
    u = lax.bitcast_convert_type(x, jnp.uint32)
    lowest_kept = (u >> drop) & jnp.uint32(1)
    u = u + jnp.uint32((1 << (drop - 1)) - 1) + lowest_kept
    u = u & jnp.uint32(0xFFFFFFFF ^ ((1 << drop) - 1))
    return jnp.where(jnp.isnan(x), x, lax.bitcast_convert_type(u, jnp.float32))


def _truncate_mantissa(x: jax.Array, bits: int) -> jax.Array:
    """Round toward zero to ``bits`` mantissa bits (clear the dropped bits)."""
    drop = _F32_MANTISSA - bits
    u = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFFFFF ^ ((1 << drop) - 1))
    return jnp.where(jnp.isnan(x), x, lax.bitcast_convert_type(u, jnp.float32))


def round_tf32(x: jax.Array) -> jax.Array:
    """Round float32 to the nearest TF32 number (10 mantissa bits), ties to even."""
    return round_mantissa(x, 10)


def round_bf16(x: jax.Array) -> jax.Array:
    """Round float32 to the nearest bfloat16 number (7 mantissa bits), ties to even;
    the result stays float32 (equal to ``x.astype(jnp.bfloat16).astype(jnp.float32)``)."""
    return round_mantissa(x, 7)


def split(x: jax.Array, bits: int, pieces: int, *, truncate: bool = False) -> list[jax.Array]:
    """``[x_0, x_1, ...]`` with ``x = sum_i 2^(-s i) x_i`` to ``pieces * (bits + 1)`` bits.

    ``x_i = rn(r_i)``, ``r_{i+1} = 2^s (r_i - x_i)``, ``s = bits + 1``; every ``x_i`` is exactly
    a number with ``bits`` mantissa bits, and ``|x_i| <= |x|`` for ``i >= 1``. The
    subtraction is exact in float32. ``truncate=True`` rounds toward zero instead (XLA's
    TF32 split). A finite value whose nearest neighbour would be inf is truncated instead,
    so the split stays exact; for inf and NaN, ``x_0 = x`` and the other pieces are 0.
    Subnormal inputs (``|x| < 2^-126``) may lose their relative accuracy (backends may
    flush them to zero), which adds at most ``2^-126`` absolute error per entry.
    """
    x = jnp.asarray(x, jnp.float32)
    scale = jnp.float32(2.0 ** (bits + 1))
    finite = jnp.isfinite(x)
    out, rest = [], x
    for _ in range(pieces):
        piece = _truncate_mantissa(rest, bits) if truncate else round_mantissa(rest, bits)
        piece = jnp.where(jnp.isinf(piece) & finite, _truncate_mantissa(rest, bits), piece)
        out.append(piece)
        rest = jnp.where(finite, (rest - piece) * scale, 0.0)
    return out


class Conv(dict):
    """Keyword arguments of `lax.conv_general_dilated`: passed as ``dims`` to the product
    functions, the "product" is that convolution (bilinear, so it splits like a matmul)."""


def _dot(a, b, dims, precision):
    """``jnp.matmul`` (``dims=None``), ``lax.dot_general`` or a `Conv`, float32 output."""
    if dims is None:
        return jnp.matmul(a, b, precision=precision, preferred_element_type=jnp.float32)
    if isinstance(dims, Conv):
        return lax.conv_general_dilated(
            a, b, **dims, precision=precision, preferred_element_type=jnp.float32
        )
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def tensor_product(a: jax.Array, b: jax.Array, fmt: str, *, emulate: bool = False, dims=None):
    """One tensor-core product ``a @ b`` of operands that are exactly ``fmt`` numbers.

    ``emulate=False``: at ``Precision.DEFAULT`` with ``preferred_element_type=float32``
    (``fmt="tf32"``), or of the operands cast to bfloat16 (``fmt="bf16"``). ``emulate=True``:
    both operands rounded to ``fmt`` and multiplied at ``Precision.HIGHEST`` with float32
    accumulation, on any backend. ``dims``: `lax.dot_general` dimension numbers instead of
    a matmul.
    """
    if emulate:
        rnd = round_tf32 if fmt == "tf32" else round_bf16
        return _dot(rnd(a), rnd(b), dims, lax.Precision.HIGHEST)
    if fmt == "bf16":
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    return _dot(a, b, dims, lax.Precision.DEFAULT)


def _split_product(a, b, fmt, bits, pieces, orders, *, truncate=False, emulate=False, dims=None):
    """``sum_{k < orders} 2^-sk sum_{i+j=k} A_i B_j``, smallest order first, in float32."""
    a_parts = split(a, bits, pieces, truncate=truncate)
    b_parts = split(b, bits, pieces, truncate=truncate)
    scale = jnp.float32(2.0 ** -(bits + 1))
    total = None
    for k in reversed(range(orders)):
        term = None
        for i in range(k + 1):
            if i < pieces and k - i < pieces:
                p = tensor_product(a_parts[i], b_parts[k - i], fmt, emulate=emulate, dims=dims)
                term = p if term is None else term + p
        total = term if total is None else term + total * scale
    return total


def corrected_matmul(
    a: jax.Array, b: jax.Array, fmt: str = "tf32", *, emulate: bool = False, dims=None
):
    """Error-corrected ``a @ b`` of float32 matrices: 3 TF32 or 6 bf16 tensor-core products.

    ``fmt`` is ``"tf32"`` (2 pieces, float32 accuracy) or ``"bf16"`` (3 pieces). Batched
    ``a`` (``(..., M, K)``) works as in `jnp.matmul`; ``dims`` (`lax.dot_general` dimension
    numbers) contracts any axes instead. See the module docstring.
    """
    mode = f"{fmt}_corrected"
    if mode not in CORRECTED:
        raise ValueError(f"corrected_matmul: fmt must be 'tf32' or 'bf16', got {fmt!r}")
    _, bits, pieces = CORRECTED[mode]
    return _split_product(a, b, fmt, bits, pieces, pieces, emulate=emulate, dims=dims)


def matmul(a: jax.Array, b: jax.Array, mode: str = "highest", *, emulate: bool = False):
    """``a @ b`` in precision ``mode`` (a key of `MODES`).

    float32 operands only take the tensor-core paths; float64 operands always multiply at
    ``Precision.HIGHEST`` (as invnet's layers do). ``emulate=True`` imitates the tensor cores
    on any backend (see the module docstring); the XLA presets are then emulated too (TF32
    split by truncation, bf16 by rounding, float32 sums), which shows the splits' error but
    not the library's accumulation order.
    """
    return _product(a, b, mode, emulate, None, "splitmm.matmul")


def dot_general(lhs, rhs, dimension_numbers, mode: str = "highest", *, emulate: bool = False):
    """`lax.dot_general` in precision ``mode``: any contraction, as `matmul` does a matmul."""
    return _product(lhs, rhs, mode, emulate, dimension_numbers, "splitmm.dot_general")


def dot_general_fn(mode: str, *, emulate: bool = False):
    """A ``dot_general`` for ``flax.nnx.Linear(..., dot_general=...)`` (and ``nnx.Conv``)
    that runs in ``mode``; the ``precision`` the layer passes is ignored (``mode`` decides).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from invnet import splitmm
        >>> dense = nnx.Linear(3, 2, rngs=nnx.Rngs(0),
        ...                    dot_general=splitmm.dot_general_fn("tf32_corrected"))
        >>> dense(jnp.ones((4, 3))).shape
        (4, 2)
    """
    if mode not in MODES:
        raise ValueError(f"splitmm.dot_general_fn: mode must be one of {sorted(MODES)}")

    def run(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        del precision, kw  # the mode decides; out_sharding is not supported
        out = dot_general(lhs, rhs, dimension_numbers, mode, emulate=emulate)
        return out if preferred_element_type is None else out.astype(preferred_element_type)

    return run


# ------------------------------------------------------- modes chosen by the enclosing layer
@contextlib.contextmanager
def scoped(mode: str, *, emulate: bool | None = None):
    """Within this block the ``scoped_*`` products of float32 operands run in ``mode`` (a
    key of `MODES`) when it is an error-corrected mode (`CORRECTED`); for XLA's own modes
    they run as written, at the enclosing ``jax.default_matmul_precision``. invnet's layers
    enter it with their precision setting, so the conditioners they build (`invnet.MLP`,
    `invnet.ConvNet`, the masked layers of `invnet.MaskedAutoregressive`) follow
    ``invnet.set_precision(model, "tf32_corrected")``; a user's own conditioner can do the
    same with `scoped_dot_general` / `scoped_matmul` / `scoped_conv`. ``emulate=True``
    imitates the tensor cores (see `matmul`); ``None`` keeps the enclosing block's choice,
    so ``with splitmm.scoped("highest", emulate=True): model.forward(x)`` measures on a CPU
    what a model set to ``"tf32_corrected"`` computes on a GPU.

    Example:
        >>> import jax, jax.numpy as jnp, invnet
        >>> from flax import nnx
        >>> from invnet import splitmm
        >>> block = invnet.set_precision(
        ...     invnet.AffineCoupling(4, rngs=nnx.Rngs(0)), "tf32_corrected")
        >>> with splitmm.scoped("highest", emulate=True):
        ...     y, _ = block.forward(jnp.ones((2, 4)))
        >>> y.shape
        (2, 4)
    """
    if mode not in MODES:
        raise ValueError(f"splitmm.scoped: mode must be one of {sorted(MODES)}, got {mode!r}")
    if emulate is None:
        enclosing = _context.current().matmul
        emulate = bool(enclosing and enclosing[1])
    with _context.using(matmul=(mode, emulate)):
        yield


def _scope_for(a, b):
    scope = _context.current().matmul
    if scope is None or scope[0] not in CORRECTED:
        return None  # XLA's own modes: the enclosing jax.default_matmul_precision decides
    if jnp.result_type(a) != jnp.float32 or jnp.result_type(b) != jnp.float32:
        return None  # float64 (and anything else) multiplies as written
    return scope


def scoped_dot_general(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw
):
    """`lax.dot_general` in the mode of the enclosing `scoped` block (as written outside
    one): for ``nnx.Linear(..., dot_general=splitmm.scoped_dot_general)``."""
    scope = _scope_for(lhs, rhs)
    if scope is None:
        return lax.dot_general(
            lhs, rhs, dimension_numbers, precision=precision,
            preferred_element_type=preferred_element_type, **kw,
        )  # fmt: skip
    out = dot_general(lhs, rhs, dimension_numbers, scope[0], emulate=scope[1])
    return out if preferred_element_type is None else out.astype(preferred_element_type)


def scoped_matmul(a, b):
    """``a @ b`` in the mode of the enclosing `scoped` block (as written outside one)."""
    scope = _scope_for(a, b)
    return a @ b if scope is None else matmul(a, b, scope[0], emulate=scope[1])


def scoped_conv(lhs, rhs, precision=None, preferred_element_type=None, **conv):
    """`lax.conv_general_dilated` in the mode of the enclosing `scoped` block: the
    convolution is split like a matmul (``lhs`` and the kernel ``rhs`` into tensor-core
    pieces, one convolution per pair of pieces)."""
    scope = _scope_for(lhs, rhs)
    if scope is None:
        return lax.conv_general_dilated(
            lhs, rhs, precision=precision, preferred_element_type=preferred_element_type, **conv
        )
    out = _product(lhs, rhs, scope[0], scope[1], Conv(conv), "splitmm.scoped_conv")
    return out if preferred_element_type is None else out.astype(preferred_element_type)


def _product(a, b, mode, emulate, dims, name):
    if mode not in MODES:
        raise ValueError(f"{name}: mode must be one of {sorted(MODES)}, got {mode!r}")
    a, b = jnp.asarray(a), jnp.asarray(b)
    if mode == "highest" or a.dtype == jnp.float64 or b.dtype == jnp.float64:
        if dims is None:
            return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)
        if isinstance(dims, Conv):
            return lax.conv_general_dilated(a, b, **dims, precision=lax.Precision.HIGHEST)
        return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST)
    if a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise TypeError(f"{name}: expected float32 operands, got {a.dtype}, {b.dtype}")
    if mode == "default":
        return tensor_product(a, b, "tf32", emulate=emulate, dims=dims)
    if mode in CORRECTED:
        return corrected_matmul(a, b, CORRECTED[mode][0], emulate=emulate, dims=dims)
    if emulate:
        fmt, bits, pieces, orders = _PRESET_EMULATION[mode]
        trunc = fmt == "tf32"
        return _split_product(
            a, b, fmt, bits, pieces, orders, truncate=trunc, emulate=True, dims=dims
        )
    if mode == "tf32x3" and jax.default_backend() != "gpu":
        raise ValueError(
            f"{name}: 'tf32x3' needs an NVIDIA GPU (TF32 tensor cores); the backend "
            f"here is {jax.default_backend()!r}. Use emulate=True to measure its accuracy, or "
            "'tf32_corrected' / 'highest'"
        )
    with jax.default_matmul_precision(_PRESETS[mode]):
        if isinstance(dims, Conv):
            return lax.conv_general_dilated(a, b, **dims)
        return jnp.matmul(a, b) if dims is None else lax.dot_general(a, b, dims)
