"""TaylorShift and FAST (attnjax/ops/linear/taylor.py): the linear form equals the direct
Taylor-softmax.

Each property is checked against an explicit evaluation of the formula written out here."""


import jax.numpy as jnp
import pytest

from attnjax.ops import linear as lin
from attnjax.ops.linear import taylor
from tests import tolerances
from tests.inputs import qkv
from tests.ops.linear.helpers import IMPLS, assert_rel, causal_mask, heads, weighted


def _taylor_softmax(x, visible):
  w = jnp.where(visible, 1.0 + x + 0.5 * x * x, 0.0)
  return w / jnp.sum(w, -1, keepdims=True)


@pytest.mark.parametrize("causal", [True, False])
def test_taylor_shift_linear_form_equals_direct_taylor_softmax(causal):
  q, k, v = qkv(T=29)
  N, T, H = q.shape[2], q.shape[1], q.shape[3]
  x = H ** -0.5 * jnp.einsum("btnf,bsnf->bnts", q, heads(k, N))
  visible = causal_mask(T) if causal else jnp.ones((T, T), bool)
  expected = weighted(_taylor_softmax(x, visible), heads(v, N))
  for form in ("linear", "direct"):
    for impl in IMPLS:
      out = lin.taylor_shift_attention(q, k, v, causal=causal, form=form, implementation=impl)
      assert_rel(out, expected, tolerances.SECOND_ORDER_FEATURES_REL_RMS[jnp.float32])


def test_taylor_shift_auto_switches_at_the_crossover_length():
  H, h = 8, 6
  crossover = lin.taylor_crossover_length(H, h)
  # Cost model: linear T·(1+H+H²)·(h+1) against direct T²·(H+h).
  assert (crossover - 1) * (H + h) < (1 + H + H * H) * (h + 1) <= crossover * (H + h)
  seen = []
  original = taylor._taylor_direct

  def spy(*args, **kwargs):
    seen.append(args[0].shape[1])
    return original(*args, **kwargs)

  taylor._taylor_direct = spy
  try:
    for T in (crossover - 1, crossover):
      q, k, v = qkv(B=1, T=T, H=H, h=h)
      lin.taylor_shift_attention(q, k, v, form="auto")
  finally:
    taylor._taylor_direct = original
  assert seen == [crossover - 1]


def test_fastmax_equals_polynomial_weights_of_standardized_scores():
  q, k, v = qkv(T=29)
  N, T, H = q.shape[2], q.shape[1], q.shape[3]

  def standardize(x):
    x = x - x.mean(-1, keepdims=True)
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)

  x = H ** -0.5 * jnp.einsum("btnf,bsnf->bnts", standardize(q), heads(standardize(k), N))
  weights = _taylor_softmax(x, causal_mask(T))
  # The polynomial is never negative.
  assert float(jnp.min(jnp.where(causal_mask(T), 1.0 + x + 0.5 * x * x, 1.0))) > 0
  expected = weighted(weights, heads(v, N))
  for impl in IMPLS:
    assert_rel(lin.fastmax_attention(q, k, v, causal=True, implementation=impl), expected,
               tolerances.SECOND_ORDER_FEATURES_REL_RMS[jnp.float32])
