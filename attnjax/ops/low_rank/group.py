"""RITA group attention: softmax over k-means key centroids (arXiv:2306.01926)."""

from __future__ import annotations


import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core.contract import lengths_or_full
from attnjax.core.contract import reject_causal_or_packing
from attnjax.ops.softmax import dot_product_attention
from attnjax.typing import Key, Output, Query, Value
from attnjax.registry import Mechanism, register

_F32 = jnp.float32
_LINEAR = dict(family="linear", decode=False, packed=False)

__all__ = ["group_attention", "kmeans_groups"]


# --------------------------------------------------------------------------------------------------
# RITA group attention


def kmeans_groups(k, valid, num_groups: int, num_iters: int):
  """Lloyd's k-means of the keys of each (batch, kv head), deterministic; no gradient.

  Init: centroid g is the valid key at position `floor((2g + 1) L / 2G)` (evenly spaced, so
  G = L starts from every key). Empty clusters keep their previous centroid.

  Args:
    k: `[B, S, K, H]` float32; valid: `[B, S]` bool (padding is assigned to no group).

  Returns:
    one-hot assignments `[B, S, K, G]` float32 (all zero on padded keys).
  """
  k = jax.lax.stop_gradient(k)
  B, S = valid.shape
  G = num_groups
  L = jnp.sum(valid, axis=1)
  idx = jnp.clip(((2 * jnp.arange(G) + 1)[None] * L[:, None]) // (2 * G), 0, S - 1)
  centroids = jnp.take_along_axis(k, idx[:, :, None, None], axis=1)                # [B, G, K, H]

  def assign(c):
    # argmin |k - c|² = argmax 2 k·c - |c|²
    score = 2 * jnp.einsum("bskh,bgkh->bskg", k, c) - jnp.sum(c * c, -1).transpose(0, 2, 1)[:, None]
    return jax.nn.one_hot(jnp.argmax(score, -1), G, dtype=_F32) * valid[:, :, None, None]

  def step(_, c):
    onehot = assign(c)
    count = jnp.sum(onehot, axis=1).transpose(0, 2, 1)[..., None]                  # [B, G, K, 1]
    total = jnp.einsum("bskg,bskh->bgkh", onehot, k)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), c)

  return assign(jax.lax.fori_loop(0, num_iters, step, centroids))


def group_attention(q: Query, k: Key, v: Value, *, num_groups: int = 64, num_iters: int = 10,
                    causal=False, segment_ids=None, q_offset=0, kv_lengths=None, scale=None,
                    implementation=None) -> Output:
  """RITA group attention: keys clustered into G groups; queries attend to size-weighted centroids.

      c_g = mean_{j∈g} k_j,   V̄_g = mean_{j∈g} v_j,   n_g = |g|
      o_i = Σ_g n_g exp(s · q_i·c_g) V̄_g / Σ_g n_g exp(s · q_i·c_g)
          = softmax_g(s · q_i·c_g + log n_g) V̄_g

  i.e. softmax attention in which every key of a group is replaced by the group's centroid:
  `o_i = Σ_j Ã_ij v_j` with `Ã_ij = exp(s q_i·c_g(j)) / Σ_l exp(s q_i·c_g(l))`. The paper's
  guarantee: if every key lies within distance d of its group's centroid, each weight Ã_ij is
  within a factor `exp(±2 s ‖q_i‖ d)` of softmax attention's A_ij, so
  `‖o_i - softmax_i‖ <= (exp(2 s ‖q_i‖ d) - 1) max_j ‖v_j‖`. With G = S (each key its own group)
  this is exactly softmax attention. Groups come from `num_iters` Lloyd iterations per example and
  kv head with a deterministic init (`kmeans_groups`); assignments carry no gradient, centroids
  and group values do. Cost O((num_iters + T)·S·G) → linear in S for fixed G. RITA's scheduler
  adapts G to meet the bound during training; here G is fixed. Groups mix positions, so there is
  no causal or packed form; keys past `kv_lengths` join no group.

  Paper: Liang et al., "RITA: Group Attention is All You Need for Timeseries Analytics",
  arXiv:2306.01926.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`, K dividing N.
    num_groups: G (>= 1). num_iters: k-means iterations (>= 0).
    scale: defaults to `H ** -0.5`. implementation: for `dot_product_attention`.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "group_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  reject_causal_or_packing(op, causal=causal, segment_ids=segment_ids,
                           why="groups mix key positions")
  if num_groups < 1 or num_iters < 0:
    raise ValueError(f"{op}: need num_groups >= 1 and num_iters >= 0, got {num_groups}, "
                     f"{num_iters}")
  kf, vf = k.astype(_F32), v.astype(_F32)
  valid = jnp.arange(S)[None] < lengths_or_full(op, kv_lengths, B, S)[:, None]
  onehot = kmeans_groups(kf, valid, num_groups, num_iters)
  count = jnp.sum(onehot, axis=1)                                                   # [B, K, G]
  denom = jnp.maximum(count, 1.0).transpose(0, 2, 1)[..., None]
  centroids = jnp.einsum("bskg,bskh->bgkh", onehot, kf) / denom
  group_v = jnp.einsum("bskg,bskh->bgkh", onehot, vf) / denom
  count = jnp.repeat(count, N // K, axis=1)[:, :, None, :]                          # [B, N, 1, G]
  out = dot_product_attention(q.astype(_F32), centroids, group_v,
                              bias=jnp.log(jnp.maximum(count, 1.0)), mask=count > 0, scale=scale,
                              implementation=implementation)
  return out.astype(q.dtype)



register(Mechanism(
    name="group_attention", fn=group_attention, seeds=(101,), **_LINEAR,
    paper="RITA: Group Attention is All You Need for Timeseries Analytics", arxiv="2306.01926",
    patterns=frozenset({"self", "cross"}), complexity="O((T + S)·G)",
    example=dict(num_groups=6, num_iters=4)))
