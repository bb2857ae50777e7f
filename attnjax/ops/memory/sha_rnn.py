"""SHA-RNN attention (#56): the single-headed attention over a memory of past states (the block's
LSTM and Boom feed-forward are a model's layers, not the mechanism's).

Paper: Merity, "Single Headed Attention RNN: Stop Thinking With Your Head", arXiv:1911.11423. The
softmax runs on `attnjax.ops.dot_product_attention`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import param_tables
from attnjax.ops.softmax import dot_product_attention
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value


def _layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """LayerNorm without affine over the last axis: `(x - mean) / √(var + eps)`."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def sha_rnn_attention(q: Query, k: Key, v: Value, *, query_ln_scale, query_ln_bias, q_gate,
                      k_gate, v_gate, v_gate_kernel, v_gate_bias, causal: bool = True,
                      segment_ids: Optional[SegmentIds] = None, q_offset=0,
                      kv_lengths: Optional[Lengths] = None, scale=None,
                      implementation: Optional[str] = None, ln_eps: float = 1e-12) -> Output:
  """SHA-RNN attention: causal single-head attention over a memory, LayerNorm'd query, vector gates.

  Paper: Merity, "Single Headed Attention RNN: Stop Thinking With Your Head", arXiv:1911.11423,
  section 3 (the SHA attention figure) and the author's code (smerity/sha-rnn: `Attention` with
  only the query projected). Per query head n (key/value head g = n // (N/K)):

      Q   = σ(s_q) ⊙ (LayerNorm(q) ⊙ λ + β)      q: the query projection of the input; LN eps 1e-12
      K   = σ(s_k) ⊙ k
      [c ‖ f] = σ(s_v) W_v + b_v,   g_v = σ(f) ⊙ tanh(c)    over-parametrized value gate
      V   = g_v ⊙ v
      O   = softmax(scale · Q Kᵀ, causal) V

  s_q, s_k ∈ R^H and s_v ∈ R^h are gate vectors, one logit per channel (they start at 0, as in
  the code); W_v `[h, 2h]`, b_v `[2h]` is the over-parametrization of the value gate (a function of
  parameters only, so it changes the training dynamics, not the function class). The memory is the
  key/value stream: the current tokens plus earlier ones in front of them (`q_offset`, a KV cache),
  as the paper's memory of past states. The SHA-RNN block around this attention (LSTM, LayerNorms,
  residuals and the Boom feed-forward `GELU(x W) summed over chunks`) is a model's, not the
  mechanism's.

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

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "sha_rnn_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  if not causal:
    raise ValueError(f"{op}: the SHA-RNN attention is causal; call with causal=True")
  p = dict(query_ln_scale=query_ln_scale, query_ln_bias=query_ln_bias, q_gate=q_gate,
           k_gate=k_gate, v_gate=v_gate, v_gate_kernel=v_gate_kernel, v_gate_bias=v_gate_bias)
  param_tables.check_table(op, SHA_RNN_TABLE, p, N=N, K=K, H=H, h=h)
  p = {name: jnp.asarray(x, jnp.float32) for name, x in p.items()}
  query = _layer_norm(q.astype(jnp.float32), ln_eps) * p["query_ln_scale"] + p["query_ln_bias"]
  cf = jnp.einsum("gd,gde->ge", jax.nn.sigmoid(p["v_gate"]), p["v_gate_kernel"]) + p["v_gate_bias"]
  value_gate = jax.nn.sigmoid(cf[:, h:]) * jnp.tanh(cf[:, :h])                     # [K, h]
  out = dot_product_attention(jax.nn.sigmoid(p["q_gate"]) * query,
                              jax.nn.sigmoid(p["k_gate"]) * k.astype(jnp.float32),
                              value_gate * v.astype(jnp.float32), causal=True,
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
    patterns=frozenset({"causal_self", "causal_cross"}), gqa=True, decode=True, packed=True,
    complexity="O(T·S)", implementations=("xla", "reference"), params=sha_rnn_param_specs(),
    example=lambda *, N, K, H, h: example_params(sha_rnn_param_specs(h=h), N=N, K=K, H=H,
                                                 perturb=0.5)))

__all__ = ["sha_rnn_attention", "sha_rnn_param_specs", "SHA_RNN_TABLE"]
