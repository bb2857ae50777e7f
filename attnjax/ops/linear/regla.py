"""ReGLA (#234): gated linear attention with a refining gate and a normalized output.

Lu et al., "ReGLA: Refining Gated Linear Attention", arXiv:2502.01578.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import feature_maps as fm
from attnjax.core.linear_contract import (CAUSAL_IMPLEMENTATIONS, feature_linear_attention,
                                          map_output, recurrent_state_floats)
from attnjax.registry import Mechanism, ParamSpec, example_arrays, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

__all__ = ["refined_gate", "refined_gated_linear_attention"]

_F32 = jnp.float32


def refined_gate(g, r):
  """ReGLA's refining gate: `(1 - r) g² + r (1 - (1 - g)²)`, between g² and 1 - (1-g)²."""
  return (1.0 - r) * g * g + r * (1.0 - (1.0 - g) ** 2)


def refined_gated_linear_attention(q: Query, k: Key, v: Value, *, gate_kernel, gate_bias,
                                   refine_kernel, refine_bias, causal: bool = True,
                                   segment_ids: Optional[SegmentIds] = None, q_offset=0,
                                   kv_lengths: Optional[Lengths] = None, scale=None,
                                   implementation: Optional[str] = None, initial_state=None,
                                   return_final_state: bool = False) -> Output | tuple[Output, Any]:
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
  result = feature_linear_attention(
      "refined_gated_linear_attention", fm.bounded_exp(q.astype(_F32) * sc ** 0.5),
      fm.bounded_exp(k.astype(_F32) * sc ** 0.5), v, causal=causal, segment_ids=segment_ids,
      q_offset=q_offset, kv_lengths=kv_lengths, implementation=implementation,
      log_decay=log_decay, chunk_size=16, initial_state=initial_state,
      return_final_state=return_final_state)

  def rms_normalized(o):
    o = o.astype(_F32)
    return (o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + 1e-6)).astype(q.dtype)

  return map_output(result, rms_normalized)


def _example(*, N: int, H: int) -> dict:
  """Gates at the asked sizes: kernels large enough (std 0.3) that the gates vary over keys."""
  return {**example_arrays(1, {"gate_kernel": ((N, H, H), 0.0, 0.3)}),
          "gate_bias": np.ones((N, H), np.float32),
          **example_arrays(2, {"refine_kernel": ((N, H, H), 0.0, 0.3)}),
          "refine_bias": np.zeros((N, H), np.float32)}


register(Mechanism(
    name="refined_gated_linear_attention", fn=refined_gated_linear_attention, family="linear",
    seeds=(234,), paper="ReGLA: Refining Gated Linear Attention", arxiv="2502.01578",
    recurrent=True, complexity="O(T·C·H + T·H·h)", implementations=CAUSAL_IMPLEMENTATIONS,
    params=(ParamSpec("gate_kernel", lambda N, K, H: (N, H, H), jax.nn.initializers.normal(0.02)),
            ParamSpec("gate_bias", lambda N, K, H: (N, H), jax.nn.initializers.constant(3.0)),
            ParamSpec("refine_kernel", lambda N, K, H: (N, H, H), jax.nn.initializers.normal(0.02)),
            ParamSpec("refine_bias", lambda N, K, H: (N, H), jax.nn.initializers.zeros)),
    example=_example,
    state_size=recurrent_state_floats(extra=0)))
