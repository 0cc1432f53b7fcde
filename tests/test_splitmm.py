"""Error-corrected split-precision products (invnet.splitmm), checked on CPU by emulation.

The rounding functions are compared bit for bit with an independent numpy reference
(float64 arithmetic and ``np.rint``, which rounds half to even). The products are compared
with a float64 product of the same float32 inputs; the stated bound: the corrected modes'
error is at most 4x that of a plain float32 product at "highest", while one emulated TF32
product (what "default" does on a GPU) is over 100x worse (about 1e3x measured).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invnet import splitmm

F32 = np.float32
MAX_F32 = np.finfo(F32).max
TINY = np.finfo(F32).tiny  # smallest normal, 2^-126
SUB = F32(2.0**-149)  # smallest subnormal


def reference_round(x: np.ndarray, bits: int) -> np.ndarray:
    """Round-to-nearest-even of float32 ``x`` to ``bits`` mantissa bits, in float64 numpy."""
    with np.errstate(invalid="ignore"):  # signalling NaN patterns
        x64 = x.astype(np.float64)
    out = x64.copy()
    finite = np.isfinite(x64) & (x64 != 0)
    _, exp = np.frexp(x64[finite])  # x = m 2^exp, 0.5 <= |m| < 1: leading bit is 2^(exp-1)
    ulp = np.ldexp(1.0, np.maximum(exp - 1, -126) - bits)
    out[finite] = np.rint(x64[finite] / ulp) * ulp  # exact: ulp is a power of two
    with np.errstate(over="ignore", invalid="ignore"):
        return out.astype(F32)  # past the largest finite value: inf, as IEEE rounding


def edge_values(bits: int) -> np.ndarray:
    drop = 23 - bits
    half = 2.0 ** -(bits + 1)  # half a unit in the last kept place of [1, 2)
    vals = [
        0.0,
        -0.0,
        1.0,
        1.0 + half,  # tie, rounds down to even
        1.0 + 3 * half,  # tie, rounds up to even
        1.0 + half + 2.0**-23,  # just above a tie
        1.0 + half - 2.0**-23,  # just below
        2.0 - 2.0**-23,  # rounds up into the next binade
        -(1.0 + 3 * half),
        SUB,
        -SUB,
        SUB * (2 ** (drop - 1)),  # subnormal tie
        SUB * (3 * 2 ** (drop - 1)),  # subnormal tie, rounds up
        TINY - SUB,  # largest subnormal: rounds to the smallest normal
        TINY,
        MAX_F32,  # past the format's largest finite value: inf
        -MAX_F32,
        np.inf,
        -np.inf,
    ]
    return np.array(vals, F32)


def bits_of(x) -> np.ndarray:
    return np.asarray(x, F32).view(np.uint32)


@pytest.mark.parametrize(
    ("fn", "bits"),
    [(splitmm.round_tf32, 10), pytest.param(splitmm.round_bf16, 7, marks=pytest.mark.extended)],
)
def test_rounding_is_exact_round_half_even(fn, bits):
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([edge_values(bits), patterns.view(F32)])
    got = np.asarray(fn(jnp.asarray(x)))
    want = reference_round(x, bits)
    nan = np.isnan(x)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(bits_of(got[~nan]), bits_of(want[~nan]))
    # named edges
    e = np.asarray(fn(jnp.asarray(edge_values(bits))))
    assert e[3] == 1.0 and e[4] == 1.0 + 2.0**-bits * 2 and e[7] == 2.0
    assert e[13] == TINY and np.isposinf(e[15]) and np.isneginf(e[16])
    assert np.signbit(e[1]) and np.isposinf(e[17])


def test_bf16_rounding_matches_jax_conversion():
    x = jax.random.normal(jax.random.key(0), (512,), jnp.float32) * 1e3
    want = x.astype(jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(splitmm.round_bf16(x)), np.asarray(want))


def test_nan_and_bad_input():
    x = np.array([np.nan, -np.nan], F32)
    x = np.concatenate([x, np.array([0x7F800001, 0xFFFFFFFF], np.uint32).view(F32)])
    assert np.all(np.isnan(np.asarray(splitmm.round_tf32(jnp.asarray(x)))))
    with pytest.raises(TypeError, match="float32"):
        splitmm.round_tf32(jnp.ones(3, jnp.float64))
    with pytest.raises(ValueError, match="mode must be one of"):
        splitmm.matmul(jnp.ones((2, 2), jnp.float32), jnp.ones((2, 2), jnp.float32), "fast")


@pytest.mark.parametrize(
    ("bits", "pieces"), [(10, 2), pytest.param(7, 3, marks=pytest.mark.extended)]
)
def test_split_is_exact_and_pieces_are_representable(bits, pieces):
    x = jax.random.normal(jax.random.key(1), (256,)) * 10.0 ** jnp.linspace(-30, 30, 256)
    x = x.astype(jnp.float32)
    x = jnp.concatenate([x, jnp.asarray([MAX_F32, -MAX_F32, SUB, TINY], jnp.float32)])
    parts = splitmm.split(x, bits, pieces)
    for p in parts:
        np.testing.assert_array_equal(np.asarray(splitmm.round_mantissa(p, bits)), np.asarray(p))
    for p in parts[1:]:  # the scaled low pieces never exceed x (no overflow)
        assert bool(jnp.all(jnp.abs(p) <= jnp.abs(x)))
    s = float(2 ** (bits + 1))
    total = sum(np.asarray(p, np.float64) * s**-i for i, p in enumerate(parts))
    x64 = np.asarray(x, np.float64)
    normal = np.abs(x64) >= TINY
    rel = np.abs(total - x64)[normal] / np.abs(x64[normal])
    # pieces * (bits + 1) bits kept, minus one for the rounding of the last piece
    assert rel.max() <= 2.0 ** -(pieces * (bits + 1) - 1)
    # subnormal inputs (XLA's CPU flushes them to zero): an absolute error below 2^-126
    assert np.abs(total - x64)[~normal].max() <= TINY


def test_split_of_non_finite():
    parts = splitmm.split(jnp.asarray([np.inf, -np.inf, np.nan], jnp.float32), 10, 2)
    assert np.isposinf(parts[0][0]) and np.isneginf(parts[0][1]) and np.isnan(parts[0][2])
    np.testing.assert_array_equal(np.asarray(parts[1]), 0.0)


def _errors(m, k, n, seed):
    ka, kb = jax.random.split(jax.random.key(seed))
    a = jax.random.normal(ka, (m, k), jnp.float32)
    b = jax.random.normal(kb, (k, n), jnp.float32)
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)

    def err(mode):
        c = np.asarray(splitmm.matmul(a, b, mode, emulate=True), np.float64)
        return np.max(np.abs(c - exact)) / np.max(np.abs(exact))

    return {mode: err(mode) for mode in ("highest", "default", *splitmm.CORRECTED)}


def test_corrected_products_reach_float32_accuracy():
    errs = _errors(48, 96, 40, 0)
    highest = errs["highest"]
    for mode in splitmm.CORRECTED:
        assert errs[mode] <= 4 * highest, (mode, errs)
    # one TF32 product is ~1e3x worse than float32 (measured 500-1500x); bound it at 100x
    assert errs["default"] >= 100 * highest, errs
    assert errs["default"] >= 50 * max(errs[m] for m in splitmm.CORRECTED), errs


@pytest.mark.extended  # slow; CI runs it
def test_batched_and_float64_operands():
    a = jax.random.normal(jax.random.key(2), (3, 5, 8), jnp.float32)
    b = jax.random.normal(jax.random.key(3), (8, 4), jnp.float32)
    want = jnp.matmul(a, b, precision="highest")
    got = splitmm.matmul(a, b, "tf32_corrected", emulate=True)
    assert got.shape == (3, 5, 4) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    a64 = a.astype(jnp.float64)
    got64 = splitmm.matmul(a64, b.astype(jnp.float64), "tf32_corrected")
    assert got64.dtype == jnp.float64  # float64 always runs at full precision


def test_real_path_on_this_backend_is_accurate():
    """emulate=False runs wherever jax runs (on a CPU, DEFAULT is exact float32)."""
    if jax.default_backend() == "gpu":
        pytest.skip("the GPU path is checked in test_corrected_on_gpu")
    a = jax.random.normal(jax.random.key(4), (16, 24), jnp.float32)
    b = jax.random.normal(jax.random.key(5), (24, 8), jnp.float32)
    want = jnp.matmul(a, b, precision="highest")
    for mode in ("default", "tf32_corrected", "bf16_corrected", "bf16x6"):
        got = jax.jit(lambda a, b, mode=mode: splitmm.matmul(a, b, mode))(a, b)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        splitmm.matmul(a, b, "tf32x3")


@pytest.mark.gpu
def test_corrected_on_gpu():
    """On tensor cores: the corrected product within 4x of "highest", "default" far worse."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (512, 1024), jnp.float32)
    b = jax.random.normal(kb, (1024, 256), jnp.float32)
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)

    def err(mode):
        c = np.asarray(jax.jit(lambda a, b: splitmm.matmul(a, b, mode))(a, b), np.float64)
        return np.max(np.abs(c - exact)) / np.max(np.abs(exact))

    highest = err("highest")
    assert err("tf32_corrected") <= 4 * highest
    assert err("bf16_corrected") <= 4 * highest


