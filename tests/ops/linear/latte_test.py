"""Latte (attnjax/ops/linear/latte.py): the latent factorization, and constant-size decoding.

Each property is checked against an explicit evaluation of the formula written out here."""


import jax
import jax.numpy as jnp

import attnjax as aj
from attnjax.core import linear
from attnjax.ops import linear as lin
from tests import tolerances
from tests.inputs import qkv
from tests.ops.linear.helpers import IMPLS, assert_rel, causal_mask, heads


def _latte_params(N=4, K=2, H=8, L=5):
  ks = jax.random.split(jax.random.PRNGKey(3), 2)
  return (0.5 * jax.random.normal(ks[0], (N, H, L)), 0.5 * jax.random.normal(ks[1], (K, H, L)))


def test_latte_equals_explicit_latent_mixture():
  q, k, v = qkv(T=29)
  wq, wk = _latte_params()
  N, T = q.shape[2], q.shape[1]
  p_l = jax.nn.softmax(jnp.einsum("btnf,nfl->btnl", q, wq), axis=-1)            # p(l | t)
  logits = jnp.einsum("bskf,kfl->bksl", k, wk)                                   # [B,K,S,L]
  logits = jnp.repeat(logits, N // k.shape[2], axis=1)                           # [B,N,S,L]
  causal = causal_mask(T)
  # p(s | l, t) = exp(k_s·w_l) / Σ_{s'≤t} exp(k_s'·w_l)
  e = jnp.where(causal[None, None, :, :, None], jnp.exp(logits)[:, :, None], 0.0)  # [B,N,T,S,L]
  p_s = e / jnp.sum(e, axis=3, keepdims=True)
  expected = jnp.einsum("btnl,bntsl,bsnh->btnh", p_l, p_s, heads(v, N))
  for impl in IMPLS:
    assert_rel(lin.latte_attention(q, k, v, query_latents=wq, key_latents=wk, implementation=impl),
                expected)


def test_latte_decoding_state_is_constant_in_length():
  """A generated token reads `L·(h+1)` numbers per head however long the prefix: the step form."""
  q, k, v = qkv(B=1, T=40)
  wq, wk = _latte_params()
  full = lin.latte_attention(q, k, v, query_latents=wq, key_latents=wk)
  # Run the same mechanism token by token through the primitive's one-step decode.
  B, T, N, _ = q.shape
  K, L, h = k.shape[2], wq.shape[-1], v.shape[-1]
  state = linear.zero_state(B, N * L, 1, h, normalize=True)
  sizes, outs = set(), []
  for t in range(T):
    kf = jnp.exp(jnp.einsum("bkf,kfl->bkl", k[:, t], wk))
    kf = jnp.repeat(kf.reshape(B, K, 1, L), N // K, 2).reshape(B, N * L, 1)
    vl = jnp.repeat(jnp.broadcast_to(v[:, t, :, None, None], (B, K, 1, L, h)), N // K, 2)
    o, state = aj.gated_linear_attention_step(jnp.ones((B, N * L, 1)), kf, vl.reshape(B, N * L, h),
                                              state, normalize=True, scale=1.0)
    sizes.add(sum(x.size for x in jax.tree.leaves(state)))
    p_l = jax.nn.softmax(jnp.einsum("bnf,nfl->bnl", q[:, t], wq), axis=-1)
    outs.append(jnp.einsum("bnl,bnlh->bnh", p_l, o.reshape(B, N, L, h)))
  assert sizes == {B * N * L * (h + 1)}
  assert_rel(jnp.stack(outs, 1), full, tolerances.STEPWISE_DECODE_REL_RMS[jnp.float32])
