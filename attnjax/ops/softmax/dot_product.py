"""Scaled dot-product attention, as a thin layer over flex attention.

    o = softmax(scale · q kᵀ + bias, masked) v

with the masks of the operator contract (causal, window, packed documents, padding lengths, a
boolean array), an additive bias, tanh soft-capping and GQA. Fully masked query rows return zeros.

Paper: Vaswani et al., "Attention Is All You Need", arXiv:1706.03762.
"""

from __future__ import annotations

from typing import Optional, Union

import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import flex
from attnjax.core import masks
from attnjax.core.contract import contract_mask
from attnjax.registry import Mechanism, register
from attnjax.typing import Array, Bool, Float, Key, Lengths, Output, Query, Value

__all__ = ["dot_product_attention", "softmax_attention"]

# Shapes in the signature (jaxtyping): broadcastable to [B, N, T, S].
Bias = Float[Array, "#B #N #T #S"]
Mask = Bool[Array, "#B #N #T #S"]


def dot_product_attention(q: Query, k: Key, v: Value, *,
                          bias: Optional[Bias] = None, mask: Optional[Mask] = None,
                          causal: bool = False,
                          window: Optional[Union[int, tuple[Optional[int], Optional[int]]]] = None,
                          segment_ids=None, softcap: Optional[float] = None,
                          scale: Optional[float] = None, q_offset=0,
                          kv_lengths: Optional[Lengths] = None, q_lengths: Optional[Lengths] = None,
                          implementation: Optional[str] = None) -> Output:
  """Softmax attention with bias, masks, windows, packed documents, soft-capping and GQA.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`, K dividing N.
    bias: additive logits broadcastable to `[B, N, T, S]` (4 dims); gradients flow to it.
    mask: boolean, broadcastable to `[B, N, T, S]`; True keeps the pair.
    causal: hide keys after the query position `q_offset + q_idx` (top-left aligned when q_offset=0,
      like `jax.nn.dot_product_attention(is_causal=True)`).
    window: an int `w >= 1`: the query at position p sees at most `w` keys on each allowed side,
      its own position counted (`|p - j| < w`; with `causal`, keys `p - w + 1 .. p`), the library's
      one meaning of a window (the `sliding_window` mechanism's). Or a pair of distances
      `(left, right)`, ints >= 0 or None (unbounded): keys in `[p - left, p + right]`, as
      `jax.nn.dot_product_attention(local_window_size=(left, right))`; `w` is `(w - 1, w - 1)`.
    segment_ids: `[B, T]` for self-attention or (`[B, T]`, `[B, S]`): attend within equal ids.
    softcap: if set, logits become `softcap * tanh(logits / softcap)` (after the bias).
    scale: defaults to `H ** -0.5`.
    q_offset: int or `[B]`: absolute position of the first query (decoding over a cache).
    kv_lengths, q_lengths: `[B]` valid lengths; padded keys are hidden, padded queries return zeros.
    implementation: a flex_attention implementation name, or None.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "dot_product_attention"
  B, T, S, N, _, _, _ = checks.check_qkv(op, q, k, v)
  mods = [contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset, segment_ids=segment_ids,
                        kv_lengths=kv_lengths, q_lengths=q_lengths, op=op)]
  if mask is not None:
    checks.check_broadcastable(op, "mask", mask, (B, N, T, S), "[B, N, T, S]")
    mods.append(masks.from_array(jnp.asarray(mask, bool)))
  if window is not None:
    left, right = _window_sides(op, window)
    mods.append(masks.sliding_window(left, right, offset=q_offset))
  score_mods = []
  if bias is not None:
    checks.check_broadcastable(op, "bias", bias, (B, N, T, S), "[B, N, T, S]")
    score_mods.append(masks.additive_bias(bias))
  if softcap is not None:
    score_mods.append(masks.softcap(softcap))
  return flex.flex_attention(q, k, v, score_mod=masks.compose_score_mods(*score_mods),
                             mask_mod=masks.combine_masks(*mods), scale=scale,
                             implementation=implementation)


def _window_sides(op: str, window) -> tuple[Optional[int], Optional[int]]:
  """The distances `(left, right)` of `window`: a key count `w >= 1` (any integer, numpy included)
  is `(w - 1, w - 1)`; a pair `(left, right)` of ints >= 0 or None is taken as is."""
  is_int = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool)
  if is_int(window):
    if window < 1:
      raise ValueError(f"{op}: an int `window` is the number of keys a query sees on each side, "
                       f"its own included, so it must be >= 1, got {window} (a pair (left, right) "
                       "gives distances: (0, 0) sees only the query's own position)")
    return int(window) - 1, int(window) - 1
  # Reports a malformed window by name (a 3-tuple would otherwise fail with an unpacking error).
  sides = window
  if (not isinstance(sides, (tuple, list)) or len(sides) != 2
      or not all(x is None or is_int(x) for x in sides)):
    raise ValueError(f"{op}: `window` must be an int or a pair (left, right) of ints or None, "
                     f"got {window!r}")
  for side, value in zip(("left", "right"), sides, strict=True):
    if value is not None and value < 0:
      raise ValueError(f"{op}: `window` {side} distance must be >= 0, got {window}")
  return tuple(None if x is None else int(x) for x in sides)


def softmax_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                      q_offset=0, kv_lengths: Optional[Lengths] = None,
                      scale: Optional[float] = None, implementation: Optional[str] = None
                      ) -> Output:
  """Multi-head scaled dot-product softmax attention, softmax(q kᵀ / √H) v."""
  return dot_product_attention(q, k, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                               kv_lengths=kv_lengths, scale=scale, implementation=implementation)


register(Mechanism(
    name="softmax", fn=softmax_attention, family="softmax-core", seeds=(147,),
    paper="Attention Is All You Need", arxiv="1706.03762",
    flex_mods=lambda causal, num_heads: {}))   # flex attention as it is
