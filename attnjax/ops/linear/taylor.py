"""TaylorShift (#177) and FAST (#87): attention with second-order Taylor weights `1 + x + x²/2`.

Both factorize the weights through the features `[1, x, vec(x xᵀ)/√2]` (`feature_maps.taylor2`),
so they compute them in O(T·H²·h) without materializing them.

Nauen et al., "TaylorShift: Shifting the Complexity of Self-Attention from Squared to Linear (and
Back) using Taylor-Softmax", arXiv:2403.02920. Gerami et al., "FAST: Factorizable Attention for
Speeding up Transformers", arXiv:2402.07901.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax.numpy as jnp

from attnjax.core import feature_maps as fm
from attnjax.core import masks
from attnjax.core.contract import contract_mask
from attnjax.core.linear_contract import (CAUSAL_IMPLEMENTATIONS, feature_linear_attention,
                                          recurrent_state_floats)
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

__all__ = ["fastmax_attention", "taylor_crossover_length", "taylor_shift_attention"]

_F32 = jnp.float32


def taylor_crossover_length(H: int, h: int) -> int:
  """Length above which TaylorShift's linear form is cheaper than the direct one.

  Linear: `T · (1 + H + H²) · (h + 1)` multiply-adds for the state and the read-out; direct:
  `T² · (H + h)`. They cross at `T* = (1 + H + H²)(h + 1) / (H + h)`.
  """
  return int(math.ceil((1 + H + H * H) * (h + 1) / (H + h)))


def _taylor_direct(qs, ks, v, *, causal, segment_ids, q_offset, kv_lengths):
  """Normalized Taylor-softmax `w_ts = 1 + x + x²/2` (x = q_s·k_s) over visible keys, quadratic."""
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


def taylor_shift_attention(q: Query, k: Key, v: Value, *, causal: bool = False,
                           segment_ids: Optional[SegmentIds] = None, q_offset=0,
                           kv_lengths: Optional[Lengths] = None, scale=None,
                           implementation: Optional[str] = None, form="auto", initial_state=None,
                           return_final_state: bool = False) -> Output | tuple[Output, Any]:
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
  return feature_linear_attention(
      "taylor_shift_attention", fm.taylor2(qs), fm.taylor2(ks), v, causal=causal,
      segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
      implementation=implementation, normalize=True, initial_state=initial_state,
      return_final_state=return_final_state)


def fastmax_attention(q: Query, k: Key, v: Value, *, causal: bool = False,
                      segment_ids: Optional[SegmentIds] = None, q_offset=0,
                      kv_lengths: Optional[Lengths] = None, scale=None,
                      implementation: Optional[str] = None, initial_state=None,
                      return_final_state: bool = False) -> Output | tuple[Output, Any]:
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
  return feature_linear_attention(
      "fastmax_attention", fm.taylor2(qs), fm.taylor2(ks), v, causal=causal,
      segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
      implementation=implementation, normalize=True, initial_state=initial_state,
      return_final_state=return_final_state)


# The recurrence carries the Taylor features `1 + H + H²` per head, plus the normalizer column.
_TAYLOR_STATE = recurrent_state_floats(lambda H: 1 + H + H * H)

register(Mechanism(
    name="taylor_shift_attention", fn=taylor_shift_attention, family="linear", seeds=(177,),
    paper="TaylorShift: Shifting the Complexity of Self-Attention from Squared to Linear (and "
          "Back) using Taylor-Softmax", arxiv="2403.02920", recurrent=True,
    complexity="O(T·H²·h)", implementations=CAUSAL_IMPLEMENTATIONS, example=dict(form="linear"),
    state_size=_TAYLOR_STATE))
register(Mechanism(
    name="fastmax_attention", fn=fastmax_attention, family="linear", seeds=(87,),
    paper="FAST: Factorizable Attention for Speeding up Transformers", arxiv="2402.07901",
    recurrent=True, complexity="O(T·H²·h)", implementations=CAUSAL_IMPLEMENTATIONS,
    state_size=_TAYLOR_STATE))
