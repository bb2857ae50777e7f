"""Gated linear attention: the linear-recurrence primitive, in recurrent, parallel and chunked forms.

    S_t = G_t ⊙ S_{t-1} + k_t v_tᵀ          S_t: [H, h] per head, G_t = exp(log_decay_t)
    o_t = (scale · q_t) S_t            optionally / ((scale · q_t) · z_t),  z_t = G_t ⊙ z_{t-1} + k_t

`q`, `k` are the feature-mapped queries and keys (apply a map from `attnjax.core.feature_maps` first;
their width F need not equal the model's head dim). The gate acts on the key dimension: `log_decay`
is None (G = 1), one value per head and step `[B,T,N]` (RetNet / Lightning / Mamba-2 style) or one per
key dimension `[B,T,N,F]` (GLA style), given in log space so long products stay stable.

Forms (`implementation=`), all equal up to float rounding:
  "pallas_triton"  the chunked form as Pallas kernels lowered through Triton (`kernels/gla_triton.py`:
              one program per head and value tile walks the chunks carrying the state, custom VJP with
              a reverse-walk kernel); listed for "gpu" only, interpret mode when named on a CPU.
  "xla"       chunked (Lightning Attention-2 tiling, arXiv:2401.04658): within a chunk of C steps the
              quadratic form with the decay mask, across chunks the state recurrence
              `S_c = A_c ⊙ S_{c-1} + U_c` run as an associative scan. Every intermediate is O(T·C) or
              O(T/C · F·h), so memory is linear in T in the forward and in autodiff's backward.
  "parallel"  the quadratic form `o = ((Q Kᵀ) ⊙ D) V` with `D_ts = exp(Λ_t - Λ_s)` for s ≤ t
              (short sequences).
  "reference" a `lax.scan` over steps, float32, the definition above.
The XLA forms are in `linear_forms.py`. `gated_linear_attention_step` advances a state by one token
(decoding).

Non-causal form (encoders, cross-attention): `o = Q (Kᵀ V)` (and `/ (Q Σ_s k_s)`), no decay.

Packed sequences: `segment_ids` `[B,T]` mark contiguous documents; the state resets where the id
changes. Padding: `kv_lengths` `[B]`; positions at or past the length contribute nothing and their gate
is neutral (G = 1), so the state at the end equals the state after the last real token.

The state with `normalize=True` carries z as one extra value column: `[B, N, F, h + 1]`.
All statistics are float32; outputs come back in the input dtype.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax.numpy as jnp

from attnjax.core import contract
from attnjax.core import implementations
from attnjax.core import linear_forms
from attnjax.kernels import gla_triton
from attnjax.typing import (Key, Output, Query, State, TokenKey, TokenOutput, TokenQuery, TokenValue,
                            Value)

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


def _causal_impls(chunk_size):
  return (("pallas_triton", functools.partial(gla_triton.chunked, chunk_size=chunk_size), ("gpu",)),
          ("xla", functools.partial(linear_forms.chunked, chunk_size=chunk_size), ()),
          ("parallel", linear_forms.parallel, ()),
          ("reference", linear_forms.recurrent, ()))


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
  fwd, _ = linear_forms.chunked(q, k, v, None, run_q, None, chunk_size=chunk_size)
  flip = lambda x: jnp.flip(x, axis=2)
  bwd, _ = linear_forms.chunked(flip(q), flip(k), flip(v), None, jnp.flip(run_q, 1), None,
                           chunk_size=chunk_size)
  diag = jnp.sum(q * k, axis=-1, keepdims=True) * v
  return fwd + flip(bwd) - diag


# ---------------------------------------------------------------------------------------------
# Public API.

def gated_linear_attention(q: Query, k: Key, v: Value, *, log_decay=None, normalize: bool = False,
                           causal: bool = True, scale: Optional[float] = None,
                           initial_state: Optional[State] = None, return_final_state: bool = False,
                           segment_ids=None, kv_lengths=None, chunk_size: int = 64,
                           implementation: Optional[str] = None) -> Union[Output, tuple[Output, State]]:
  """Gated linear attention `o_t = q_t S_t`, `S_t = G_t ⊙ S_{t-1} + k_t v_tᵀ` (see module docstring).

  Args:
    q: `[B,T,N,F]` feature-mapped queries. k: `[B,S,K,F]` feature-mapped keys. v: `[B,S,K,h]`.
      K divides N (GQA). Causal needs T == S.
    log_decay: None, `[B,T,N]` or `[B,T,N,F]`: log of the gate G_t (≤ 0 for a decay; values below
      `LOG_DECAY_FLOOR` = -30 count as -30, i.e. G_t ≈ 1e-13 for G_t = 0).
    normalize: divide by `q_t · z_t` (linear attention's normalizer); rows with zero normalizer
      give zeros.
    causal: the recurrence (True) or the non-causal `Q (Kᵀ V)` (False).
    scale: multiplies q; default `F ** -0.5`.
    initial_state: `[B,N,F,h]` (`[B,N,F,h+1]` with normalize) state before the first step.
    return_final_state: also return the state after the last step.
    segment_ids: `[B,T]` packed documents; the state resets where the id changes.
    kv_lengths: `[B]`; steps at or past the length leave the state unchanged.
    chunk_size: C of the chunked form.
    implementation: "pallas_triton" (causal only), "xla", "parallel" or "reference" (None: the first
      that serves the input on this platform).

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
    g = jnp.swapaxes(_floored(log_decay), 1, 2)
    g = g[..., None] if g.ndim == 3 else g
  if kv_lengths is not None:
    real = contract.valid_slots(B, S, kv_lengths)[:, None, :, None]
    # where, not multiply: a padded slot may hold inf/NaN garbage that must not reach the state.
    kh, vh = jnp.where(real, kh, 0.0), jnp.where(real, vh, 0.0)
    g = None if g is None else jnp.where(real, g, 0.0)
  run = None if segment_ids is None else run_index(jnp.asarray(segment_ids))

  if causal:
    state0 = None if initial_state is None else initial_state.astype(_F32)
    o, S_T = implementations.dispatch("gated_linear_attention", _causal_impls(chunk_size),
                                      implementation, qh, kh, vh, g, run, state0)
  else:
    if implementation == "pallas_triton":
      raise NotImplementedError("gated_linear_attention: the pallas_triton kernel is the causal "
                                "recurrence; the non-causal form is 'xla', 'parallel' or 'reference'")
    if implementation not in (None, "xla", "parallel", "reference"):
      raise ValueError(f"gated_linear_attention: unknown implementation {implementation!r}")
    o = _noncausal(qh, kh, vh, run, run, implementation=implementation, chunk_size=chunk_size)
    S_T = None
  if normalize:
    o = normalize_output(o)
  o = jnp.swapaxes(o, 1, 2).astype(q.dtype)
  return (o, S_T) if return_final_state else o


# Log decays below this count as it: a factor e^-30 ≈ 1e-13 is zero next to any unit term at float32
# precision (ε ≈ 6e-8), and the chunked forms' exponents are differences of cumulative sums, whose
# float32 error grows with their size (one step of -1e4 would cost later, weakly decayed pairs of its
# chunk ~1e-2 absolute error); a gate of -inf (a hard reset) stays finite.
LOG_DECAY_FLOOR = -30.0


def _floored(log_decay):
  return jnp.maximum(log_decay.astype(_F32), LOG_DECAY_FLOOR)


def normalize_output(o):
  """`[.., h+1]` (numerator, normalizer) -> `[.., h]`; a zero normalizer gives zeros, not NaN."""
  num, den = o[..., :-1], o[..., -1:]
  safe = jnp.where(den == 0, 1.0, den)
  return jnp.where(den == 0, 0.0, num / safe)


def gated_linear_attention_step(q: TokenQuery, k: TokenKey, v: TokenValue, state: State, *,
                                log_decay=None, normalize: bool = False,
                                scale: Optional[float] = None) -> tuple[TokenOutput, State]:
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
    gd = _floored(log_decay)
    S = jnp.exp(gd[..., None] if gd.ndim == 3 else gd[..., None, None]) * S
  S = S + kt[..., :, None] * vt[..., None, :]
  o = jnp.einsum("bnf,bnfh->bnh", q.astype(_F32) * scale, S)
  if normalize:
    o = normalize_output(o)
  return o.astype(q.dtype), S


def gated_linear_attention_cached(q: Query, k: Key, v: Value, *, q_offset, kv_lengths=None,
                                  log_decay=None, normalize: bool = False,
                                  scale: Optional[float] = None, segment_ids=None) -> Output:
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
  real = contract.valid_slots(B, S, kv_lengths)
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
  scores = linear_forms.masked_scores(qh, kh, L_q, L, visible[:, None])
  o = jnp.einsum("bnts,bnsh->bnth", scores, vh)
  if normalize:
    o = normalize_output(o)
  return jnp.swapaxes(o, 1, 2).astype(q.dtype)


def zero_state(B: int, N: int, F: int, h: int, *, normalize: bool = False):
  """The empty state `[B,N,F,h(+1)]` in float32."""
  return jnp.zeros((B, N, F, h + int(normalize)), _F32)
