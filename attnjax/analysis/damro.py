"""DAMRO: outlier visual tokens from the ViT's [CLS] attention, and contrastive decoding against them.

Gong et al., "DAMRO: Dive into the Attention Mechanism of LVLM to Reduce Object Hallucination",
arXiv:2410.04514. The visual encoder's [CLS] attention (last layer, mean over heads) picks the top-k
patch tokens (high-norm background outliers the decoder over-attends). Decoding contrasts the logits
computed from all visual tokens with those from the outliers alone,

  z' = (1 + α) z_full - α z_outlier,   kept on { y : p_full(y) >= β max p_full },  -inf elsewhere,

the adaptive plausibility constraint of contrastive decoding (Li et al., arXiv:2210.15097) that
visual contrastive decoding uses; the paper names both steps, the method text was not reachable here,
so the constraint's form follows VCD's.

  outlier_tokens(cls_attention [B, P], k)         -> [B, k] patch indices, most attended first
  damro_logits(full_logits, outlier_logits, ...)  -> [B, V]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import catalog

__all__ = ["damro_logits", "outlier_tokens"]


def outlier_tokens(cls_attention: np.ndarray, k: int) -> np.ndarray:
  """The k patches with the largest [CLS] attention `[B, P] -> [B, k]` (ties: the lower index)."""
  a = np.asarray(cls_attention)
  if a.ndim != 2 or not 0 < k <= a.shape[1]:
    raise ValueError(f"outlier_tokens: cls_attention must be [B, P] with P >= k = {k}, got {a.shape}")
  return np.argsort(-a, axis=-1, kind="stable")[:, :k]


@catalog.serves(6, kind="analysis", name="attnjax.analysis.damro.damro_logits")
def damro_logits(full_logits: jax.Array, outlier_logits: jax.Array, alpha: float = 1.0,
                 beta: float = 0.1) -> jax.Array:
  """(1 + α) z_full - α z_outlier on the plausible set p_full >= β max p_full; -inf elsewhere."""
  if jnp.shape(full_logits) != jnp.shape(outlier_logits):
    raise ValueError(f"damro_logits: outlier_logits must be {jnp.shape(full_logits)}, got "
                     f"{jnp.shape(outlier_logits)}")
  p = jax.nn.softmax(full_logits, -1)
  keep = p >= beta * p.max(-1, keepdims=True)
  return jnp.where(keep, (1 + alpha) * full_logits - alpha * outlier_logits, -jnp.inf)
