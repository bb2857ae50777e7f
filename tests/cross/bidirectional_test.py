"""NeuFA bidirectional attention (arXiv:2203.16838): one score matrix, w1 the transpose of its softmax
over the second sequence (rows of Pᵀ's transpose sum to one) and w2 its softmax over the first (columns
sum to one); both outputs against a numpy loop; padding gives zeros and leaves the valid part equal to
the unpadded call; the diagonal prior is lower for a diagonal alignment than for an anti-diagonal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.cross import bidirectional
from tests import tolerances

B, TA, TB, DA, DB, A = 2, 5, 9, 6, 4, 8


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  return f(B, TA, DA), f(B, TB, DB), f(B, TA, 3), f(B, TB, 7)


def _weights(seed=1):
  layer = bidirectional.BidirectionalSharedAttention(attention_dim=A)
  return layer, layer.init(jax.random.PRNGKey(seed), *_inputs())["params"]


def _run(params, *inputs, **kw):
  return bidirectional.bidirectional_shared_attention(*map(jnp.asarray, inputs), **params, **kw)


def test_both_directions_match_numpy():
  ka, kb, va, vb = _inputs(2)
  _, params = _weights()
  a_at_b, b_at_a, w1, w2 = _run(params, ka, kb, va, vb)
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  want_ab, want_ba = np.zeros((B, TB, 3)), np.zeros((B, TA, 7))
  for b in range(B):
    scores = (ka[b] @ p["proj_a"] + p["bias_a"]) @ (kb[b] @ p["proj_b"] + p["bias_b"]).T
    rows = np.exp(scores - scores.max(1, keepdims=True))
    rows /= rows.sum(1, keepdims=True)               # each a-token over b
    cols = np.exp(scores - scores.max(0, keepdims=True))
    cols /= cols.sum(0, keepdims=True)               # each b-token over a
    want_ab[b], want_ba[b] = rows.T @ va[b], cols @ vb[b]
    np.testing.assert_allclose(np.asarray(w1[b]), rows.T, **tolerances.output(jnp.float32))
    np.testing.assert_allclose(np.asarray(w2[b]), cols, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(np.asarray(a_at_b), want_ab, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(np.asarray(b_at_a), want_ba, **tolerances.output(jnp.float32))


def test_one_matrix_normalized_over_each_axis():
  _, params = _weights()
  _, _, w1, w2 = _run(params, *_inputs(3))
  np.testing.assert_allclose(np.asarray(w1).sum(axis=1), 1.0, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(np.asarray(w2).sum(axis=1), 1.0, **tolerances.output(jnp.float32))
  # Both are normalizations of one score matrix: their logs differ by a per-row plus a per-column
  # constant, so every 2x2 log cross-ratio agrees.
  l1, l2 = np.log(np.swapaxes(np.asarray(w1, np.float64), 1, 2)), np.log(np.asarray(w2, np.float64))
  cross = lambda l: l[:, 1:, 1:] - l[:, 1:, :1] - l[:, :1, 1:] + l[:, :1, :1]  # noqa: E731
  np.testing.assert_allclose(cross(l1), cross(l2), **tolerances.output(jnp.float32))


def test_padding_gives_zeros_and_leaves_the_valid_part():
  ka, kb, va, vb = _inputs(4)
  _, params = _weights()
  la, lb = np.array([TA, 3]), np.array([6, TB])
  out = _run(params, ka, kb, va, vb, lengths_a=jnp.asarray(la), lengths_b=jnp.asarray(lb))
  for got in out:
    assert np.all(np.isfinite(np.asarray(got)))
  a_at_b, b_at_a, w1, w2 = (np.asarray(x) for x in out)
  b = 1
  alone = [np.asarray(x) for x in _run(params, ka[b:, :la[b]], kb[b:, :lb[b]], va[b:, :la[b]],
                                       vb[b:, :lb[b]])]
  np.testing.assert_allclose(a_at_b[b, :lb[b]], alone[0][0], **tolerances.output(jnp.float32))
  np.testing.assert_allclose(b_at_a[b, :la[b]], alone[1][0], **tolerances.output(jnp.float32))
  assert np.all(b_at_a[b, la[b]:] == 0) and np.all(w2[b, la[b]:] == 0) and np.all(w1[b, :, la[b]:] == 0)
  assert np.all(a_at_b[0, lb[0]:] == 0)


def test_diagonal_prior_prefers_the_diagonal():
  T = 6
  diag = jnp.eye(T)[None]
  anti = jnp.eye(T)[::-1][None]
  loss = lambda w: bidirectional.diagonal_attention_loss(jnp.swapaxes(w, 1, 2), w)  # noqa: E731
  assert float(loss(diag)) < float(loss(anti))
  # The authors' formula in numpy on a random pair of maps.
  rng = np.random.default_rng(5)
  w1, w2 = rng.random((1, 7, T)), rng.random((1, T, 7))
  a = np.linspace(1e-6, 1, T)[:, None]
  c = np.linspace(1e-6, 1, 7)[None, :]
  r = np.tanh(0.5 * (np.maximum(a / c, c / a) - 1))
  want = np.mean(np.maximum(w1[0].T, w2[0]) * r)
  got = bidirectional.diagonal_attention_loss(jnp.asarray(w1, jnp.float32), jnp.asarray(w2, jnp.float32))
  np.testing.assert_allclose(float(got), want, **tolerances.output(jnp.float32))


def test_gradients_are_finite_and_reach_both_projections():
  ka, kb, va, vb = _inputs(6)
  _, params = _weights()
  la = jnp.asarray([TA, 2])

  def loss(p):
    o1, o2, w1, w2 = _run(p, ka, kb, va, vb, lengths_a=la)
    return jnp.sum(jnp.sin(o1)) + jnp.sum(jnp.sin(o2)) + bidirectional.diagonal_attention_loss(
        w1, w2, lengths_a=la)

  grads = jax.grad(loss)(params)
  for name, g in grads.items():
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0, name


def test_bad_inputs_are_clear_errors():
  ka, kb, va, vb = _inputs()
  _, params = _weights()
  with pytest.raises(ValueError, match=r"values_b.*\[B, T_b, d_b\]"):
    _run(params, ka, kb, va, vb[:, :3])
  with pytest.raises(ValueError, match="proj_a"):
    _run({**params, "proj_a": params["proj_a"][:2]}, ka, kb, va, vb)
  with pytest.raises(ValueError, match="lengths_a"):
    _run(params, ka, kb, va, vb, lengths_a=jnp.asarray([1, 2, 3]))
