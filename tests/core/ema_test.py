"""The damped multi-dimensional EMA (Mega, arXiv:2209.10655, eqs. (2)-(3)): the recurrence equals a
float64 loop of the paper's equations, the closed-form kernel's direct convolution and the FFT
convolution (values and gradients); the (bi)directional EMA restarts at packed-document boundaries.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import ema
from tests import tolerances

TOL = tolerances.output(jnp.float32)


def _ema_params(seed, K=2, H=3, ndim=4):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  return tuple(jax.random.normal(key, (K, H, ndim)) for key in keys)


def numpy_ema_loop(x, alpha, delta, beta, eta):
  """The paper's recurrence, float64, one step at a time."""
  sig = lambda z: 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
  a, d = sig(alpha), sig(delta)
  beta, eta = np.asarray(beta, np.float64), np.asarray(eta, np.float64)
  x = np.asarray(x, np.float64)
  state = np.zeros(x.shape[:1] + x.shape[2:] + a.shape[-1:])
  ys = []
  for t in range(x.shape[1]):
    state = a * beta * x[:, t, ..., None] + (1 - a * d) * state
    ys.append(np.sum(eta * state, -1))
  return np.stack(ys, 1)


@pytest.mark.parametrize("T", [1, 7, 40])
def test_mega_ema_recurrence_equals_convolution(T):
  params = _ema_params(0)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, T, 2, 3))
  scan = ema.ema_recurrence(x, *params)
  fft = ema.ema_convolution(x, *params)
  # Direct convolution with the closed-form kernel K_l = Σ_j η_j α_j β_j φ_j^l.
  kern = np.asarray(ema.ema_kernel(*params, T), np.float64)
  direct = np.stack([sum(kern[l] * np.asarray(x, np.float64)[:, t - l] for l in range(t + 1))
                     for t in range(T)], 1)
  chex.assert_trees_all_close(scan, numpy_ema_loop(x, *params), **TOL)
  chex.assert_trees_all_close(scan, direct, **TOL)
  chex.assert_trees_all_close(fft, scan, **TOL)
  rev = ema.ema_recurrence(x, *params, reverse=True)
  chex.assert_trees_all_close(ema.ema_convolution(x, *params, reverse=True), rev, **TOL)
  chex.assert_trees_all_close(rev, jnp.flip(ema.ema_recurrence(jnp.flip(x, 1), *params), 1), **TOL)


def test_mega_ema_gradients_of_both_forms_agree():
  params = _ema_params(2)
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 25, 2, 3))
  loss = lambda f: lambda x, *p: jnp.sum(jnp.sin(f(x, *p)))
  g_scan = jax.grad(loss(ema.ema_recurrence), argnums=(0, 1, 2, 3, 4))(x, *params)
  g_fft = jax.grad(loss(ema.ema_convolution), argnums=(0, 1, 2, 3, 4))(x, *params)
  chex.assert_trees_all_close(g_fft, g_scan, **tolerances.grad(jnp.float32))


def test_mega_ema_restarts_at_document_boundaries():
  params = tuple(jnp.stack([p, p + 0.5]) for p in _ema_params(4))
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 12, 2, 3))
  seg = jnp.array([[0] * 5 + [1] * 7])
  for causal in (True, False):
    packed = ema.multidim_ema(x, *params, causal=causal, segment_ids=seg)
    alone = [ema.multidim_ema(part, *params, causal=causal) for part in (x[:, :5], x[:, 5:])]
    chex.assert_trees_all_close(packed, jnp.concatenate(alone, 1), **TOL)
  # The bidirectional EMA is the forward EMA plus a backward EMA with its own parameters.
  both = ema.multidim_ema(x, *params, causal=False, implementation="reference")
  fwd = ema.ema_recurrence(x, *(p[0] for p in params))
  bwd = ema.ema_recurrence(x, *(p[1] for p in params), reverse=True)
  chex.assert_trees_all_close(both, fwd + bwd, **TOL)
