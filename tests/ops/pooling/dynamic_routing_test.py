"""Dynamic Self-Attention pooling (#114): r rounds of softmax(q) → Σ a x̂ → tanh → q += x̂·z from q = 0.

Checked against a float64 numpy rewrite of the paper's routing loop (masked words, tanh and squash),
and its defining properties: one round is plain softmax pooling of the initial logits (the mean of the
real words, then tanh); later rounds move weight toward the words that agree with the pooled vector;
padding never matters and a sentence with no word gives zeros with finite gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.pooling import dynamic_self_attention_pooling
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, S, M, D = 2, 9, 3, 5


def _x_hat(seed, shape=(B, S, M, D)):
  # The paper's projected words LeakyReLU(W x + b): mostly positive entries.
  return jax.nn.leaky_relu(jax.random.normal(jax.random.PRNGKey(seed), shape) + 0.3)


def _dsa_float64(x_hat, mask, r, nonlinearity="tanh"):
  """The paper's dynamic weight vector algorithm, one sentence and attention at a time."""
  x_hat, mask = np.asarray(x_hat, np.float64), np.asarray(mask)
  out = np.zeros((x_hat.shape[0], x_hat.shape[2], x_hat.shape[3]))
  for b in range(x_hat.shape[0]):
    for m in range(x_hat.shape[2]):
      x = x_hat[b, mask[b], m]                                  # the sentence's real words
      q = np.zeros(len(x))
      for _ in range(r):
        a = np.exp(q - q.max())
        a /= a.sum()
        s = a @ x
        if nonlinearity == "tanh":
          z = np.tanh(s)
        else:
          n2 = s @ s
          z = n2 / (1 + n2) * s / np.sqrt(n2)
        q = q + x @ z
      out[b, m] = z
  return out


@pytest.mark.parametrize("nonlinearity", ["tanh", "squash"])
def test_equals_the_papers_routing_loop(nonlinearity):
  x = _x_hat(1)
  mask = jnp.arange(S)[None, :] < jnp.array([[S], [6]])
  fn = jax.jit(lambda x, m: dynamic_self_attention_pooling(x, mask=m, iterations=3,
                                                           nonlinearity=nonlinearity))
  np.testing.assert_allclose(np.asarray(fn(x, mask)), _dsa_float64(x, mask, 3, nonlinearity), **F32)


def test_one_round_is_softmax_pooling_of_the_initial_logits():
  # q = 0: softmax gives every real word 1/n, so z = tanh(mean of the real words).
  x = _x_hat(2)
  mask = jnp.arange(S)[None, :] < jnp.array([[S], [4]])
  z, a = jax.jit(lambda x, m: dynamic_self_attention_pooling(x, mask=m, iterations=1,
                                                             return_weights=True))(x, mask)
  xn, mn = np.asarray(x, np.float64), np.asarray(mask)
  want = np.stack([np.tanh(xn[b, mn[b]].mean(0)) for b in range(B)])
  np.testing.assert_allclose(np.asarray(z), want, **F32)
  np.testing.assert_allclose(np.asarray(a), np.where(mn, 1.0 / mn.sum(1, keepdims=True), 0.0)[
      :, :, None].repeat(M, 2), **F32)


def test_later_rounds_weight_the_words_that_agree_with_the_pooled_vector():
  # Round 2's logits are x̂_i·z of round 1: its weights are ordered exactly as the agreements.
  x = _x_hat(3)
  z1 = dynamic_self_attention_pooling(x, iterations=1)
  _, a2 = dynamic_self_attention_pooling(x, iterations=2, return_weights=True)
  agreement = np.einsum("bsmd,bmd->bsm", np.asarray(x, np.float64), np.asarray(z1, np.float64))
  order = np.argsort(agreement, axis=1)
  assert np.all(np.diff(np.take_along_axis(np.asarray(a2), order, axis=1), axis=1) >= 0)
  assert np.all(np.asarray(a2).max(1) > 1.0 / S)              # no longer uniform


def test_padding_is_ignored_and_an_empty_sentence_gives_zeros():
  x = _x_hat(4)
  mask = jnp.arange(S)[None, :] < jnp.array([[5], [0]])
  fn = jax.jit(lambda x: dynamic_self_attention_pooling(x, mask=mask))
  garbage = x.at[:, 5:].set(1e4)
  np.testing.assert_allclose(np.asarray(fn(garbage))[0], np.asarray(fn(x))[0], **F32)
  np.testing.assert_array_equal(np.asarray(fn(x))[1], 0.0)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x) ** 2)))(x)
  assert np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_array_equal(np.asarray(grad)[0, 5:], 0.0)


def test_bad_input_is_a_clear_error():
  x = _x_hat(0)
  with pytest.raises(ValueError, match=r"dynamic_self_attention_pooling.*x_hat.*\[B, S, M, D\]"):
    dynamic_self_attention_pooling(x[..., 0])
  with pytest.raises(ValueError, match=r"mask.*\[B, S\]"):
    dynamic_self_attention_pooling(x, mask=jnp.ones((B, S + 1), bool))
  with pytest.raises(ValueError, match="iterations"):
    dynamic_self_attention_pooling(x, iterations=0)
  with pytest.raises(ValueError, match="nonlinearity"):
    dynamic_self_attention_pooling(x, nonlinearity="relu")
