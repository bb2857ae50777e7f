"""SHA-RNN attention (#56): the single-headed attention over a memory of past states (the block's
LSTM and Boom feed-forward are a model's layers, not the mechanism's).

Paper: Merity, "Single Headed Attention RNN: Stop Thinking With Your Head", arXiv:1911.11423. The
softmax runs on `attnjax.ops.dot_product_attention`.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import flex
from attnjax.core import memory_state
from attnjax.core import param_tables
from attnjax.ops.softmax import dot_product_attention
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value


SHA_RNN_MEMORY = 5000   # the past positions the paper's attention reads ("up to 5000 tokens")


def _layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """LayerNorm without affine over the last axis: `(x - mean) / √(var + eps)`."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def sha_rnn_attention(q: Query, k: Key, v: Value, *, query_ln_scale, query_ln_bias, q_gate,
                      k_gate, v_gate, v_gate_kernel, v_gate_bias, causal: bool = True,
                      segment_ids: Optional[SegmentIds] = None, q_offset=0,
                      kv_lengths: Optional[Lengths] = None, scale=None,
                      implementation: Optional[str] = None, ln_eps: float = 1e-12,
                      memory: Optional[int] = SHA_RNN_MEMORY,
                      initial_state: Optional[dict] = None,
                      return_final_state: bool = False) -> Union[Output, tuple[Output, dict]]:
  """SHA-RNN attention: causal single-head attention over a memory, LayerNorm'd query, vector gates.

  Paper: Merity, "Single Headed Attention RNN: Stop Thinking With Your Head", arXiv:1911.11423,
  section 3 (the SHA attention figure) and the author's code (smerity/sha-rnn: `Attention` with
  only the query projected). Per query head n (key/value head g = n // (N/K)):

      Q   = σ(s_q) ⊙ (LayerNorm(q) ⊙ λ + β)      q: the query projection of the input; LN eps 1e-12
      K   = σ(s_k) ⊙ k
      [c ‖ f] = σ(s_v) W_v + b_v,   g_v = σ(f) ⊙ tanh(c)    over-parametrized value gate
      V   = g_v ⊙ v
      O_p = Σ_j softmax_j(scale · Q_p·K_j) V_j   over j <= p (and p - M <= j with `memory` M)

  s_q, s_k ∈ R^H and s_v ∈ R^h are gate vectors, one logit per channel (they start at 0, as in
  the code); W_v `[h, 2h]`, b_v `[2h]` is the over-parametrization of the value gate (a function of
  parameters only, so it changes the training dynamics, not the function class). The memory is the
  key/value stream: the current tokens plus earlier ones in front of them (`q_offset`, a KV cache),
  as the paper's memory of past states, bounded as in the paper (its enwik8 model reads up to
  5000 tokens back): the query at position p reads the keys at p - M, ..., p (`memory` M). The
  SHA-RNN block around this attention (LSTM, LayerNorms, residuals and the Boom feed-forward
  `GELU(x W) summed over chunks`) is a model's, not the mechanism's.

  Recurrent decoding (`return_final_state=True`, bounded `memory` only): q, k, v are the T new
  tokens at positions n, ..., n + T - 1 (n = `q_offset`); the state is the memory itself, the raw
  keys and values of the M positions before the call, `{"keys": [B, M, K, H], "values":
  [B, M, K, h]}` float32, oldest first (`attnjax.core.memory_state`; zeros or None: no tokens yet).
  Returns the full forward's rows and the state after n + T tokens.

  Adaptation: the query's linear map is the layer's query projection (the operator normalizes the
  q it gets); the paper's keys and values are the memory itself, here the layer's k and v. The
  paper has one head; each of the N heads here is such a head. Arrays over the value width h are
  sized with h = H in the layer (its head dim); called directly, they take the value width of `v`.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`.
    query_ln_scale, query_ln_bias, q_gate: `[N, H]` (λ, β, s_q); k_gate: `[K, H]` (s_k);
    v_gate: `[K, h]` (s_v); v_gate_kernel: `[K, h, 2h]`, v_gate_bias: `[K, 2h]` (W_v, b_v).
    causal: must be True (the paper's language-model attention).
    segment_ids, q_offset, kv_lengths, scale, implementation: as `dot_product_attention`.
    ln_eps: the query LayerNorm's epsilon.
    memory: M >= 1, the past positions a query reads (default 5000, the paper's; None: all of
      them, and no recurrent form).
    initial_state, return_final_state: recurrent decoding (above).

  Returns:
    `[B, T, N, h]` in q's dtype; with `return_final_state`, `(out, state)`.
  """
  op = "sha_rnn_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  if not causal:
    raise ValueError(f"{op}: the SHA-RNN attention is causal; call with causal=True")
  if memory is not None and memory < 1:
    raise ValueError(f"{op}: `memory` must be >= 1 or None, got {memory}")
  if initial_state is not None and not return_final_state:
    raise ValueError(f"{op}: `initial_state` needs `return_final_state=True` (recurrent decoding)")
  p = dict(query_ln_scale=query_ln_scale, query_ln_bias=query_ln_bias, q_gate=q_gate,
           k_gate=k_gate, v_gate=v_gate, v_gate_kernel=v_gate_kernel, v_gate_bias=v_gate_bias)
  param_tables.check_table(op, SHA_RNN_TABLE, p, N=N, K=K, H=H, h=h)
  p = {name: jnp.asarray(x, jnp.float32) for name, x in p.items()}
  query = _layer_norm(q.astype(jnp.float32), ln_eps) * p["query_ln_scale"] + p["query_ln_bias"]
  query = jax.nn.sigmoid(p["q_gate"]) * query
  cf = jnp.einsum("gd,gde->ge", jax.nn.sigmoid(p["v_gate"]), p["v_gate_kernel"]) + p["v_gate_bias"]
  value_gate = jax.nn.sigmoid(cf[:, h:]) * jnp.tanh(cf[:, :h])                     # [K, h]
  key_gate = jax.nn.sigmoid(p["k_gate"])
  if return_final_state:
    memory_state.check_recurrent_call(op, causal=causal, segment_ids=segment_ids,
                                       kv_lengths=kv_lengths, T=T, S=S)
    if memory is None:
      raise ValueError(f"{op}: recurrent decoding carries a bounded memory: set `memory` (the past "
                       "positions a query reads), or decode over a KV cache")
    state = memory_state.checked_state(
        op, initial_state, {"keys": (B, memory, K, H), "values": (B, memory, K, h)},
        {"keys": "[B, M, K, H]", "values": "[B, M, K, h]"})
    keys, kept_keys = memory_state.shift_in(state["keys"], k)
    values, kept_values = memory_state.shift_in(state["values"], v)
    n = memory_state.tokens_before(B, q_offset)
    out = flex.flex_attention(query, key_gate * keys, value_gate * values,
                              mask_mod=memory_state.recent_mask(n, memory, memory=memory),
                              scale=scale, implementation=implementation)
    new_state = {"keys": kept_keys, "values": kept_values}
    return out.astype(q.dtype), new_state
  out = dot_product_attention(query, key_gate * k.astype(jnp.float32),
                              value_gate * v.astype(jnp.float32), causal=True,
                              window=None if memory is None else (memory, 0),
                              segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
                              scale=scale, implementation=implementation)
  return out.astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# Registration

