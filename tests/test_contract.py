"""The one contract every public layer passes (see tests/registry.py for the cases).

The default run checks each case with ONE compiled function (`_everything_fn`) of its
float64 model that computes everything the checks need: jitted round trips both ways,
log-dets against ``slogdet`` of the autodiff Jacobian in both directions, forward + inverse
log-dets summing to 0, a (2, 2) batch equal to the same samples flattened, the dtype kept,
float32 data through it (computed in float32, to the case's float32 bound), and gradients
reaching every parameter; a saved and loaded copy then runs through the same compiled
function and must give the same results to the bit. Almost all the time of a contract check
is XLA compiling, so one function per case keeps the default command short.

The long tail (``-m extended``, run by CI after the default command): each check as its own
compiled test for models of float32 AND float64 parameters (the float32 Jacobian check among
them), more batch shapes (unbatched, (2, 3)), parameters and inputs of different dtypes, and
the model's own compiled methods against the same methods run op by op.

Tolerances: float64 round trips to 1e-12 relative; float32 to the case's stated ``tol32``
(about eps32 = 1.2e-7 times the perturbed layer's error amplification, with margin). All
matmuls run at the layers' default precision="highest".
"""

from __future__ import annotations

import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from registry import CASES, VARIANTS, build

import invnet

DTYPES = ["float64", "float32"]
params = pytest.mark.parametrize("dtype", DTYPES)
cases = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
# the default command: every layer type once (variants of a type under -m extended)
default_cases = pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.extended) if c.name in VARIANTS else c for c in CASES],
    ids=[c.name for c in CASES],
)


def rel_tol(case, dtype):
    return 1e-12 if dtype == "float64" else case.tol32


@functools.cache
def _model_and_fns(case, dtype):
    model = build(case, dtype)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x, c: nnx.merge(graphdef, s).forward(x, cond=c))
    inv = jax.jit(lambda s, y, c: nnx.merge(graphdef, s).inverse(y, cond=c))
    return model, state, fwd, inv


def _inputs(case, dtype, batch=(4,), seed=0, event=None):
    kx, kc = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (*batch, *(event or case.event_shape)), dtype)
    cond = jax.random.normal(kc, (*batch, case.cond_dim), dtype) if case.cond_dim else None
    return x, cond


def _out_event(case, model):
    return tuple(model.output_shape(case.event_shape))


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1.0))


extended = pytest.mark.extended


def _jacobian_log_dets(method, points, conds):
    """``slogdet`` of the autodiff (reverse-mode: it also runs through custom VJPs, as in
    Reversible) Jacobian of ``method`` at each point, with the method's own log-det."""

    def one(point, c):
        def flat(v):
            return method(v.reshape(point.shape), cond=c)[0].reshape(-1)

        jac = jax.jacrev(flat)(point.reshape(-1))
        sign, logabs = jnp.linalg.slogdet(jac.astype(jnp.float64))
        return sign, logabs, method(point, cond=c)[1]

    return jax.vmap(one)(points, conds)


