"""Linear attention mechanisms: feature maps, gates and normalizations on `gated_linear_attention`.

Each mechanism maps q and k through its feature map φ, builds its gate, and hands the rest to the
primitive (`attnjax.core.linear`). `linear_contract` adapts the primitive to the common call
contract: full sequences use the chunked / parallel / scan forms; queries at an offset over a KV
cache use `gated_linear_attention_cached` (equal to the matching rows of the full forward).

Implementations: causal attention has three forms of the primitive ("xla" chunked, "parallel"
quadratic, "reference" scan). Non-causal attention has two: "xla", the linear `φ(Q)(φ(K)ᵀ V)`,
and "reference" (= "parallel"), the quadratic `(φ(Q) φ(K)ᵀ ⊙ mask) V` that materializes the
weights; mechanisms that are only non-causal list those two.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import feature_maps as fm
from attnjax.core import linear
from attnjax.core import masks
from attnjax.registry import Mechanism, ParamSpec, example_params, register

_F32 = jnp.float32
_IMPLS = ("xla", "parallel", "reference")
_NONCAUSAL_IMPLS = ("xla", "reference")


def _is_full_sequence(T, S, q_offset):
  return T == S and isinstance(q_offset, int) and q_offset == 0


def linear_contract(op, qf, kf, v, *, causal, segment_ids, q_offset, kv_lengths, implementation,
                    log_decay=None, normalize=False, scale=1.0, chunk_size=64, initial_state=None,
                    return_final_state=False):
  """Gated linear attention on feature-mapped `qf [B,T,N,F]`, `kf [B,S,K,F]` under the contract.

  `log_decay` is `[B,S,N]` / `[B,S,N,F]` over the key positions. Non-causal attention ignores
  positions; causal attention over a full sequence uses the primitive's forms; causal queries at an
  offset (decoding over a cache) use the cached form. The result has v's dtype.

  Recurrent decoding (`return_final_state=True`): q, k, v are the T new tokens of a causal
  self-attention, `initial_state` the state after the earlier ones (None: none yet); returns
  `(out, state)` with the float32 state `[B,N,F,h(+1)]`. Positions are implicit in the state, so
  `q_offset` is not used here.
  """
  if return_final_state:
    return _recurrent_contract(op, qf, kf, v, causal=causal, segment_ids=segment_ids,
                               kv_lengths=kv_lengths, implementation=implementation,
                               log_decay=log_decay, normalize=normalize, scale=scale,
                               chunk_size=chunk_size, initial_state=initial_state)
  if initial_state is not None:
    raise ValueError(f"{op}: `initial_state` needs `return_final_state=True` (recurrent decoding)")
  out = _linear_contract(op, qf, kf, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                         kv_lengths=kv_lengths, implementation=implementation,
                         log_decay=log_decay, normalize=normalize, scale=scale,
                         chunk_size=chunk_size)
  return out.astype(v.dtype)   # the features are float32; the result takes the input's dtype


def check_recurrent_args(op, *, causal, segment_ids, T, S):
  """The recurrent form's contract: causal self-attention over the new tokens of one sequence."""
  if not causal:
    raise ValueError(f"{op}: recurrent decoding (`return_final_state`) is for causal attention")
  if segment_ids is not None:
    raise ValueError(f"{op}: recurrent decoding carries one sequence per batch row; "
                     "`segment_ids` are not supported there")
  if T != S:
    raise ValueError(f"{op}: recurrent decoding takes the new tokens only: q and k must have the "
                     f"same length, got T={T}, S={S}")


def _recurrent_contract(op, qf, kf, v, *, causal, segment_ids, kv_lengths, implementation,
                        log_decay, normalize, scale, chunk_size, initial_state):
  check_recurrent_args(op, causal=causal, segment_ids=segment_ids, T=qf.shape[1], S=kf.shape[1])
  if kv_lengths is not None:
    checks.check_shape(op, "kv_lengths", kv_lengths, (qf.shape[0],), "[B]")
  out, state = linear.gated_linear_attention(
      qf, kf, v, log_decay=log_decay, causal=True, normalize=normalize, scale=scale,
      initial_state=initial_state, return_final_state=True, kv_lengths=kv_lengths,
      chunk_size=chunk_size, implementation=implementation)
  return out.astype(v.dtype), state


def _map_output(result, f):
  """Applies `f` to the output of `linear_contract`, passing a returned state through."""
  if isinstance(result, tuple):
    return f(result[0]), result[1]
  return f(result)