_init = jax.nn.initializers
# (name, shape(N, K, H, h), shape in letters, init): see `attnjax.core.param_tables`.
SHA_RNN_TABLE = (
    ("query_ln_scale", lambda N, K, H, h: (N, H), "[N, H]", _init.ones),
    ("query_ln_bias", lambda N, K, H, h: (N, H), "[N, H]", _init.zeros),
    ("q_gate", lambda N, K, H, h: (N, H), "[N, H]", _init.zeros),
    ("k_gate", lambda N, K, H, h: (K, H), "[K, H]", _init.zeros),
    ("v_gate", lambda N, K, H, h: (K, h), "[K, h]", _init.zeros),
    ("v_gate_kernel", lambda N, K, H, h: (K, h, 2 * h), "[K, h, 2h]", param_tables.fan_in_normal),
    ("v_gate_bias", lambda N, K, H, h: (K, 2 * h), "[K, 2h]", _init.zeros),
)


def sha_rnn_param_specs(h: Optional[int] = None) -> tuple[ParamSpec, ...]:
  """The learned arrays as ParamSpecs, for value width `h` (None: h = H, as in the Flax layer)."""
  return param_tables.param_specs(SHA_RNN_TABLE, h=h)


register(Mechanism(
    name="sha_rnn_attention", fn=sha_rnn_attention, family="recurrent-memory", seeds=(56,),
    paper="Single Headed Attention RNN: Stop Thinking With Your Head", arxiv="1911.11423",
    patterns=frozenset({"causal_self", "causal_cross"}), gqa=True, decode=True, recurrent=True,
    packed=True, complexity="O(T·S); O(T·M) with a memory of M", implementations=("xla", "reference"),
    params=sha_rnn_param_specs(), defaults=dict(memory=SHA_RNN_MEMORY),
    # memory: an example setting (a memory shorter than the suite's sequences, so it slides).
    example=lambda *, N, K, H, h: dict(memory=6, **example_params(sha_rnn_param_specs(h=h), N=N,
                                                                  K=K, H=H, perturb=0.5)),
    # The keys and values of the last M positions (the whole cache with an unbounded memory).
    state_size=lambda T, N, K, H, h, kw: (T if kw.get("memory") is None else kw["memory"])
    * K * (H + h),
    # An unbounded memory (memory=None) attends to every earlier token: a KV cache then.
    recurrent_when=lambda kw: kw.get("memory") is not None))

__all__ = ["sha_rnn_attention", "sha_rnn_param_specs", "SHA_RNN_MEMORY", "SHA_RNN_TABLE"]
