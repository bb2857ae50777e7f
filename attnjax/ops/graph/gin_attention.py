"""GIN-Attention: the attention matrix read as a weighted adjacency, and a Graph Isomorphism Network
update in place of the weighted sum of values.

Buehler, "Graph-Aware Isomorphic Attention for Adaptive Dynamics in Transformers", arXiv:2501.02393.
Per head n, with A = softmax(q kᵀ · scale) under the usual masks (the adjacency of the token graph):

    h_i = (1 + ε_n) v_i + Σ_j A_ij v_j                    GIN aggregation (Xu et al., arXiv:1810.00826)
    o_i = W2_n SiLU(RMSNorm_n(W1_n h_i + b1_n)) + b2_n    the per-head GIN MLP, h -> m -> h

so plain attention is the aggregation alone; the self term (1 + ε) v_i and the MLP are what GIN adds
(a sum aggregator followed by an injective update, the GIN paper's condition for distinguishing
neighbourhoods that a weighted mean confuses). The MLP is the authors' `GINLayer`
(lamm-mit/Graph-Aware-Transformers, `Attention_GNN.py`: Linear, RMSNorm, SiLU, Linear, one per head;
its dropout is left to the layer). The authors' code writes the self term as ε·v_i with ε
initialized at 0; we keep the paper's (1 + ε) v_i, ε initialized at 0 (GIN's default), which is the
same family of functions. Their optional thresholding of A (Sparse-GIN) is not included.

v_i is the value of the query's own token: self-attention only (T = S, or the new tokens of a decode
step at positions `q_offset + t` of the cache). Σ_j A_ij v_j is softmax attention, computed by flex
attention (every flex implementation, mask, GQA and packing applies).

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `eps [N]`, `w1 [N,h,m]`, `b1 [N,m]`,
`norm [N,m]`, `w2 [N,m,h]`, `b2 [N,h]` → `[B,T,N,h]`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core.contract import flex_with_contract
from attnjax.registry import Mechanism, ParamSpec, example_arrays, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["gin_attention"]

HeadScalars = Float[Array, "N"]
HeadIn = Float[Array, "N h m"]
HeadHidden = Float[Array, "N m"]
HeadOut = Float[Array, "N m h"]
HeadBias = Float[Array, "N h"]
_RMS_EPS = 1e-6


def gin_attention(q: Query, k: Key, v: Value, *, eps: HeadScalars, w1: HeadIn, b1: HeadHidden,
                  norm: HeadHidden, w2: HeadOut, b2: HeadBias, causal: bool = False,
                  segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                  scale: Optional[float] = None, implementation: Optional[str] = None) -> Output:
  """GIN-Attention (module docstring): `MLP_n((1 + ε_n) v_i + Σ_j A_ij v_j)` per head."""
  op = "gin_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  if isinstance(segment_ids, (tuple, list)):
    raise ValueError(f"{op}: self-attention only (the update adds the query token's own value): "
                     "pass `segment_ids` as one [B, T] array")
  if T > S:
    raise ValueError(f"{op}: self-attention only: the queries must be tokens of the key/value "
                     f"sequence, got T={T} > S={S}")
  checks.check_shape(op, "eps", eps, (N,), "[N]")
  if jnp.ndim(w1) != 3 or w1.shape[:2] != (N, h):
    raise ValueError(f"{op}: `w1` must be [N, h, m] = [{N}, {h}, m], got shape {jnp.shape(w1)}")
  m = w1.shape[2]
  checks.check_shape(op, "b1", b1, (N, m), "[N, m]")
  checks.check_shape(op, "norm", norm, (N, m), "[N, m]")
  checks.check_shape(op, "w2", w2, (N, m, h), "[N, m, h]")
  checks.check_shape(op, "b2", b2, (N, h), "[N, h]")
  agg = flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                           kv_lengths=kv_lengths, scale=scale,
                           implementation=implementation).astype(jnp.float32)
  # The query's own value: position q_offset + t of v, its KV head repeated over the group.
  # A scalar offset or one per row ([B], each row decoding its own position).
  offset = jnp.asarray(q_offset, jnp.int32).reshape(-1, 1)
  pos = jnp.clip(jnp.broadcast_to(offset + jnp.arange(T, dtype=jnp.int32), (B, T)), 0, S - 1)
  own = jnp.take_along_axis(v.astype(jnp.float32), pos[:, :, None, None], axis=1)  # [B, T, K, h]
  own = jnp.repeat(own, N // K, axis=2)                                        # [B, T, N, h]
  x = (1.0 + eps.astype(jnp.float32))[:, None] * own + agg
  y = jnp.einsum("btnh,nhm->btnm", x, w1.astype(jnp.float32)) + b1.astype(jnp.float32)
  y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + _RMS_EPS) * norm.astype(
      jnp.float32)
  out = jnp.einsum("btnm,nmh->btnh", jax.nn.silu(y), w2.astype(jnp.float32)) + b2.astype(jnp.float32)
  return out.astype(q.dtype)


def _example(*, N=4, K=2, H=8, h=6):
  del K, H
  m = 2 * h
  return {**example_arrays(21, {"eps": ((N,), 0.0, 0.3), "w1": ((N, h, m), 0.0, h ** -0.5),
                                "b1": ((N, m), 0.0, 0.1), "norm": ((N, m), 1.0, 0.1),
                                "w2": ((N, m, h), 0.0, m ** -0.5), "b2": ((N, h), 0.0, 0.1)})}


_HIDDEN = 2   # the authors' attention_GIN_MLP_multiplier default: m = 2 h

register(Mechanism(
    name="gin_attention", fn=gin_attention, family="graph", seeds=(192,),
    paper="Graph-Aware Isomorphic Attention for Adaptive Dynamics in Transformers",
    arxiv="2501.02393", patterns=frozenset({"self", "causal_self"}),
    # The layer's value head dim is H: the MLP is H -> 2H -> H per head.
    params=(ParamSpec("eps", lambda N, K, H: (N,), jax.nn.initializers.zeros),
            ParamSpec("w1", lambda N, K, H: (N, H, _HIDDEN * H),
                      jax.nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=0)),
            ParamSpec("b1", lambda N, K, H: (N, _HIDDEN * H), jax.nn.initializers.zeros),
            ParamSpec("norm", lambda N, K, H: (N, _HIDDEN * H), jax.nn.initializers.ones),
            ParamSpec("w2", lambda N, K, H: (N, _HIDDEN * H, H),
                      jax.nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=0)),
            ParamSpec("b2", lambda N, K, H: (N, H), jax.nn.initializers.zeros)),
    example=_example))
