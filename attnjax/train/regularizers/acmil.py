"""Stochastic top-K instance masking over multi-branch attention-MIL pooling (ACMIL: Zhang et al.,
"Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification",
arXiv:2311.07125).

A bag of n instance features h_i feeds M gated-attention branches,
s_{m i} = w_mᵀ (tanh(V h_i) ⊙ σ(U h_i)). In training, for each branch, each of its K highest-scored
instances is masked independently with probability p (its weight set to 0) and the softmax is
renormalized over the rest:

    α_{m i} = exp(s_{m i}) 1[i kept] / Σ_j exp(s_{m j}) 1[j kept],    z_m = Σ_i α_{m i} h_i

so no branch can rely on a few dominant instances; at evaluation nothing is masked.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.train.regularizers.maps import serves
from attnjax.typing import Array, Bool, Float

__all__ = ["ACMILPooling", "stochastic_topk_mask"]

BranchScores = Float[Array, "B M n"]
BranchMask = Bool[Array, "B M n"]
Bag = Float[Array, "B n d"]


@serves(202, kind="loss")
def stochastic_topk_mask(scores: BranchScores, rng: jax.Array, *, top_k: int,
                         mask_prob: float) -> BranchMask:
  """True where an instance is masked: among each branch's `top_k` highest scores, independently
  with probability `mask_prob`. Never masks a whole row (a row whose every instance would be
  masked, when top_k >= n, keeps its highest one) so the renormalization stays defined."""
  if scores.ndim != 3:
    raise ValueError(f"stochastic_topk_mask: scores must be [B, M, n], got {scores.shape}")
  if not 0 <= mask_prob <= 1 or top_k < 0:
    raise ValueError(f"stochastic_topk_mask: need top_k >= 0 and mask_prob in [0, 1]; got "
                     f"top_k={top_k}, mask_prob={mask_prob}")
  n = scores.shape[-1]
  k = min(top_k, n)
  # Rank of each instance within its branch: 0 for the highest score.
  rank = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)
  drop = (rank < k) & jax.random.bernoulli(rng, mask_prob, scores.shape)
  return drop & ~(drop.all(-1, keepdims=True) & (rank == 0))


@serves(202, kind="layer")
class ACMILPooling(nn.Module):
  """`(z [B, M, d], α [B, M, n])` for a bag `x` `[B, n, d]` (module docstring); `train=True` masks
  with the module's "dropout" rng stream."""
  num_branches: int = 5
  hidden: int = 64
  top_k: int = 10
  mask_prob: float = 0.6

  @nn.compact
  def __call__(self, x: Bag, *, train: bool = False):
    gate = jnp.tanh(nn.Dense(self.hidden, name="V")(x)) * jax.nn.sigmoid(
        nn.Dense(self.hidden, name="U")(x))
    scores = jnp.swapaxes(nn.Dense(self.num_branches, name="w")(gate), 1, 2)   # [B, M, n]
    if train:
      masked = stochastic_topk_mask(jax.lax.stop_gradient(scores), self.make_rng("dropout"),
                                    top_k=self.top_k, mask_prob=self.mask_prob)
      scores = jnp.where(masked, -jnp.inf, scores)
    alpha = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bmn,bnd->bmd", alpha, x), alpha