@functools.cache
def _everything_fn(case, dtype):
    """The model of ``case`` with ``dtype`` parameters and ONE jitted function of its
    parameters and buffers that computes every check of the contract (module docstring)."""
    model = build(case, dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def everything(params, rest, x, cond, y0, xb, x32, cond32):
        m = nnx.merge(graphdef, params, rest)
        y, ld = m.forward(x, cond=cond)
        x_back, ild = m.inverse(y, cond=cond)
        x0, _ = m.inverse(y0, cond=cond)
        y_back, _ = m.forward(x0, cond=cond)
        # a (2, 2) batch against the same four samples flattened
        cb = None if cond is None else cond[:4].reshape(2, 2, -1)
        yb, ldb = m.forward(xb, cond=cb)
        xbb, ildb = m.inverse(yb, cond=cb)
        # float32 data through the float64 parameters: computed in float32, dtype kept
        y32, ld32 = m.forward(x32, cond=cond32)
        x32_back, ild32 = m.inverse(y32, cond=cond32)
        conditional = cond is not None
        cj = cond[:2] if conditional else jnp.zeros((2, 0), x.dtype)

        def at(fn):  # the vmapped condition, dropped for an unconditional model
            return lambda v, cond=None: fn(v, cond=cond if conditional else None)

        jac_fwd = _jacobian_log_dets(at(m.forward), x[:2], cj)
        jac_inv = _jacobian_log_dets(at(m.inverse), y[:2], cj)

        def loss(p):
            mm = nnx.merge(graphdef, p, rest)
            out, log_det = mm.forward(x, cond=cond)
            back, inv_log_det = mm.inverse(jnp.sin(out), cond=cond)
            return jnp.sum(out**2) + jnp.sum(log_det) + jnp.sum(back**3) + jnp.sum(inv_log_det)

        grads = jax.grad(loss)(params)
        return dict(
            y=y,
            ld=ld,
            x_back=x_back,
            ild=ild,
            x0=x0,
            y_back=y_back,
            yb=yb,
            ldb=ldb,
            xbb=xbb,
            ildb=ildb,
            y32=y32,
            ld32=ld32,
            x32_back=x32_back,
            ild32=ild32,
            jac_fwd=jac_fwd,
            jac_inv=jac_inv,
            grads=grads,
        )

    return model, params, rest, jax.jit(everything)


def _check_contract(case, dtype):
    model, params, rest, everything = _everything_fn(case, dtype)
    x, cond = _inputs(case, dtype)
    y0, _ = _inputs(case, dtype, seed=1, event=_out_event(case, model))
    xb = x[:4].reshape(2, 2, *case.event_shape)
    x32, cond32 = _inputs(case, "float32", seed=4)
    args = (x, cond, y0, xb, x32, cond32)
    out = everything(params, rest, *args)
    tol = rel_tol(case, dtype)
    # round trips both ways, jitted
    assert _rel(out["x_back"], x) <= tol
    assert _rel(out["y_back"], y0) <= tol
    # dtype kept (float32 data through a float64 model stays float32)
    for key in ("y", "ld", "x_back", "ild"):
        assert out[key].dtype == jnp.dtype(dtype), key
    for key in ("y32", "ld32", "x32_back", "ild32"):
        assert out[key].dtype == jnp.float32, key
    assert _rel(out["x32_back"], x32) <= case.tol32
    # forward + inverse log-dets sum to zero; batch shape
    assert out["ld"].shape == x.shape[:1] and out["ild"].shape == x.shape[:1]
    zero_tol = 1e-12 if dtype == "float64" else 1e-4
    np.testing.assert_allclose(np.asarray(out["ld"] + out["ild"]), 0.0, atol=zero_tol)
    np.testing.assert_allclose(np.asarray(out["ld32"] + out["ild32"]), 0.0, atol=1e-4)
    # log-det against slogdet of the Jacobian, both directions
    jac_tol = 1e-10 if dtype == "float64" else 1e-3
    for sign, logabs, log_det in (out["jac_fwd"], out["jac_inv"]):
        assert bool(jnp.all(sign != 0.0))
        np.testing.assert_allclose(
            np.asarray(log_det), np.asarray(logabs), atol=jac_tol, rtol=jac_tol
        )
    # a (2, 2) batch equals the same samples flattened
    out_event = _out_event(case, model)
    assert out["yb"].shape == (2, 2, *out_event) and out["ldb"].shape == (2, 2)
    assert out["xbb"].shape == (2, 2, *case.event_shape) and out["ildb"].shape == (2, 2)
    np.testing.assert_allclose(
        np.asarray(out["yb"]).reshape(4, *out_event), out["y"][:4], rtol=tol, atol=tol
    )
    np.testing.assert_allclose(np.asarray(out["ldb"]).reshape(4), out["ld"][:4], rtol=tol, atol=tol)
    # gradients reach every parameter
    for path, g in jax.tree_util.tree_leaves_with_path(out["grads"]):
        assert bool(jnp.all(jnp.isfinite(g))), path
        assert float(jnp.max(jnp.abs(g))) > 0.0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    # save and load: the same architecture, the same results to the bit
    with tempfile.TemporaryDirectory() as tmp:
        loaded = invnet.load(invnet.save(model, os.path.join(tmp, "model.invnet")))
    assert type(loaded) is type(model)
    _, loaded_params, loaded_rest = nnx.split(loaded, nnx.Param, ...)
    again = everything(loaded_params, loaded_rest, *args)
    for key in ("y", "ld", "x_back", "ild", "y32", "x32_back"):
        assert bool(jnp.array_equal(out[key], again[key])), key


@default_cases
def test_contract(case):
    """Everything the contract asks of a layer, from one compiled function (see the module
    docstring): a float64 model to 1e-12, float32 data through it to the case's ``tol32``;
    then a saved and loaded copy gives the same results to the bit."""
    _check_contract(case, "float64")


@extended
@cases
def test_contract_float32_parameters(case):
    """The same checks for a model with float32 parameters (float32 tolerances)."""
    _check_contract(case, "float32")


@extended
@cases
@params
def test_default_methods_are_compiled_and_equal_eager(case, dtype):
    """The model's own methods (compiled by the runtime) equal the same methods run op by op
    (``invnet.eager()``), for models of float32 and float64 parameters."""
    model, *_ = _model_and_fns(case, dtype)
    x, cond = _inputs(case, dtype)
    y, ld = model.forward(x, cond=cond)
    xb, ild = model.inverse(y, cond=cond)
    with invnet.eager():
        y_e, ld_e = model.forward(x, cond=cond)
        xb_e, ild_e = model.inverse(y, cond=cond)
    tol = rel_tol(case, dtype)
    for compiled_, eager_ in ((y, y_e), (ld, ld_e), (xb, xb_e), (ild, ild_e)):
        np.testing.assert_allclose(np.asarray(compiled_), np.asarray(eager_), rtol=tol, atol=tol)


@extended
@cases
@pytest.mark.parametrize("batch", [(), (2, 3)], ids=["unbatched", "B1xB2"])
def test_batch_shapes(case, batch):
    model, *_ = _model_and_fns(case, "float64")
    x, cond = _inputs(case, "float64", batch=batch, seed=2)
    out_event = _out_event(case, model)
    y, log_det = model.forward(x, cond=cond)
    assert y.shape == (*batch, *out_event) and log_det.shape == batch
    x_back, inv_log_det = model.inverse(y, cond=cond)
    assert x_back.shape == x.shape and inv_log_det.shape == batch
    # every sample equals the same computation done on the flattened batch
    flat_c = None if cond is None else cond.reshape(-1, case.cond_dim)
    y_flat, ld_flat = model.forward(x.reshape(-1, *case.event_shape), cond=flat_c)
    np.testing.assert_allclose(
        np.asarray(y).reshape(-1, *out_event), y_flat, rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(np.asarray(log_det).reshape(-1), ld_flat, rtol=1e-12, atol=1e-12)


@extended
@cases
@pytest.mark.parametrize(
    "param_dtype, input_dtype",
    [("float32", "float64")],  # float64 parameters with float32 data: the default run
    ids=["f32-params-f64-input"],
)
def test_input_dtype_wins_over_the_parameters(case, param_dtype, input_dtype):
    """The input's dtype wins: outputs keep it and parameters are cast to it (invnet.core),
    with every cast explicit: the suite runs under strict dtype promotion (tests/conftest.py),
    where an implicit float32/float64 op raises. Forward, inverse and parameter gradients."""
    model, state, fwd, inv = _model_and_fns(case, param_dtype)
    x, cond = _inputs(case, input_dtype)
    y, ld = fwd(state, x, cond)
    xb, ild = inv(state, y, cond)
    for arr in (y, ld, xb, ild):
        assert arr.dtype == jnp.dtype(input_dtype)
    assert _rel(xb, x) <= case.tol32  # float32 somewhere on the way: float32's bound
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        out, log_det = nnx.merge(graphdef, p, rest).forward(x, cond=cond)
        return jnp.sum(out**2) + jnp.sum(log_det)

    grads = jax.grad(loss)(params)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
        assert g.dtype == p.dtype and bool(jnp.all(jnp.isfinite(g)))


def _public_layer_types():
    return {
        obj
        for name in invnet.__all__
        if isinstance(obj := getattr(invnet, name), type)
        and issubclass(obj, invnet.Bijector)
        and obj is not invnet.Bijector
    }


def test_every_public_layer_is_in_the_registry():
    covered = set()
    # the default command's cases alone (variants run under -m extended) reach every type
    for case in [c for c in CASES if c.name not in VARIANTS]:
        # only the layer types matter: no data init, no perturbation
        for _, node in nnx.iter_graph(case.build(jnp.dtype("float64"), nnx.Rngs(0))):
            covered.add(type(node))
    missing = {t.__name__ for t in _public_layer_types()} - {t.__name__ for t in covered}
    assert not missing, f"public layers missing from tests/registry.py: {sorted(missing)}"
