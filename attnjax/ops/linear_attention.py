"""Linear attention mechanisms: feature maps, gates and normalizations on `gated_linear_attention`.

Each mechanism maps q and k through its feature map φ, builds its gate, and hands the rest to the
primitive (`attnjax.core.linear`). `linear_contract` adapts the primitive to the common call
contract: full sequences use the chunked / parallel / scan forms; queries at an offset over a KV cache
use `gated_linear_attention_cached` (equal to the matching rows of the full forward).
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
from attnjax.registry import Mechanism, ParamSpec, register

_F32 = jnp.float32
_IMPLS = ("xla", "parallel", "reference")


def _is_full_sequence(T, S, q_offset):
  return T == S and isinstance(q_offset, int) and q_offset == 0


def linear_contract(op, qf, kf, v, *, causal, segment_ids, q_offset, kv_lengths, implementation,
                    log_decay=None, normalize=False, scale=1.0, chunk_size=64, initial_state=None,
                    return_final_state=False):
  """Runs gated linear attention on feature-mapped `qf [B,T,N,F]`, `kf [B,S,K,F]` under the contract.

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


def _recurrent_contract(op, qf, kf, v, *, causal, segment_ids, kv_lengths, implementation,
                        log_decay, normalize, scale, chunk_size, initial_state):
  if not causal:
    raise ValueError(f"{op}: recurrent decoding (`return_final_state`) is for causal attention")
  if segment_ids is not None:
    raise ValueError(f"{op}: recurrent decoding carries one sequence per batch row; "
                     "`segment_ids` are not supported there")
  if qf.shape[1] != kf.shape[1]:
    raise ValueError(f"{op}: recurrent decoding takes the new tokens only: q and k must have the "
                     f"same length, got T={qf.shape[1]}, S={kf.shape[1]}")
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
    if pair is not None and T != S:
      # Documents across two sequences: the masked quadratic form (no positions needed).
      big = jnp.full((B,), S)
      return linear.gated_linear_attention_cached(
          qf, kf, v, q_offset=big, kv_lengths=kv_lengths, normalize=normalize, scale=scale,
          segment_ids=pair)
    return linear.gated_linear_attention(
        qf, kf, v, causal=False, normalize=normalize, scale=scale, segment_ids=segment_ids,
        kv_lengths=kv_lengths, chunk_size=chunk_size, implementation=implementation)
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
  `σ = sigmoid(length_exponent)` a learned per-head exponent `[N]` (default σ = 1/2). The causal form
  is the RNN `S_t = S_{t-1} + k̂_t v_tᵀ`, `o_t = q̂_t S_t / t^σ`. `scale` is unused (cosine
  similarities need none). Recurrent decoding carries `S_t` (`[B,N,H,h]`); the count comes from
  `q_offset`. Mongaras et al., "Cottention: Linear Transformers With Cosine Attention",
  arXiv:2409.18747.
  """
  del scale
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
                        scale=None, implementation=None):
  """Efficient attention `E = ρ_q(Q) (ρ_k(K)ᵀ V)`: softmax of each query over its features and of
  each key feature over positions, multiplied right to left in O(T·F·h).

  Non-causal (the key softmax runs over the whole sequence). `scale` multiplies q and k before the
  softmaxes (default `H ** -0.25` each, the dot-product scaling split in two). Shen et al.,
  "Efficient Attention: Attention with Linear Complexities", arXiv:1812.01243.
  """
  del q_offset
  H = q.shape[-1]
  s = (H ** -0.5 if scale is None else scale) ** 0.5
  if isinstance(segment_ids, (tuple, list)):
    raise ValueError("efficient_attention: segment_ids must be one [B,T] array (self-attention)")
  qf = fm.softmax_features(q.astype(_F32) * s)
  kf = _segment_softmax_over_positions(k.astype(_F32) * s, segment_ids, kv_lengths)
  return linear_contract("efficient_attention", qf, kf, v, causal=causal, segment_ids=segment_ids,
                         q_offset=0, kv_lengths=kv_lengths, implementation=implementation)


# ---------------------------------------------------------------------------------------------
# #79 Lightning Attention-2.

def lightning_decay_rates(num_heads: int):
  """Per-head decay rates `λ_n = exp(-2^{-8(n+1)/N})` (TransNormerLLM / RetNet geometric rates)."""
  return -masks.alibi_slopes(num_heads)


def lightning_attention_2(q, k, v, *, causal=True, segment_ids=None, q_offset=0, kv_lengths=None,
                          scale=None, implementation=None, log_decay_rates=None, chunk_size=64,
                          initial_state=None, return_final_state=False):
  """Lightning Attention-2: causal linear attention `o_t = q_t Σ_{s≤t} λ^{t-s} k_s v_sᵀ`, tiled.

  Intra-block `((Q_i K_iᵀ) ⊙ M) V_i` plus inter-block `Q_i KV` with `KV ← λ^C KV + K_iᵀ V_i`
  (the primitive's "xla" form). `log_decay_rates [N]` (≤ 0; default `lightning_decay_rates`; 0 means
  no decay). Non-causal: `Q (Kᵀ V)` without decay. Qin et al., "Lightning Attention-2: A Free Lunch
  for Handling Unlimited Sequence Lengths in Large Language Models", arXiv:2401.04658.
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

  `φ(x) = exp(W x - ‖x‖²/2)/√m`, `W = projection [m, H]` (draw it with
  `feature_maps.orthogonal_random_features(key, m, H)`; the layer holds it as a parameter), so
  `E[φ(q)·φ(k)] = exp(scale · q·k)`: an unbiased estimate of softmax attention's kernel. q and k are
  each scaled by `√scale`. Query rows are stabilized by their own max (cancels in D⁻¹); non-causal keys
  by one global max. Choromanski et al., "Rethinking Attention with Performers", arXiv:2009.14794.
  """
  H = q.shape[-1]
  r = (H ** -0.5 if scale is None else scale) ** 0.5
  qs, ks = q.astype(_F32) * r, _zero_padded(k, kv_lengths) * r
  w = jnp.asarray(projection, _F32)
  q_logits = jnp.einsum("...f,mf->...m", qs, w)
  qf = fm.favor_plus(qs, w, stabilizer=jnp.max(q_logits, axis=-1, keepdims=True))
  key_stab = None
  if not causal:
    k_logits = jnp.einsum("...f,mf->...m", ks, w) - 0.5 * jnp.sum(ks * ks, -1, keepdims=True)
    key_stab = jnp.max(k_logits, axis=(1, 2, 3), keepdims=True)[:, :, :, :1]
  kf = fm.favor_plus(ks, w, stabilizer=key_stab)
  return linear_contract("favor_plus_attention", qf, kf, v, causal=causal, segment_ids=segment_ids,
                         q_offset=q_offset, kv_lengths=kv_lengths, implementation=implementation,
                         normalize=True, initial_state=initial_state,
                         return_final_state=return_final_state)


def _favor_projection_shape(N, K, H):
  del N, K
  return (4 * H, H)


def _favor_init(key, shape, dtype=_F32):
  return orthogonal_features_init(key, shape, dtype)


def orthogonal_features_init(key, shape, dtype=_F32):
  """Initializer drawing `[m, H]` orthogonal random features (Performer)."""
  return fm.orthogonal_random_features(key, shape[0], shape[1]).astype(dtype)


# ---------------------------------------------------------------------------------------------
# #98 Linear Log-Normal attention.

def _strided_sample(x, n):
  """Up to n evenly spaced positions of `x [B,T,...]` (all of them when T <= n), batch folded in."""
  T = x.shape[1]
  idx = jnp.linspace(0, T - 1, min(n, T)).astype(jnp.int32)
  x = jnp.take(x, idx, axis=1)
  return x.reshape((-1,) + x.shape[2:])                                     # [B·n, N, H]


def lognormal_alpha(q, k, *, scale, num_samples: int = 64, steps: int = 40):
  """Moment-matched `α = β` of Linear Log-Normal Attention, per head `[N]` (no gradient).

  Softmax weights of a query are log-normal with log-variance `σ²_sm = Var_j(scale · q·k_j)`; the
  LLN weight `Σ_f exp(α q_f) exp(α k_{j,f})` is a sum of log-normals whose log-variance grows with α.
  α is the root of `Var_j log Σ_f exp(α (q_f + k_{j,f})) = σ²_sm`, both sides averaged over queries,
  found by bisection on up to `num_samples` evenly spaced queries and keys per sequence (closed-form
  approximations of log-normal sums, such as Fenton–Wilkinson, miss it by 2-5x at typical spreads).
  """
  N, K = q.shape[2], k.shape[2]
  qs = _strided_sample(q.astype(_F32), num_samples)                        # [Mq, N, H]
  ks = jnp.repeat(_strided_sample(k.astype(_F32), num_samples), N // K, axis=1)   # [Mk, N, H]
  logits = scale * jnp.einsum("inf,jnf->nij", qs, ks)
  target = jnp.mean(jnp.var(logits, axis=-1), axis=-1)                      # [N]

  def lln_log_var(a):                                                       # a: [N]
    x = a[:, None, None, None] * (jnp.swapaxes(qs, 0, 1)[:, :, None] + jnp.swapaxes(ks, 0, 1)[:, None])
    return jnp.mean(jnp.var(jax.nn.logsumexp(x, axis=-1), axis=-1), axis=-1)

  spread = jnp.sqrt(jnp.maximum(jnp.var(qs, axis=(0, 2)) + jnp.var(ks, axis=(0, 2)), 1e-12))
  lo, hi = jnp.zeros((N,), _F32), 20.0 / spread                             # log-var(hi) ≫ any target

  def bisect(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    below = lln_log_var(mid) < target
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(0, steps, bisect, (lo, hi))
  return jax.lax.stop_gradient(0.5 * (lo + hi))


def linear_lognormal_attention(q, k, v, *, causal=False, segment_ids=None, q_offset=0,
                               kv_lengths=None, scale=None, implementation=None, alpha=None):
  """Linear Log-Normal attention: `D⁻¹ φ(Q)(φ(K)ᵀ V)`, `φ_q = exp(α q)`, `φ_k = exp(β k)`, α = β.

  α is moment-matched to softmax attention's log-normal weight distribution from the q and k given
  (`lognormal_alpha`: a statistic of the whole batch, like batch norm's, so packing or padding
  changes it; non-causal only, since statistics over all positions would leak the future into a
  causal model), or passed as `alpha [N]` (e.g. a running estimate kept by the layer). Rows are stabilized by their max
  (constants that cancel in D⁻¹). Nahshan et al., "Linear Log-Normal Attention with Unbiased
  Concentration", arXiv:2311.13541.
  """
  H, N, K = q.shape[-1], q.shape[2], k.shape[2]
  sc = H ** -0.5 if scale is None else scale
  k = _zero_padded(k, kv_lengths)
  a = lognormal_alpha(q, k, scale=sc) if alpha is None else jnp.asarray(alpha, _F32)
  a_q = a[:, None]
  a_k = a.reshape(K, N // K)[:, 0][:, None]
  ql, kl = a_q * q.astype(_F32), a_k * k.astype(_F32)
  qf = jnp.exp(ql - jax.lax.stop_gradient(jnp.max(ql, axis=-1, keepdims=True)))
  kf = jnp.exp(kl - jax.lax.stop_gradient(jnp.max(kl, axis=(1, 3), keepdims=True)))
  return linear_contract("linear_lognormal_attention", qf, kf, v, causal=causal,
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
  uses the linear form (its state is `[B,N,1+H+H²,h+1]`). Nauen et al., "TaylorShift:
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
  weights are never materialized. Gerami et al., "FAST: Factorizable Attention for Speeding up
  Transformers", arXiv:2402.07901.
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
  gives no layer input). Kernels `[N, H, H]`, biases `[N, H]`. Lu et al., "ReGLA: Refining Gated
  Linear Attention", arXiv:2502.01578.
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
  `z = Σ_j α_j S φ(k_j)`; `o_i = (φ(q_i) KV / φ(q_i) z) ⊙ v_i`, φ = elu + 1. Plain linear attention's
  output has rank ≤ F; the element-wise product with the token's own projection (here its value
  vector, the contract's projection of x_i) raises it. Non-causal self-attention (the global query
  sees all tokens). Fan et al., "Breaking the Low-Rank Dilemma of Linear Attention",
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
  one-dimensional features, so decoding keeps `L · (h + 1)` numbers per head. Key logits are clipped
  at 60 (exp stays finite in float32). Dolga et al., "Latent Attention for Linear Time
  Transformers", arXiv:2402.17512.
  """
  del scale
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
    implementations=_IMPLS))
