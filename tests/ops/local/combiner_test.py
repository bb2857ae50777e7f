"""Combiner-Fixed (#170): one softmax over the own block's keys and one summary per other block.

The defining property is the authors' `sqrt_fixed_full`: joint logits [q_i·k_j for j in i's block,
q_i·k̄_r for the other (causal: earlier) blocks r], one softmax, and a block's value the attention of
its max-pooled query over its own keys. Checked against a float64 numpy rewrite written from those
joint logits (not from the merged passes the operator uses), with padding, GQA and a length the block
does not divide, for both implementations; gradients against the same rewrite in jnp; then the
catalog's claim: every key is reachable from every query (causal: every earlier key) although each
query scores only c + T/c entries; and one block covering the sequence is full attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.local import combiner_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances


def _combiner_dense(xp, q, k, v, *, c, causal, kv_lengths=None):
  """Combiner-Fixed with max pooling in array module `xp` (numpy float64 or jax.numpy)."""
  B, T, N, H = q.shape
  G = N // k.shape[2]
  k, v = xp.repeat(k, G, axis=2), xp.repeat(v, G, axis=2)
  scale = H ** -0.5
  lengths = np.full(B, T) if kv_lengths is None else np.asarray(kv_lengths)
  real = np.arange(T)[None] < lengths[:, None]                                  # [B, T]
  block = np.arange(T) // c
  R = block[-1] + 1
  in_block = block[None, :] == np.arange(R)[:, None]                            # [R, T]
  members = in_block[None] & real[:, None, :]                                   # [B, R, T]
  m = members[:, :, :, None, None]
  q_bar = xp.max(xp.where(m, q[:, None], -np.inf), axis=2)                     # [B, R, N, H]
  k_bar = xp.max(xp.where(m, k[:, None], -np.inf), axis=2)
  has_key = members.any(-1)                                                     # [B, R]
  q_bar = xp.where(has_key[..., None, None], q_bar, 0.0)
  k_bar = xp.where(has_key[..., None, None], k_bar, 0.0)
  # ṽ_r: softmax over block r's real keys of q̄_r·k_j.
  s_bar = xp.einsum("brnh,bsnh->bnrs", q_bar, k) * scale
  w_bar = xp.where(members[:, None], xp.exp(s_bar - xp.max(xp.where(members[:, None], s_bar, -np.inf),
                                                             axis=-1, keepdims=True)), 0.0)
  w_bar = w_bar / xp.maximum(w_bar.sum(-1, keepdims=True), 1e-30)
  v_tilde = xp.einsum("bnrs,bsnh->brnh", w_bar, v)
  # Joint logits: direct keys of the own block, then one per other (earlier) block.
  direct_ok = (block[:, None] == block[None, :])[None] & real[:, None, :]      # [B, T, T]
  if causal:
    direct_ok = direct_ok & np.tril(np.ones((T, T), bool))[None]
  other = (np.arange(R)[None] < block[:, None]) if causal else (np.arange(R)[None] != block[:, None])
  summary_ok = other[None] & has_key[:, None, :]                                # [B, T, R]
  logits = xp.concatenate([xp.einsum("btnh,bsnh->bnts", q, k) * scale,
                           xp.einsum("btnh,brnh->bntr", q, k_bar) * scale], axis=-1)
  ok = np.concatenate([direct_ok, summary_ok], axis=-1)[:, None]
  top = xp.max(xp.where(ok, logits, -np.inf), axis=-1, keepdims=True)
  e = xp.where(ok, xp.exp(logits - top), 0.0)
  w = e / e.sum(-1, keepdims=True)
  return (xp.einsum("bnts,bsnh->btnh", w[..., :T], v)
          + xp.einsum("bntr,brnh->btnh", w[..., T:], v_tilde))


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_joint_softmax_of_the_authors_code(implementation, causal):
  q, k, v = inputs.qkv(B=2, T=18, N=4, K=2, H=8, h=6, seed=1)
  kv_lengths = jnp.array([18, 13])
  fn = inputs.jit_with(combiner_attention, block_size=4, causal=causal,
                       implementation=implementation)
  want = _combiner_dense(np, *(np.asarray(x, np.float64) for x in (q, k, v)), c=4, causal=causal,
                         kv_lengths=kv_lengths)
  np.testing.assert_allclose(np.asarray(fn(q, k, v, kv_lengths=kv_lengths)), want,
                             **tolerances.output(jnp.float32))


def test_gradients_match_the_joint_softmax():
  causal = True  # the summary mask of the causal form; the non-causal one is in the output test
  q, k, v = inputs.qkv(B=1, T=11, N=2, K=1, H=4, h=3, seed=3)
  dout = jax.random.normal(jax.random.PRNGKey(4), (1, 11, 2, 3))
  op = lambda *a: combiner_attention(*a, block_size=3, causal=causal, implementation="xla")
  dense = lambda *a: _combiner_dense(jnp, *a, c=3, causal=causal)
  inputs.assert_same_gradients(op, dense, (q, k, v), dout, ("dq", "dk", "dv"),
                               tol=tolerances.grad(jnp.float32))


@pytest.mark.parametrize("causal", [False, True])
def test_every_key_is_reachable_from_every_query(causal):
  # 16 tokens in blocks of 4: each query scores 4 direct keys + 3 summaries (7 < 16), yet the output
  # of every query depends on the value of every (earlier) key.
  T = 16
  q, k, v = inputs.qkv(B=1, T=T, N=1, K=1, H=8, h=4, seed=5)
  jac = jax.jit(jax.jacrev(lambda v: combiner_attention(q, k, v, block_size=4, causal=causal)))(v)
  reach = np.abs(np.asarray(jac)).reshape(T, 4, T, 4).sum(axis=(1, 3))         # [query, key]
  expected = np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool)
  assert np.all(reach[expected] > tolerances.REACHED_ABS)
  assert np.all(reach[~expected] == 0.0)


def test_one_block_covering_the_sequence_is_full_attention():
  q, k, v = inputs.qkv(B=2, T=13, N=4, K=2, H=8, h=6, seed=6)
  out = inputs.jit_with(combiner_attention, block_size=16, causal=True)(q, k, v)
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  k64, v64 = np.repeat(k64, 2, axis=2), np.repeat(v64, 2, axis=2)
  w = numpy_math.softmax(np.einsum("btnh,bsnh->bnts", q64, k64) * 8 ** -0.5,
                         where=np.tril(np.ones((13, 13), bool)))
  np.testing.assert_allclose(np.asarray(out), np.einsum("bnts,bsnh->btnh", w, v64),
                             **tolerances.output(jnp.float32))


def test_bad_settings_name_the_operator_and_argument():
  q, k, v = inputs.qkv(B=1, T=8, N=2, K=2, H=4, h=4)
  with pytest.raises(ValueError, match="combiner_attention: `block_size`"):
    combiner_attention(q, k, v, block_size=0)
  with pytest.raises(ValueError, match="combiner_attention: `pooling`"):
    combiner_attention(q, k, v, pooling="min")
  with pytest.raises(ValueError, match="combiner_attention: self-attention"):
    combiner_attention(q, k[:, :6], v[:, :6])
