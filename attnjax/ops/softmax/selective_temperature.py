"""Selective self-attention (SSA): softmax with query- and value-dependent temperatures.

    τ_q(i) = 1 + σ(α_q)·log n_i + tanh(u_q · q_i)        one inverse temperature per query and head
    τ_v(j) = 1 + σ(α_v)·log m_j + tanh(u_v · v_j)        one per key/value token and head
    o_i    = Σ_j softmax_j(τ_q(i) · scale · q_i·k_j) · τ_v(j) v_j

that is, the queries scaled by τ_q and the values by τ_v (SSA(X) = S(τ_q(X) ⊙ Q Kᵀ) (τ_v(X) ⊙ V)).
The query temperature decides how spiky each query's attention is, apart from which keys it
matches: the token part tanh(·) ∈ (-1, 1) per query, the position part σ(α)·log n sharpens the
softmax as the row gets longer, against the dilution of attention over long contexts. The value
temperature lets a head scale down noisy or irrelevant tokens' values.

Interpretations (stated because the paper leaves them open, or the arXiv text was not at hand):
- Position term: τ_pos = 1 + σ(α) log n with a learned α per head (the paper's form). For a query, n
  is the number of keys its row sees: i + 1 for a causal query at position i, as in the authors' code
  (lit_gpt/model_finetune_att.py of github.com/umich-sota/selective_attention: logits times
  1 + c·log(row_length) with row_length = 1, 2, ..., T), the row length of a packed document, S for a
  bidirectional row. For a value, m is the token's position in its sequence (document) plus 1. Both
  follow their tokens, so decoding over a KV cache and packed documents equal the full forward.
  α starts at logit(e^{-e^2}) ≈ -7.4: the authors' code starts its coefficient c = exp(-exp(β)) at
  β = 2, so SSA starts close to softmax.
- Token term: τ_tok(x) = tanh(f(x)) added to the position term (the paper's "τ_pos + τ_tok"), with the
  weight-sharing form of f: a learned vector per head applied to the token's own query (or value)
  embedding, f(x) = u·(W_q x), which costs H numbers per head (< 0.5% of the layer) instead of a
  second projection of x (in a layer with RoPE, the rotated query). The vectors start at 0.
- `value_token_weight=None` and `value_position_logit=None` give query selectivity alone.

Streamable on flex attention: n_i from one flex pass of zero scores
(`core.contract.visible_key_counts`, under the same masks), then the query temperature is a
`score_mod` multiplying the logits; the value temperature is a per-token step on v before the
call, so every flex path (the `xla` one with block skipping) serves it.
A row with no visible key gives zeros.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`; `query_token_weight [N,H]`,
`query_position_logit [N]`, `value_token_weight [K,h]`, `value_position_logit [K]` → `[B,T,N,h]`.
Paper: Zhang, Chang, Li, Roy-Chowdhury, Chen and Oymak, "Selective Attention: Enhancing Transformer
through Principled Context Control", NeurIPS 2024, arXiv:2411.12892.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import param_tables
from attnjax.registry import Mechanism, example_arrays, example_params, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["selective_temperature_attention", "SSA_TABLE"]

# Shapes of the learned arrays in the signature (letters of `attnjax.typing`).
QueryHeadVectors = Float[Array, "N H"]
QueryHeadLogits = Float[Array, "N"]
ValueHeadVectors = Float[Array, "K h"]
ValueHeadLogits = Float[Array, "K"]

# The authors' starting position coefficient c = exp(-exp(β)) at β = 2 (about 6e-4), as σ(α).
_C0 = math.exp(-math.exp(2.0))
_ALPHA0 = math.log(_C0 / (1.0 - _C0))
_init = jax.nn.initializers
# (name, shape(N, K, H, h), shape in letters, init): see `attnjax.core.param_tables`.
SSA_TABLE = (
    ("query_token_weight", lambda N, K, H, h: (N, H), "[N, H]", _init.zeros),
    ("query_position_logit", lambda N, K, H, h: (N,), "[N]", _init.constant(_ALPHA0)),
    ("value_token_weight", lambda N, K, H, h: (K, h), "[K, h]", _init.zeros),
    ("value_position_logit", lambda N, K, H, h: (K,), "[K]", _init.constant(_ALPHA0)),
)


def _value_positions(segment_ids, B: int, S: int) -> jax.Array:
  """`[B, S]` int32: each key slot's position in its sequence (its packed document)."""
  kv_seg = segment_ids[1] if isinstance(segment_ids, (tuple, list)) else segment_ids
  start, _ = contract.document_bounds(kv_seg, B, S)
  return jnp.arange(S, dtype=jnp.int32)[None] - start


