"""Relative position representations (#71, Shaw et al.): the logits see k_j + a^K_{clip(j-i)} and the
output sums v_j + a^V_{clip(j-i)}. Checked against a float64 rewrite of the paper's equations (both
implementations, causal or not, GQA, a query block over a cache), the output's gradients against a
dense rewrite, zero tables giving softmax attention exactly, one-hot value tables reading out the
weight mass of every relative bucket, and the clipping: distances beyond c share the edge embeddings,
so a larger table whose extra rows copy the edges gives the same output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.positional import relative_position_attention
from attnjax.ops.softmax import softmax_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, N, K, H, h = 2, 13, 4, 2, 8, 6


def _tables(c, seed, width=h):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((2 * c + 1, H)), jnp.float32),
          jnp.asarray(rng.standard_normal((2 * c + 1, width)), jnp.float32))


def _buckets(T_, S_, c, q_offset):
  i = q_offset + np.arange(T_)
  return np.clip(np.arange(S_)[None] - i[:, None], -c, c) + c                 # [T, S] rows of a^K, a^V


def _shaw_float64(q, k, v, rel_k, rel_v, *, causal, q_offset=0):
  """The paper's eqs. (3)-(5) with clipped relative embeddings, per head, in float64."""
  q, k, v, rk, rv = (np.asarray(x, np.float64) for x in (q, k, v, rel_k, rel_v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  T_, S_, H_ = q.shape[1], k.shape[1], q.shape[3]
  r = _buckets(T_, S_, (rk.shape[0] - 1) // 2, q_offset)
  e = (np.einsum("btnh,bsnh->bnts", q, k) + np.einsum("btnh,tsh->bnts", q, rk[r])) / np.sqrt(H_)
  visible = np.arange(S_)[None] <= (q_offset + np.arange(T_))[:, None] if causal else None
  w = numpy_math.softmax(e, where=visible)
  return np.einsum("bnts,bsnh->btnh", w, v) + np.einsum("bnts,tsh->btnh", w, rv[r])


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_papers_equations(implementation, causal):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=1)
  rel_k, rel_v = _tables(3, seed=2)
  fn = inputs.jit_with(relative_position_attention, causal=causal, implementation=implementation)
  out = fn(q, k, v, rel_k=rel_k, rel_v=rel_v)
  np.testing.assert_allclose(np.asarray(out), _shaw_float64(q, k, v, rel_k, rel_v, causal=causal),
                             **F32)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_query_block_over_a_cache_uses_absolute_positions(implementation):
  # Five queries at positions 6..10 over 11 cached keys: distances j - (6 + t), not j - t.
  q, k, v = inputs.qkv(B=B, T=5, S=11, N=N, K=K, H=H, h=h, seed=3)
  rel_k, rel_v = _tables(2, seed=4)
  fn = inputs.jit_with(relative_position_attention, causal=True, q_offset=6,
                       implementation=implementation)
  out = fn(q, k, v, rel_k=rel_k, rel_v=rel_v)
  want = _shaw_float64(q, k, v, rel_k, rel_v, causal=True, q_offset=6)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_clipping_distance_zero_is_one_embedding_for_every_distance():
  # c = 0: the key table adds q_i·a^K_0 to every logit of row i (no effect on the weights) and the
  # value table adds a^V_0 to every output; both edge passes feed the one bucket.
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=12)
  rel_k, rel_v = _tables(0, seed=13)
  out = inputs.jit_with(relative_position_attention)(q, k, v, rel_k=rel_k, rel_v=rel_v)
  np.testing.assert_allclose(np.asarray(out), _shaw_float64(q, k, v, rel_k, rel_v, causal=False),
                             **F32)


def _dense_float32(q, k, v, rel_k, rel_v, causal):
  """The same equations in float32 jnp (differentiable), independent of the library's paths."""
  G = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  r = _buckets(q.shape[1], k.shape[1], (rel_k.shape[0] - 1) // 2, 0)
  e = (jnp.einsum("btnh,bsnh->bnts", q, k) + jnp.einsum("btnh,tsh->bnts", q, rel_k[r])) * H ** -0.5
  if causal:
    e = jnp.where(jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool)), e, -jnp.inf)
  w = jax.nn.softmax(e, axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", w, v) + jnp.einsum("bnts,tsh->btnh", w, rel_v[r])


@pytest.mark.parametrize("causal", [False, True])
def test_streamed_gradients_match_a_dense_rewrite(causal):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=5)
  rel_k, rel_v = _tables(3, seed=6)
  loss = lambda out: jnp.sum(out * jnp.sin(out))
  got = jax.jit(jax.grad(lambda *a: loss(relative_position_attention(
      *a[:3], rel_k=a[3], rel_v=a[4], causal=causal, implementation="xla")), argnums=range(5)))(
          q, k, v, rel_k, rel_v)
  want = jax.grad(lambda *a: loss(_dense_float32(*a, causal)), argnums=range(5))(
      q, k, v, rel_k, rel_v)
  for name, g, w in zip(("dq", "dk", "dv", "drel_k", "drel_v"), got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=name,
                               **tolerances.grad(jnp.float32))


