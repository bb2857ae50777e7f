"""Landmark attention (arXiv:2305.16300): the last token of each block is its landmark; a query attends
to its own block directly and to an earlier block's tokens only through that block's landmark (the
grouped softmax), and at inference retrieves its top-k earlier blocks by landmark score.

Checked against a float64 numpy port of the authors' `landmark_grouped_softmax` and the masking in
their `CausalSelfAttention.forward` (github.com/epfml/landmark-attention, `models/landmark.py`), row
by row with GQA and padding, for the training form and the top-k retrieval (earlier blocks not
retrieved hidden before the grouped softmax, as their memory cache does); the catalog's claims: every
row's weights sum to 1, and with a single block the weights are the causal softmax; retrieving every
block is the training form; and the gradients against finite differences of the float64 port.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.sparse import landmark
from tests import inputs
from tests import numpy_math
from tests import tolerances

B, T, N, K, H, HV = 2, 14, 4, 2, 8, 6
BLOCK = 3
LENGTHS = np.array([T, 11])


def _grouped_softmax_row(x, visible, block):
  """One row of the authors' masking + landmark_grouped_softmax, in float64 numpy."""
  S = x.shape[0]
  is_mem = np.arange(S) % block == block - 1
  attn_mask = ~visible
  mem_ids = np.where(attn_mask, 0, np.cumsum(is_mem) - is_mem)
  last = mem_ids.max() == mem_ids
  mask = attn_mask | (is_mem & last)
  last &= ~mask
  is_mem = is_mem & ~mask
  x = np.where(mask, -np.inf, x)
  G = S + 2                                             # max_mem_cnt: more groups than blocks
  group = np.cumsum(is_mem)
  resp = np.where(last | mask | is_mem, G - 1, group)
  probs = np.zeros(S)
  for g in np.unique(resp):
    members = resp == g
    if np.isfinite(x[members]).any():
      probs[members] = numpy_math.softmax(x[members])
  group_prob = np.zeros(G)
  group_prob[group[is_mem] - 1] = probs[is_mem]
  group_prob[G - 1] = np.sum(probs * last)
  full_access = is_mem | last | mask
  return probs * np.where(full_access, last, group_prob[resp])


