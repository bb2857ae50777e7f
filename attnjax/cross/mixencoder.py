"""MixEncoder: a light-weight cross-attention between a query text, encoded once, and many candidates
whose representations were computed ahead of time.

Yang, Tang, Yang, Wang, Zhang, "Once is Enough: A Light-Weight Cross-Attention for Fast Sentence
Pair Modeling", arXiv:2210.05261 (EMNLP 2023). Written from the first author's code (ysngki's
initial commit of `MixEncoder`, `nlp_model.py`: `ClassifyParallelEncoder`, `MatchParallelEncoder`,
`ContextLayer`, `MyLSTMBlock`; `my_transformer/out_vector_modeling_bert.py`: `MyBertSelfAttention`,
`DecoderLayerChunk`, `MyBertSelfOutput`), as the paper text could not be read.

Offline, each candidate's final token states `s [S, D]` are compressed into k context vectors by k
learned queries (`candidate_contexts`, unscaled dot attention):  c_i = softmax(u_i sᵀ) s.

Online, the query text A runs through the encoder alone (its tokens never see a candidate); at the
interaction layer, with A's hidden states x [T, D] entering it and, per candidate, its contexts
C [k, D] and an aggregation state a [D] (zero before the first interaction layer), per head:

    K_A, V_A    = x W_K, x W_V                 the layer's own key and value projections of A,
                                               computed once for every candidate
    h           = mean_i c_i                   the candidate's hint
    a_new       = softmax(h W_cq K_Aᵀ / sqrt(d)) V_A                      aggregation: A read by h
    c_i,new     = softmax([c_i W_q K_Aᵀ, c_i W_q (C W_k)ᵀ] / sqrt(d)) [V_A; C W_v]
                                               the contexts read A and their own candidate, one softmax
    C'          = FFN(LN(c_new W_o + C))                                      residual update
    g           = σ([h, a_new W_o, a] W_g)                                    gate in (0, 1)
    a'          = FFN(LN(g ⊙ a_new W_o + (1 - g) ⊙ a))                       gated update
    FFN(y)      = LN(gelu(y W_1) W_2 + y)      (biases throughout; W_o, the LNs and the FFN shared
                                               by the two updates, as the code's one layer chunk)

A pair is scored by the dot product of a' with mean_i c'_i (`match_scores`). A candidate costs the
interaction layer O(k·(T + k)·D + k·D²): the query side is projected once, not once per candidate.

Shapes: `x [B, T, D]`, `candidates [B, n, k + 1, D]` (the k contexts, then the aggregation state, as
the code concatenates them), optional `mask [B, T]` (A's real tokens) → `[B, n, k + 1, D]`.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core.layer_norm import layer_norm
from attnjax.typing import Array, Bool, Float

__all__ = ["MixEncoderLayer", "candidate_contexts", "match_scores", "mixencoder_light_cross_attention"]

Tokens = Float[Array, "B T D"]
TokenMask = Bool[Array, "B T"]
Candidates = Float[Array, "B n k1 D"]
CandidateTokens = Float[Array, "B n S D"]
CandidateMask = Bool[Array, "B n S"]
Contexts = Float[Array, "B n k D"]
ContextQueries = Float[Array, "k D"]
Scores = Float[Array, "B n"]
_LN_EPS = 1e-12   # BERT's layer_norm_eps, which the layer chunk copies


def candidate_contexts(states: CandidateTokens, mask: Optional[CandidateMask] = None, *,
                       queries: ContextQueries) -> Contexts:
  """The k context vectors of each candidate (`ContextLayer`): learned queries `u [k, D]` attend to
  its final token states `states [B, n, S, D]` (unscaled dot products; `mask [B, n, S]` its real
  tokens)."""
  if jnp.ndim(states) != 4 or jnp.ndim(queries) != 2 or queries.shape[1] != states.shape[-1]:
    raise ValueError(f"candidate_contexts: `states` must be [B, n, S, D] and `queries` [k, D], got "
                     f"shapes {jnp.shape(states)} and {jnp.shape(queries)}")
  s = states.astype(jnp.float32)
  logits = jnp.einsum("kd,bnsd->bnks", queries.astype(jnp.float32), s)
  where = None if mask is None else mask[:, :, None, :]
  return jnp.einsum("bnks,bnsd->bnkd", jax.nn.softmax(logits, axis=-1, where=where),
                    s).astype(states.dtype)


def match_scores(candidates: Candidates) -> Scores:
  """`[B, n]`: each pair's score, the aggregation state (last slot) dotted with the mean context."""
  a = candidates[:, :, -1].astype(jnp.float32)
  return jnp.sum(a * jnp.mean(candidates[:, :, :-1].astype(jnp.float32), axis=2), axis=-1)