register(Mechanism(
    name="lightning_attention_2", fn=lightning_attention_2, family="linear", seeds=(79,),
    paper="Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large "
          "Language Models", arxiv="2401.04658",
    recurrent=True, complexity="O(T·C·H + T·H·h)", implementations=_IMPLS,
    example=dict(chunk_size=8), state_size=_UNNORMALIZED))
register(Mechanism(
    name="favor_plus_attention", fn=favor_plus_attention, family="linear", seeds=(152,),
    paper="Rethinking Attention with Performers", arxiv="2009.14794", recurrent=True,
    complexity="O(T·m·h)", implementations=_IMPLS,
    params=(ParamSpec("projection", _favor_projection_shape, _favor_init),),
    example=dict(projection=_example_array(7, (32, 8))),
    state_size=_state_floats(lambda H: 4 * H)))
register(Mechanism(
    name="linear_lognormal_attention", fn=linear_lognormal_attention, family="linear", seeds=(98,),
    paper="Linear Log-Normal Attention with Unbiased Concentration", arxiv="2311.13541",
    patterns=frozenset({"self", "cross"}), decode=False, complexity="O(T·H·h)",
    implementations=_IMPLS,
    # A fixed α, as at evaluation time: the estimated one is a batch statistic (see the docstring).
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
    implementations=_IMPLS))
register(Mechanism(
    name="latte_attention", fn=latte_attention, family="linear", seeds=(96,),
    paper="Latent Attention for Linear Time Transformers", arxiv="2402.17512",
    recurrent=True, complexity="O(T·L·h)", implementations=_IMPLS,
    params=(ParamSpec("query_latents", lambda N, K, H: (N, H, LATTE_LATENTS), _normal(0.02)),
            ParamSpec("key_latents", lambda N, K, H: (K, H, LATTE_LATENTS), _normal(0.02))),
    example=dict(query_latents=_example_array(3, (4, 8, 5), 0.5),
                 key_latents=_example_array(4, (2, 8, 5), 0.5)),
    state_size=lambda T, N, K, H, h, kwargs: N * _latte_latent_count(kwargs) * (h + 1)))
