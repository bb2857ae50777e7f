"""Entity-aware self-attention (LUKE): one query projection per (query type, key type) pair.

Words and entities are tokens of one sequence; the query of token i for key j depends on both types:

    e_ij = scale · (x_i Q_{τ(i)→τ(j)}) · k_j        Q_{w→w} = Q (the layer's query), Q_{w→e},
    o_i  = Σ_j softmax_j(e_ij) v_j                  Q_{e→w}, Q_{e→e}: three more projections

with keys and values shared by all pairs (τ: 0 word, 1 entity). The layer's q is x Q_{w→w}; the three
other queries are the per-token input `pair_queries [B, T, 3, N, H]` in the order (w→e, e→w, e→e),
which the Flax layer projects from its input ('pair_queries_proj', weights and biases, as LUKE's
`w2e_query`, `e2w_query`, `e2e_query` linear layers of studio-ousia/luke `luke/model.py`). A
per-pair linear map M on q would give x (W_q M) = x Q only for Q whose columns lie in the span of
W_q's, a restriction LUKE does not have; the projection from x is its computation exactly.
Token types are given per call: `query_types [B, T]` and `key_types [B, S]` (in LUKE's
self-attention the same array twice; two arrays also serve cross-attention and keep the key types in
the KV cache when decoding).

Streamable on flex attention: with the queries toward each key type side by side and each key in
the half of its type, q̃_i = [q_i^{→w} | q_i^{→e}], k̃_j = [k_j·1(τ_j = w) | k_j·1(τ_j = e)],
q̃_i·k̃_j = q_i^{→τ(j)}·k_j exactly (the other half multiplies zeros), so one flex call at head dim 2H
(logit scale still H^-1/2) is LUKE's attention and every flex path serves it. In a layer with RoPE
the layer rotates q and k but not `pair_queries`; LUKE itself uses absolute position embeddings.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `pair_queries [B,T,3,N,H]`, `query_types
[B,T]`, `key_types [B,S]` (0 word, 1 entity) → `[B,T,N,h]`.
Paper: Yamada, Asai, Shindo, Takeda and Matsumoto, "LUKE: Deep Contextualized Entity Representations
with Entity-aware Self-attention", arXiv:2010.01057.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core.contract import flex_with_contract
from attnjax.registry import Mechanism, TokenInput, register
from attnjax.typing import Array, Float, Key, Lengths, Output, PerKeyToken, PerQueryToken, Query, Value

__all__ = ["entity_aware_attention", "WORD", "ENTITY"]

WORD, ENTITY = 0, 1
PairQueries = Float[Array, "B T 3 N H"]


def entity_aware_attention(q: Query, k: Key, v: Value, *, pair_queries: PairQueries,
                           query_types: PerQueryToken, key_types: PerKeyToken,
                           causal: bool = False, segment_ids=None, q_offset=0,
                           kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                           implementation: Optional[str] = None) -> Output:
  """LUKE's entity-aware attention: the query of each (query type, key type) pair (see module)."""
  op = "entity_aware_attention"
  B, T, S, N, _, H, _ = checks.check_qkv(op, q, k, v)
  checks.check_shape(op, "pair_queries", pair_queries, (B, T, 3, N, H), "[B, T, 3, N, H]")
  checks.check_shape(op, "query_types", query_types, (B, T), "[B, T]")
  checks.check_shape(op, "key_types", key_types, (B, S), "[B, S]")
  pair_queries = pair_queries.astype(q.dtype)
  q_entity = (jnp.asarray(query_types) == ENTITY)[:, :, None, None]
  to_word = jnp.where(q_entity, pair_queries[:, :, 1], q)                  # w→w = q, e→w
  to_entity = jnp.where(q_entity, pair_queries[:, :, 2], pair_queries[:, :, 0])   # e→e, w→e
  k_entity = (jnp.asarray(key_types) == ENTITY)[:, :, None, None]
  zeros = jnp.zeros_like(k)
  q_pairs = jnp.concatenate([to_word, to_entity], axis=-1)
  k_pairs = jnp.concatenate([jnp.where(k_entity, zeros, k), jnp.where(k_entity, k, zeros)], axis=-1)
  return flex_with_contract(op, q_pairs, k_pairs, v, causal=causal, segment_ids=segment_ids,
                            q_offset=q_offset, kv_lengths=kv_lengths,
                            scale=H ** -0.5 if scale is None else scale,
                            implementation=implementation)


register(Mechanism(
    name="entity_aware_attention", fn=entity_aware_attention, family="softmax-variant", seeds=(187,),
    paper="LUKE: Deep Contextualized Entity Representations with Entity-aware Self-attention",
    arxiv="2010.01057",
    token_inputs=(
        # LUKE's three extra query projections of the token's hidden state (weights and biases).
        TokenInput("pair_queries", side="q", shape=lambda N, K, H: (3, N, H)),
        TokenInput("query_types", side="q", kind="given", dtype="int", num_values=2),
        TokenInput("key_types", side="kv", kind="given", dtype="int", num_values=2),
    )))