def selective_temperature_attention(
    q: Query, k: Key, v: Value, *, query_token_weight: QueryHeadVectors,
    query_position_logit: QueryHeadLogits,
    value_token_weight: Optional[ValueHeadVectors] = None,
    value_position_logit: Optional[ValueHeadLogits] = None, causal: bool = False,
    segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
    scale: Optional[float] = None, implementation: Optional[str] = None) -> Output:
  """Selective self-attention (SSA): softmax(τ_q · logits) with τ_v-scaled values (see module)."""
  op = "selective_temperature_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  if (value_token_weight is None) != (value_position_logit is None):
    raise ValueError(f"{op}: pass both `value_token_weight` [K, h] and `value_position_logit` [K] "
                     "(value selectivity) or neither")
  params = {"query_token_weight": query_token_weight, "query_position_logit": query_position_logit}
  if value_token_weight is not None:
    params.update(value_token_weight=value_token_weight, value_position_logit=value_position_logit)
  param_tables.check_table(op, [row for row in SSA_TABLE if row[0] in params], params,
                           N=N, K=K, H=H, h=h)
  masks = dict(causal=causal, segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths)
  # log n_i: n_i = keys visible to query i (an empty row counts as 1: log 1 = 0, finite).
  counts = contract.visible_key_counts(op, q, k, implementation=implementation, **masks)
  log_n = jnp.log(jnp.maximum(counts, 1.0))                                          # [B, T]
  qf = q.astype(jnp.float32)
  tau_q = (1.0 + jax.nn.sigmoid(query_position_logit.astype(jnp.float32)) * log_n[..., None]
           + jnp.tanh(jnp.einsum("btnh,nh->btn", qf, query_token_weight.astype(jnp.float32))))
  if value_token_weight is not None:
    log_m = jnp.log1p(_value_positions(segment_ids, B, S).astype(jnp.float32))          # [B, S]
    vf = v.astype(jnp.float32)
    tau_v = (1.0 + jax.nn.sigmoid(value_position_logit.astype(jnp.float32)) * log_m[..., None]
             + jnp.tanh(jnp.einsum("bskh,kh->bsk", vf, value_token_weight.astype(jnp.float32))))
    v = (vf * tau_v[..., None]).astype(v.dtype)

  def score_mod(s, b, n, qi, ki):
    # tau_q is [B, T, N]; the indices broadcast as [B, ., ., T, .] with n the query head.
    return s * tau_q[b, qi, n]

  return contract.flex_with_contract(op, q, k, v, scale=scale, implementation=implementation,
                                     score_mod=score_mod, **masks)


register(Mechanism(
    name="selective_temperature_attention", fn=selective_temperature_attention,
    family="softmax-variant", seeds=(48,),
    paper="Selective Attention: Enhancing Transformer through Principled Context Control",
    arxiv="2411.12892", params=param_tables.param_specs(SSA_TABLE),
    # Token weights moved off 0 and position logits near 0 (σ ≈ 1/2), so both terms of both
    # temperatures matter at the test sizes (the initial σ(α) ≈ 6e-4 barely does).
    example=lambda *, N, K, H, h: {
        **example_params(param_tables.param_specs(SSA_TABLE, h=h), N=N, K=K, H=H, perturb=0.5),
        **example_arrays(48, {"query_position_logit": ((N,), 0.0, 1.0),
                              "value_position_logit": ((K,), 0.0, 1.0)})}))
