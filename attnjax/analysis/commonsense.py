"""Maximum attention score (MAS) for pronoun resolution.

Klein & Nabi, "Attention Is (not) All You Need for Commonsense Reasoning", arXiv:1905.13497. For a
reference token r (the pronoun) and candidates c (token spans), A_c[l, h] is the attention from r to
c in layer l, head h (a span's attention is the sum over its tokens, the word-piece convention of
Clark et al.). Each (l, h) votes for the candidate with the largest attention by keeping only that
candidate's score (mask M_c[l, h] = 1 iff A_c[l, h] = max_c' A_c'[l, h]; ties keep every tied
candidate):

  MAS(c) = Σ_{l,h} A_c ∘ M_c  /  Σ_{c'} Σ_{l,h} A_c' ∘ M_c',    answer = argmax_c MAS(c).

  maximum_attention_score(weights, reference, candidates)  [L, N, T, S] -> MAS [n_candidates]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from attnjax import catalog

__all__ = ["maximum_attention_score"]


@catalog.serves(74, kind="analysis", name="attnjax.analysis.commonsense.maximum_attention_score")
def maximum_attention_score(weights: np.ndarray, reference: int,
                            candidates: Sequence[tuple[int, int]]) -> np.ndarray:
  """MAS of each candidate span (arXiv:1905.13497).

  Args:
    weights: one example's maps `[L, N, T, S]` (or `[N, T, S]` for one layer).
    reference: the pronoun's query position.
    candidates: key spans `[(start, stop), ...]` (stop exclusive), at least two.

  Returns:
    float64 `[len(candidates)]` summing to 1 (all zeros when the reference attends to no candidate);
    the answer is its argmax.
  """
  w = np.asarray(weights, np.float64)
  if w.ndim == 3:
    w = w[None]
  if w.ndim != 4:
    raise ValueError(f"maximum_attention_score: weights must be [L, N, T, S], got {np.shape(weights)}")
  if len(candidates) < 2:
    raise ValueError(f"maximum_attention_score: candidates needs >= 2 spans, got {len(candidates)}")
  for a, b in candidates:
    if not 0 <= a < b <= w.shape[-1]:
      raise ValueError(f"maximum_attention_score: candidate span ({a}, {b}) outside [0, {w.shape[-1]}]")
  row = w[:, :, reference, :]  # [L, N, S]
  a_c = np.stack([row[..., a:b].sum(-1) for a, b in candidates])  # [C, L, N]
  masked = np.where(a_c == a_c.max(axis=0, keepdims=True), a_c, 0.0)
  per = masked.sum(axis=(1, 2))
  total = per.sum()
  return per / total if total > 0 else per
