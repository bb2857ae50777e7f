"""ReGLA (attnjax/ops/linear/regla.py): the refining gate, and recurrent = chunked.

Each property is checked against an explicit evaluation of the formula written out here."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import linear as lin
from tests import tolerances
from tests.inputs import qkv
from tests.ops.linear.helpers import assert_rel


def test_refining_gate_lies_between_its_bounds_and_reaches_both_ends():
  g = jnp.linspace(0.0, 1.0, 101)[:, None]
  r = jnp.linspace(0.0, 1.0, 11)[None, :]
  gated = lin.refined_gate(g, r)
  tol = tolerances.GATE_VALUES[jnp.float32]
  assert bool(jnp.all(gated >= g * g - tol["atol"]))
  assert bool(jnp.all(gated <= 1 - (1 - g) ** 2 + tol["atol"]))
  np.testing.assert_allclose(lin.refined_gate(g, 0.0), g * g, **tol)
  np.testing.assert_allclose(lin.refined_gate(g, 1.0), 1 - (1 - g) ** 2, **tol)
  # The refined gate moves further than σ allows: d g'/d g at r=1, g→0 is 2 (twice the plain gate).
  grad = jax.grad(lambda g0: lin.refined_gate(g0, 1.0))(0.0)
  assert abs(float(grad) - 2.0) < tolerances.ELEMENTWISE_DERIVATIVE_ABS


def _regla_params(N=4, H=8, seed=1):
  ks = jax.random.split(jax.random.PRNGKey(seed), 2)
  return dict(gate_kernel=0.3 * jax.random.normal(ks[0], (N, H, H)), gate_bias=jnp.ones((N, H)),
              refine_kernel=0.3 * jax.random.normal(ks[1], (N, H, H)),
              refine_bias=jnp.zeros((N, H)))


@pytest.mark.parametrize("T", [29, pytest.param(100, marks=pytest.mark.slow)])
def test_regla_recurrent_and_chunked_forms_agree_with_gradients(T):
  q, k, v = qkv(T=T)
  params = _regla_params()

  def loss(impl, q, k, v, params):
    o = lin.refined_gated_linear_attention(q, k, v, implementation=impl, **params)
    return jnp.sum(o * jnp.cos(jnp.arange(o.size).reshape(o.shape)))

  # Compiled per implementation (eager dispatch would compile every primitive separately).
  grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0)
  ref = grad("reference", q, k, v, params)
  for impl in ("xla", "parallel"):
    got = grad(impl, q, k, v, params)
    assert_rel(got[0], ref[0])
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1]), strict=True):
      assert_rel(a, b, tolerances.GRAD_REL_RMS[jnp.float32])