def mixencoder_light_cross_attention(
    x: Tokens, candidates: Candidates, mask: Optional[TokenMask] = None, *, num_heads: int,
    key_w, key_b, value_w, value_b, context_query_w, context_query_b, context_key_w,
    context_key_b, context_value_w, context_value_b, aggregate_query_w, aggregate_query_b,
    out_w, out_b, norm1_scale, norm1_bias, gate_w, gate_b, ffn_in_w, ffn_in_b, ffn_out_w,
    ffn_out_b, norm2_scale, norm2_bias, return_gate: bool = False):
  """MixEncoder's interaction layer (module docstring): the candidates' contexts and aggregation
  states `[B, n, k + 1, D]` after reading the query text's hidden states `x [B, T, D]`. Projections
  `[D, D]` (`gate_w [3D, D]`, `ffn_in_w [D, F]`, `ffn_out_w [F, D]`) with biases; `return_gate` also
  gives g `[B, n, D]`."""
  op = "mixencoder_light_cross_attention"
  if jnp.ndim(x) != 3:
    raise ValueError(f"{op}: `x` must be [B, T, D], got shape {jnp.shape(x)}")
  b, t, d = x.shape
  if jnp.ndim(candidates) != 4 or candidates.shape[0] != b or candidates.shape[-1] != d or (
      candidates.shape[2] < 2):
    raise ValueError(f"{op}: `candidates` must be [B, n, k + 1, D] = [{b}, n, k + 1, {d}] with k >= 1 "
                     f"(the contexts, then the aggregation state), got shape {jnp.shape(candidates)}")
  if mask is not None and jnp.shape(mask) != (b, t):
    raise ValueError(f"{op}: `mask` must be [B, T] = [{b}, {t}], got shape {jnp.shape(mask)}")
  if d % num_heads:
    raise ValueError(f"{op}: `num_heads` ({num_heads}) must divide the width D = {d}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  lin = lambda y, w, bias: y @ f32(w) + f32(bias)  # noqa: E731
  heads = lambda y: y.reshape(y.shape[:-1] + (num_heads, d // num_heads))  # noqa: E731
  scale = (d // num_heads) ** -0.5
  h = x.astype(jnp.float32)
  cand = candidates.astype(jnp.float32)
  ctx, state = cand[:, :, :-1], cand[:, :, -1]                          # [B, n, k, D], [B, n, D]
  hint = jnp.mean(ctx, axis=2)

  # The query text's keys and values: once, shared by every candidate.
  k_a, v_a = heads(lin(h, key_w, key_b)), heads(lin(h, value_w, value_b))   # [B, T, H, d]
  keep = None if mask is None else mask[:, None, None, None, :]

  # Aggregation: the hint's query reads A alone.
  q_agg = heads(lin(hint, aggregate_query_w, aggregate_query_b))            # [B, n, H, d]
  logits = jnp.einsum("bnhd,bthd->bnht", q_agg, k_a) * scale
  p = jax.nn.softmax(logits, axis=-1, where=None if mask is None else mask[:, None, None, :])
  a_new = jnp.einsum("bnht,bthd->bnhd", p, v_a).reshape(b, -1, d)

  # Contexts: one softmax over A's tokens and the candidate's own contexts.
  q_c = heads(lin(ctx, context_query_w, context_query_b))                   # [B, n, k, H, d]
  k_c = heads(lin(ctx, context_key_w, context_key_b))
  v_c = heads(lin(ctx, context_value_w, context_value_b))
  to_a = jnp.einsum("bnkhd,bthd->bnkht", q_c, k_a) * scale
  to_self = jnp.einsum("bnkhd,bnjhd->bnkhj", q_c, k_c) * scale
  if keep is not None:
    to_a = jnp.where(keep, to_a, -jnp.inf)
  p = jax.nn.softmax(jnp.concatenate([to_a, to_self], axis=-1), axis=-1)
  c_new = (jnp.einsum("bnkht,bthd->bnkhd", p[..., :t], v_a)
           + jnp.einsum("bnkhj,bnjhd->bnkhd", p[..., t:], v_c)).reshape(ctx.shape)

  def ffn(y):
    inner = jax.nn.gelu(lin(y, ffn_in_w, ffn_in_b), approximate=False)
    return layer_norm(lin(inner, ffn_out_w, ffn_out_b) + y, f32(norm2_scale), f32(norm2_bias),
                      eps=_LN_EPS)

  ln1 = lambda y: layer_norm(y, f32(norm1_scale), f32(norm1_bias), eps=_LN_EPS)  # noqa: E731
  ctx_out = ffn(ln1(lin(c_new, out_w, out_b) + ctx))
  a_proj = lin(a_new, out_w, out_b)
  gate = jax.nn.sigmoid(lin(jnp.concatenate([hint, a_proj, state], axis=-1), gate_w, gate_b))
  state_out = ffn(ln1(gate * a_proj + (1.0 - gate) * state))
  out = jnp.concatenate([ctx_out, state_out[:, :, None]], axis=2).astype(x.dtype)
  return (out, gate) if return_gate else out


class MixEncoderLayer(nn.Module):
  """Creates the interaction layer's weights (`num_heads` heads, FFN width `ffn_width`, default
  4·D; Linen's default initializers, LayerNorms at identity) and calls
  `mixencoder_light_cross_attention(x, candidates, mask)`, sowing the aggregation gate."""
  num_heads: int = 4
  ffn_width: Optional[int] = None

  @nn.compact
  def __call__(self, x: Tokens, candidates: Candidates, mask: Optional[TokenMask] = None):
    d = x.shape[-1]
    f = self.ffn_width or 4 * d
    dense = nn.initializers.lecun_normal()
    weights = {}
    for name, shape in (("key", (d, d)), ("value", (d, d)), ("context_query", (d, d)),
                        ("context_key", (d, d)), ("context_value", (d, d)),
                        ("aggregate_query", (d, d)), ("out", (d, d)), ("gate", (3 * d, d)),
                        ("ffn_in", (d, f)), ("ffn_out", (f, d))):
      weights[f"{name}_w"] = self.param(f"{name}_w", dense, shape)
      weights[f"{name}_b"] = self.param(f"{name}_b", nn.initializers.zeros, shape[1:])
    for name in ("norm1", "norm2"):
      weights[f"{name}_scale"] = self.param(f"{name}_scale", nn.initializers.ones, (d,))
      weights[f"{name}_bias"] = self.param(f"{name}_bias", nn.initializers.zeros, (d,))
    out, gate = mixencoder_light_cross_attention(x, candidates, mask, num_heads=self.num_heads,
                                                 return_gate=True, **weights)
    self.sow("intermediates", modules.GATE, gate)
    return out


# The conformance suite's candidates: 3 per query text, 2 contexts each, then the aggregation state.
_EXAMPLE_CANDIDATES, _EXAMPLE_CONTEXTS = 3, 2

modules.register_module(modules.Module(
    name="mixencoder_light_cross_attention", fn=mixencoder_light_cross_attention,
    linen=MixEncoderLayer, kind="signal", family="cross-attention", seeds=(206,),
    paper="Once is Enough: A Light-Weight Cross-Attention for Fast Sentence Pair Modeling",
    arxiv="2210.05261",
    extra_inputs=(modules.ExtraInput(
        "candidates", lambda s: (s[0], _EXAMPLE_CANDIDATES, _EXAMPLE_CONTEXTS + 1, s[-1])),),
    gate_range=(0.0, 1.0), keeps_shape=False,
    out_shape=lambda s, st: (s[0], _EXAMPLE_CANDIDATES, _EXAMPLE_CONTEXTS + 1, s[-1]),
    example={"num_heads": 4}))
