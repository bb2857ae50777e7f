"""Additive attention with one pooled global query per head: SwiftFormer and Ladaformer.

Both score each token with a learned vector, turn the scores into token weights α (SwiftFormer:
L2-normalised over the tokens; Ladaformer: a softmax over the tokens), pool one global query
`g = Σ_t α_t q_t` per head and combine it element-wise with every token's key: no `[T, S]` matrix,
O(T·H) per head.

  efficient_additive_attention   o_t = (g ⊙ k̂_t) W_T + b_T + v̂_t       (SwiftFormer, unit q̂ k̂ v̂)
  linear_additive_attention      o_t = v_t ⊙ k_t ⊙ g                     (Ladaformer)

Pooling is over the tokens of each packed sequence (`segment_ids`) and skips padding
(`kv_lengths`, whose positions return zeros). Statistics are float32; outputs come back in q's
dtype. The global query looks at every token, so there is no causal form, and the output is per
key token, so it is self-attention only.
"""


from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core.feature_maps import unit_rows
from attnjax.typing import Key, Output, Query, Value
from attnjax.registry import Mechanism, ParamSpec, example_arrays, register

_F32 = jnp.float32

__all__ = ["efficient_additive_attention", "linear_additive_attention", "token_groups",
           "pooled_query"]



def token_groups(op: str, segment_ids, kv_lengths, B: int, T: int):
  """Labels `[B, T]` in `[0, T]`: tokens with equal `segment_ids` share a label; padding gets T.

  Equal ids need not be contiguous (labels come from a stable sort, O(T log T)).
  """
  if segment_ids is None:
    labels = jnp.zeros((B, T), jnp.int32)
  else:
    if isinstance(segment_ids, (tuple, list)):
      raise ValueError(f"{op}: self-attention only: pass `segment_ids` as one [B, T] array")
    checks.check_shape(op, "segment_ids", segment_ids, (B, T), "[B, T]")
    seg = jnp.asarray(segment_ids)
    order = jnp.argsort(seg, axis=1, stable=True)
    ordered = jnp.take_along_axis(seg, order, axis=1)
    new = jnp.concatenate([jnp.ones((B, 1), bool), ordered[:, 1:] != ordered[:, :-1]], axis=1)
    run = jnp.cumsum(new, axis=1, dtype=jnp.int32) - 1
    labels = jnp.zeros((B, T), jnp.int32).at[jnp.arange(B)[:, None], order].set(run)
  if kv_lengths is not None:
    checks.check_shape(op, "kv_lengths", kv_lengths, (B,), "[B]")
    labels = jnp.where(jnp.arange(T)[None] < jnp.asarray(kv_lengths)[:, None], labels, T)
  return labels


def pooled_query(scores, x, labels, *, pooling: str = "softmax", eps: float = 1e-12):
  """`g_t = Σ_{u: label_u = label_t} α_u x_u` for every token t (per head), α over each group:

      pooling="softmax":  α_u = softmax_u(scores)               (weights sum to 1)
      pooling="l2":       α_u = scores_u / max(‖scores‖_2, eps)  (unit L2 norm, signs kept)

  scores: `[B, T, N]` float32; x: `[B, T, N, H]` float32; labels: `[B, T]` from `token_groups`.
  Returns `[B, T, N, H]`. Linear: segment reductions over B·(T + 1) groups, no `[T, T]` array.
  """
  B, T, N = scores.shape
  flat = (labels + jnp.arange(B)[:, None] * (T + 1)).reshape(-1)
  groups = B * (T + 1)
  scores = scores.reshape(B * T, N)
  xs = x.reshape(B * T, N, -1)
  if pooling == "l2":
    sumsq = jax.ops.segment_sum(scores * scores, flat, num_segments=groups)
    num = jax.ops.segment_sum(scores[..., None] * xs, flat, num_segments=groups)
    # rsqrt of the clamped square: F.normalize's max(‖α‖, eps), with a finite gradient at 0.
    return (num[flat] * jax.lax.rsqrt(jnp.maximum(sumsq, eps * eps))[flat][..., None]).reshape(
        x.shape)
  # The max only shifts the exponent (it cancels), so it carries no gradient.
  top = jax.lax.stop_gradient(jax.ops.segment_max(scores, flat, num_segments=groups))
  e = jnp.exp(scores - top[flat])
  den = jax.ops.segment_sum(e, flat, num_segments=groups)
  num = jax.ops.segment_sum(e[..., None] * xs, flat, num_segments=groups)
  return (num[flat] / den[flat][..., None]).reshape(x.shape)