def _linear_contract(op, qf, kf, v, *, causal, segment_ids, q_offset, kv_lengths, implementation,
                     log_decay, normalize, scale, chunk_size):
  B, T, N, _ = qf.shape
  S = kf.shape[1]
  if isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = segment_ids
    checks.check_shape(op, "segment_ids (query)", q_seg, (B, T), "[B, T]")
    checks.check_shape(op, "segment_ids (key)", kv_seg, (B, S), "[B, S]")
    pair = (q_seg, kv_seg)
  elif segment_ids is not None:
    if T != S:
      raise ValueError(f"{op}: a single `segment_ids` array is for self-attention (T == S); "
                       f"got T={T}, S={S}: pass (q_segment_ids [B,T], kv_segment_ids [B,S])")
    checks.check_shape(op, "segment_ids", segment_ids, (B, T), "[B, T]")
    pair = (segment_ids, segment_ids)
  else:
    pair = None
  if kv_lengths is not None:
    checks.check_shape(op, "kv_lengths", kv_lengths, (B,), "[B]")
  if not causal:
    if implementation not in (None, "xla", "parallel", "reference"):
      raise ValueError(f"{op}: unknown implementation {implementation!r}; choose from "
                       f"{_IMPLS}")
    if implementation in ("parallel", "reference") or (pair is not None and T != S):
      # The quadratic form `(φ(Q) φ(K)ᵀ ⊙ mask) V` (every key visible: offset S), the plain
      # definition, and the one form for documents across two sequences.
      return linear.gated_linear_attention_cached(
          qf, kf, v, q_offset=jnp.full((B,), S), kv_lengths=kv_lengths, normalize=normalize,
          scale=scale, segment_ids=pair)
    return linear.gated_linear_attention(
        qf, kf, v, causal=False, normalize=normalize, scale=scale, segment_ids=segment_ids,
        kv_lengths=kv_lengths, chunk_size=chunk_size, implementation="xla")
  if _is_full_sequence(T, S, q_offset) and not isinstance(segment_ids, (tuple, list)):
    return linear.gated_linear_attention(
        qf, kf, v, log_decay=log_decay, causal=True, normalize=normalize, scale=scale,
        segment_ids=segment_ids, kv_lengths=kv_lengths, chunk_size=chunk_size,
        implementation=implementation)
  return linear.gated_linear_attention_cached(
      qf, kf, v, q_offset=q_offset, kv_lengths=kv_lengths, log_decay=log_decay,
      normalize=normalize, scale=scale, segment_ids=pair)


def _zero_padded(x, kv_lengths):
  """x `[B,S,...]` in float32 with slots at or past `kv_lengths` set to 0 (they may hold garbage
  that would otherwise enter statistics taken over all positions)."""
  x = x.astype(_F32)
  if kv_lengths is None:
    return x
  real = jnp.arange(x.shape[1])[None] < kv_lengths[:, None]
  return jnp.where(real.reshape(real.shape + (1,) * (x.ndim - 2)), x, 0.0)


def _real_slots(B, S, kv_lengths):
  """`[B,S]` bool: the slots before `kv_lengths` (all when None)."""
  if kv_lengths is None:
    return jnp.ones((B, S), bool)
  return jnp.arange(S)[None] < kv_lengths[:, None]


def _segments_of_keys(segment_ids, B, S):
  """`segment_ids` if it is one `[B,S]` array, else None (a pair, or a malformed array, which the
  contract then rejects with its own error)."""
  if segment_ids is None or isinstance(segment_ids, (tuple, list)):
    return None
  return jnp.asarray(segment_ids) if jnp.shape(segment_ids) == (B, S) else None


def _visible_counts(op, q, k, *, causal, segment_ids, q_offset, kv_lengths):
  """Number of keys each query sees, `[B,T,N,1]` float32 (by running the contract on ones)."""
  B, T, N, _ = q.shape
  S, K = k.shape[1], k.shape[2]
  ones_q = jnp.ones((B, T, N, 1), _F32)
  ones_k = jnp.ones((B, S, K, 1), _F32)
  return linear_contract(op, ones_q, ones_k, ones_k, causal=causal, segment_ids=segment_ids,
                         q_offset=q_offset, kv_lengths=kv_lengths, implementation=None)


# ---------------------------------------------------------------------------------------------
# #33 Cottention.

def cosine_linear_attention(q, k, v, *, causal=False, segment_ids=None, q_offset=0,
                            kv_lengths=None, scale=None, implementation=None, length_exponent=None,
                            initial_state=None, return_final_state=False):
  """Cottention: cosine-similarity attention `o_t = Σ_s (q̂_t·k̂_s) v_s / n_t^σ`, linear in T.

  q̂, k̂ are L2-normalized rows, `n_t` the number of keys query t sees (t + 1 when causal) and
  `σ = sigmoid(length_exponent)` a learned per-head exponent `[N]` (default σ = 1/2). The causal
  form is the RNN `S_t = S_{t-1} + k̂_t v_tᵀ`, `o_t = q̂_t S_t / t^σ`. The paper has no `scale`
  (cosine similarities are bounded; σ sets the magnitude): a `scale` other than None is an error.
  Recurrent decoding carries `S_t` (`[B,N,H,h]`); the count comes from `q_offset`;
  `initial_state` needs `return_final_state=True`. Mongaras et al., "Cottention: Linear
  Transformers With Cosine Attention", arXiv:2409.18747.
  """
  if scale is not None:
    raise ValueError(f"cosine_linear_attention: the paper has no `scale` (cosine similarities need "
                     f"none; `length_exponent` sets the magnitude); got scale={scale}")
  B, T, N, _ = q.shape
  sigma = (jnp.full((N,), 0.5, _F32) if length_exponent is None else
           jax.nn.sigmoid(jnp.asarray(length_exponent, _F32)))
  contract = dict(causal=causal, segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths)
  result = linear_contract("cosine_linear_attention", fm.l2_normalize(q), fm.l2_normalize(k), v,
                           implementation=implementation, initial_state=initial_state,
                           return_final_state=return_final_state, **contract)
  if return_final_state:
    # The state holds no count: query t of this call sees the q_offset earlier tokens and t + 1 new.
    new = jnp.arange(1, T + 1)[None]
    if kv_lengths is not None:
      new = jnp.minimum(new, kv_lengths[:, None])
    n = (jnp.reshape(jnp.asarray(q_offset), (-1, 1)) + new).astype(_F32)[:, :, None, None]
  else:
    n = _visible_counts("cosine_linear_attention", q, k, **contract)
  div = jnp.where(n > 0, jnp.maximum(n, 1.0) ** sigma[:, None], 1.0)
  return _map_output(result, lambda o: (o.astype(_F32) / div).astype(q.dtype))


# ---------------------------------------------------------------------------------------------
# #70 Efficient attention.

