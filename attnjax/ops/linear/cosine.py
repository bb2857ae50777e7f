"""Cottention (#33): cosine-similarity linear attention with a learned length normalization.

Mongaras et al., "Cottention: Linear Transformers With Cosine Attention", arXiv:2409.18747.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import feature_maps as fm
from attnjax.core.linear_contract import (CAUSAL_IMPLEMENTATIONS, feature_linear_attention,
                                          map_output, recurrent_state_floats, visible_key_counts)
from attnjax.registry import Mechanism, ParamSpec, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

__all__ = ["cosine_linear_attention"]

_F32 = jnp.float32


def cosine_linear_attention(q: Query, k: Key, v: Value, *, causal: bool = False,
                            segment_ids: Optional[SegmentIds] = None, q_offset=0,
                            kv_lengths: Optional[Lengths] = None, scale=None,
                            implementation: Optional[str] = None, length_exponent=None,
                            initial_state=None, return_final_state: bool = False
                            ) -> Output | tuple[Output, Any]:
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
  result = feature_linear_attention(
      "cosine_linear_attention", fm.l2_normalize(q), fm.l2_normalize(k), v,
      implementation=implementation, initial_state=initial_state,
      return_final_state=return_final_state, **contract)
  if return_final_state:
    # The state holds no count: query t of this call sees the q_offset earlier tokens and t + 1 new.
    new = jnp.arange(1, T + 1)[None]
    if kv_lengths is not None:
      new = jnp.minimum(new, kv_lengths[:, None])
    n = (jnp.reshape(jnp.asarray(q_offset), (-1, 1)) + new).astype(_F32)[:, :, None, None]
  else:
    n = visible_key_counts("cosine_linear_attention", q, k, **contract)
  div = jnp.where(n > 0, jnp.maximum(n, 1.0) ** sigma[:, None], 1.0)
  return map_output(result, lambda o: (o.astype(_F32) / div).astype(q.dtype))


register(Mechanism(
    name="cosine_linear_attention", fn=cosine_linear_attention, family="linear", seeds=(33,),
    paper="Cottention: Linear Transformers With Cosine Attention", arxiv="2409.18747",
    recurrent=True, complexity="O(T·H·h)", implementations=CAUSAL_IMPLEMENTATIONS,
    params=(ParamSpec("length_exponent", lambda N, K, H: (N,), jax.nn.initializers.zeros),),
    # Exponents spread over σ ∈ (0.27, 0.73), one per head.
    example=lambda *, N: dict(length_exponent=np.linspace(-1.0, 1.0, N, dtype=np.float32)),
    state_size=recurrent_state_floats(extra=0)))