def _landmark_numpy(q, k, *, lengths, block, top_k=None, scale=None):
  """float64 weights [B, N, T, S] of the port above (causal, queries at 0..T-1)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  S = k.shape[1]
  scale = H ** -0.5 if scale is None else scale
  w = np.zeros((B, N, T, S))
  for b in range(B):
    for n in range(N):
      s = k[b, :, n // (N // K)] @ q[b, :, n].T * scale                    # [S, T]
      for t in range(T):
        visible = (np.arange(S) <= t) & (np.arange(S) < lengths[b])
        own = t // block
        if top_k is not None:
          earlier = [beta for beta in range(own) if visible[beta * block + block - 1]]
          ranked = sorted(earlier, key=lambda beta: -s[beta * block + block - 1, t])[:top_k]
          for beta in set(earlier) - set(ranked):
            visible[beta * block:(beta + 1) * block] = False
        w[b, n, t] = _grouped_softmax_row(s[:, t], visible, block)
  return w


def _values(w, v):
  return np.einsum("bnts,bsnh->btnh", w, np.repeat(np.asarray(v, np.float64), N // K, axis=2))


@pytest.mark.parametrize("top_k", [None, 2])
def test_matches_numpy_port_of_the_authors_grouped_softmax(top_k):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=1)
  lengths = jnp.asarray(LENGTHS)
  want = _landmark_numpy(q, k, lengths=LENGTHS, block=BLOCK, top_k=top_k)
  got_w = np.asarray(landmark.landmark_weights(q, k, kv_lengths=lengths, block_size=BLOCK,
                                               top_k=top_k))
  got = np.asarray(inputs.jit_with(landmark.landmark_attention, block_size=BLOCK, top_k=top_k)(
      q, k, v, kv_lengths=lengths))
  want_out = _values(want, v)
  # Queries at or past a row's length are padding (their own block is not among the keys): skipped.
  for b, length in enumerate(LENGTHS):
    np.testing.assert_allclose(got_w[b, :, :length], want[b, :, :length],
                               **tolerances.output(jnp.float32))
    np.testing.assert_allclose(got[b, :length], want_out[b, :length], **tolerances.output(jnp.float32))


def test_weights_sum_to_one_and_earlier_blocks_are_reached_through_landmarks():
  q, k, _ = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=2)
  w = np.asarray(landmark.landmark_weights(q, k, kv_lengths=jnp.asarray(LENGTHS), block_size=BLOCK))
  np.testing.assert_allclose(w.sum(-1), 1.0, **tolerances.output(jnp.float32))
  landmarks = np.arange(T) % BLOCK == BLOCK - 1
  assert np.all(w[..., landmarks] == 0)                   # a landmark carries no value
  # Within an earlier block the weights are that block's own softmax (ratios of e^s).
  qf, kf = np.asarray(q, np.float64), np.asarray(k, np.float64)
  t, beta = 10, 1
  block = np.arange(beta * BLOCK, beta * BLOCK + BLOCK - 1)
  s = kf[0, block, 0] @ qf[0, t, 0] * H ** -0.5
  np.testing.assert_allclose(w[0, 0, t, block] / w[0, 0, t, block].sum(), numpy_math.softmax(s),
                             **tolerances.output(jnp.float32))


def test_a_single_block_is_the_causal_softmax():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=3)
  got = inputs.jit_with(landmark.landmark_attention, block_size=T + 1)(q, k, v)
  keep = numpy_math.visible(B, T, T, causal=True)
  qf, kf = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), N // K, axis=2)
  w = numpy_math.softmax(np.einsum("btnh,bsnh->bnts", qf, kf) * H ** -0.5, where=keep)
  np.testing.assert_allclose(got, _values(w, v), **tolerances.output(jnp.float32))


def test_retrieving_every_block_is_the_training_form():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=4)
  full = inputs.jit_with(landmark.landmark_attention, block_size=BLOCK)(q, k, v)
  every = inputs.jit_with(landmark.landmark_attention, block_size=BLOCK, top_k=T)(q, k, v)
  one = inputs.jit_with(landmark.landmark_attention, block_size=BLOCK, top_k=1)(q, k, v)
  np.testing.assert_allclose(every, full, **tolerances.output(jnp.float32))
  assert tolerances.rel_rms(one, full) > tolerances.CHANGED_REL_RMS


def test_gradients_match_finite_differences_of_the_port():
  q, k, v = inputs.qkv(B=1, T=8, N=2, K=1, H=4, h=3, seed=5)
  rng = np.random.default_rng(0)
  c = rng.standard_normal((1, 8, 2, 3))

  def loss(q, k, v):
    return jnp.sum(landmark.landmark_attention(q, k, v, block_size=3) * jnp.asarray(c, jnp.float32))

  def loss64(q, k, v):
    w = np.zeros((1, 2, 8, 8))
    for n in range(2):
      s = k[0, :, 0] @ q[0, :, n].T * 4 ** -0.5
      for t in range(8):
        w[0, n, t] = _grouped_softmax_row(s[:, t], np.arange(8) <= t, 3)
    return np.sum(np.einsum("bnts,bsh->btnh", w, v[:, :, 0]) * c)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  numpy_math.check_directional_derivatives(grads, (q, k, v), loss64, "qkv", rng=rng,
                                           tol=tolerances.grad(jnp.float32))


def test_rejects_non_causal_and_packed_calls():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV)
  with pytest.raises(ValueError, match="landmark_attention.*causal"):
    landmark.landmark_attention(q, k, v, causal=False, block_size=BLOCK)
  with pytest.raises(ValueError, match="landmark_attention.*segment_ids"):
    landmark.landmark_attention(q, k, v, segment_ids=jnp.zeros((B, T), jnp.int32), block_size=BLOCK)
  with pytest.raises(ValueError, match="landmark_attention.*block_size"):
    landmark.landmark_attention(q, k, v, block_size=1)
