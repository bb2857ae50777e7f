"""Region-modulated attention (#116, VideoGrain's ST-Layout Attn): logits of same-region pairs pulled
toward the row's maximum and of cross-region pairs toward its minimum by ξ(t)·(1 - region share).

Checked against a float64 numpy rewrite of the authors' controller (every size weighting, the
time-step factor, causal rows and padded keys), its gradients against a dense float32 form, and the
paper's defining property: zero strength is softmax attention, and the modulation moves weight from
cross-region to same-region keys (every same-region weight rises relative to every cross-region one).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import region_modulated_attention, softmax_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, S, N, K, H, h = 2, 11, 13, 4, 2, 8, 6


def _regions(seed, shape, num=3):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, num)


def _videograin_float64(q, k, v, qr, kr, *, strength, timestep=None, size="keys", causal=False,
                        kv_lengths=None, scale):
  """The authors' `ST_Layout_Attn_Control.forward` on each head's logits, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  qr, kr = np.asarray(qr), np.asarray(kr)
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  sim = np.einsum("btnh,bsnh->bnts", q, k) * scale
  Tq, Sk = sim.shape[-2:]
  visible = np.ones(sim.shape, bool)
  if causal:
    visible &= np.tril(np.ones((Tq, Sk), bool))
  if kv_lengths is not None:
    visible &= (np.arange(Sk)[None, :] < np.asarray(kv_lengths)[:, None])[:, None, None, :]
  treg = 1.0 if timestep is None else ((timestep - 1) / 1000) ** 5
  mask = qr[:, None, :, None] == kr[:, None, None, :]                    # positive pairs
  if size == "keys":
    share = (mask & visible).sum(-1, keepdims=True) / visible.sum(-1, keepdims=True)
  elif size == "queries":
    share = (qr[:, :, None] == qr[:, None, :]).mean(-1)[:, None, :, None]
  else:
    share = 0.0
  size_reg = 1.0 - share
  max_value = np.where(visible, sim, -np.inf).max(-1, keepdims=True)
  min_value = np.where(visible, sim, np.inf).min(-1, keepdims=True)
  sim = sim + mask * size_reg * strength * treg * (max_value - sim)
  sim = sim - ~mask * size_reg * strength * treg * (sim - min_value)
  z = np.where(visible, sim, -np.inf)
  w = np.exp(z - z.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", w, v)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_equals_the_authors_controller_with_key_shares(implementation):
  q, k, v = inputs.qkv(B=B, T=T, S=T, N=N, K=K, H=H, h=h, seed=1)
  qr, kr = _regions(2, (B, T)), _regions(3, (B, T))
  lengths = jnp.array([T, 8])
  fn = inputs.jit_with(region_modulated_attention, causal=True, implementation=implementation,
                       strength=0.9)
  out = fn(q, k, v, q_regions=qr, kv_regions=kr, kv_lengths=lengths)
  want = _videograin_float64(q, k, v, qr, kr, strength=0.9, causal=True, kv_lengths=lengths,
                             scale=H ** -0.5)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


@pytest.mark.parametrize("size", ["queries", None])
def test_cross_attention_with_query_shares_and_a_time_step(size):
  # Cross-attention: pixels (queries) against text tokens (keys), ξ(t) = 1.0·((981 - 1)/1000)^5.
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=4)
  qr, kr = _regions(5, (B, T)), _regions(6, (B, S))
  fn = inputs.jit_with(region_modulated_attention, strength=1.0, size_weighting=size, scale=0.6)
  out = fn(q, k, v, q_regions=qr, kv_regions=kr, timestep=981)
  want = _videograin_float64(q, k, v, qr, kr, strength=1.0, timestep=981, size=size, scale=0.6)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_zero_strength_is_softmax_attention():
  q, k, v = inputs.qkv(B=B, T=T, S=T, N=N, K=K, H=H, h=h, seed=7)
  qr, kr = _regions(8, (B, T)), _regions(9, (B, T))
  out = inputs.jit_with(region_modulated_attention, strength=0.0, causal=True)(
      q, k, v, q_regions=qr, kv_regions=kr)
  want = inputs.jit_with(softmax_attention, causal=True)(q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **F32)