def _segment_softmax_over_positions(x, segment_ids, kv_lengths):
  """Softmax of `x [B,S,K,F]` over positions, within each document and over real slots only."""
  B, S = x.shape[:2]
  x = x.astype(_F32)
  real = jnp.ones((B, S), bool) if kv_lengths is None else jnp.arange(S)[None] < kv_lengths[:, None]
  x = jnp.where(real[..., None, None], x, -jnp.inf)
  if segment_ids is None:
    m = jnp.max(x, axis=1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(x - jax.lax.stop_gradient(m))
    return e / jnp.maximum(jnp.sum(e, axis=1, keepdims=True), 1e-30)
  run = linear.run_index(segment_ids)                                   # [B,S] in [0, S)
  seg_max = jax.vmap(lambda xb, rb: jax.ops.segment_max(xb, rb, num_segments=S))(x, run)
  m = jnp.take_along_axis(seg_max, run[:, :, None, None], axis=1)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(x - jax.lax.stop_gradient(m))
  seg_sum = jax.vmap(lambda eb, rb: jax.ops.segment_sum(eb, rb, num_segments=S))(e, run)
  return e / jnp.maximum(jnp.take_along_axis(seg_sum, run[:, :, None, None], axis=1), 1e-30)


def efficient_attention(q, k, v, *, causal=False, segment_ids=None, q_offset=0, kv_lengths=None,
                        scale=None, implementation=None, normalization="softmax"):
  """Efficient attention `E = ρ_q(Q) (ρ_k(K)ᵀ V)`, multiplied right to left in O(T·F·h).

  `normalization="softmax"` (the paper's main form): ρ_q is a softmax of each query over its
  features, ρ_k a softmax of each key feature over positions (within its document when packed);
  `scale` multiplies q and k before them (default `H ** -0.25` each, the dot-product scaling split
  in two). `normalization="scaling"`: `ρ_q(Y) = ρ_k(Y) = Y / √n`, n the keys a query sees, under
  which E equals dot-product attention with the same normalization, `(scale · Q Kᵀ / n) V`,
  exactly (the paper's equivalence). Non-causal. Shen et al., "Efficient Attention: Attention with
  Linear Complexities", arXiv:1812.01243.
  """
  del q_offset
  op = "efficient_attention"
  H = q.shape[-1]
  sc = H ** -0.5 if scale is None else scale
  if causal:
    raise ValueError(f"{op}: non-causal only (ρ_k normalizes each key feature over all positions)")
  if isinstance(segment_ids, (tuple, list)):
    raise ValueError(f"{op}: segment_ids must be one [B,T] array (self-attention)")
  contract = dict(causal=False, segment_ids=segment_ids, q_offset=0, kv_lengths=kv_lengths)
  if normalization == "scaling":
    o = linear_contract(op, q.astype(_F32) * sc, _zero_padded(k, kv_lengths), v, scale=1.0,
                        implementation=implementation, **contract)
    n = _visible_counts(op, q, k, **contract)
    return (o.astype(_F32) / jnp.maximum(n, 1.0)).astype(q.dtype)
  if normalization != "softmax":
    raise ValueError(f"{op}: `normalization` must be 'softmax' or 'scaling', got {normalization!r}")
  qf = fm.softmax_features(q.astype(_F32) * sc ** 0.5)
  kf = _segment_softmax_over_positions(k.astype(_F32) * sc ** 0.5, segment_ids, kv_lengths)
  return linear_contract(op, qf, kf, v, implementation=implementation, **contract)


# ---------------------------------------------------------------------------------------------
# #79 Lightning Attention-2.

def lightning_decay_rates(num_heads: int):
  """Per-head decay rates `λ_n = exp(-2^{-8(n+1)/N})` (TransNormerLLM / RetNet geometric rates)."""
  return -masks.alibi_slopes(num_heads)


def lightning_attention_2(q, k, v, *, causal=True, segment_ids=None, q_offset=0, kv_lengths=None,
                          scale=None, implementation=None, log_decay_rates=None, chunk_size=64,
                          initial_state=None, return_final_state=False):
  """Lightning Attention-2: causal linear attention `o_t = (scale · q_t) Σ_{s≤t} λ^{t-s} k_s v_sᵀ`.

  `scale` defaults to `H ** -0.5`. Tiled: intra-block `((scale · Q_i K_iᵀ) ⊙ M) V_i` plus
  inter-block `scale · Q_i KV` with `KV ← λ^C KV + K_iᵀ V_i` (the primitive's "xla" form).
  `log_decay_rates [N]` (≤ 0; default `lightning_decay_rates`; 0 means no decay). Non-causal:
  `scale · Q (Kᵀ V)` without decay. Recurrent decoding carries KV (`[B,N,H,h]`);
  `initial_state` needs `return_final_state=True`. Qin et al., "Lightning Attention-2: A Free
  Lunch for Handling Unlimited Sequence Lengths in Large Language Models", arXiv:2401.04658.
  """
  B, T, N, H = q.shape
  S = k.shape[1]
  rates = lightning_decay_rates(N) if log_decay_rates is None else jnp.asarray(log_decay_rates,
                                                                                 _F32)
  log_decay = jnp.broadcast_to(rates, (B, S, N)) if causal else None
  return linear_contract("lightning_attention_2", q, k, v, causal=causal, segment_ids=segment_ids,
                         q_offset=q_offset, kv_lengths=kv_lengths, implementation=implementation,
                         log_decay=log_decay, scale=H ** -0.5 if scale is None else scale,
                         chunk_size=chunk_size, initial_state=initial_state,
                         return_final_state=return_final_state)


# ---------------------------------------------------------------------------------------------
# #152 Performer (FAVOR+).

def favor_plus_attention(q, k, v, *, projection, causal=False, segment_ids=None, q_offset=0,
                         kv_lengths=None, scale=None, implementation=None, initial_state=None,
                         return_final_state=False):
  """Performer FAVOR+: `D⁻¹ φ(Q)(φ(K)ᵀ V)` with positive orthogonal random features.

  `φ(x) = exp(W x - ‖x‖²/2)/√m`, `W = projection [m, H]` shared by the heads, so that
  `E_W[φ(q)·φ(k)] = exp(scale · q·k)` (q and k are each scaled by `√scale`): an unbiased estimate
  of softmax attention's kernel. W is drawn, not learned: the registry's `ParamSpec` draws the
  paper's orthogonal features with chi-distributed norms (`orthogonal_features_init`) and marks it
  `trainable=False`, so the layer keeps it in its "buffers" (redrawn on the trainer's schedule).

  Range (exact, `feature_maps.stabilized_exp_features`): each key feature column is divided by
  exp of its max exponent over the keys a query sees (per example, head and feature: per document
  when packed, one per row for documents across two sequences; causal: the running max, whose
  growth is the per-feature gate `exp(M_{s-1} - M_s)` of the recurrence), each query row by its
  own max; the constants cancel in D⁻¹ and no row underflows, however large q and k. Causal
  attention therefore runs the recurrence with per-feature gates (chunks of 16).

  Recurrent decoding carries `(S [B,N,m,h+1], M [B,K,m])`, the stabilized state and the running
  max; an all-zero state (as a layer initializes it) is empty. `initial_state` needs
  `return_final_state=True`. Choromanski et al., "Rethinking Attention with Performers",
  arXiv:2009.14794.
  """
  op = "favor_plus_attention"
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  w = jnp.asarray(projection, _F32)
  if w.ndim != 2 or w.shape[1] != H:
    raise ValueError(f"{op}: `projection` must have shape [m, H] with H={H}, got {w.shape}")
  if initial_state is not None and not return_final_state:
    raise ValueError(f"{op}: `initial_state` needs `return_final_state=True` (recurrent decoding)")
  r = (H ** -0.5 if scale is None else scale) ** 0.5
  a = fm.favor_plus_logits(q.astype(_F32) * r, w)                              # [B,T,N,m]
  real = _real_slots(B, S, kv_lengths)[..., None, None]
  b = jnp.where(real, fm.favor_plus_logits(_zero_padded(k, kv_lengths) * r, w), -jnp.inf)
  state, prev_max, log_decay = None, None, None
  if return_final_state:
    check_recurrent_args(op, causal=causal, segment_ids=segment_ids, T=T, S=S)
    state, prev_max = _favor_state(op, initial_state, (B, N, K, w.shape[0], v.shape[-1]))
  if causal:
    seg = _segments_of_keys(segment_ids[1] if isinstance(segment_ids, (tuple, list)) else
                            segment_ids, B, S)
    run = None if seg is None else linear.run_index(seg)
    b_max = fm.running_feature_max(b, run, prev_max)
    log_decay = jnp.repeat(fm.running_max_log_decay(b_max, run, prev_max), N // K, axis=2)
    offset = 0 if return_final_state else jnp.reshape(jnp.asarray(q_offset), (-1, 1))
    q_pos = jnp.broadcast_to(jnp.clip(offset + jnp.arange(T)[None], 0, S - 1), (B, T))
    a_max = jnp.take_along_axis(b_max, q_pos[:, :, None, None], axis=1)
  else:
    per_doc = _segments_of_keys(segment_ids, B, S) if T == S else None
    b_max = fm.feature_max_over_keys(b, per_doc)
    a_max = b_max if per_doc is not None else b_max[:, :1]
  qf, kf = fm.stabilized_exp_features(a, b, a_max, b_max)
  result = linear_contract(op, qf, kf, v, causal=causal, segment_ids=segment_ids,
                           q_offset=q_offset, kv_lengths=kv_lengths, implementation=implementation,
                           log_decay=log_decay, normalize=True, initial_state=state,
                           return_final_state=return_final_state)
  if not return_final_state:
    return result
  out, new_state = result
  last_max = b_max[:, -1]
  return out, (new_state, jnp.where(jnp.isfinite(last_max), last_max, 0.0))


def _favor_state(op, initial_state, sizes):
  """(state `[B,N,m,h+1]` or None, running key max `[B,K,m]` or None) from a carried state; the
  max of an empty state (normalizer 0, e.g. all zeros) is -inf (nothing stored)."""
  if initial_state is None:
    return None, None
  B, N, K, m, h = sizes
  if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2
          and jnp.shape(initial_state[0]) == (B, N, m, h + 1)
          and jnp.shape(initial_state[1]) == (B, K, m)):
    raise ValueError(f"{op}: `initial_state` must be (state [B,N,m,h+1] = {(B, N, m, h + 1)}, "
                     f"key max [B,K,m] = {(B, K, m)}), as returned with `return_final_state`")
  state, key_max = (jnp.asarray(x, _F32) for x in initial_state)
  normalizer = state[:, ::N // K, :, -1]                                       # [B,K,m]
  return state, jnp.where(normalizer > 0, key_max, -jnp.inf)


def _favor_projection_shape(N, K, H):
  del N, K
  return (4 * H, H)


def orthogonal_features_init(key, shape, dtype=_F32):
  """Initializer drawing `[m, H]` orthogonal random features with chi norms (Performer)."""
  return fm.orthogonal_random_features(key, shape[0], shape[1]).astype(dtype)


def _favor_state_floats(T, N, K, H, h, kwargs):
  m = np.shape(kwargs["projection"])[0] if kwargs.get("projection") is not None else 4 * H
  return N * m * (h + 1) + K * m


# ---------------------------------------------------------------------------------------------
# #98 Linear Log-Normal attention.

def _per_head(op, name, x, B, N):
  x = jnp.asarray(x, _F32)
  if x.shape not in ((N,), (B, N)):
    raise ValueError(f"{op}: `{name}` must have shape [N] = ({N},) or [B,N] = {(B, N)}, "
                     f"got {x.shape}")
  return jnp.broadcast_to(x, (B, N))


def linear_lognormal_attention(q, k, v, *, causal=False, segment_ids=None, q_offset=0,
                               kv_lengths=None, scale=None, implementation=None, alpha=None,
                               beta=None):
  """Linear Log-Normal attention: `D⁻¹ φ(Q)(φ(K)ᵀ V)`, `φ_q(q) = exp(α q)`, `φ_k(k) = exp(β k)`.

  α, β are moment-matched to softmax attention's log-normal weights at temperature `scale`
  (`feature_maps.lognormal_temperatures`: per example and per query head, from this call's q and
  k, so one example never changes another's; packed documents of one row share theirs), or passed
  as `alpha`, `beta` (`[N]` or `[B,N]`; β defaults to α), e.g. running estimates kept by a layer;
  then `scale` plays no part and must be None. Under GQA each query head applies its own β to the
  shared keys. Non-causal (the statistics cover every position). Exponents are stabilized exactly
  (`feature_maps.stabilized_exp_features`). Nahshan et al., "Linear Log-Normal Attention with
  Unbiased Concentration", arXiv:2311.13541.
  """
  op = "linear_lognormal_attention"
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  if causal:
    raise ValueError(f"{op}: non-causal only (α, β are statistics over all positions)")
  if alpha is None:
    if beta is not None:
      raise ValueError(f"{op}: `beta` needs `alpha`")
    a, b = fm.lognormal_temperatures(q, k, scale=H ** -0.5 if scale is None else scale,
                                     kv_lengths=kv_lengths)
  else:
    if scale is not None:
      raise ValueError(f"{op}: `scale` is the temperature α, β are matched to; with an explicit "
                       f"`alpha` it plays no part: pass one or the other (got scale={scale})")
    a = _per_head(op, "alpha", alpha, B, N)
    b = a if beta is None else _per_head(op, "beta", beta, B, N)
  real = _real_slots(B, S, kv_lengths)[..., None, None]
  kr = jnp.repeat(_zero_padded(k, kv_lengths), N // K, axis=2)                 # β per query head
  key_exp = jnp.where(real, b[:, None, :, None] * kr, -jnp.inf)                 # [B,S,N,H]
  per_doc = _segments_of_keys(segment_ids, B, S) if T == S else None
  b_max = fm.feature_max_over_keys(key_exp, per_doc)
  qf, kf = fm.stabilized_exp_features(a[:, None, :, None] * q.astype(_F32), key_exp,
                                      b_max if per_doc is not None else b_max[:, :1], b_max)
  return linear_contract(op, qf, kf, jnp.repeat(v, N // K, axis=2), causal=False,
                         segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
                         implementation=implementation, normalize=True)


# ---------------------------------------------------------------------------------------------
# #177 TaylorShift and #87 FAST.

def taylor_crossover_length(H: int, h: int) -> int:
  """Length above which TaylorShift's linear form is cheaper than the direct one.

  Linear: `T · (1 + H + H²) · (h + 1)` multiply-adds for the state and the read-out; direct:
  `T² · (H + h)`. They cross at `T* = (1 + H + H²)(h + 1) / (H + h)`.
  """
  return int(math.ceil((1 + H + H * H) * (h + 1) / (H + h)))


def _taylor_direct(qs, ks, v, *, causal, segment_ids, q_offset, kv_lengths):
  """Normalized Taylor-softmax `w_ts = 1 + x + x²/2` (x = q_s·k_s) over visible keys, quadratic."""
  from attnjax.ops.dot_product import contract_mask  # pylint: disable=import-outside-toplevel
  B, T, N, _ = qs.shape
  S, K = ks.shape[1], ks.shape[2]
  x = jnp.einsum("btnf,bsnf->bnts", qs, jnp.repeat(ks, N // K, axis=2))
  w = 1.0 + x + 0.5 * x * x
  mask_mod = contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                           segment_ids=segment_ids, kv_lengths=kv_lengths, op="taylor_shift")
  if mask_mod is not None:
    b, n, i, j = masks.index_grid((B, N, T, S))
    w = jnp.where(jnp.broadcast_to(mask_mod(b, n, i, j), w.shape), w, 0.0)
  den = jnp.sum(w, axis=-1, keepdims=True)
  num = jnp.einsum("bnts,bsnh->bnth", w, jnp.repeat(v.astype(_F32), N // K, axis=2))
  o = jnp.where(den == 0, 0.0, num / jnp.where(den == 0, 1.0, den))
  return jnp.swapaxes(o, 1, 2)


def taylor_shift_attention(q, k, v, *, causal=False, segment_ids=None, q_offset=0, kv_lengths=None,
                           scale=None, implementation=None, form="auto", initial_state=None,
                           return_final_state=False):
  """TaylorShift: normalized second-order Taylor-softmax `w = 1 + x + x²/2`, `x = scale · q·k`.

  `form="linear"` computes it exactly in O(T·H²·h) with features `[1, x, vec(x xᵀ)/√2]`;
  `form="direct"` materializes the `[T, S]` weights; `"auto"` picks the direct form below the
  crossover length `taylor_crossover_length(H, h)` where it is cheaper. Recurrent decoding always
  uses the linear form (its state is `[B,N,1+H+H²,h+1]`); `initial_state` needs
  `return_final_state=True`. Nauen et al., "TaylorShift:
  Shifting the Complexity of Self-Attention from Squared to Linear (and Back) using Taylor-Softmax",
  arXiv:2403.02920.
  """
  H, h, T = q.shape[-1], v.shape[-1], q.shape[1]
  r = (H ** -0.5 if scale is None else scale) ** 0.5
  qs, ks = q.astype(_F32) * r, k.astype(_F32) * r
  if form not in ("auto", "linear", "direct"):
    raise ValueError(f"taylor_shift_attention: `form` must be auto, linear or direct, got {form!r}")
  if return_final_state and form == "direct":
    raise ValueError("taylor_shift_attention: recurrent decoding needs form='linear' or 'auto'")
  if form == "direct" or (form == "auto" and T < taylor_crossover_length(H, h)
                          and not return_final_state):
    return _taylor_direct(qs, ks, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                          kv_lengths=kv_lengths).astype(q.dtype)
  return linear_contract("taylor_shift_attention", fm.taylor2(qs), fm.taylor2(ks), v,
                         causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                         kv_lengths=kv_lengths, implementation=implementation, normalize=True,
                         initial_state=initial_state, return_final_state=return_final_state)


def fastmax_attention(q, k, v, *, causal=False, segment_ids=None, q_offset=0, kv_lengths=None,
                      scale=None, implementation=None, initial_state=None,
                      return_final_state=False):
  """FAST (Fastmax): `w_ts ∝ 1 + x + x²/2` of normalized `x = q̂·k̂`, factorized to O(T·H²·h).

  q and k rows are standardized (zero mean, unit variance over the head dim) and scaled by
  `√scale` each, so x is bounded in `[-1, 1]`·`scale·H` and the polynomial stays positive. The
  weights are never materialized. Recurrent decoding carries the `[B,N,1+H+H²,h+1]` state;
  `initial_state` needs `return_final_state=True`. Gerami et al., "FAST: Factorizable Attention
  for Speeding up Transformers", arXiv:2402.07901.
  """
  H = q.shape[-1]
  r = (H ** -0.5 if scale is None else scale) ** 0.5

  def standardize(x):
    x = x.astype(_F32)
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

  qs, ks = standardize(q) * r, standardize(k) * r
  return linear_contract("fastmax_attention", fm.taylor2(qs), fm.taylor2(ks), v, causal=causal,
                         segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
                         implementation=implementation, normalize=True,
                         initial_state=initial_state, return_final_state=return_final_state)


# ---------------------------------------------------------------------------------------------
# #234 ReGLA.

def refined_gate(g, r):
  """ReGLA's refining gate: `(1 - r) g² + r (1 - (1 - g)²)`, between g² and 1 - (1-g)²."""
  return (1.0 - r) * g * g + r * (1.0 - (1.0 - g) ** 2)


def refined_gated_linear_attention(q, k, v, *, gate_kernel, gate_bias, refine_kernel, refine_bias,
                                   causal=True, segment_ids=None, q_offset=0, kv_lengths=None,
                                   scale=None, implementation=None, initial_state=None,
                                   return_final_state=False):
  """ReGLA: `S_t = diag(g'_t) S_{t-1} + φ(k_t) v_tᵀ`, `o_t = norm(φ(q_t) S_t)`.

  φ is the bounded exponential `exp(x - max x)`; `g = σ(k W_g + b_g)` and the refining gate
  `r = σ(k W_r + b_r)` give `g' = (1 - r) g² + r (1 - (1 - g)²)` per key dimension, which reaches
  values near 0 and 1 without saturating σ. The output is normalized per head (RMS norm, no learned
  scale: the layer's output projection carries it). Gates are computed from the key (the contract
  gives no layer input). Kernels `[N, H, H]`, biases `[N, H]`. Recurrent decoding carries the
  `[B,N,H,h]` state; `initial_state` needs `return_final_state=True`. Lu et al., "ReGLA: Refining
  Gated Linear Attention", arXiv:2502.01578.
  """
  B, T, N, H = q.shape
  K = k.shape[2]
  kr = jnp.repeat(k.astype(_F32), N // K, axis=2)
  g = jax.nn.sigmoid(jnp.einsum("bsnf,nfg->bsng", kr, gate_kernel) + gate_bias)
  r = jax.nn.sigmoid(jnp.einsum("bsnf,nfg->bsng", kr, refine_kernel) + refine_bias)
  log_decay = jnp.log(jnp.maximum(refined_gate(g, r), 1e-30)) if causal else None
  sc = H ** -0.5 if scale is None else scale
  result = linear_contract(
      "refined_gated_linear_attention", fm.bounded_exp(q.astype(_F32) * sc ** 0.5),
      fm.bounded_exp(k.astype(_F32) * sc ** 0.5), v, causal=causal, segment_ids=segment_ids,
      q_offset=q_offset, kv_lengths=kv_lengths, implementation=implementation,
      log_decay=log_decay, chunk_size=16, initial_state=initial_state,
      return_final_state=return_final_state)

  def rms_normalized(o):
    o = o.astype(_F32)
    return (o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + 1e-6)).astype(q.dtype)

  return _map_output(result, rms_normalized)


# ---------------------------------------------------------------------------------------------
# #93 Rank-augmented linear attention (RALA).

def rank_augmented_linear_attention(q, k, v, *, causal=False, segment_ids=None, q_offset=0,
                                    kv_lengths=None, scale=None, implementation=None):
  """RALA: a KV buffer weighted by a global query, and an element-wise output gate that lifts rank.

  `α_j = softmax_j(scale · q̄·k_j)` with q̄ the mean query; `KV = Σ_j α_j S φ(k_j) v_jᵀ`,
  `z = Σ_j α_j S φ(k_j)`; `o_i = (φ(q_i) KV / φ(q_i) z) ⊙ v_i`, φ = elu + 1. Plain linear
  attention's output has rank ≤ F; the element-wise product with the token's own projection (here
  its value vector, the contract's projection of x_i) raises it. Non-causal self-attention (the
  global query sees all tokens). Fan et al., "Breaking the Low-Rank Dilemma of Linear Attention",
  arXiv:2411.07635.
  """
  del q_offset
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  sc = H ** -0.5 if scale is None else scale
  real = jnp.ones((B, S), bool) if kv_lengths is None else jnp.arange(S)[None] < kv_lengths[:, None]
  qbar = jnp.sum(jnp.where(real[..., None, None], q.astype(_F32), 0.0), 1) / jnp.maximum(
      jnp.sum(real, 1), 1)[:, None, None]                                      # [B,N,H]
  kr = jnp.repeat(k.astype(_F32), N // K, axis=2)
  logits = jnp.einsum("bnf,bsnf->bsn", qbar * sc, kr)
  logits = jnp.where(real[..., None], logits, -jnp.inf)
  alpha = jax.nn.softmax(logits, axis=1)
  alpha = jnp.where(real[..., None], alpha, 0.0) * S                           # [B,S,N]
  kf = fm.elu_plus_one(kr) * alpha[..., None]
  vr = jnp.repeat(v, N // K, axis=2)
  o = linear_contract("rank_augmented_linear_attention", fm.elu_plus_one(q), kf, vr,
                      causal=causal, segment_ids=segment_ids, q_offset=0, kv_lengths=kv_lengths,
                      implementation=implementation, normalize=True)
  return (o.astype(_F32) * vr.astype(_F32)).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# #96 Latte.

LATTE_LATENTS = 16


def latte_attention(q, k, v, *, query_latents, key_latents, causal=True, segment_ids=None,
                    q_offset=0, kv_lengths=None, scale=None, implementation=None,
                    initial_state=None, return_final_state=False):
  """Latte: attention factored through L latent states, linear in T.

  `o_t = Σ_l p(l|t) Σ_{s≤t} p(s|l,t) v_s` with `p(l|t) = softmax_l(q_t W_q)` and
  `p(s|l,t) = exp(k_s·w_l) / Σ_{s'≤t} exp(k_{s'}·w_l)` (`W_q = query_latents [N, H, L]`,
  `W_k = key_latents [K, H, L]`). The inner sums are L normalized linear-attention heads with
  one-dimensional features, so decoding keeps `L · (h + 1)` numbers per head (`initial_state`
  needs `return_final_state=True`). Key logits are clipped at 60 (exp stays finite in float32).
  The paper's logits have no `scale` (the latents learn theirs): a `scale` other than None is an
  error. Dolga et al., "Latent Attention for Linear Time Transformers", arXiv:2402.17512.
  """
  if scale is not None:
    raise ValueError(f"latte_attention: the paper has no `scale` (the latent projections learn "
                     f"the logits' magnitude); got scale={scale}")
  B, T, N, H = q.shape
  S, K, h = k.shape[1], k.shape[2], v.shape[-1]
  L = query_latents.shape[-1]
  p_lt = jax.nn.softmax(jnp.einsum("btnf,nfl->btnl", q.astype(_F32), query_latents), axis=-1)
  k_logit = jnp.minimum(jnp.einsum("bskf,kfl->bskl", k.astype(_F32), key_latents), 60.0)
  kf = jnp.exp(k_logit).reshape(B, S, K * L, 1)
  vl = jnp.broadcast_to(v.astype(_F32)[:, :, :, None], (B, S, K, L, h)).reshape(B, S, K * L, h)
  # Heads ordered (kv head, query group, latent) so GQA groups share their kv head's latents.
  ones = jnp.ones((B, T, N * L, 1), _F32)
  kf = jnp.repeat(kf.reshape(B, S, K, 1, L, 1), N // K, 3).reshape(B, S, N * L, 1)
  vl = jnp.repeat(vl.reshape(B, S, K, 1, L, h), N // K, 3).reshape(B, S, N * L, h)
  result = linear_contract("latte_attention", ones, kf, vl, causal=causal, segment_ids=segment_ids,
                           q_offset=q_offset, kv_lengths=kv_lengths, implementation=implementation,
                           normalize=True, scale=1.0, initial_state=initial_state,
                           return_final_state=return_final_state)
  mix = lambda per_latent: jnp.einsum(
      "btnl,btnlh->btnh", p_lt, per_latent.astype(_F32).reshape(B, T, N, L, h)).astype(q.dtype)
  return _map_output(result, mix)


def _latte_latent_count(kwargs):
  """L, from the latents passed (the layer creates LATTE_LATENTS of them)."""
  latents = kwargs.get("query_latents")
  return LATTE_LATENTS if latents is None else np.shape(latents)[-1]


def _example_array(seed, shape, stddev=1.0):
  """Gaussian numpy array for a registry example (numpy: no JAX computation at import time)."""
  return (stddev * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _normal(stddev):
  return jax.nn.initializers.normal(stddev)


def _state_floats(features=lambda H: H, extra=1):
  """`state_size` of a recurrence with `features(H)` features per head and `h + extra` value
  columns (extra = 1 for a normalizer row)."""
  return lambda T, N, K, H, h, kwargs: N * features(H) * (h + extra)


_UNNORMALIZED = _state_floats(extra=0)
_TAYLOR = _state_floats(lambda H: 1 + H + H * H)

_FAVOR_PARAMS = (ParamSpec("projection", _favor_projection_shape, orthogonal_features_init,
                           trainable=False),)

register(Mechanism(
    name="cosine_linear_attention", fn=cosine_linear_attention, family="linear", seeds=(33,),
    paper="Cottention: Linear Transformers With Cosine Attention", arxiv="2409.18747",
    recurrent=True, complexity="O(T·H·h)", implementations=_IMPLS,
    params=(ParamSpec("length_exponent", lambda N, K, H: (N,), jax.nn.initializers.zeros),),
    example=dict(length_exponent=np.linspace(-1.0, 1.0, 4, dtype=np.float32)),
    state_size=_UNNORMALIZED))
register(Mechanism(
    name="efficient_attention", fn=efficient_attention, family="linear", seeds=(70,),
    paper="Efficient Attention: Attention with Linear Complexities", arxiv="1812.01243",
    patterns=frozenset({"self", "cross"}), decode=False, complexity="O((T+S)·H·h)",
    implementations=_NONCAUSAL_IMPLS))
register(Mechanism(
    name="lightning_attention_2", fn=lightning_attention_2, family="linear", seeds=(79,),
    paper="Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large "
          "Language Models", arxiv="2401.04658",
    recurrent=True, complexity="O(T·C·H + T·H·h)", implementations=_IMPLS,
    example=dict(chunk_size=8), state_size=_UNNORMALIZED))
register(Mechanism(
    name="favor_plus_attention", fn=favor_plus_attention, family="linear", seeds=(152,),
    paper="Rethinking Attention with Performers", arxiv="2009.14794", recurrent=True,
    complexity="O(T·m·h)", implementations=_IMPLS, params=_FAVOR_PARAMS,
    # The draw the layer makes (orthogonal, chi norms), at the conformance sizes.
    example=lambda: example_params(_FAVOR_PARAMS), state_size=_favor_state_floats))
register(Mechanism(
    name="linear_lognormal_attention", fn=linear_lognormal_attention, family="linear", seeds=(98,),
    paper="Linear Log-Normal Attention with Unbiased Concentration", arxiv="2311.13541",
    patterns=frozenset({"self", "cross"}), decode=False, complexity="O(T·H·h)",
    implementations=_NONCAUSAL_IMPLS,
    # A fixed α = β (a layer's running estimate): the estimated ones are per-example statistics
    # that a row's packed documents share, so only a fixed one makes packed equal separate.
    example=dict(alpha=np.asarray([0.4, 0.6, 0.8, 1.0], np.float32))))
register(Mechanism(
    name="taylor_shift_attention", fn=taylor_shift_attention, family="linear", seeds=(177,),
    paper="TaylorShift: Shifting the Complexity of Self-Attention from Squared to Linear (and "
          "Back) using Taylor-Softmax", arxiv="2403.02920", recurrent=True,
    complexity="O(T·H²·h)", implementations=_IMPLS, example=dict(form="linear"),
    state_size=_TAYLOR))
register(Mechanism(
    name="fastmax_attention", fn=fastmax_attention, family="linear", seeds=(87,),
    paper="FAST: Factorizable Attention for Speeding up Transformers", arxiv="2402.07901",
    recurrent=True, complexity="O(T·H²·h)", implementations=_IMPLS, state_size=_TAYLOR))
register(Mechanism(
    name="refined_gated_linear_attention", fn=refined_gated_linear_attention, family="linear",
    seeds=(234,), paper="ReGLA: Refining Gated Linear Attention", arxiv="2502.01578",
    recurrent=True, complexity="O(T·C·H + T·H·h)", implementations=_IMPLS,
    params=(ParamSpec("gate_kernel", lambda N, K, H: (N, H, H), _normal(0.02)),
            ParamSpec("gate_bias", lambda N, K, H: (N, H), jax.nn.initializers.constant(3.0)),
            ParamSpec("refine_kernel", lambda N, K, H: (N, H, H), _normal(0.02)),
            ParamSpec("refine_bias", lambda N, K, H: (N, H), jax.nn.initializers.zeros)),
    example=dict(gate_kernel=_example_array(1, (4, 8, 8), 0.3),
                 gate_bias=np.ones((4, 8), np.float32),
                 refine_kernel=_example_array(2, (4, 8, 8), 0.3),
                 refine_bias=np.zeros((4, 8), np.float32)),
    state_size=_UNNORMALIZED))
register(Mechanism(
    name="rank_augmented_linear_attention", fn=rank_augmented_linear_attention, family="linear",
    seeds=(93,), paper="Breaking the Low-Rank Dilemma of Linear Attention", arxiv="2411.07635",
    patterns=frozenset({"self"}), decode=False, packed=False, complexity="O(T·H·h)",
    implementations=_NONCAUSAL_IMPLS))
register(Mechanism(
    name="latte_attention", fn=latte_attention, family="linear", seeds=(96,),
    paper="Latent Attention for Linear Time Transformers", arxiv="2402.17512",
    recurrent=True, complexity="O(T·L·h)", implementations=_IMPLS,
    params=(ParamSpec("query_latents", lambda N, K, H: (N, H, LATTE_LATENTS), _normal(0.02)),
            ParamSpec("key_latents", lambda N, K, H: (K, H, LATTE_LATENTS), _normal(0.02))),
    example=dict(query_latents=_example_array(3, (4, 8, 5), 0.5),
                 key_latents=_example_array(4, (2, 8, 5), 0.5)),
    state_size=lambda T, N, K, H, h, kwargs: N * _latte_latent_count(kwargs) * (h + 1)))
