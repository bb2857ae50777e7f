"""EDAtt: encoder-decoder attention as a simultaneous-translation emission policy.

Papi, Negri, Turchi, "Attention as a Guide for Simultaneous Speech Translation", arXiv:2212.07850.
With n source frames received, the offline model proposes candidate tokens y_1..y_m; their
cross-attention `A: [heads, m, n]` of one chosen decoder layer is averaged over heads, and token i
is emitted iff the attention on the last λ frames is small:

  emit(y_i)  <=>  Σ_{j = n-λ+1}^{n} Ā_{i,j} < α,   Ā = mean_heads A.

Tokens are emitted left to right until the first one that fails (it would need more audio); the
rest wait for the next source chunk. When the whole source is in, everything left is emitted.

  emission_mask(attention, lam, alpha, layer=)   [L?, heads, m, n] -> bool [m] (prefix rule)
  simultaneous_decode(decode, source, chunk, ...) run the policy over growing source prefixes
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from attnjax import catalog

__all__ = ["emission_mask", "simultaneous_decode"]


@catalog.serves(44, kind="analysis", name="attnjax.analysis.edatt.emission_mask")
def emission_mask(attention: np.ndarray, lam: int, alpha: float, layer: Optional[int] = None
                  ) -> np.ndarray:
  """Which candidate tokens EDAtt emits (arXiv:2212.07850).

  Args:
    attention: cross-attention `[heads, m, n]`, or `[L, heads, m, n]` with `layer` selecting one.
    lam: λ, the number of most recent frames watched (>= 1; clipped to n).
    alpha: α, the emission threshold.
    layer: the decoder layer to read when `attention` has a layer axis.

  Returns:
    bool `[m]`: True for the emitted prefix (tokens up to, not including, the first with
    Σ_{last λ frames} Ā_i >= α).
  """
  a = np.asarray(attention, np.float64)
  if a.ndim == 4:
    if layer is None:
      raise ValueError("edatt.emission_mask: attention is [L, heads, m, n]; pass layer=")
    a = a[layer]
  if a.ndim != 3:
    raise ValueError(f"edatt.emission_mask: attention must be [heads, m, n] or [L, heads, m, n], "
                     f"got shape {np.shape(attention)}")
  if lam < 1:
    raise ValueError(f"edatt.emission_mask: lam must be >= 1, got {lam}")
  tail = a.mean(axis=0)[:, -lam:].sum(axis=-1)  # [m]
  ok = tail < alpha
  return np.cumprod(ok).astype(bool)  # stop at the first token that fails


@catalog.serves(44, kind="analysis", name="attnjax.analysis.edatt.simultaneous_decode")
def simultaneous_decode(decode: Callable[[np.ndarray, list], tuple[Sequence, np.ndarray]],
                        source: np.ndarray, chunk: int, lam: int, alpha: float,
                        layer: Optional[int] = None) -> list[tuple[int, list]]:
  """Run EDAtt over a source stream read `chunk` frames at a time (arXiv:2212.07850).

  Args:
    decode: `decode(source_prefix, emitted) -> (candidates, attention)`: the offline model's
      continuation of the emitted tokens given the prefix, and its cross-attention
      `[heads, m, n]` (or `[L, heads, m, n]`) over the prefix's n frames for the m candidates.
    source: the full source `[S, ...]` (frames first).
    chunk: frames added per step (>= 1).
    lam, alpha, layer: as in `emission_mask`.

  Returns:
    `[(frames_read, tokens_emitted_at_this_step), ...]`, one entry per step; at the last step
    (whole source read) every remaining candidate is emitted.
  """
  if chunk < 1:
    raise ValueError(f"edatt.simultaneous_decode: chunk must be >= 1, got {chunk}")
  emitted: list = []
  log: list[tuple[int, list]] = []
  total = len(source)
  n = 0
  while n < total:
    n = min(n + chunk, total)
    candidates, attention = decode(source[:n], list(emitted))
    candidates = list(candidates)
    if n == total:
      new = candidates
    else:
      new = candidates[: int(emission_mask(attention, lam, alpha, layer).sum())] if candidates else []
    emitted += new
    log.append((n, new))
  return log
