"""Low-rank multi-head attention pooling (LAMA): M attention distributions over a sequence's states
from one low-rank bilinear affinity against a global context vector; no per-head query or key.

    f_t   = P^T (σ(U^T c) ∘ σ(V^T h_t))          ∈ R^M    one score per head for state t
    a_t^m = softmax_t(f_t^m)                                over the sequence (padding excluded)
    z^m   = Σ_t a_t^m h_t                          ∈ R^D    one pooled vector per head

c ∈ R^C is the global context vector (a learned vector, as the word context vector of hierarchical
attention networks, or one per example, e.g. a summary of the states); U ∈ R^{C×R}, V ∈ R^{D×R},
P ∈ R^{R×M}. With σ the identity, f_t^m = c^T W_m h_t for the rank-≤R matrices W_m = U diag(P[:, m]) V^T:
the M bilinear affinities share the factors U, V (the low-rank factorization of the affinity), and
the heads differ only in P's columns. σ = tanh (default) is low-rank bilinear pooling as in Kim et
al.'s Hadamard-product attention (arXiv:1610.04325), which LAMA adopts; `activation=None` gives the
plain factorized bilinear form.

Parameters: C·R + D·R + R·M (+ C for a learned c), against M·C·D (+ C) for M full-rank bilinear
affinities c^T W_m h_t (`parameter_counts`); e.g. C = D = 600, R = 64, M = 30: 79,320 against
10,800,600.
Interpretation (the paper's text was not at hand; its factorized affinity against a global context
vector, one distribution per head, is what is built): σ placed on both projections as in MLB.

Why a pooling function and not a registered q, k, v mechanism: there are no per-token queries (one
global context vector scores every state), keys and values are the same states, and the result is M
vectors per sequence, not one per token.

Shapes: `states [B, S, D]`, `context [C]` or `[B, C]`, `u [C, R]`, `v [D, R]`, `p [R, M]`,
`mask [B, S]` → pooled `[B, M, D]` and weights `[B, M, S]`.
Paper: Mehta, Rangwala and Ramakrishnan, "Low Rank Factorization for Compact Multi-Head
Self-Attention", arXiv:1912.00835.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from attnjax import catalog
from attnjax.core.pooling import masked_softmax

__all__ = ["low_rank_multihead_pooling", "parameter_counts"]

# Array types of the signature (letters as in the module docstring; `b` an optional batch axis).
States = Float[Array, "B S D"]
Context = Float[Array, "*b C"]
ContextFactor = Float[Array, "C R"]
StateFactor = Float[Array, "D R"]
HeadFactor = Float[Array, "R M"]
TokenMask = Bool[Array, "B S"]
Pooled = Float[Array, "B M D"]
HeadWeights = Float[Array, "B M S"]


def parameter_counts(*, C: int, D: int, R: int, M: int, learned_context: bool = True) -> dict:
  """`{"low_rank": C·R + D·R + R·M (+ C), "full_rank": M·C·D (+ C)}`: the learned numbers of the
  factorized affinity and of M separate full-rank bilinear affinities c^T W_m h_t."""
  context = C if learned_context else 0
  return {"low_rank": C * R + D * R + R * M + context, "full_rank": M * C * D + context}


@catalog.serves(34, kind="pooling function", name="attnjax.ops.pooling.low_rank_multihead_pooling")
def low_rank_multihead_pooling(states: States, context: Context, u: ContextFactor, v: StateFactor,
                               p: HeadFactor, *,
                               mask: Optional[TokenMask] = None,
                               activation: Optional[Callable[[jax.Array], jax.Array]] = jnp.tanh
                               ) -> tuple[Pooled, HeadWeights]:
  """LAMA pooling (see the module docstring): M softmax distributions over the states from the scores
  P^T(σ(U^T c) ∘ σ(V^T h_t)), and the M pooled vectors.

  Args:
    states: `[B, S, D]` the sequence's hidden states h_t (the paper: a bidirectional GRU's).
    context: `[C]` (shared, learned) or `[B, C]` (per example) global context vector c.
    u: `[C, R]`, v: `[D, R]`, p: `[R, M]` the factors (R the rank, M the number of heads).
    mask: `[B, S]` True at real tokens; None: every position.
    activation: σ applied to both projections (tanh); None for the plain bilinear form.

  Returns:
    `(pooled [B, M, D], weights [B, M, S])`, pooled in the states' dtype; a sequence with no real
    token gives zero weights and zeros.
  """
  op = "low_rank_multihead_pooling"
  if jnp.ndim(states) != 3:
    raise ValueError(f"{op}: `states` must have shape [B, S, D], got {jnp.shape(states)}")
  B, S, D = states.shape
  if jnp.ndim(u) != 2 or jnp.ndim(v) != 2 or jnp.ndim(p) != 2:
    raise ValueError(f"{op}: `u` [C, R], `v` [D, R] and `p` [R, M] must be matrices, got "
                     f"{jnp.shape(u)}, {jnp.shape(v)}, {jnp.shape(p)}")
  C, R = u.shape
  if v.shape != (D, R):
    raise ValueError(f"{op}: `v` must have shape [D, R] = [{D}, {R}], got {v.shape}")
  if p.shape[0] != R:
    raise ValueError(f"{op}: `p` must have shape [R, M] = [{R}, M], got {p.shape}")
  if jnp.shape(context) not in ((C,), (B, C)):
    raise ValueError(f"{op}: `context` must have shape [C] = [{C}] or [B, C] = [{B}, {C}], got "
                     f"{jnp.shape(context)}")
  if mask is not None and jnp.shape(mask) != (B, S):
    raise ValueError(f"{op}: `mask` must have shape [B, S] = [{B}, {S}], got {jnp.shape(mask)}")
  act = (lambda x: x) if activation is None else activation
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  h = f32(states)
  c_proj = act(jnp.broadcast_to(f32(context), (B, C)) @ f32(u))                     # [B, R]
  h_proj = act(jnp.einsum("bsd,dr->bsr", h, f32(v)))                                # [B, S, R]
  scores = jnp.einsum("br,bsr,rm->bms", c_proj, h_proj, f32(p))                    # [B, M, S]
  weights = masked_softmax(scores, None if mask is None else jnp.asarray(mask, bool)[:, None, :],
                           axis=-1)
  pooled = jnp.einsum("bms,bsd->bmd", weights, h)
  return pooled.astype(states.dtype), weights
