"""Inference-time interventions on attention maps, as `edit_weights` functions.

Each is a pure function of post-softmax maps `w [B, N, T, S]` (rows sum to 1 over visible keys), and
a factory returning a `WeightsEdit` `fn(w, path) -> w` for `attnjax.nn.maps.edit_weights` (or
the `edit=` of `attnjax.pretrained` encoders), which applies it in the layers named by their module
paths ("layer_2/attention") and leaves the others alone.

VAR, Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal Models",
arXiv:2503.03321 (rule of the authors' code, VisAttnSink `logic.py`):
  sink tokens: φ(x) = max_{d ∈ D_sink} |RMSNorm(x)_d| > τ (τ = 20) on the layer's hidden states;
  image-centric rows: per head and query, the image span gets Σ_img w >= `summ` (0.2) and its sink
  tokens at most a share ρ (0.5) of it; in those rows every sink column keeps a fraction p (0.6)
  and the freed (1 - p) Σ_sinks w goes to the image's non-sink tokens in proportion to their weight.
  The authors skip the first two layers and the last one: choose the paths accordingly.

ACT, Yu et al., "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models
without Training through Attention Calibration", arXiv:2406.15765 (rule of the authors' code,
GATECH-EIC/ACT `atten_process_eval`): in a calibrated head, a key s >= 1 is a sink when its mean
weight over the queries that see it exceeds a threshold (0.1); its column is scaled by β (0.4) and
each row's freed (1 - β) Σ_sinks w is given to the row's other keys in proportion to their weight.
The initial token is never calibrated. The heads are chosen per task by the authors' search.

MotionCLR, Chen et al., "MotionCLR: Motion Generation and Training-free Editing via Understanding
Attention Mechanisms", arXiv:2410.18977: (de-)emphasis multiplies a word's attention column by a
factor (not renormalized), and in-place / example-based edits replace a layer's maps by those of
another generation (`replace_maps`).

Pattern injection, Li et al., "Human Guided Exploitation of Interpretable Attention Patterns in
Summarization and Topic Segmentation", arXiv:2112.05364: fixed row-normalized patterns (matching
token, first token, local window, previous token) injected into chosen heads, mixed with the model's
map by λ (1 = replace).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import catalog
from attnjax.nn.maps import WeightsEdit

__all__ = ["attention_calibration", "calibration_edit", "first_token_pattern", "inject_patterns",
           "local_pattern", "matching_token_pattern", "previous_token_pattern", "rescale_columns",
           "rescale_edit", "replace_maps", "sink_tokens", "visual_attention_redistribution",
           "visual_redistribution_edit"]


def _check(w, fn):
  if w.ndim != 4:
    raise ValueError(f"{fn}: weights must be [B, N, T, S], got shape {w.shape}")


def _only(paths, edit) -> WeightsEdit:
  paths = set(paths)
  return lambda w, path: edit(w, path) if path in paths else w


# ----------------------------------------------------------------------------------------- VAR


def sink_tokens(hidden: jax.Array, sink_dims: Sequence[int], tau: float = 20.0) -> jax.Array:
  """bool `[B, T]`: φ(x) = max over `sink_dims` of |RMSNorm(x)_d| (no learned scale) exceeds τ."""
  x = jnp.asarray(hidden, jnp.float32)
  if x.ndim != 3:
    raise ValueError(f"sink_tokens: hidden must be [B, T, D], got shape {x.shape}")
  normed = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
  return jnp.max(jnp.abs(normed[..., list(sink_dims)]), -1) > tau


@catalog.serves(216, kind="analysis",
                name="attnjax.analysis.interventions.visual_attention_redistribution")
def visual_attention_redistribution(w: jax.Array, sinks: jax.Array, image: tuple[int, int],
                                    p: float = 0.6, rho: float = 0.5,
                                    summ: float = 0.2) -> jax.Array:
  """VAR on `w [B, N, T, S]` with sink keys `sinks` bool `[B, S]` and the image at keys
  `image = (start, stop)` (module docstring). Rows that are not image-centric, or whose image has
  no sink, are returned unchanged; every row keeps its sum."""
  _check(w, "visual_attention_redistribution")
  a, b = image
  S = w.shape[-1]
  if not 0 <= a < b <= S or jnp.shape(sinks) != (w.shape[0], S):
    raise ValueError(f"visual_attention_redistribution: need image inside [0, {S}] and sinks "
                     f"[B, S] = [{w.shape[0]}, {S}]; got {image} and {jnp.shape(sinks)}")
  keys = jnp.arange(S)
  in_image = (keys >= a) & (keys < b)
  sink = jnp.asarray(sinks, bool)[:, None, None, :]                   # [B, 1, 1, S]
  vis_sink = sink & in_image
  image_mass = jnp.sum(jnp.where(in_image, w, 0.0), -1, keepdims=True)
  sink_share = jnp.sum(jnp.where(vis_sink, w, 0.0), -1, keepdims=True) / (image_mass + 1e-6)
  chosen = (sink_share <= rho) & (image_mass >= summ) & jnp.any(vis_sink, -1, keepdims=True)
  budget = (1 - p) * jnp.sum(jnp.where(sink, w, 0.0), -1, keepdims=True)
  receivers = jnp.where(in_image & ~sink, w, 0.0)
  share = receivers / jnp.maximum(jnp.sum(receivers, -1, keepdims=True), 1e-30)
  edited = jnp.where(sink, p * w, w) + budget * share
  return jnp.where(chosen, edited, w)


@catalog.serves(216, kind="analysis",
                name="attnjax.analysis.interventions.visual_redistribution_edit")
def visual_redistribution_edit(sinks: Mapping[str, jax.Array], image: tuple[int, int],
                               p: float = 0.6, rho: float = 0.5, summ: float = 0.2) -> WeightsEdit:
  """VAR in the layers of `sinks` ({path: that layer's sink tokens [B, S]})."""
  return _only(sinks, lambda w, path: visual_attention_redistribution(w, sinks[path], image, p, rho,
                                                                      summ))


# ----------------------------------------------------------------------------------------- ACT


@catalog.serves(217, kind="analysis", name="attnjax.analysis.interventions.attention_calibration")
def attention_calibration(w: jax.Array, heads: Sequence[int], beta: float = 0.4,
                          threshold: float = 0.1, causal: bool = True) -> jax.Array:
  """ACT on `w [B, N, T, S]` in the heads `heads` (module docstring): sinks are keys s >= 1 whose
  mean weight over the queries that see them (t >= s when `causal`, else all T) exceeds
  `threshold`, per example and head. Rows keep their sums; other heads are unchanged."""
  _check(w, "attention_calibration")
  B, N, T, S = w.shape
  seen_by = jnp.maximum(T - jnp.arange(S), 1) if causal else jnp.full((S,), T)
  mean = jnp.sum(w, axis=2) / seen_by                                   # [B, N, S]
  sink = (mean > threshold) & (jnp.arange(S) >= 1)
  sink = sink[:, :, None, :]                                            # [B, N, 1, S]
  freed = (1 - beta) * jnp.sum(jnp.where(sink, w, 0.0), -1, keepdims=True)
  others = jnp.where(sink, 0.0, w)
  share = others / jnp.maximum(jnp.sum(others, -1, keepdims=True), 1e-30)
  edited = jnp.where(sink, beta * w, w) + freed * share
  # A row with nothing but sinks to give to keeps its weights (the authors' row 0).
  edited = jnp.where(jnp.sum(others, -1, keepdims=True) > 0, edited, w)
  chosen = jnp.isin(jnp.arange(N), jnp.asarray(list(heads), jnp.int32))[None, :, None, None]
  return jnp.where(chosen, edited, w)


@catalog.serves(217, kind="analysis", name="attnjax.analysis.interventions.calibration_edit")
def calibration_edit(heads: Mapping[str, Sequence[int]], beta: float = 0.4, threshold: float = 0.1,
                     causal: bool = True) -> WeightsEdit:
  """ACT in the calibrated heads `{path: [head, ...]}`."""
  return _only(heads, lambda w, path: attention_calibration(w, heads[path], beta, threshold, causal))


# ----------------------------------------------------------------------------------- MotionCLR


def rescale_columns(w: jax.Array, columns: Sequence[int], factor: float) -> jax.Array:
  """MotionCLR's (de-)emphasis: the weights on keys `columns` times `factor`, rows not renormalized
  (factor 1 is the identity; < 1 de-emphasizes, > 1 emphasizes; negative erases)."""
  _check(w, "rescale_columns")
  cols = jnp.isin(jnp.arange(w.shape[-1]), jnp.asarray(list(columns), jnp.int32))
  return jnp.where(cols, factor * w, w)


@catalog.serves(19, kind="analysis", name="attnjax.analysis.interventions.rescale_edit")
def rescale_edit(columns: Mapping[str, Sequence[int]], factor: float) -> WeightsEdit:
  """`rescale_columns` in the layers `{path: columns}`."""
  return _only(columns, lambda w, path: rescale_columns(w, columns[path], factor))


@catalog.serves(19, kind="analysis", name="attnjax.analysis.interventions.replace_maps")
def replace_maps(maps: Mapping[str, jax.Array], heads: Optional[Sequence[int]] = None) -> WeightsEdit:
  """MotionCLR's map replacement: the layers `{path: maps [B, N, T, S]}` (captured from another
  input, e.g. `enc.attention_maps(other)[layer]`) use those maps, in all heads or in `heads`."""

  def edit(w, path):
    new = jnp.asarray(maps[path], w.dtype)
    if new.shape != w.shape:
      raise ValueError(f"replace_maps: maps[{path!r}] must be {w.shape}, got {new.shape}")
    if heads is None:
      return new
    chosen = jnp.isin(jnp.arange(w.shape[1]), jnp.asarray(list(heads), jnp.int32))
    return jnp.where(chosen[None, :, None, None], new, w)

  return _only(maps, edit)


# -------------------------------------------------------------------------- pattern injection


def _normalize(m: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Rows over each example's visible keys (padding keys 0), summing to 1 (rows past the length,
  or with no key, stay 0)."""
  T = m.shape[-1]
  valid = np.arange(T)[None] < np.asarray(lengths)[:, None]            # [B, T]
  m = m * valid[:, None, :] * valid[:, :, None]
  s = m.sum(-1, keepdims=True)
  return np.where(s > 0, m / np.where(s > 0, s, 1.0), 0.0).astype(np.float32)


def matching_token_pattern(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """`[B, T, T]`: each token attends uniformly to the other occurrences of its id (itself when
  there is none)."""
  ids = np.asarray(ids)
  same = (ids[:, :, None] == ids[:, None, :]) & ~np.eye(ids.shape[1], dtype=bool)
  alone = ~same.any(-1, keepdims=True)
  return _normalize(same | (alone & np.eye(ids.shape[1], dtype=bool)), lengths)


def first_token_pattern(lengths: np.ndarray, T: int) -> np.ndarray:
  """`[B, T, T]`: every token attends to the first token."""
  m = np.zeros((len(lengths), T, T))
  m[..., 0] = 1.0
  return _normalize(m, lengths)


def local_pattern(lengths: np.ndarray, T: int, radius: int) -> np.ndarray:
  """`[B, T, T]`: uniform over the tokens at most `radius` away."""
  d = np.abs(np.arange(T)[:, None] - np.arange(T)[None])
  return _normalize(np.broadcast_to(d <= radius, (len(lengths), T, T)).astype(float), lengths)


def previous_token_pattern(lengths: np.ndarray, T: int) -> np.ndarray:
  """`[B, T, T]`: every token attends to the one before it (the first to itself)."""
  m = np.eye(T, k=-1)
  m[0, 0] = 1.0
  return _normalize(np.broadcast_to(m, (len(lengths), T, T)), lengths)


@catalog.serves(90, kind="analysis", name="attnjax.analysis.interventions.inject_patterns")
def inject_patterns(patterns: Mapping[str, Mapping[int, np.ndarray]], mix: float = 1.0) -> WeightsEdit:
  """The heads `{path: {head: pattern [B, T, S]}}` use (1 - λ) w + λ pattern, λ = `mix` (1: the
  pattern replaces the head's map)."""

  def edit(w, path):
    for head, pattern in patterns[path].items():
      pattern = jnp.asarray(pattern, w.dtype)
      if pattern.shape != w.shape[:1] + w.shape[2:]:
        raise ValueError(f"inject_patterns: the pattern of {path!r} head {head} must be "
                         f"{w.shape[:1] + w.shape[2:]} ([B, T, S]), got {pattern.shape}")
      w = w.at[:, head].set((1 - mix) * w[:, head] + mix * pattern)
    return w

  return _only(patterns, edit)
