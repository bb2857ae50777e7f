"""Performer FAVOR+ (#152): positive orthogonal random features for the softmax kernel.

Choromanski et al., "Rethinking Attention with Performers", arXiv:2009.14794.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from attnjax.core import feature_maps as fm
from attnjax.core import linear
from attnjax.core.contract import valid_slots, zero_padded
from attnjax.core.linear_contract import (CAUSAL_IMPLEMENTATIONS, check_recurrent_args,
                                          feature_linear_attention, self_segment_ids)
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

__all__ = ["favor_plus_attention", "orthogonal_features_init"]

_F32 = jnp.float32


def favor_plus_attention(q: Query, k: Key, v: Value, *, projection, causal: bool = False,
                         segment_ids: Optional[SegmentIds] = None, q_offset=0,
                         kv_lengths: Optional[Lengths] = None, scale=None,
                         implementation: Optional[str] = None, initial_state=None,
                         return_final_state: bool = False) -> Output | tuple[Output, Any]:
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
  real = valid_slots(B, S, kv_lengths)[..., None, None]
  b = jnp.where(real, fm.favor_plus_logits(zero_padded(k, kv_lengths) * r, w), -jnp.inf)
  state, prev_max, log_decay = None, None, None
  if return_final_state:
    check_recurrent_args(op, causal=causal, segment_ids=segment_ids, T=T, S=S)
    state, prev_max = _favor_state(op, initial_state, (B, N, K, w.shape[0], v.shape[-1]))
  if causal:
    seg = self_segment_ids(segment_ids[1] if isinstance(segment_ids, (tuple, list)) else
                            segment_ids, B, S)
    run = None if seg is None else linear.run_index(seg)
    b_max = fm.running_feature_max(b, run, prev_max)
    log_decay = jnp.repeat(fm.running_max_log_decay(b_max, run, prev_max), N // K, axis=2)
    offset = 0 if return_final_state else jnp.reshape(jnp.asarray(q_offset), (-1, 1))
    q_pos = jnp.broadcast_to(jnp.clip(offset + jnp.arange(T)[None], 0, S - 1), (B, T))
    a_max = jnp.take_along_axis(b_max, q_pos[:, :, None, None], axis=1)
  else:
    per_doc = self_segment_ids(segment_ids, B, S) if T == S else None
    b_max = fm.feature_max_over_keys(b, per_doc)
    a_max = b_max if per_doc is not None else b_max[:, :1]
  qf, kf = fm.stabilized_exp_features(a, b, a_max, b_max)
  result = feature_linear_attention(
      op, qf, kf, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
      kv_lengths=kv_lengths, implementation=implementation, log_decay=log_decay, normalize=True,
      initial_state=state, return_final_state=return_final_state)
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


_FAVOR_PARAMS = (ParamSpec("projection", _favor_projection_shape, orthogonal_features_init,
                           trainable=False),)


register(Mechanism(
    name="favor_plus_attention", fn=favor_plus_attention, family="linear", seeds=(152,),
    paper="Rethinking Attention with Performers", arxiv="2009.14794", recurrent=True,
    complexity="O(T·m·h)", implementations=CAUSAL_IMPLEMENTATIONS, params=_FAVOR_PARAMS,
    # The draw the layer makes (orthogonal, chi norms), at the sizes asked for.
    example=lambda *, N, K, H: example_params(_FAVOR_PARAMS, N=N, K=K, H=H),
    state_size=_favor_state_floats))
