"""Per-head statistics of attention maps: entropy, share on chosen keys (sinks, special tokens),
relative-offset profile and head diversity.

Every function takes post-softmax weights `[..., B, N, T, S]` (any leading axes, e.g. the layers of
`attnjax.analysis.capture(...).weights` or `PretrainedEncoder.attention_maps`), and optionally the
batch's `lengths [B]` (right padding: query rows t >= length are left out of every mean; keys past the
length already carry weight 0). Each returns one number per head `[..., N]` (or more axes, said
below), the mean over every valid query row of every example:

  entropy          H_t = -Σ_s w_ts log w_ts (nats)                      [..., N]
  key_share        Σ_{s ∈ K} w_ts for a key set K (per example)         [..., N]
  first_token_share  key_share with K = {0} (the attention-sink share)  [..., N]
  offset_profile   P(o) = mean_t w_{t, t+o}, o = -K..K                  [..., N, 2K+1]
  head_distance    D_ij = mean_t JS(w^i_t, w^j_t) between heads i, j    [..., N, N]
  head_diversity   the mean of D_ij over pairs i != j                   [...]
  summary          all of them for `[L, B, N, T, S]`, as JSON-ready lists (experiments/analyze.py)

The Jensen-Shannon distance between heads follows Clark et al., "What Does BERT Look At? An Analysis
of BERT's Attention" (arXiv:1906.04341, section 6), who cluster heads by it; the entropy and
special-token shares are their section 3 statistics. JS is in nats, so 0 <= D_ij <= log 2.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["entropy", "first_token_share", "head_distance", "head_diversity", "key_share",
           "offset_profile", "summary", "valid_rows"]


def _weights(weights) -> np.ndarray:
  w = np.asarray(weights, np.float64)
  if w.ndim < 4:
    raise ValueError(f"statistics: weights must be [..., B, N, T, S], got shape {w.shape}")
  return w


def valid_rows(weights, lengths: Optional[np.ndarray] = None) -> np.ndarray:
  """`[B, T]` float mask of the query rows the statistics average over (all when `lengths` is None)."""
  B, _, T, _ = np.shape(weights)[-4:]
  if lengths is None:
    return np.ones((B, T))
  lengths = np.asarray(lengths)
  if lengths.shape != (B,):
    raise ValueError(f"statistics: lengths must be [B] = [{B}], got shape {lengths.shape}")
  return (np.arange(T)[None] < lengths[:, None]).astype(np.float64)


def _row_mean(per_row: np.ndarray, rows: np.ndarray, extra: int = 0) -> np.ndarray:
  """Mean of `[..., B, N, T, *extra]` (`extra` trailing axes) over B and T under the `[B, T]` row
  mask -> `[..., N, *extra]`."""
  lead = per_row.ndim - extra - 3          # axes before B
  m = rows[:, None, :].reshape(rows.shape[0], 1, rows.shape[1], *([1] * extra))
  total = (per_row * m).sum(axis=(lead, lead + 2))
  return total / max(float(rows.sum()), 1.0)


def entropy(weights, lengths: Optional[np.ndarray] = None) -> np.ndarray:
  """`[..., N]`: mean over valid rows of -Σ_s w log w (0 log 0 = 0)."""
  w = _weights(weights)
  h = -np.where(w > 0, w * np.log(np.where(w > 0, w, 1.0)), 0.0).sum(-1)
  return _row_mean(h, valid_rows(w, lengths))


def key_share(weights, keys, lengths: Optional[np.ndarray] = None) -> np.ndarray:
  """`[..., N]`: mean over valid rows of the weight on the keys where `keys` (bool `[S]`, or `[B, S]`
  per example: e.g. `ids == sep_id`) is true."""
  w = _weights(weights)
  B, _, _, S = w.shape[-4:]
  k = np.asarray(keys, bool)
  if k.shape not in ((S,), (B, S)):
    raise ValueError(f"key_share: keys must be [S] = [{S}] or [B, S] = [{B}, {S}], got {k.shape}")
  k = np.broadcast_to(k, (B, S))[:, None, None, :]
  return _row_mean((w * k).sum(-1), valid_rows(w, lengths))


def first_token_share(weights, lengths: Optional[np.ndarray] = None) -> np.ndarray:
  """`[..., N]`: the mean weight on key 0 (the sink share of Gu et al., arXiv:2410.10781)."""
  S = np.shape(weights)[-1]
  return key_share(weights, np.arange(S) == 0, lengths)


def offset_profile(weights, max_offset: int, lengths: Optional[np.ndarray] = None) -> np.ndarray:
  """`[..., N, 2K+1]` with K = `max_offset`: entry K + o is the mean weight a query puts on the key o
  positions after it (o < 0: before). Rows whose key t+o falls outside the sequence count 0 there."""
  w = _weights(weights)
  T, S = w.shape[-2:]
  if max_offset < 0:
    raise ValueError(f"offset_profile: max_offset must be >= 0, got {max_offset}")
  offsets = np.arange(-max_offset, max_offset + 1)
  cols = np.arange(T)[:, None] + offsets[None]                       # [T, 2K+1]
  inside = (cols >= 0) & (cols < S)
  picked = np.take_along_axis(
      w, np.broadcast_to(np.clip(cols, 0, S - 1), w.shape[:-1] + (len(offsets),)), axis=-1)
  return _row_mean(np.where(inside, picked, 0.0), valid_rows(w, lengths), extra=1)


def head_distance(weights, lengths: Optional[np.ndarray] = None) -> np.ndarray:
  """`[..., N, N]`: mean over valid rows of the Jensen-Shannon divergence between heads' rows,
  JS(p, q) = (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2 (nats)."""
  w = _weights(weights)
  # JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2: one log per pair element.
  xlogx = lambda a: np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)
  h = -xlogx(w).sum(-1)                                                # [..., B, N, T]
  h_mix = -xlogx((w[..., :, None, :, :] + w[..., None, :, :, :]) / 2).sum(-1)   # [..., B, N, N, T]
  js = h_mix - (h[..., :, None, :] + h[..., None, :, :]) / 2
  rows = valid_rows(w, lengths)
  lead = js.ndim - 4
  total = (js * rows[:, None, None, :]).sum(axis=(lead, lead + 3))
  return total / max(float(rows.sum()), 1.0)


def head_diversity(weights, lengths: Optional[np.ndarray] = None) -> np.ndarray:
  """`[...]`: the mean JS divergence over ordered pairs of distinct heads (0 when all heads attend
  alike; log 2 when every pair of heads has disjoint supports)."""
  d = head_distance(weights, lengths)
  N = d.shape[-1]
  if N < 2:
    raise ValueError("head_diversity: needs at least 2 heads")
  return (d.sum(axis=(-1, -2)) - np.trace(d, axis1=-2, axis2=-1)) / (N * (N - 1))


def summary(weights, lengths: Optional[np.ndarray] = None, max_offset: int = 2) -> dict:
  """Every statistic above for maps `[L, B, N, T, S]`, as JSON-ready lists: per layer and head the
  entropy, first-token share and offset profile (offsets -K..K), per layer the head diversity."""
  w = _weights(weights)
  if w.ndim != 5:
    raise ValueError(f"summary: weights must be [L, B, N, T, S], got shape {w.shape}")
  return {"entropy": entropy(w, lengths).tolist(),
          "first_token_share": first_token_share(w, lengths).tolist(),
          "offsets": list(range(-max_offset, max_offset + 1)),
          "offset_profile": offset_profile(w, max_offset, lengths).tolist(),
          "head_diversity": head_diversity(w, lengths).tolist()}
