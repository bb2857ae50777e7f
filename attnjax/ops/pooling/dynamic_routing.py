"""Dynamic Self-Attention (DSA): sentence-embedding weights computed by capsule-style dynamic routing.

For each of M attentions (m = 1..M), with projected word vectors x̂_{i,m} = LeakyReLU(W_m x_i + b_m):

    q_{i,m} = 0                                          routing logits, one per word
    repeat r times:
      a_{i,m} = softmax_i(q_{i,m})                       over the sentence's words (padding excluded)
      s_m     = Σ_i a_{i,m} x̂_{i,m}
      z_m     = tanh(s_m)                                 (the paper's scalar-neuron stand-in for squash)
      q_{i,m} = q_{i,m} + x̂_{i,m}·z_m                    agreement added to the logits
    return z_1 .. z_M                                     (concatenated: the sentence embedding)

The dynamic weight vector z_m plays the role a learned query plays in Lin et al.'s self-attentive
embedding, but is recomputed from the sentence itself at every iteration. `nonlinearity="squash"` uses
capsule networks' squash(s) = ‖s‖²/(1 + ‖s‖²) · s/‖s‖ (Sabour et al., arXiv:1710.09829) instead of tanh.
Gradients flow through every iteration (the paper's algorithm stops none).

Why a pooling function and not a registered q, k, v mechanism: DSA has no per-token queries (the only
"query" is z_m, built from the values themselves), keys and values are the same vectors x̂ (agreement
x̂·z needs z in the value space), and it returns M vectors per sentence, not one per token.

Shapes: `x_hat [B, S, M, D]` (M attentions' projected words), `mask [B, S]` (True at real words) →
`[B, M, D]` (and the final weights `[B, S, M]` with `return_weights=True`).
Paper: Yoon, Lee and Lee, "Dynamic Self-Attention: Computing Attention over Words Dynamically for
Sentence Embedding", arXiv:1808.07383.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from attnjax import catalog
from attnjax.core.pooling import masked_softmax

__all__ = ["dynamic_self_attention_pooling", "NONLINEARITIES"]

NONLINEARITIES = ("tanh", "squash")
# Array types of the signature (letters as in the module docstring).
ProjectedWords = Float[Array, "B S M D"]
TokenMask = Bool[Array, "B S"]
Pooled = Float[Array, "B M D"]
PoolWeights = Float[Array, "B S M"]


def _squash(s: jax.Array) -> jax.Array:
  """‖s‖²/(1 + ‖s‖²) · s/‖s‖ = s·‖s‖/(1 + ‖s‖²), finite (and differentiable) at s = 0."""
  sq = jnp.sum(s * s, axis=-1, keepdims=True)
  return s * jnp.sqrt(sq + 1e-12) / (1.0 + sq)


@catalog.serves(114, kind="pooling function",
                name="attnjax.ops.pooling.dynamic_self_attention_pooling")
def dynamic_self_attention_pooling(x_hat: ProjectedWords, *, mask: Optional[TokenMask] = None,
                                   iterations: int = 3, nonlinearity: str = "tanh",
                                   return_weights: bool = False
                                   ) -> Union[Pooled, tuple[Pooled, PoolWeights]]:
  """Dynamic Self-Attention pooling (see the module docstring): `iterations` rounds of
  softmax(q) → weighted sum → tanh (or squash) → q += x̂·z, from q = 0.

  Args:
    x_hat: `[B, S, M, D]` the words projected for each of the M attentions (the paper:
      LeakyReLU(W_m x_i + b_m)).
    mask: `[B, S]` True at real words (padding gets no weight); None: every position.
    iterations: r ≥ 1, the routing rounds (the paper uses 2-3); r = 1 is plain softmax pooling of
      the initial logits 0, i.e. the mean of the real words, then the nonlinearity.
    nonlinearity: "tanh" (the paper) or "squash" (capsule networks).
    return_weights: also return the last round's weights a `[B, S, M]`.

  Returns:
    `[B, M, D]` the dynamic weight vectors z_m (flatten to `[B, M·D]` for the sentence embedding), in
    x_hat's dtype; a sentence with no real word gives zeros.
  """
  op = "dynamic_self_attention_pooling"
  if jnp.ndim(x_hat) != 4:
    raise ValueError(f"{op}: `x_hat` must have shape [B, S, M, D], got {jnp.shape(x_hat)}")
  B, S = x_hat.shape[:2]
  if mask is not None and jnp.shape(mask) != (B, S):
    raise ValueError(f"{op}: `mask` must have shape [B, S] = [{B}, {S}], got {jnp.shape(mask)}")
  if int(iterations) < 1:
    raise ValueError(f"{op}: `iterations` must be >= 1, got {iterations}")
  if nonlinearity not in NONLINEARITIES:
    raise ValueError(f"{op}: `nonlinearity` must be one of {NONLINEARITIES}, got {nonlinearity!r}")
  act = jnp.tanh if nonlinearity == "tanh" else _squash
  x = x_hat.astype(jnp.float32)
  m = None if mask is None else jnp.asarray(mask, bool)[:, :, None]
  logits = jnp.zeros(x.shape[:3], jnp.float32)                                 # [B, S, M]
  for _ in range(int(iterations)):
    a = masked_softmax(logits, m, axis=1)
    z = act(jnp.einsum("bsm,bsmd->bmd", a, x))
    logits = logits + jnp.einsum("bsmd,bmd->bsm", x, z)
  z = z.astype(x_hat.dtype)
  return (z, a) if return_weights else z
