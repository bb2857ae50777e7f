"""DQA (#230, arXiv:2103.13322): the mix is the softmax-weighted sum of the min-max quantizers
(eqs. 2-4, checked against a numpy loop), low T picks the argmax quantizer, gradients reach w (STE)
and α, the schedule ends at T(B) (eq. 5), eq. 7 initialization and the eq. 6 regularizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.train import quantization as dqa
from tests import tolerances

BITS = dqa.PAPER_BITS


def _w():
  return jnp.asarray(np.random.default_rng(0).standard_normal((5, 7)), jnp.float32)


def _np_minmax(w, bits):
  lo, hi = w.min(), w.max()
  step = (hi - lo) / (2 ** bits - 1)
  return lo + step * np.round((w - lo) / step)


def _np_attention(alpha, t):
  z = alpha / np.std(alpha, ddof=1) / t
  e = np.exp(z - z.max())
  return e / e.sum()


def test_minmax_quantizer_levels_and_error():
  w = np.asarray(_w(), np.float64)
  for bits in BITS:
    q = np.asarray(dqa.minmax_quantize(jnp.asarray(w, jnp.float32), bits), np.float64)
    step = (w.max() - w.min()) / (2 ** bits - 1)
    assert len(np.unique(np.round((q - w.min()) / step))) <= 2 ** bits
    assert np.abs(q - w).max() <= step / 2 + tolerances.OUTPUT[jnp.float32]["atol"]
    np.testing.assert_allclose(q, _np_minmax(w, bits), **tolerances.output(jnp.float32))


def test_mix_is_softmax_weighted_sum_of_quantizers():
  w = _w()
  alpha = jnp.asarray([0.3, -0.2, 0.9])
  for t in (0.5, 2.0, 100.0):
    got = np.asarray(dqa.dqa_quantize(w, alpha, t, BITS), np.float64)
    a = _np_attention(np.asarray(alpha, np.float64), t)
    want = sum(a[k] * _np_minmax(np.asarray(w, np.float64), b) for k, b in enumerate(BITS))
    np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))
    np.testing.assert_allclose(np.asarray(dqa.dqa_attention(alpha, t)), a,
                               **tolerances.output(jnp.float32))


def test_low_temperature_picks_argmax_and_high_temperature_averages():
  w = _w()
  alpha = dqa.init_alpha(BITS)    # argmax is the lowest bit width (eq. 7)
  np.testing.assert_allclose(dqa.dqa_quantize(w, alpha, 0.03, BITS), dqa.minmax_quantize(w, 2),
                             **tolerances.output(jnp.float32))
  mean = sum(dqa.minmax_quantize(w, b) for b in BITS) / len(BITS)
  hot = dqa.dqa_quantize(w, alpha, 1e6, BITS)
  np.testing.assert_allclose(hot, mean, **tolerances.output(jnp.float32))
  assert not np.allclose(hot, dqa.minmax_quantize(w, 2))


def test_gradient_reaches_weights_straight_through_and_alpha():
  w = _w()
  c = jnp.asarray(np.random.default_rng(1).standard_normal(w.shape), jnp.float32)
  alpha = jnp.asarray([0.3, -0.2, 0.9])

  def loss(w, alpha):
    return jnp.sum(c * dqa.dqa_quantize(w, alpha, 1.0, BITS))

  gw, ga = jax.grad(loss, argnums=(0, 1))(w, alpha)
  # STE: ∂q/∂w = Σ_k a_k = 1, so ∂L/∂w = c.
  np.testing.assert_allclose(gw, c, **tolerances.GRAD[jnp.float32])
  assert np.all(np.isfinite(ga)) and np.abs(np.asarray(ga)).max() > 0
  # α's gradient is the exact derivative of the smooth mix: compare with central differences.
  a64 = np.asarray(alpha, np.float64)
  qs = [_np_minmax(np.asarray(w, np.float64), b) for b in BITS]
  c64 = np.asarray(c, np.float64)

  def f(al):
    a = _np_attention(al, 1.0)
    return sum(a[k] * np.sum(c64 * qs[k]) for k in range(len(BITS)))

  eps = 1e-6
  fd = np.array([(f(a64 + eps * e) - f(a64 - eps * e)) / (2 * eps) for e in np.eye(3)])
  np.testing.assert_allclose(ga, fd, **tolerances.GRAD[jnp.float32])


def test_schedule_end_points_and_decay():
  sched = dqa.temperature_schedule(100.0, 0.03, total_steps=50)
  np.testing.assert_allclose(sched(0), 100.0, **tolerances.ELEMENTWISE[jnp.float32])
  np.testing.assert_allclose(sched(50), 0.03, **tolerances.ELEMENTWISE[jnp.float32])
  psi = (0.03 / 100.0) ** (1 / 50)
  np.testing.assert_allclose(sched(7), 100.0 * psi ** 7, **tolerances.ELEMENTWISE[jnp.float32])
  ts = np.asarray(jax.vmap(sched)(jnp.arange(51)))
  assert np.all(np.diff(ts) < 0)


def test_init_alpha_and_penalty():
  np.testing.assert_allclose(dqa.init_alpha(BITS), [12 / 14, 10 / 14, 6 / 14],
                             **tolerances.ELEMENTWISE[jnp.float32])
  alphas = {"l1": jnp.asarray([0.3, -0.2, 0.9]), "l2": dqa.init_alpha(BITS)}
  got = dqa.bitwidth_penalty(alphas, 0.7, num_weights=1000, strength=5.0)
  g = np.asarray(dqa.PAPER_PENALTY)
  want = 5.0 * sum(g @ _np_attention(np.asarray(a, np.float64), 0.7) for a in alphas.values()) / 1000
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))
  # The penalty pushes attention to the low bit width: its gradient raises α_1 relative to α_3.
  ga = jax.grad(lambda a: dqa.bitwidth_penalty(a, 0.7, 1000, 5.0))(alphas["l1"])
  assert ga[0] < ga[2]


def test_dense_wrapper_uses_eq7_init_and_quantized_kernel():
  layer = dqa.DQADense(4)
  x = jnp.ones((2, 3))
  params = layer.init(jax.random.PRNGKey(0), x, 1.0)["params"]
  np.testing.assert_allclose(params["alpha"], dqa.init_alpha(BITS),
                             **tolerances.ELEMENTWISE[jnp.float32])
  y = layer.apply({"params": params}, x, 0.03)
  want = x @ dqa.minmax_quantize(params["kernel"], 2) + params["bias"]
  np.testing.assert_allclose(y, want, **tolerances.output(jnp.float32))


def test_bad_alpha_shape():
  with pytest.raises(ValueError, match="alpha must be \\[3\\]"):
    dqa.dqa_quantize(_w(), jnp.zeros((2,)), 1.0, BITS)