@pytest.mark.extended  # slow; CI runs it
def test_dot_general_and_flax_linear():
    """Any contraction (here the batch-of-matrices one), and nnx.Linear's dot_general hook."""
    from flax import nnx

    a = jax.random.normal(jax.random.key(6), (3, 8, 16), jnp.float32)
    b = jax.random.normal(jax.random.key(7), (3, 16, 4), jnp.float32)
    dims = (((2,), (1,)), ((0,), (0,)))
    exact = np.einsum("bij,bjk->bik", np.asarray(a, np.float64), np.asarray(b, np.float64))
    got = splitmm.dot_general(a, b, dims, "tf32_corrected", emulate=True)
    one = splitmm.dot_general(a, b, dims, "default", emulate=True)
    assert np.max(np.abs(np.asarray(got) - exact)) < 1e-5 < np.max(np.abs(np.asarray(one) - exact))

    x = jax.random.normal(jax.random.key(8), (5, 16), jnp.float32)
    plain = nnx.Linear(16, 4, precision="highest", rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    fn = splitmm.dot_general_fn("tf32_corrected", emulate=True)
    split_dense = nnx.Linear(16, 4, dot_general=fn, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(split_dense(x)), np.asarray(plain(x)), atol=1e-5)
    with pytest.raises(ValueError, match="mode must be one of"):
        splitmm.dot_general_fn("fast")


@pytest.mark.extended  # slow; CI runs it
def test_scoped_conv_is_corrected():
    """A convolution splits like a matmul: emulated tensor cores, float32-level error."""
    x = jax.random.normal(jax.random.key(9), (2, 6, 6, 8), jnp.float32)
    k = jax.random.normal(jax.random.key(10), (3, 3, 8, 5), jnp.float32)
    conv = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    exact = np.asarray(
        jax.lax.conv_general_dilated(x.astype(jnp.float64), k.astype(jnp.float64), **conv)
    )

    def err(mode):
        with splitmm.scoped(mode, emulate=True):
            out = splitmm.scoped_conv(x, k, **conv)
        return float(np.max(np.abs(np.asarray(out, np.float64) - exact)) / np.max(np.abs(exact)))

    assert err("tf32_corrected") < 1e-6 and err("bf16_corrected") < 1e-6
    with splitmm.scoped("default", emulate=True):  # XLA's own modes: as written
        assert splitmm.scoped_conv(x, k, **conv).dtype == jnp.float32
    one = splitmm.tensor_product(x, k, "tf32", emulate=True, dims=splitmm.Conv(conv))
    one_err = float(np.max(np.abs(np.asarray(one, np.float64) - exact)) / np.max(np.abs(exact)))
    assert one_err > 100 * err("tf32_corrected")  # one TF32 convolution: far worse


@pytest.mark.parametrize(
    "kind",
    ["maf", *(pytest.param(k, marks=pytest.mark.extended) for k in ("affine", "spline", "conv"))],
)
@pytest.mark.extended  # slow; CI runs it
def test_conditioners_follow_the_corrected_mode(kind, monkeypatch):
    """set_precision(model, "tf32_corrected") reaches the conditioners' products (3 tensor-
    core products each, emulated here), with float32-level results; an inner layer set back
    to "highest", and float64 inputs, multiply as written."""
    from flax import nnx
    from registry import perturb

    import invnet

    r = nnx.Rngs(0)
    build = {
        "affine": lambda: invnet.AffineCoupling(8, hidden=(16,), rngs=r),
        "spline": lambda: invnet.SplineCoupling(8, hidden=(16,), rngs=r),
        "maf": lambda: invnet.MaskedAutoregressive(8, hidden=(16,), rngs=r),
        "conv": lambda: invnet.ConvAffineCoupling(4, hidden=8, rngs=r),
    }[kind]
    shape = (2, 4, 4, 4) if kind == "conv" else (4, 8)
    x = jax.random.normal(jax.random.key(11), shape, jnp.float32)
    block = perturb(build(), 0.3)
    calls = []
    real = splitmm.tensor_product
    monkeypatch.setattr(splitmm, "tensor_product", lambda *a, **k: calls.append(1) or real(*a, **k))
    with invnet.eager():
        want = block.forward(x.astype(jnp.float64))[0]
        assert not calls  # float64: as written
        invnet.set_precision(block, "tf32_corrected")
        with splitmm.scoped("highest", emulate=True):
            got = block.forward(x)[0]
        assert len(calls) == 3 * (3 if kind == "conv" else 2)  # 3 products per layer
        outer = invnet.set_precision(invnet.Sequential(block), "tf32_corrected")
        invnet.set_precision(block, "highest")
        calls.clear()
        outer.forward(x)
        assert not calls  # the inner layer's own setting wins
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want), rtol=0, atol=2e-5)
