"""The `identity` normalizer: unnormalized attention weights equal to the (modified) scores.

    o_i = Σ_{j visible} g(s_ij) v_j          g = the score_mod, s_ij = scale · q_i·k_j

For mechanisms whose score_mod computes the final attention weight itself, possibly negative and not
normalized over the row (Normalized Attention Pooling's standardized scores, Comateformer's
tanh·sigmoid quasi-attention), and for row statistics `Σ_{j visible} g(s_ij)` (values of ones:
`row_sums`). Because it is a registered `Normalizer`, every `flex_attention` path serves it, the `xla`
one with block skipping and a custom VJP that recomputes the scores tile by tile; hidden pairs get
weight 0 and a row with no visible key gives 0.

  IDENTITY   `Normalizer("identity")`: f(s) = s, unnormalized (no shift, lse = 0)
  row_sums   `[B, T, N]` float32 `Σ_{j visible} g(s_ij)` under the call contract's masks (one pass)
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import contract
from attnjax.core.normalizers import Normalizer, register_normalizer
from attnjax.typing import ScoreMod

__all__ = ["IDENTITY", "row_sums"]

# f(s) = s with no shift: the weight is whatever the score_mod returned (the shift m is unused).
IDENTITY = register_normalizer(Normalizer("identity", weight=lambda s, m: s, normalized=False))


def row_sums(op: str, q, k, *, score_mod: Optional[ScoreMod] = None, causal: bool = False,
             segment_ids=None, q_offset=0, kv_lengths=None, scale=None,
             implementation: Optional[str] = None) -> jax.Array:
  """`[B, T, N]` float32: `Σ_{j visible} g(s_ij)` with g = `score_mod` (the identity when None) and
  the contract's masks; 0 on a row with no visible key.

  One flex pass with the identity normalizer over values of ones (`[B, S, K, 1]`), so the sum streams
  over key tiles like any attention output and gradients reach q, k and what `score_mod` captures.
  """
  ones = jnp.ones(k.shape[:3] + (1,), jnp.float32)
  # flex returns q's dtype: float32 inputs keep the statistic in float32 whatever the input dtype.
  out = contract.flex_with_contract(op, q.astype(jnp.float32), k.astype(jnp.float32), ones,
                                    causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                                    kv_lengths=kv_lengths, scale=scale,
                                    implementation=implementation, score_mod=score_mod,
                                    normalizer=IDENTITY)
  return out[..., 0]
