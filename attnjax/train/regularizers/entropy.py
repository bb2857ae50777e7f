"""Entropy-band regularizer (Jha & Reagen, "Entropy-Guided Attention for Private LLMs",
arXiv:2501.03489).

For every layer l, head h and query row t with visible keys V_t, the attention entropy
E = -Σ_{s∈V_t} α_{ts} log α_{ts} is compared with a per-head target θ_{l h} · E_max,
E_max = log |V_t| (the entropy of the uniform row over what the row can see):

    d = E - θ_{l h} E_max,   penalty = d²  if |d| > γ E_max  else 0,
    R = mean_{l} mean_{h} mean_{b, t} penalty          (multiply by λ outside)

so heads whose entropy collapses (deep layers) or overloads towards uniform (early layers) are
pulled back into the tolerance band of half-width γ E_max around their target; inside the band the
loss and its gradient are zero. The paper learns the per-head fractions θ jointly with the model
(its "reg_threshold_weights"): here they are an argument, so a caller can make them parameters and
differentiate `entropy_band_penalty` w.r.t. them; the trainer flag does so with `learn_target`
(one θ per head shared by the layers, as the paper's code reads them).
The paper's code sums the penalty over batch and query rows; the mean used here only rescales λ.
"""

from __future__ import annotations

from typing import Sequence, Union

import jax.numpy as jnp

from attnjax.train.regularizers import maps
from attnjax.train.regularizers.maps import HeadRows, Maps, Scalar, serves

__all__ = ["row_entropy", "entropy_band_penalty"]

# Floor for log α on visible pairs whose weight underflowed to 0: keeps α log α (0) and its
# gradient finite.
_LOG_FLOOR = 1e-30


@serves(133, kind="loss")
def row_entropy(weights: Maps, logits: Maps) -> tuple[HeadRows, HeadRows]:
  """`(E, E_max)`: each row's entropy over its visible keys (finite logits) and log |V_t|."""
  if weights.shape != logits.shape or weights.ndim != 4:
    raise ValueError(f"row_entropy: weights and logits must both be [B, N, T, S]; got "
                     f"{weights.shape} and {logits.shape}")
  seen = maps.visible(logits)
  # Masked pairs become 1 (1·log 1 = 0) so neither the value nor the gradient sees log 0.
  w = jnp.where(seen, weights, 1.0)
  entropy = -jnp.sum(jnp.where(seen, w * jnp.log(jnp.maximum(w, _LOG_FLOOR)), 0.0), axis=-1)
  max_entropy = jnp.log(jnp.maximum(seen.sum(-1), 1).astype(weights.dtype))
  return entropy, max_entropy


@serves(133, kind="loss")
def entropy_band_penalty(weights: Sequence[Maps],
                         logits: Sequence[Maps], *,
                         target: Union[float, jnp.ndarray] = 0.5,
                         tolerance: float = 0.2) -> Scalar:
  """R of the module docstring. `target`: θ, a scalar, `[N]` (every layer) or `[L, N]` (per layer
  and head); `tolerance`: γ, the band's half-width as a fraction of E_max."""
  if len(weights) != len(logits) or not weights:
    raise ValueError(f"entropy_band_penalty: need as many logits as weights maps (>= 1); got "
                     f"{len(weights)} and {len(logits)}")
  theta = jnp.asarray(target, jnp.float32)
  if theta.ndim == 2 and theta.shape[0] != len(weights):
    raise ValueError(f"entropy_band_penalty: target [L, N] must have L={len(weights)} rows; got "
                     f"{theta.shape}")
  terms = []
  for layer, (w, lg) in enumerate(zip(weights, logits, strict=True)):
    entropy, max_entropy = row_entropy(w, lg)
    th = theta[layer] if theta.ndim == 2 else theta
    if th.ndim == 1 and th.shape[0] != w.shape[1]:
      raise ValueError(f"entropy_band_penalty: target has {th.shape[0]} heads, the maps "
                       f"{w.shape[1]} (N of [B, N, T, S])")
    th = th[None, :, None] if th.ndim == 1 else th
    deviation = entropy - th * max_entropy
    outside = jnp.abs(deviation) > tolerance * max_entropy
    terms.append(jnp.where(outside, jnp.square(deviation), 0.0).mean())
  return jnp.mean(jnp.stack(terms))
