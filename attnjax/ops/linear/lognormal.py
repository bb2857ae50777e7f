"""Linear Log-Normal attention (#98): exponential features moment-matched to softmax.

Nahshan et al., "Linear Log-Normal Attention with Unbiased Concentration", arXiv:2311.13541.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from attnjax.core import feature_maps as fm
from attnjax.core.contract import valid_slots, zero_padded
from attnjax.core.linear_contract import (NONCAUSAL_IMPLEMENTATIONS, feature_linear_attention,
                                          self_segment_ids)
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

__all__ = ["linear_lognormal_attention"]

_F32 = jnp.float32


def _per_head(op, name, x, B, N):
  x = jnp.asarray(x, _F32)
  if x.shape not in ((N,), (B, N)):
    raise ValueError(f"{op}: `{name}` must have shape [N] = ({N},) or [B,N] = {(B, N)}, "
                     f"got {x.shape}")
  return jnp.broadcast_to(x, (B, N))


def linear_lognormal_attention(q: Query, k: Key, v: Value, *, causal: bool = False,
                               segment_ids: Optional[SegmentIds] = None, q_offset=0,
                               kv_lengths: Optional[Lengths] = None, scale=None,
                               implementation: Optional[str] = None, alpha=None, beta=None
                              ) -> Output:
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
  real = valid_slots(B, S, kv_lengths)[..., None, None]
  kr = jnp.repeat(zero_padded(k, kv_lengths), N // K, axis=2)                 # β per query head
  key_exp = jnp.where(real, b[:, None, :, None] * kr, -jnp.inf)                 # [B,S,N,H]
  per_doc = self_segment_ids(segment_ids, B, S) if T == S else None
  b_max = fm.feature_max_over_keys(key_exp, per_doc)
  qf, kf = fm.stabilized_exp_features(a[:, None, :, None] * q.astype(_F32), key_exp,
                                      b_max if per_doc is not None else b_max[:, :1], b_max)
  return feature_linear_attention(
      op, qf, kf, jnp.repeat(v, N // K, axis=2), causal=False, segment_ids=segment_ids,
      q_offset=q_offset, kv_lengths=kv_lengths, implementation=implementation, normalize=True)


register(Mechanism(
    name="linear_lognormal_attention", fn=linear_lognormal_attention, family="linear", seeds=(98,),
    paper="Linear Log-Normal Attention with Unbiased Concentration", arxiv="2311.13541",
    patterns=frozenset({"self", "cross"}), decode=False, complexity="O(T·H·h)",
    implementations=NONCAUSAL_IMPLEMENTATIONS,
    # A fixed α = β (a layer's running estimate): the estimated ones are per-example statistics
    # that a row's packed documents share, so only a fixed one makes packed equal separate.
    # One α per head, spread over [0.4, 1].
    example=lambda *, N: dict(alpha=np.linspace(0.4, 1.0, N, dtype=np.float32))))