def _validated_inputs(op, q, k, v, *, causal, segment_ids, kv_lengths, implementation):
  """Validation shared by both mechanisms; returns float32 q, k, v (K/V heads repeated to N, padding
  zeroed), the token labels and the `[B, T, 1, 1]` validity of each token."""
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  checks.check_implementation(op, implementation, ("reference",))
  if causal:
    raise ValueError(f"{op}: causal attention is not defined (the global query pools every token)")
  if T != S:
    raise ValueError(f"{op}: self-attention only (the output is per key token), got T={T}, S={S}")
  labels = token_groups(op, segment_ids, kv_lengths, B, T)
  valid = (labels < T)[:, :, None, None]
  prep = lambda x: jnp.where(valid, jnp.repeat(x.astype(_F32), N // x.shape[2], axis=2), 0.0)
  return prep(q), prep(k), prep(v), labels, valid


def efficient_additive_attention(q: Query, k: Key, v: Value, *, score_vector, proj, proj_bias,
                                 pooling: str = "l2", causal=False, segment_ids=None, q_offset=0,
                                 kv_lengths=None, scale=None,
                                 implementation: Optional[str] = None) -> Output:
  """SwiftFormer efficient additive attention: an L2-pooled global query gates every key.

  The paper's form (default, `pooling="l2"`), per head, over the tokens of each sequence:

      q̂_t = q_t / ‖q_t‖,  k̂_t = k_t / ‖k_t‖,  v̂_t = v_t / ‖v_t‖        unit vectors per token
      α_t = q̂_t·w_a / √H,  α ← α / ‖α‖_2                  [T]   scores, L2-normalised over tokens
      g = Σ_t α_t q̂_t                                     [H]   global query (no softmax)
      o_t = (g ⊙ k̂_t) W_T + b_T + v̂_t                     [h]   linear transform T plus residual

  No `[T, S]` matrix is formed; cost O(T·H·h). This follows the paper's equations (α = Q·w_a/√d,
  q = Σ α_i Q_i, x̂ = Q̂ + T(K ⊙ q)) with the normalisations of the authors' released code
  (`Amshaker/SwiftFormer`: F.normalize of query and key per token and of α over the tokens),
  applied per head (the released model has one head). The residual is the paper's normalised
  query Q̂, which has width H; the operator contract returns the value width h, so the residual is
  the token's value vector, normalised the same way, and W_T maps H -> h: calling with `v = q`
  gives the paper's `Q̂ + T(g ⊙ K̂)` exactly.

  `pooling="softmax"` is another reading (not the paper's): raw q, k, v, α = softmax_t(s · q_t·w_a)
  so g is a convex combination of the queries, and `o_t = (g ⊙ k_t) W_T + b_T + v_t`.

  `scale`: with the L2 pooling a positive scale cancels in α / ‖α‖, so only None (the paper's
  1/√H, which cancels too) is accepted; the softmax pooling honours it. `q_offset` is unused.

  Paper: Shaker et al., "SwiftFormer: Efficient Additive Attention for Transformer-based Real-time
  Mobile Vision Applications", arXiv:2303.15446.

  Args:
    q: `[B, T, N, H]`; k: `[B, T, K, H]`; v: `[B, T, K, h]`, K dividing N (self-attention).
    score_vector: w_a, `[N, H]`. proj: W_T, `[N, H, h]`. proj_bias: b_T, `[N, h]`.
    pooling: "l2" (the paper) or "softmax".
    segment_ids: `[B, T]`: pool within each packed sequence. kv_lengths: `[B]`: padding tokens
      are left out of the pool and return zeros.
    scale: None with "l2"; defaults to `H ** -0.5` with "softmax". implementation: "reference" or
      None.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "efficient_additive_attention"
  N, H, h = q.shape[2], q.shape[3], v.shape[3]
  if pooling not in ("l2", "softmax"):
    raise ValueError(f"{op}: unknown pooling {pooling!r}; choose 'l2' (the paper) or 'softmax'")
  if pooling == "l2" and scale is not None:
    raise ValueError(f"{op}: `scale` has no effect with pooling='l2' (the L2 normalisation of the "
                     f"scores over the tokens cancels it), got scale={scale}; leave it None or use "
                     "pooling='softmax'")
  qf, kf, vf, labels, valid = _validated_inputs(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                       kv_lengths=kv_lengths, implementation=implementation)
  checks.check_shape(op, "score_vector", score_vector, (N, H), "[N, H]")
  checks.check_shape(op, "proj", proj, (N, H, h), "[N, H, h]")
  checks.check_shape(op, "proj_bias", proj_bias, (N, h), "[N, h]")
  if pooling == "l2":
    qf, kf, vf = unit_rows(qf), unit_rows(kf), unit_rows(vf)
  scale = H ** -0.5 if scale is None else scale
  scores = jnp.einsum("btnh,nh->btn", qf, score_vector.astype(_F32)) * scale
  g = pooled_query(scores, qf, labels, pooling=pooling)
  out = jnp.einsum("btnh,nhd->btnd", g * kf, proj.astype(_F32)) + proj_bias.astype(_F32) + vf
  return jnp.where(valid, out, 0.0).astype(q.dtype)


def linear_additive_attention(q: Query, k: Key, v: Value, *, score_proj, value_map=None,
                              causal=False, segment_ids=None, q_offset=0, kv_lengths=None,
                              scale=None, implementation: Optional[str] = None) -> Output:
  """Ladaformer linear additive attention: one softmax attention vector per head pools a global
  query that gates every key and value element-wise.

      α_n = softmax_t(s · Σ_{n'} q_{t,n'} W_{n',:,n})     [T]  per head n, over the tokens
      g_n = Σ_t α_{n,t} q_{t,n}                           [H]  global query
      o_t = v_t ⊙ (k_t ⊙ g)                               [h]

  The scores follow the authors' code (a dense layer from the concatenated heads' queries to one
  logit per head; its bias cancels in the softmax). No `[T, S]` matrix: cost O(T·N·H). The product
  needs h = H; for h != H the caller must give `value_map` `[N, H, h]`, an adapter that is not in
  the paper (`o_t = v_t ⊙ ((k_t ⊙ g) M)`; M = identity is the paper). `q_offset` is unused.

  Paper: Morales-Juarez & Fuentes-Pineda, "Efficient generative adversarial networks using linear
  additive-attention Transformers", arXiv:2401.09596.

  Args:
    q: `[B, T, N, H]`; k: `[B, T, K, H]`; v: `[B, T, K, h]`, K dividing N (self-attention).
    score_proj: W, `[N, H, N]`. value_map: None (h = H) or `[N, H, h]`.
    segment_ids: `[B, T]`: pool within each packed sequence. kv_lengths: `[B]`: padding tokens
      are left out of the pool and return zeros.
    scale: defaults to `H ** -0.5`. implementation: "reference" or None.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "linear_additive_attention"
  N, H, h = q.shape[2], q.shape[3], v.shape[3]
  qf, kf, vf, labels, valid = _validated_inputs(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                       kv_lengths=kv_lengths, implementation=implementation)
  checks.check_shape(op, "score_proj", score_proj, (N, H, N), "[N, H, N]")
  if value_map is None and h != H:
    raise ValueError(f"{op}: v ⊙ k needs the value head dim h={h} to equal H={H}; pass "
                     "`value_map` [N, H, h] to map the key gate to width h")
  scale = H ** -0.5 if scale is None else scale
  logits = jnp.einsum("btnh,nhm->btm", qf, score_proj.astype(_F32)) * scale
  gate = kf * pooled_query(logits, qf, labels, pooling="softmax")
  if value_map is not None:
    checks.check_shape(op, "value_map", value_map, (N, H, h), "[N, H, h]")
    gate = jnp.einsum("btnh,nhd->btnd", gate, value_map.astype(_F32))
  return jnp.where(valid, vf * gate, 0.0).astype(q.dtype)


def _swiftformer_example(*, N=4, K=2, H=8, h=6):
  del K
  return {**example_arrays(11, {"score_vector": ((N, H), 0.0, 1.0)}),
          **example_arrays(12, {"proj": ((N, H, h), 0.0, 1 / 3)}),
          **example_arrays(13, {"proj_bias": ((N, h), 0.0, 0.1)})}


def _ladaformer_example(*, N=4, K=2, H=8, h=6):
  # With h != H the value adapter is the identity's first h columns.
  del K
  return dict(**example_arrays(14, {"score_proj": ((N, H, N), 0.0, 0.25)}),
              value_map=np.broadcast_to(np.eye(H, h, dtype=np.float32), (N, H, h)))


_ADDITIVE = dict(family="linear", patterns=frozenset({"self"}), decode=False,
                 implementations=("reference",), complexity="O(T·H)")

register(Mechanism(
    name="efficient_additive_attention", fn=efficient_additive_attention, seeds=(89,),
    paper="SwiftFormer: Efficient Additive Attention for Transformer-based Real-time Mobile Vision "
          "Applications", arxiv="2303.15446", **_ADDITIVE,
    params=(ParamSpec("score_vector", lambda N, K, H: (N, H), jax.nn.initializers.normal(1.0)),
            # The layer's value head dim is H, so W_T is [N, H, H] there.
            ParamSpec("proj", lambda N, K, H: (N, H, H),
                      jax.nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=0)),
            ParamSpec("proj_bias", lambda N, K, H: (N, H), jax.nn.initializers.zeros)),
    example=_swiftformer_example))

register(Mechanism(
    name="linear_additive_attention", fn=linear_additive_attention, seeds=(219,),
    paper="Efficient generative adversarial networks using linear additive-attention Transformers",
    arxiv="2401.09596", **_ADDITIVE,
    params=(ParamSpec("score_proj", lambda N, K, H: (N, H, N),
                      jax.nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)),),
    # The conformance inputs have h = 6 != H = 8: the adapter is the identity's first h columns.
    example=_ladaformer_example))