def test_weight_moves_from_cross_region_to_same_region_keys():
  # One-hot values make each output row the row's weights; compare with softmax's.
  q, k, _ = inputs.qkv(B=1, T=T, S=S, N=2, K=2, H=H, h=h, seed=10)
  v = jnp.broadcast_to(jnp.eye(S)[None, :, None, :], (1, S, 2, S))
  qr, kr = _regions(11, (1, T)), _regions(12, (1, S))
  w = np.asarray(inputs.jit_with(region_modulated_attention, strength=0.5)(
      q, k, v, q_regions=qr, kv_regions=kr), np.float64)
  w0 = np.asarray(inputs.jit_with(softmax_attention)(q, k, v), np.float64)
  positive = np.asarray(qr)[0, :, None, None] == np.asarray(kr)[0, None, None, :]   # [T, 1, S]
  positive = np.broadcast_to(positive, w.shape[1:])
  log_ratio = np.log(w[0]) - np.log(w0[0])
  rows = 0
  for t in range(T):
    for n in range(2):
      pos, neg = positive[t, n], ~positive[t, n]
      if pos.any() and neg.any():
        rows += 1
        # Every same-region key gains relative to every cross-region key (ties only for the row's
        # max key when it is same-region and its min key when cross-region: both keep their logit).
        assert log_ratio[t, n][pos].min() >= log_ratio[t, n][neg].max() - tolerances.LOG_WEIGHT_ABS
        # ... so the same-region keys hold more of the row's weight than under softmax.
        assert w[0, t, n][pos].sum() > w0[0, t, n][pos].sum()
  assert rows > T  # the draw has rows with both kinds of pair


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_gradients_match_a_dense_form(implementation):
  q, k, v = inputs.qkv(B=1, T=7, S=7, N=2, K=1, H=4, h=3, seed=13)
  dout = inputs.qkv(B=1, T=7, S=7, N=2, K=1, H=3, h=3, seed=14)[0]
  qr, kr = _regions(15, (1, 7), num=2), _regions(16, (1, 7), num=2)

  def dense(q, k, v):
    kr_, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, kr_) / 2.0
    visible = jnp.tril(jnp.ones((7, 7), bool))
    hi = jnp.max(jnp.where(visible, s, -jnp.inf), -1, keepdims=True)
    lo = jnp.min(jnp.where(visible, s, jnp.inf), -1, keepdims=True)
    pos = qr[:, None, :, None] == kr[:, None, None, :]
    share = jnp.sum(pos & visible, -1, keepdims=True) / jnp.sum(visible, -1, keepdims=True)
    lam = 0.7 * (1.0 - share)
    s = jnp.where(pos, s + lam * (hi - s), s - lam * (s - lo))
    w = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", w, vr)

  op = lambda *a: region_modulated_attention(*a, q_regions=qr, kv_regions=kr, strength=0.7,
                                             causal=True, implementation=implementation)
  inputs.assert_same_gradients(op, dense, (q, k, v), dout, ("dq", "dk", "dv"),
                               tol=tolerances.grad(jnp.float32))


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h)
  qr, kr = _regions(0, (B, T)), _regions(0, (B, S))
  with pytest.raises(ValueError, match=r"region_modulated_attention.*kv_regions.*\[B, S\]"):
    region_modulated_attention(q, k, v, q_regions=qr, kv_regions=qr)
  with pytest.raises(ValueError, match="integer region ids"):
    region_modulated_attention(q, k, v, q_regions=qr.astype(jnp.float32), kv_regions=kr)
  with pytest.raises(ValueError, match="size_weighting"):
    region_modulated_attention(q, k, v, q_regions=qr, kv_regions=kr, size_weighting="area")
