"""Gated linear attention: the linear-recurrence primitive, in recurrent, parallel and chunked forms.

    S_t = G_t ⊙ S_{t-1} + k_t v_tᵀ          S_t: [H, h] per head, G_t = exp(log_decay_t)
    o_t = (scale · q_t) S_t                  optionally / ((scale · q_t) · z_t),  z_t = G_t ⊙ z_{t-1} + k_t

`q`, `k` are the feature-mapped queries and keys (apply a map from `attnjax.core.feature_maps` first;
their width F need not equal the model's head dim). The gate acts on the key dimension: `log_decay`
is None (G = 1), one value per head and step `[B,T,N]` (RetNet / Lightning / Mamba-2 style) or one per
key dimension `[B,T,N,F]` (GLA style), given in log space so long products stay stable.

Forms (`implementation=`), all equal up to float rounding:
  "xla"       chunked (Lightning Attention-2 tiling, arXiv:2401.04658): within a chunk of C steps the
              quadratic form with the decay mask, across chunks the state recurrence
              `S_c = A_c ⊙ S_{c-1} + U_c` run as an associative scan. Every intermediate is O(T·C) or
              O(T/C · F·h), so memory is linear in T in the forward and in autodiff's backward.
  "parallel"  the quadratic form `o = ((Q Kᵀ) ⊙ D) V` with `D_ts = exp(Λ_t - Λ_s)` for s ≤ t
              (short sequences).
  "reference" a `lax.scan` over steps, float32, the definition above.
`gated_linear_attention_step` advances a state by one token (decoding).

Non-causal form (encoders, cross-attention): `o = Q (Kᵀ V)` (and `/ (Q Σ_s k_s)`), no decay.

Packed sequences: `segment_ids` `[B,T]` mark contiguous documents; the state resets where the id
changes. Padding: `kv_lengths` `[B]`; positions at or past the length contribute nothing and their gate
is neutral (G = 1), so the state at the end equals the state after the last real token.

The state with `normalize=True` carries z as one extra value column: `[B, N, F, h + 1]`.
All statistics are float32; outputs come back in the input dtype.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import implementations

_F32 = jnp.float32


# ---------------------------------------------------------------------------------------------
# Input handling.

def _check(q, k, v, log_decay, initial_state, segment_ids, kv_lengths, normalize, causal):
  op = "gated_linear_attention"
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{op}: q, k, v must be [B,T,N,F], [B,S,K,F], [B,S,K,h]; got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  B, T, N, F = q.shape
  _, S, K, h = v.shape
  if k.shape != (B, S, K, F):
    raise ValueError(f"{op}: k must have shape [B,S,K,F] = {(B, S, K, F)} (from q and v), "
                     f"got {k.shape}")
  if N % K:
    raise ValueError(f"{op}: query heads N={N} must be a multiple of key/value heads K={K}")
  if causal and T != S:
    raise ValueError(f"{op}: causal attention needs T == S (got T={T}, S={S}); decode one step "
                     "with gated_linear_attention_step")
  if log_decay is not None:
    if not causal:
      raise ValueError(f"{op}: `log_decay` is defined for the causal recurrence only")
    if log_decay.shape not in ((B, S, N), (B, S, N, F)):
      raise ValueError(f"{op}: `log_decay` must have shape [B,T,N] = {(B, S, N)} or [B,T,N,F] = "
                       f"{(B, S, N, F)}, got {log_decay.shape}")
  if initial_state is not None:
    if not causal:
      raise ValueError(f"{op}: `initial_state` is for the causal recurrence only")
    want = (B, N, F, h + int(normalize))
    if initial_state.shape != want:
      raise ValueError(f"{op}: `initial_state` must have shape [B,N,F,h{'+1' * normalize}] = "
                       f"{want}, got {initial_state.shape}")
  if segment_ids is not None and jnp.shape(segment_ids) != (B, S):
    raise ValueError(f"{op}: `segment_ids` must have shape [B,T] = {(B, S)}, "
                     f"got {jnp.shape(segment_ids)}")
  if kv_lengths is not None and jnp.shape(kv_lengths) != (B,):
    raise ValueError(f"{op}: `kv_lengths` must have shape [B] = {(B,)}, "
                     f"got {jnp.shape(kv_lengths)}")
  return B, T, S, N, K, F, h


def run_index(segment_ids):
  """`[B,T]` ids -> non-decreasing run numbers that change exactly where the id changes."""
  change = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], dtype=jnp.int32),
                            (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)], 1)
  return jnp.cumsum(change, axis=1)


def _to_heads(x, N):
  """[B,T,K,X] -> [B,N,T,X] float32, repeating K/V heads for GQA."""
  K = x.shape[2]
  x = jnp.swapaxes(x.astype(_F32), 1, 2)
  return jnp.repeat(x, N // K, axis=1) if K != N else x


# ---------------------------------------------------------------------------------------------
# The three causal forms. Inputs in [B,N,T,*] float32: q, k [.., F]; v [.., hv]; g (log decay)
# [.., 1 or F]; run [B,T] int or None; state0 [B,N,F,hv] or None. Return (o [B,N,T,hv], S_T).

def _neutral_gate(q, g):
  return jnp.zeros(q.shape[:3] + (1,), _F32) if g is None else g


def _causal_recurrent(q, k, v, g, run, state0):
  B, N, T, F = q.shape
  hv = v.shape[-1]
  g = _neutral_gate(q, g)
  S0 = jnp.zeros((B, N, F, hv), _F32) if state0 is None else state0
  reset = (jnp.zeros((B, T), bool) if run is None else
           jnp.concatenate([jnp.zeros((B, 1), bool), run[:, 1:] != run[:, :-1]], 1))

  def step(S, x):
    q_t, k_t, v_t, g_t, reset_t = x
    S = jnp.where(reset_t[:, None, None, None], 0.0, jnp.exp(g_t)[..., None] * S)
    S = S + k_t[..., :, None] * v_t[..., None, :]
    return S, jnp.einsum("bnf,bnfh->bnh", q_t, S)

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, g)) + (reset.T,)
  S, o = jax.lax.scan(step, S0, xs)
  return jnp.moveaxis(o, 0, 2), S


def _decay_weights(L_q, L_k, visible):
  """exp(L_q[t] - L_k[s]) where visible (exponent ≤ 0 there), 0 elsewhere.

  L_q: [.., T, G], L_k: [.., S, G] -> [.., T, S, G]. The exponent is masked before exp so hidden
  pairs (whose exponent may be large and positive) never overflow, in the forward or the gradient.
  """
  diff = L_q[..., :, None, :] - L_k[..., None, :, :]
  return jnp.exp(jnp.where(visible[..., None], diff, -jnp.inf))


def _masked_scores(q, k, L_q, L_k, visible):
  """Σ_f q_tf k_sf exp(L_q[t,f] - L_k[s,f]) over visible (t, s) pairs: [.., T, S]."""
  if L_q.shape[-1] == 1:   # one gate per head: the decay factors out of the dot product
    scores = jnp.einsum("...tf,...sf->...ts", q, k)
    return jnp.where(visible, scores, 0.0) * _decay_weights(L_q, L_k, visible)[..., 0]
  return jnp.einsum("...tf,...sf,...tsf->...ts", q, k, _decay_weights(L_q, L_k, visible))


def _causal_parallel(q, k, v, g, run, state0):
  B, N, T, F = q.shape
  L = jnp.cumsum(_neutral_gate(q, g), axis=2)                                    # Λ_t = Σ_{r≤t} log G_r
  visible = jnp.tril(jnp.ones((T, T), bool))[None]
  if run is not None:
    visible = visible & (run[:, :, None] == run[:, None, :])
  scores = _masked_scores(q, k, L, L, visible[:, None])
  o = jnp.einsum("bnts,bnsh->bnth", scores, v)
  last_run = None if run is None else run[:, -1:]
  keep_last = jnp.ones((B, T), bool) if run is None else run == last_run
  S = jnp.einsum("bnsf,bnsh->bnfh", k * jnp.exp(jnp.where(keep_last[:, None, :, None],
                                                          L[:, :, -1:] - L, -jnp.inf)), v)
  if state0 is not None:
    first = jnp.ones((B, T), bool) if run is None else run == run[:, :1]
    o = o + jnp.einsum("bntf,bnfh->bnth",
                       q * jnp.exp(L) * first[:, None, :, None], state0)
    S = S + jnp.exp(L[:, :, -1])[..., None] * state0 * first[:, -1][:, None, None, None]
  return o, S


def _scan_chunk_states(A, U, run_break):
  """Prefix of `S_c = A_c ⊙ S_{c-1} + U_c` over chunks (axis 2), from S_{-1} = 0.

  A: [B,N,nc,G,1] (G = 1 or F), U: [B,N,nc,F,hv]. Returns (states after each chunk, cumulative A).
  """
  if A is None and not run_break:
    return jnp.cumsum(U, axis=2), None

  def combine(earlier, later):
    a1, u1 = earlier
    a2, u2 = later
    return a1 * a2, a2 * u1 + u2

  Acum, states = jax.lax.associative_scan(combine, (A, U), axis=2)
  return states, Acum


def _causal_chunked(q, k, v, g, run, state0, *, chunk_size):
  B, N, T, F = q.shape
  hv = v.shape[-1]
  C = min(chunk_size, T)
  if g is not None and g.shape[-1] > 1:
    # A per-dimension gate makes intra-chunk weights [C, C, F]: keep chunks small so that tensor
    # stays ~T·16·F, the size of the inputs times 16.
    C = min(C, 16)
  nc = -(-T // C)
  pad = nc * C - T
  if pad:
    # Padded steps: zero keys and values, neutral gate, same run as the last step -> state unchanged.
    pad4 = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
    q, k, v = pad4(q), pad4(k), pad4(v)
    g = None if g is None else pad4(g)
    run = None if run is None else jnp.pad(run, ((0, 0), (0, pad)), mode="edge")
  chunks = lambda x: x.reshape(x.shape[:2] + (nc, C) + x.shape[3:])
  qc, kc, vc = chunks(q), chunks(k), chunks(v)
  L = jnp.zeros((B, N, nc, C, 1), _F32) if g is None else jnp.cumsum(chunks(g), axis=3)
  runc = None if run is None else run.reshape(B, nc, C)
  # run of the step before each chunk (the run the carried state belongs to)
  prev_run = None if run is None else jnp.concatenate([run[:, :1], runc[:, :-1, -1]], 1)

  # Intra-chunk: causal quadratic form with local cumulative decays (all exponents ≤ 0).
  visible = jnp.tril(jnp.ones((C, C), bool))
  if runc is not None:
    visible = visible & (runc[..., :, None] == runc[..., None, :])   # [B, nc, C, C]
    visible = visible[:, None]
  if g is None:
    # where, not multiply: a hidden (future) key may hold inf, and inf * 0 is NaN.
    scores = jnp.where(visible, jnp.einsum("bnctf,bncsf->bncts", qc, kc), 0.0)
  else:
    scores = _masked_scores(qc, kc, L, L, visible)
  o = jnp.einsum("bncts,bncsh->bncth", scores, vc)

  # Chunk summaries: U_c = Σ_s exp(L_end - L_s) k_s v_sᵀ over the chunk's last run; A_c the decay.
  L_end = L[:, :, :, -1:, :]                                          # [B,N,nc,1,G]
  if g is None and runc is None:
    kd = kc
  else:
    keep = jnp.ones((B, nc, C), bool) if runc is None else runc == runc[..., -1:]
    kd = kc * jnp.exp(jnp.where(keep[:, None, ..., None], L_end - L, -jnp.inf))
  U = jnp.einsum("bncsf,bncsh->bncfh", kd, vc)
  A = None
  if g is not None or runc is not None:
    A = jnp.exp(L_end[:, :, :, 0, :])[..., None]                      # [B,N,nc,G,1]
    if runc is not None:
      A = A * (runc[:, :, -1] == prev_run)[:, None, :, None, None]
  after, Acum = _scan_chunk_states(A, U, runc is not None)
  if state0 is not None:
    after = after + (1.0 if Acum is None else Acum) * state0[:, :, None]
  before = jnp.concatenate([jnp.zeros_like(after[:, :, :1]) if state0 is None else
                            state0[:, :, None], after[:, :, :-1]], axis=2)

  # Inter-chunk: each query reads the state carried into its chunk, decayed to its step.
  qd = qc if g is None else qc * jnp.exp(L)
  if runc is not None:
    qd = qd * (runc == prev_run[..., None])[:, None, ..., None]
  o = o + jnp.einsum("bnctf,bncfh->bncth", qd, before)
  o = o.reshape(B, N, nc * C, hv)[:, :, :T]
  return o, after[:, :, -1]


def _causal_impls(chunk_size):
  return (("xla", functools.partial(_causal_chunked, chunk_size=chunk_size), ()),
          ("parallel", _causal_parallel, ()),
          ("reference", _causal_recurrent, ()))


# ---------------------------------------------------------------------------------------------
# Non-causal form.

def _noncausal(q, k, v, run_q, run_k, *, implementation, chunk_size):
  if run_q is None:
    return jnp.einsum("bntf,bnfh->bnth", q, jnp.einsum("bnsf,bnsh->bnfh", k, v))
  if implementation in ("reference", "parallel"):
    visible = (run_q[:, :, None] == run_k[:, None, :])[:, None]
    return jnp.einsum("bnts,bnsh->bnth", jnp.einsum("bntf,bnsf->bnts", q, k) * visible, v)
  # Within each document: the causal sum plus the reversed causal sum, minus the diagonal counted
  # twice. Linear in T, unlike the masked quadratic form.
  fwd, _ = _causal_chunked(q, k, v, None, run_q, None, chunk_size=chunk_size)
  flip = lambda x: jnp.flip(x, axis=2)
  bwd, _ = _causal_chunked(flip(q), flip(k), flip(v), None, jnp.flip(run_q, 1), None,
                           chunk_size=chunk_size)
  diag = jnp.sum(q * k, axis=-1, keepdims=True) * v
  return fwd + flip(bwd) - diag


# ---------------------------------------------------------------------------------------------
# Public API.

def gated_linear_attention(q, k, v, *, log_decay=None, normalize: bool = False, causal: bool = True,
                           scale: Optional[float] = None, initial_state=None,
                           return_final_state: bool = False, segment_ids=None, kv_lengths=None,
                           chunk_size: int = 64, implementation: Optional[str] = None):
  """Gated linear attention `o_t = q_t S_t`, `S_t = G_t ⊙ S_{t-1} + k_t v_tᵀ` (see module docstring).

  Args:
    q: `[B,T,N,F]` feature-mapped queries. k: `[B,S,K,F]` feature-mapped keys. v: `[B,S,K,h]`.
      K divides N (GQA). Causal needs T == S.
    log_decay: None, `[B,T,N]` or `[B,T,N,F]`: log of the gate G_t (≤ 0 for a decay).
    normalize: divide by `q_t · z_t` (linear attention's normalizer); rows with zero normalizer
      give zeros.
    causal: the recurrence (True) or the non-causal `Q (Kᵀ V)` (False).
    scale: multiplies q; default `F ** -0.5`.
    initial_state: `[B,N,F,h]` (`[B,N,F,h+1]` with normalize) state before the first step.
    return_final_state: also return the state after the last step.
    segment_ids: `[B,T]` packed documents; the state resets where the id changes.
    kv_lengths: `[B]`; steps at or past the length leave the state unchanged.
    chunk_size: C of the chunked form.
    implementation: "xla", "parallel" or "reference" (None: the first that serves the input).

  Returns:
    `[B,T,N,h]` in q's dtype, and with `return_final_state` the float32 state `[B,N,F,h(+1)]`.

  Paper: Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive Transformers with Linear
  Attention", arXiv:2006.16236; gates: Yang et al., "Gated Linear Attention Transformers with
  Hardware-Efficient Training", arXiv:2312.06635; tiling: Qin et al., "Lightning Attention-2",
  arXiv:2401.04658.
  """
  B, T, S, N, K, F, h = _check(q, k, v, log_decay, initial_state, segment_ids, kv_lengths,
                               normalize, causal)
  if chunk_size < 1:
    raise ValueError(f"gated_linear_attention: `chunk_size` must be >= 1, got {chunk_size}")
  scale = F ** -0.5 if scale is None else scale
  qh = _to_heads(q, N) * scale
  kh, vh = _to_heads(k, N), _to_heads(v, N)
  if normalize:
    vh = jnp.concatenate([vh, jnp.ones(vh.shape[:-1] + (1,), _F32)], axis=-1)
  g = None
  if log_decay is not None:
    g = jnp.swapaxes(log_decay.astype(_F32), 1, 2)
    g = g[..., None] if g.ndim == 3 else g
  if kv_lengths is not None:
    real = (jnp.arange(S)[None, :] < jnp.asarray(kv_lengths)[:, None])[:, None, :, None]
    # where, not multiply: a padded slot may hold inf/NaN garbage that must not reach the state.
    kh, vh = jnp.where(real, kh, 0.0), jnp.where(real, vh, 0.0)
    g = None if g is None else jnp.where(real, g, 0.0)
  run = None if segment_ids is None else run_index(jnp.asarray(segment_ids))

  if causal:
    state0 = None if initial_state is None else initial_state.astype(_F32)
    o, S_T = implementations.dispatch("gated_linear_attention", _causal_impls(chunk_size),
                                      implementation, qh, kh, vh, g, run, state0)
  else:
    if implementation not in (None, "xla", "parallel", "reference"):
      raise ValueError(f"gated_linear_attention: unknown implementation {implementation!r}")
    o = _noncausal(qh, kh, vh, run, run, implementation=implementation, chunk_size=chunk_size)
    S_T = None
  if normalize:
    o = normalize_output(o)
  o = jnp.swapaxes(o, 1, 2).astype(q.dtype)
  return (o, S_T) if return_final_state else o


def normalize_output(o):
  """`[.., h+1]` (numerator, normalizer) -> `[.., h]`; a zero normalizer gives zeros, not NaN."""
  num, den = o[..., :-1], o[..., -1:]
  safe = jnp.where(den == 0, 1.0, den)
  return jnp.where(den == 0, 0.0, num / safe)


def gated_linear_attention_step(q, k, v, state, *, log_decay=None, normalize: bool = False,
                                scale: Optional[float] = None):
  """One decoding step of `gated_linear_attention`: `S ← G ⊙ S + k vᵀ`, `o = q S`.

  Args:
    q: `[B,N,F]`, k: `[B,K,F]`, v: `[B,K,h]` (the new token). state: `[B,N,F,h(+1)]`.
    log_decay: None, `[B,N]` or `[B,N,F]`.

  Returns:
    (`o [B,N,h]` in q's dtype, the new float32 state).
  """
  B, N, F = q.shape
  h = v.shape[-1]
  want = (B, N, F, h + int(normalize))
  if state.shape != want:
    raise ValueError(f"gated_linear_attention_step: `state` must have shape {want}, "
                     f"got {state.shape}")
  scale = F ** -0.5 if scale is None else scale
  rep = lambda x: jnp.repeat(x.astype(_F32), N // x.shape[1], axis=1)
  kt, vt = rep(k), rep(v)
  if normalize:
    vt = jnp.concatenate([vt, jnp.ones(vt.shape[:-1] + (1,), _F32)], axis=-1)
  S = state.astype(_F32)
  if log_decay is not None:
    gd = log_decay.astype(_F32)
    S = jnp.exp(gd[..., None] if gd.ndim == 3 else gd[..., None, None]) * S
  S = S + kt[..., :, None] * vt[..., None, :]
  o = jnp.einsum("bnf,bnfh->bnh", q.astype(_F32) * scale, S)
  if normalize:
    o = normalize_output(o)
  return o.astype(q.dtype), S


def gated_linear_attention_cached(q, k, v, *, q_offset, kv_lengths=None, log_decay=None,
                                  normalize: bool = False, scale: Optional[float] = None,
                                  segment_ids=None):
  """Causal gated linear attention for queries at absolute positions `q_offset + [0, T)` over a KV
  cache `k, v [B,S,K,*]` (decoding without a recurrent state).

  Equals rows `q_offset .. q_offset + T - 1` of the full causal forward over the cache. Slots at or
  past `kv_lengths` may hold garbage: they are replaced before use. Quadratic in (T, S), meant for
  small T; a model that decodes token by token should carry the state with
  `gated_linear_attention_step` instead.

  Args:
    q: `[B,T,N,F]`; k: `[B,S,K,F]`; v: `[B,S,K,h]` (feature-mapped, as in gated_linear_attention).
    q_offset: int or `[B]`. kv_lengths: `[B]` or None (the whole cache is valid).
    log_decay: None, `[B,S,N]` or `[B,S,N,F]`, the gates of the cached steps.
    segment_ids: None or a pair (`[B,T]`, `[B,S]`) of document ids of queries and cache slots.
  """
  B, T, N, F = q.shape
  S, K = v.shape[1], v.shape[2]
  if k.shape != (B, S, K, F):
    raise ValueError(f"gated_linear_attention_cached: k must have shape {(B, S, K, F)}, "
                     f"got {k.shape}")
  scale = F ** -0.5 if scale is None else scale
  qh = _to_heads(q, N) * scale
  kh, vh = _to_heads(k, N), _to_heads(v, N)
  if normalize:
    vh = jnp.concatenate([vh, jnp.ones(vh.shape[:-1] + (1,), _F32)], axis=-1)
  q_pos = jnp.broadcast_to(jnp.asarray(q_offset), (B,))[:, None] + jnp.arange(T)[None, :]
  s_idx = jnp.arange(S)
  real = jnp.ones((B, S), bool) if kv_lengths is None else s_idx[None] < kv_lengths[:, None]
  kh = jnp.where(real[:, None, :, None], kh, 0.0)
  vh = jnp.where(real[:, None, :, None], vh, 0.0)
  visible = (s_idx[None, None, :] <= q_pos[:, :, None]) & real[:, None, :]
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids
    visible = visible & (q_seg[:, :, None] == kv_seg[:, None, :])
  if log_decay is None:
    L = jnp.zeros((B, N, S, 1), _F32)
  else:
    g = jnp.swapaxes(log_decay.astype(_F32), 1, 2)
    g = g[..., None] if g.ndim == 3 else g
    L = jnp.cumsum(jnp.where(real[:, None, :, None], g, 0.0), axis=2)
  idx = jnp.clip(q_pos, 0, S - 1)[:, None, :, None]
  L_q = jnp.take_along_axis(L, jnp.broadcast_to(idx, (B, N, T, L.shape[-1])), axis=2)
  scores = _masked_scores(qh, kh, L_q, L, visible[:, None])
  o = jnp.einsum("bnts,bnsh->bnth", scores, vh)
  if normalize:
    o = normalize_output(o)
  return jnp.swapaxes(o, 1, 2).astype(q.dtype)


def zero_state(B: int, N: int, F: int, h: int, *, normalize: bool = False):
  """The empty state `[B,N,F,h(+1)]` in float32."""
  return jnp.zeros((B, N, F, h + int(normalize)), _F32)