@pytest.mark.parametrize("causal", [False, True])
def test_zero_tables_give_softmax_attention(causal):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=7)
  zeros_k, zeros_v = jnp.zeros((9, H)), jnp.zeros((9, h))
  out = inputs.jit_with(relative_position_attention, causal=causal)(q, k, v, rel_k=zeros_k,
                                                                     rel_v=zeros_v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(softmax_attention(q, k, v, causal=causal)),
                             **F32)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_one_hot_value_table_reads_the_weight_mass_of_each_bucket(implementation):
  # v = 0 and a^V_r = e_r: output channel r is Σ_{j: clip(j - i) = r - c} α_ij, the edge channels
  # summing every key at distance ≥ c on their side.
  c = 3
  q, k, _ = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=8)
  v = jnp.zeros((B, T, K, 2 * c + 1))
  rel_k, _ = _tables(c, seed=9)
  out = inputs.jit_with(relative_position_attention, implementation=implementation)(
      q, k, v, rel_k=rel_k, rel_v=jnp.eye(2 * c + 1))
  qd, kd = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), N // K, axis=2)
  r = _buckets(T, T, c, 0)
  e = (np.einsum("btnh,bsnh->bnts", qd, kd)
       + np.einsum("btnh,tsh->bnts", qd, np.asarray(rel_k, np.float64)[r])) / np.sqrt(H)
  w = numpy_math.softmax(e)
  mass = np.stack([np.where(r == bucket, w, 0.0).sum(-1) for bucket in range(2 * c + 1)], -1)
  np.testing.assert_allclose(np.asarray(out), mass.transpose(0, 2, 1, 3), **F32)
  assert mass[..., 0].max() > 0.01 and mass[..., -1].max() > 0.01     # the edges are populated


def test_distances_beyond_c_share_the_edge_embeddings():
  # A table for c = 6 whose rows beyond ±2 repeat the c = 2 table's edge rows equals the c = 2 table.
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=10)
  rel_k, rel_v = _tables(2, seed=11)
  rows = np.clip(np.arange(-6, 7), -2, 2) + 2
  fn = inputs.jit_with(relative_position_attention)
  out = fn(q, k, v, rel_k=rel_k, rel_v=rel_v)
  wide = fn(q, k, v, rel_k=rel_k[rows], rel_v=rel_v[rows])
  np.testing.assert_allclose(np.asarray(wide), np.asarray(out), **F32)
  # A different row at distance 4 (inside the wide table, beyond c = 2) changes the output.
  moved = fn(q, k, v, rel_k=rel_k[rows].at[6 + 4].add(1.0), rel_v=rel_v[rows])
  assert tolerances.rel_rms(moved, out) > tolerances.CHANGED_REL_RMS


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h)
  rel_k, rel_v = _tables(2, seed=0)
  with pytest.raises(ValueError, match=r"relative_position_attention.*rel_k.*\[2c\+1, H\]"):
    relative_position_attention(q, k, v, rel_k=rel_k[:4], rel_v=rel_v)
  with pytest.raises(ValueError, match=r"relative_position_attention.*rel_v.*\[2c\+1, h\]"):
    relative_position_attention(q, k, v, rel_k=rel_k, rel_v=rel_v[:, :3])
  with pytest.raises(ValueError, match="self-attention"):
    relative_position_attention(q, k[:, :7], v[:, :7], rel_k=rel_k, rel_v=rel_v)
