"""Comateformer's compositional quasi-attention: signed weights from dual affinities, no softmax.

    E_ij = α · scale · q_i·k_j                     similarity (affinity)
    N_ij = -β · scale · ‖q_i - k_j‖_1              negative L1 distance (dissimilarity)
    w_ij = tanh(E_ij) · 2 sigmoid(N_ij)            in (-1, 1)
    o_i  = Σ_{j visible} w_ij v_j                  (no normalization over the row)

Each key's value is added (w ≈ +1), subtracted (w ≈ -1) or dropped (w ≈ 0): tanh(E) decides the
sign from the similarity, and the dissimilarity gate 2σ(N) ∈ (0, 1] shrinks the weight of keys far
from the query in L1. The paper's Transformer form divides both affinities by √d_k (`scale`,
default H^-1/2) and sets α = β = 1. Since N <= 0, σ(N) <= 1/2; of the paper's two fixes we take
2·sigmoid(N), the one it reports as more effective (its alternative, centering N to zero mean, is not
offered). The quasi-attention follows Compositional De-Attention (Tay et al., NeurIPS 2019), which
Comateformer moves into the Transformer. (Read from a detailed summary of the paper, no authors'
code being public: where the summary is silent, e.g. on masks, hidden pairs simply get no weight.)

The L1 distance is not a dot product, but it is a function of the pair (q_i, k_j): a score_mod that
reads the two rows by index computes it tile by tile, so flex attention serves the mechanism with
the unnormalized `identity` normalizer (`core.identity_weights`). On the `xla` path only the
non-empty tiles are visited and the custom VJP recomputes the weights per tile (memory O(tile · H)
for the distances, linear in length); gradients reach q and k through both affinities (those of the
distance through the arrays the score_mod reads, accumulated per visited tile). `reference` is the
dense form. Causal, packed, cross and cached (decode) attention are masks on independent pairs. A row
with no visible key gives zeros.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
Paper: Li, Liang and Zhang, "Comateformer: Combined Attention Transformer for Semantic Sentence
Matching", arXiv:2412.07220.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core.identity_weights import IDENTITY
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["compositional_quasi_attention"]


def compositional_quasi_attention(q: Query, k: Key, v: Value, *, causal: bool = False,
                                  segment_ids=None, q_offset=0,
                                  kv_lengths: Optional[Lengths] = None,
                                  scale: Optional[float] = None,
                                  implementation: Optional[str] = None, alpha: float = 1.0,
                                  beta: float = 1.0) -> Output:
  """Comateformer quasi-attention: weights tanh(α s)·2σ(-β·scale·‖q - k‖₁), unnormalized (see
  the module docstring)."""
  op = "compositional_quasi_attention"
  _, _, _, N, K, H, _ = checks.check_qkv(op, q, k, v)
  G = N // K
  scale = H ** -0.5 if scale is None else scale
  qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)

  def weights(s, b, n, qi, ki):
    # Rows of the tile: q [., K, G, bq, 1, H] against k [., K, G, 1, bk, H] (query head n reads
    # key head n // G); indices past the end (padding of the last tile) are clamped and masked.
    l1 = jnp.sum(jnp.abs(qf[b, qi, n] - kf[b, ki, n // G]), axis=-1)
    return jnp.tanh(alpha * s) * (2.0 * jax.nn.sigmoid(-beta * scale * l1))

  out = contract.flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                    q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                    implementation=implementation, score_mod=weights,
                                    normalizer=IDENTITY)
  return out.astype(q.dtype)


register(Mechanism(
    name="compositional_quasi_attention", fn=compositional_quasi_attention,
    family="softmax-variant", seeds=(124,),
    paper="Comateformer: Combined Attention Transformer for Semantic Sentence Matching",
    arxiv="2412.07220", complexity="O(T·S·H)"))
